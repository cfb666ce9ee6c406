//! Large payloads are received straight into the `bytes` object Python code gets.
//!
//! When a large request or response starts arriving, its receiver (the engine thread, or a
//! caller or worker thread reading its own socket) asks for its buffer; for payloads of at
//! least [`PY_BODY_MIN`] bytes we create an uninitialised `bytes` object of exactly that size
//! (holding the GIL only for that) and let the kernel write into it. The finished object is
//! handed over as is: no copy after the kernel's.

use std::any::Any;

use daffi_runtime::{Payload, RawBuf};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// Smaller payloads are received into engine memory and copied (cheaper than taking the GIL).
pub const PY_BODY_MIN: usize = 1 << 20;

/// A fresh `bytes` object that the kernel fills before any Python code sees it.
#[derive(Debug)]
struct PyBytesBuf {
    obj: Py<PyBytes>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the object is referenced only by this value until it is handed to Python, and the
// pointer is into that object's own data; a Py<T> may be dropped on any thread (the decref is
// deferred until the GIL is held).
unsafe impl Send for PyBytesBuf {}

// SAFETY: `ptr` is the data of a bytes object of `len` bytes that nothing else references (see
// `alloc`); the object (and so its data) lives as long as `self`, and CPython never moves it.
unsafe impl RawBuf for PyBytesBuf {
    fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
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

/// The engine's body allocator (see `daffi_runtime::set_body_allocator`).
pub fn alloc(len: usize) -> Option<Box<dyn RawBuf>> {
    if len < PY_BODY_MIN {
        return None;
    }
    let size = pyo3::ffi::Py_ssize_t::try_from(len).ok()?;
    // Not during interpreter shutdown (try_attach refuses): the engine's own buffer serves then.
    Python::try_attach(|py| {
        // SAFETY: a NULL source with a size asks CPython for a new, uninitialised bytes object
        // of that size; the GIL is held. A NULL result is a MemoryError, cleared below.
        let raw = unsafe { pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), size) };
        if raw.is_null() {
            let _ = PyErr::take(py);
            return None;
        }
        // SAFETY: `raw` is a new reference to a bytes object; ownership moves into `obj`.
        let obj: Py<PyBytes> = unsafe {
            Bound::from_owned_ptr(py, raw)
                .cast_into_unchecked()
                .unbind()
        };
        // SAFETY: `raw` is a live bytes object; its data pointer stays valid while `obj` lives.
        let ptr = unsafe { pyo3::ffi::PyBytes_AsString(raw) } as *mut u8;
        daffi_runtime::advise_huge(ptr, len);
        Some(Box::new(PyBytesBuf { obj, ptr, len }) as Box<dyn RawBuf>)
    })
    .flatten()
}

/// A received payload as a Python `bytes`: the object itself when the kernel wrote into it, a
/// copy of engine memory otherwise.
pub fn payload_bytes(py: Python<'_>, payload: Payload) -> Bound<'_, PyBytes> {
    match payload {
        Payload::Body(body) if body.raw().as_any().is::<PyBytesBuf>() && body.is_full() => {
            let buf = body
                .into_raw()
                .into_any()
                .downcast::<PyBytesBuf>()
                .expect("checked type");
            buf.obj.into_bound(py)
        }
        other => PyBytes::new(py, other.as_slice()),
    }
}
