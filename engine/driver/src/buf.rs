//! Receive buffers that are not `Vec`s: memory handed to the kernel that belongs to someone
//! else, such as a Python `bytes` object that the payload will become.

use std::any::Any;
use std::fmt;

/// Memory the kernel may receive into.
///
/// # Safety
/// `as_mut_ptr()` and `as_ptr()` return the same address, valid for reads and writes of
/// `capacity()` bytes, which nothing else reads or writes while the value lives and which does
/// not move when the value (or its box) moves.
pub unsafe trait RawBuf: Send + fmt::Debug + 'static {
    fn as_ptr(&self) -> *const u8;
    fn as_mut_ptr(&mut self) -> *mut u8;
    fn capacity(&self) -> usize;
    /// For the owner to recognise its concrete type.
    fn as_any(&self) -> &dyn Any;
    /// For the owner to get its concrete type back.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// A `RawBuf` on the Rust heap, for when no one else provides memory. Its bytes start
/// uninitialised: only the part a [`Body`] has filled is ever read.
#[derive(Debug)]
pub struct HeapBuf {
    mem: Vec<u8>,
    len: usize,
}

impl HeapBuf {
    /// Room for `len` bytes (on huge pages where the system allows), or `None` when the
    /// allocation fails.
    pub fn new(len: usize) -> Option<HeapBuf> {
        let mut mem = Vec::new();
        mem.try_reserve_exact(len).ok()?;
        crate::sys::advise_huge(mem.as_mut_ptr(), len);
        Some(HeapBuf { mem, len })
    }
}

// SAFETY: the vector's block holds at least `len` bytes, is owned, never reallocated (its
// length stays 0, nothing pushes) and only reachable through `self`.
unsafe impl RawBuf for HeapBuf {
    fn as_ptr(&self) -> *const u8 {
        self.mem.as_ptr()
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.mem.as_mut_ptr()
    }
    fn capacity(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// A large payload being received into a [`RawBuf`]: the buffer and how much of it is filled.
pub struct Body {
    raw: Box<dyn RawBuf>,
    len: usize,
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body")
            .field("len", &self.len)
            .field("capacity", &self.raw.capacity())
            .finish()
    }
}

impl Body {
    pub fn new(raw: Box<dyn RawBuf>) -> Body {
        Body { raw, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.raw.capacity()
    }

    pub fn is_full(&self) -> bool {
        self.len == self.raw.capacity()
    }

    /// Appends `bytes`.
    ///
    /// # Panics
    /// If they do not fit (a runtime bug: bodies are sized from the frame header).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        assert!(
            bytes.len() <= self.raw.capacity() - self.len,
            "body overflow"
        );
        // SAFETY: the destination range lies within the buffer's capacity (checked above) and
        // cannot overlap `bytes`, which the caller borrows from elsewhere.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.raw.as_mut_ptr().add(self.len),
                bytes.len(),
            )
        };
        self.len += bytes.len();
    }

    /// The unfilled tail: where the kernel writes next.
    pub(crate) fn spare(&mut self) -> (*mut u8, usize) {
        let cap = self.raw.capacity();
        // SAFETY: `len <= capacity`, so the offset stays within the buffer.
        (
            unsafe { self.raw.as_mut_ptr().add(self.len) },
            cap - self.len,
        )
    }

    /// Records that the kernel filled `n` more bytes.
    pub(crate) fn advance(&mut self, n: usize) {
        assert!(
            n <= self.raw.capacity() - self.len,
            "kernel reported more bytes than lent"
        );
        self.len += n;
    }

    /// The filled part.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written (by `extend_from_slice` or the kernel) and
        // the RawBuf contract keeps them valid and unaliased for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.raw.as_ptr(), self.len) }
    }

    /// The buffer, for its owner to recognise (see [`RawBuf::as_any`]).
    pub fn raw(&self) -> &dyn RawBuf {
        &*self.raw
    }

    /// The buffer, for its owner to downcast (see [`RawBuf::into_any`]).
    pub fn into_raw(self) -> Box<dyn RawBuf> {
        self.raw
    }
}

/// What a receive writes into.
#[derive(Debug)]
pub enum RecvBuf {
    /// The spare capacity of a vector; its length grows.
    Vec(Vec<u8>),
    /// The unfilled tail of a large payload.
    Body(Body),
}

impl RecvBuf {
    /// Destination pointer and room for a receive of at most `max` bytes.
    pub(crate) fn target(&mut self, max: usize) -> (*mut u8, usize) {
        match self {
            RecvBuf::Vec(v) => {
                let room = (v.capacity() - v.len()).min(max);
                // SAFETY: `len <= capacity`: the pointer stays within the allocation.
                (unsafe { v.as_mut_ptr().add(v.len()) }, room)
            }
            RecvBuf::Body(b) => {
                let (p, room) = b.spare();
                (p, room.min(max))
            }
        }
    }

    /// Records that the kernel wrote `n` bytes at the target.
    ///
    /// # Safety
    /// The kernel must actually have initialised `n` bytes at the pointer returned by
    /// [`RecvBuf::target`], and `n` must not exceed the room it returned.
    pub(crate) unsafe fn filled(&mut self, n: usize) {
        match self {
            // SAFETY: per this function's contract the bytes are initialised and in capacity.
            RecvBuf::Vec(v) => unsafe { v.set_len(v.len() + n) },
            RecvBuf::Body(b) => b.advance(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_fills_and_hands_back_its_buffer() {
        let mut b = Body::new(Box::new(HeapBuf::new(6).unwrap()));
        b.extend_from_slice(b"abc");
        let (_, room) = RecvBuf::Body(Body::new(Box::new(HeapBuf::new(4).unwrap()))).target(10);
        assert_eq!(room, 4);
        b.extend_from_slice(b"def");
        assert!(b.is_full());
        assert_eq!(b.as_slice(), b"abcdef");
        assert!(b.into_raw().into_any().downcast::<HeapBuf>().is_ok());
    }
}
