//! Completion-based socket I/O for daffi's engine.
//!
//! The runtime hands an operation and the buffers it needs to a [`Driver`]; the driver gives
//! the buffers back, with the result, in a [`Completion`]. The caller never touches a buffer
//! while the kernel may use it, which is what io_uring requires and what makes the two backends
//! interchangeable:
//!
//! ```text
//!   runtime ── submit(token, Op{fd, buffers}) ──► Driver ──► kernel
//!   runtime ◄── Completion{token, Outcome{buffers, result}} ── wait()
//! ```
//!
//! - [`uring::Driver`] (Linux, cargo feature `io-uring`): one io_uring, multishot accept,
//!   vectored sends, batched submission.
//! - [`poll::Driver`]: mio (epoll on Linux, kqueue on macOS); operations are tried at once and
//!   parked until the socket is ready.
//!
//! The driver knows nothing of frames or protocols. Nearly all of daffi's `unsafe` lives here.
//!
//! # Portability
//! The poll backend works wherever mio does (Unix). The uring backend needs Linux 5.19 or later
//! (multishot accept); [`AnyDriver::new`] probes for it and falls back to poll.

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub mod buf;
pub mod poll;
pub mod signal;
pub mod sys;

pub use buf::{Body, HeapBuf, Pool, PoolBuf, RawBuf, RecvBuf};
pub use signal::ReadySignal;
#[cfg(all(target_os = "linux", feature = "io-uring"))]
pub mod uring;

/// Identifies an operation to its submitter; returned in its completions.
pub type Token = u64;

/// An operation on a socket. Buffers are owned by the operation until it completes.
#[derive(Debug)]
pub enum Op {
    /// Accept connections until cancelled: one completion per connection.
    Accept { fd: RawFd },
    /// Receive at most `max` bytes into the free part of `buf`.
    Recv { fd: RawFd, buf: RecvBuf, max: usize },
    /// Receive until cancelled, each time into a buffer the driver picks from its pool: one
    /// [`Outcome::Pooled`] per arrival. Only where [`Driver::pooled_recv`] says so.
    RecvPooled { fd: RawFd },
    /// Send the concatenation of `bufs`, less its first `skip` bytes. May send only part.
    /// With `zero_copy`, where [`Driver::zero_copy_send`] says so, the kernel sends from the
    /// buffers' own pages (io_uring `SENDMSG_ZC`) instead of copying them first; the driver
    /// keeps them alive until the kernel is done with them, after the completion.
    Send {
        fd: RawFd,
        bufs: Vec<Bytes>,
        skip: usize,
        zero_copy: bool,
    },
    /// Move up to `len` bytes that arrive on socket `fd` into `pipe`, without copying them to
    /// user space; completes once some moved (or at end of stream, or on an error). When bytes
    /// wait but the pipe has no room for them, it completes at once with `StorageFull`
    /// (`ENOSPC`): submit it again once the pipe was drained. Only where [`Driver::splice`]
    /// says so. Counts as the descriptor's receive.
    SpliceIn {
        fd: RawFd,
        pipe: Arc<sys::Pipe>,
        len: usize,
    },
    /// Move up to `len` bytes from `pipe` (which holds at least that many) to socket `fd`;
    /// completes once some moved. Counts as the descriptor's send.
    SpliceOut {
        fd: RawFd,
        pipe: Arc<sys::Pipe>,
        len: usize,
    },
}

/// The result of an operation, with its buffers.
#[derive(Debug)]
pub enum Outcome {
    /// One accepted connection (or error). `more` is false on the last completion of this
    /// accept operation (after a cancel or a fatal error).
    Accepted {
        res: io::Result<OwnedFd>,
        more: bool,
    },
    /// Bytes received; the filled part of `buf` has grown by that many. `Ok(0)` is end of
    /// stream.
    Recv {
        buf: RecvBuf,
        res: io::Result<usize>,
    },
    /// Bytes received into a pool buffer (`buf` is `Some` when `res` is `Ok(n)`, n > 0): hand
    /// it back with [`Driver::recycle`] once read. `more` is false on the operation's last
    /// completion: at end of stream (`Ok(0)`), after [`Driver::cancel_recv`] (`ECANCELED`),
    /// when the pool ran dry (`ENOBUFS`: start it again) or on an error.
    Pooled {
        buf: Option<PoolBuf>,
        res: io::Result<usize>,
        more: bool,
    },
    /// Bytes sent.
    Sent {
        bufs: Vec<Bytes>,
        skip: usize,
        res: io::Result<usize>,
    },
    /// Bytes moved by [`Op::SpliceIn`] (`Ok(0)`: end of stream) or [`Op::SpliceOut`].
    Spliced {
        pipe: Arc<sys::Pipe>,
        res: io::Result<usize>,
    },
}

