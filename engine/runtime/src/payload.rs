//! Received payloads, and where large ones are received into.

use std::sync::OnceLock;

use bytes::Bytes;
use daffi_driver::{Body, HeapBuf, RawBuf};

/// A received payload: small ones were parsed out of the connection's staging buffer, large
/// ones were received straight into a buffer of their own (see [`set_body_allocator`]).
#[derive(Debug)]
pub enum Payload {
    Inline(Vec<u8>),
    Body(Body),
}

impl Payload {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Inline(v) => v,
            Payload::Body(b) => b.as_slice(),
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload as `Bytes`, without copying it.
    pub fn into_bytes(self) -> Bytes {
        match self {
            Payload::Inline(v) => Bytes::from(v),
            Payload::Body(b) => Bytes::from_owner(BodyBytes(b)),
        }
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Payload {}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Payload {
        Payload::Inline(v)
    }
}

struct BodyBytes(Body);

impl AsRef<[u8]> for BodyBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// Provides the buffer for a large payload of the given length, or `None` to let the engine
/// use its own heap buffer.
pub type BodyAllocator = dyn Fn(usize) -> Option<Box<dyn RawBuf>> + Send + Sync;

static ALLOCATOR: OnceLock<Box<BodyAllocator>> = OnceLock::new();

/// Installs the process-wide allocator for large payloads (once; later calls are ignored). A
/// binding uses it to receive payloads into memory that becomes its own object, so that no
/// copy is made after the kernel's. It runs on the engine thread.
pub fn set_body_allocator(f: Box<BodyAllocator>) {
    let _ = ALLOCATOR.set(f);
}

/// A buffer for a large payload that stays with the engine (a Router's): never the binding's.
pub(crate) fn alloc_heap(len: usize) -> Option<Body> {
    Some(Body::new(Box::new(HeapBuf::new(len)?)))
}

pub(crate) fn alloc_body(len: usize) -> Option<Body> {
    if let Some(raw) = ALLOCATOR.get().and_then(|f| f(len)) {
        if raw.capacity() == len {
            return Some(Body::new(raw));
        }
        tracing::error!("body allocator returned {} bytes for {len}", raw.capacity());
    }
    alloc_heap(len)
}
