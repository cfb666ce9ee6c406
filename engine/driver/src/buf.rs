//! Receive buffers that are not `Vec`s: memory handed to the kernel that belongs to someone
//! else, such as a Python `bytes` object that the payload will become.

use std::alloc::Layout;
use std::any::Any;
use std::fmt;
use std::sync::Arc;

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

/// A block of equal receive buffers that the kernel picks from (io_uring's provided buffers),
/// `count` buffers of `size` bytes each, at `base`, page-aligned. Shared (`Arc`) by the driver
/// and every [`PoolBuf`], so the memory outlives all of them.
pub struct Pool {
    base: *mut u8,
    size: usize,
    count: usize,
    layout: Layout,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("size", &self.size)
            .field("count", &self.count)
            .finish()
    }
}

// SAFETY: the block is plain memory owned by the pool. Who may write where is decided by
// ownership of buffer ids (the kernel while a buffer is in its ring, one `PoolBuf` otherwise),
// never by the thread.
unsafe impl Send for Pool {}
// SAFETY: as above; `&Pool` only gives out addresses and reads through `PoolBuf`.
unsafe impl Sync for Pool {}

impl Pool {
    /// `count` buffers of `size` bytes (both non-zero), or `None` when the memory cannot be had.
    pub fn new(size: usize, count: usize) -> Option<Arc<Pool>> {
        let len = size.checked_mul(count).filter(|l| *l > 0)?;
        let layout = Layout::from_size_align(len, 4096).ok()?;
        // SAFETY: the layout has a non-zero size (checked above).
        let base = unsafe { std::alloc::alloc(layout) };
        if base.is_null() {
            return None;
        }
        Some(Arc::new(Pool {
            base,
            size,
            count,
            layout,
        }))
    }

    /// Bytes per buffer.
    pub fn size(&self) -> usize {
        self.size
    }

    /// How many buffers.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Where buffer `id` starts.
    ///
    /// # Panics
    /// If `id` is not below [`Pool::count`].
    pub fn addr(&self, id: u16) -> *mut u8 {
        assert!((id as usize) < self.count, "no buffer {id} in the pool");
        // SAFETY: `id * size` lies within the block (checked above).
        unsafe { self.base.add(id as usize * self.size) }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout; the last `Arc` is going away, so no
        // `PoolBuf` can read it any more (and the driver unregistered it from the kernel).
        unsafe { std::alloc::dealloc(self.base, self.layout) }
    }
}

/// One buffer of a [`Pool`] that the kernel filled and handed over: readable until it is given
/// back to the driver (`Driver::recycle`), which returns it to the kernel. Dropping it without
/// giving it back keeps the buffer out of the kernel's reach for good (the pool shrinks).
pub struct PoolBuf {
    pool: Arc<Pool>,
    id: u16,
    len: usize,
}

impl fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuf")
            .field("id", &self.id)
            .field("len", &self.len)
            .finish()
    }
}

impl PoolBuf {
    /// Buffer `id` of `pool`, whose first `len` bytes the kernel filled.
    ///
    /// # Safety
    /// The kernel must have written `len` bytes (at most the buffer size) to buffer `id` and
    /// handed it over: nothing else writes to it until this value is given back.
    #[cfg_attr(not(all(target_os = "linux", feature = "io-uring")), allow(dead_code))]
    pub(crate) unsafe fn new(pool: Arc<Pool>, id: u16, len: usize) -> PoolBuf {
        assert!(
            len <= pool.size,
            "kernel reported more bytes than the buffer holds"
        );
        PoolBuf { pool, id, len }
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    /// The received bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: per `new`'s contract the first `len` bytes of buffer `id` are initialised and
        // nobody writes them while this value lives; the `Arc` keeps the memory alive.
        unsafe { std::slice::from_raw_parts(self.pool.addr(self.id), self.len) }
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
    fn pool_buffers_are_disjoint_and_aligned() {
        let pool = Pool::new(4096, 8).unwrap();
        assert_eq!(pool.addr(0) as usize % 4096, 0);
        assert_eq!(pool.addr(3) as usize - pool.addr(2) as usize, 4096);
        // SAFETY: nothing else uses buffer 5; its first 3 bytes are written just below.
        let b = unsafe {
            std::ptr::copy_nonoverlapping(b"abc".as_ptr(), pool.addr(5), 3);
            PoolBuf::new(pool.clone(), 5, 3)
        };
        assert_eq!(b.as_slice(), b"abc");
        assert_eq!(b.id(), 5);
    }

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