/// Whether a pooled receive that ended with `e` is simply started again: it was cancelled
/// ([`Driver::cancel_recv`]) or the pool ran dry for a moment.
pub fn pooled_restart(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECANCELED | libc::ENOBUFS))
}

/// Which way a splice goes, for the drivers: from the socket into the pipe
/// ([`Op::SpliceIn`]), or out of the pipe to the socket ([`Op::SpliceOut`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Way {
    In,
    Out,
}

impl Way {
    /// One non-blocking splice of up to `len` bytes between socket `fd` and `pipe`.
    pub(crate) fn splice(self, pipe: &sys::Pipe, fd: RawFd, len: usize) -> io::Result<usize> {
        match self {
            Way::In => pipe.fill_from(fd, len),
            Way::Out => pipe.drain_to(fd, len),
        }
    }
}

/// Whether an [`Op::SpliceIn`] ended with `e` because its pipe had no room.
pub fn pipe_full(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

/// Whether an operation ended with `e` because it was cancelled.
pub fn cancelled(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ECANCELED)
}

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    pub token: Token,
    pub outcome: Outcome,
}

/// Wakes a driver blocked in [`Driver::wait`] from another thread.
pub trait Wake: Send + Sync + std::fmt::Debug {
    fn wake(&self);
}

/// What every backend does.
pub trait Driver {
    /// Starts `op`; its completion carries `token`.
    fn submit(&mut self, token: Token, op: Op);
    /// Stops an [`Op::Accept`] started with `token`; its last completion has `more == false`.
    fn cancel_accept(&mut self, token: Token);
    /// Forgets `fd` and closes it. Every operation on it must have completed (after
    /// [`sys::shutdown`], pending receives complete with end of stream).
    fn close(&mut self, fd: OwnedFd);
    /// Waits until at least one completion is ready, a wake-up arrives or `timeout` passes, and
    /// appends every ready completion to `out`.
    fn wait(&mut self, out: &mut Vec<Completion>, timeout: Option<Duration>) -> io::Result<()>;
    /// Whether [`Op::RecvPooled`] is available.
    fn pooled_recv(&self) -> bool {
        false
    }
    /// Stops the receive started with `token` on `fd` ([`Op::Recv`] or [`Op::RecvPooled`]): it
    /// completes with `ECANCELED` unless it completed already (a pooled one: its last
    /// completion has `more == false`).
    fn cancel_recv(&mut self, _token: Token, _fd: RawFd) {}
    /// Gives a pool buffer back, for the kernel to fill again.
    fn recycle(&mut self, _buf: PoolBuf) {}
    /// Whether [`Op::Send`]'s `zero_copy` does anything here.
    fn zero_copy_send(&self) -> bool {
        false
    }
    /// Whether [`Op::SpliceIn`] and [`Op::SpliceOut`] are available (Linux).
    fn splice(&self) -> bool {
        false
    }
    /// Another thread receives on `fd` for a while (`lent`), or no longer: meanwhile the driver
    /// does not watch it for reading (it would wake for data it must not touch). Only while no
    /// receive is in flight on `fd`.
    fn lend(&mut self, _fd: RawFd, _lent: bool) {}
    /// A handle other threads use to interrupt [`Driver::wait`].
    fn waker(&self) -> std::sync::Arc<dyn Wake>;
    /// `"uring"` or `"poll"`.
    fn name(&self) -> &'static str;
}

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// io_uring when the kernel allows it, else poll.
    Auto,
    Uring,
    Poll,
}

impl Backend {
    /// Parses `auto`, `uring` or `poll` (as in `DAFFI_BACKEND`).
    pub fn parse(s: &str) -> Option<Backend> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Some(Backend::Auto),
            "uring" | "io_uring" | "io-uring" => Some(Backend::Uring),
            "poll" | "epoll" | "mio" => Some(Backend::Poll),
            _ => None,
        }
    }
}

/// A driver of either kind, picked at run time.
#[derive(Debug)]
pub enum AnyDriver {
    #[cfg(all(target_os = "linux", feature = "io-uring"))]
    Uring(Box<uring::Driver>),
    Poll(poll::Driver),
}

impl AnyDriver {
    /// Builds the requested backend. `Auto` falls back to poll with one log line when io_uring
    /// is unavailable (old kernel, seccomp, `io_uring_disabled`); an explicit `Uring` fails.
    pub fn new(backend: Backend) -> io::Result<AnyDriver> {
        match backend {
            Backend::Poll => Ok(AnyDriver::Poll(poll::Driver::new()?)),
            #[cfg(all(target_os = "linux", feature = "io-uring"))]
            Backend::Uring => Ok(AnyDriver::Uring(Box::new(uring::Driver::new()?))),
            #[cfg(not(all(target_os = "linux", feature = "io-uring")))]
            Backend::Uring => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring backend not built in (Linux with cargo feature `io-uring` only)",
            )),
            #[cfg(all(target_os = "linux", feature = "io-uring"))]
            Backend::Auto => match uring::Driver::new() {
                Ok(d) => Ok(AnyDriver::Uring(Box::new(d))),
                Err(e) => {
                    tracing::warn!("io_uring unavailable ({e}); using the poll backend");
                    Ok(AnyDriver::Poll(poll::Driver::new()?))
                }
            },
            #[cfg(not(all(target_os = "linux", feature = "io-uring")))]
            Backend::Auto => Ok(AnyDriver::Poll(poll::Driver::new()?)),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            #[cfg(all(target_os = "linux", feature = "io-uring"))]
            AnyDriver::Uring($d) => $e,
            AnyDriver::Poll($d) => $e,
        }
    };
}

impl Driver for AnyDriver {
    fn submit(&mut self, token: Token, op: Op) {
        dispatch!(self, d => d.submit(token, op))
    }
    fn cancel_accept(&mut self, token: Token) {
        dispatch!(self, d => d.cancel_accept(token))
    }
    fn close(&mut self, fd: OwnedFd) {
        dispatch!(self, d => d.close(fd))
    }
    fn wait(&mut self, out: &mut Vec<Completion>, timeout: Option<Duration>) -> io::Result<()> {
        dispatch!(self, d => d.wait(out, timeout))
    }
    fn pooled_recv(&self) -> bool {
        dispatch!(self, d => d.pooled_recv())
    }
    fn cancel_recv(&mut self, token: Token, fd: RawFd) {
        dispatch!(self, d => d.cancel_recv(token, fd))
    }
    fn recycle(&mut self, buf: PoolBuf) {
        dispatch!(self, d => d.recycle(buf))
    }
    fn zero_copy_send(&self) -> bool {
        dispatch!(self, d => d.zero_copy_send())
    }
    fn splice(&self) -> bool {
        dispatch!(self, d => d.splice())
    }
    fn lend(&mut self, fd: RawFd, lent: bool) {
        dispatch!(self, d => d.lend(fd, lent))
    }
    fn waker(&self) -> std::sync::Arc<dyn Wake> {
        dispatch!(self, d => d.waker())
    }
    fn name(&self) -> &'static str {
        dispatch!(self, d => d.name())
    }
}

/// Builds the iovec list for the unsent part of `bufs` (at most `max` entries).
pub(crate) fn iovecs(bufs: &[Bytes], mut skip: usize, max: usize) -> Vec<libc::iovec> {
    let mut v = Vec::with_capacity(bufs.len().min(max));
    for b in bufs {
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        if v.len() == max {
            break;
        }
        let rest = &b[skip..];
        skip = 0;
        v.push(libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        });
    }
    v
}

/// Most iovecs one send takes (Linux's UIO_MAXIOV is 1024).
pub(crate) const MAX_IOV: usize = 512;
