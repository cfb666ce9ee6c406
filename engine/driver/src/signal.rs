//! A readiness signal for a foreign event loop (asyncio's `add_reader`, for one): a descriptor
//! that becomes readable when [`ReadySignal::raise`] is called, until [`ReadySignal::drain`].
//!
//! # Portability
//! An `eventfd` on Linux, a non-blocking pipe elsewhere.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// See the module documentation.
#[derive(Debug)]
pub struct ReadySignal {
    /// The end to watch (and, for an eventfd, to write too).
    read: OwnedFd,
    /// A pipe's write end; `None` for an eventfd.
    write: Option<OwnedFd>,
}

impl ReadySignal {
    #[cfg(target_os = "linux")]
    pub fn new() -> io::Result<ReadySignal> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ReadySignal {
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            read: unsafe { OwnedFd::from_raw_fd(fd) },
            write: None,
        })
    }

    #[cfg(not(target_os = "linux"))]
    pub fn new() -> io::Result<ReadySignal> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a live array of two ints, as pipe() requires.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&read, &write] {
            crate::sys::set_nonblocking(fd.as_raw_fd())?;
            // SAFETY: fcntl on a descriptor we own, no pointers.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        Ok(ReadySignal {
            read,
            write: Some(write),
        })
    }

    /// The descriptor to watch for readability.
    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Makes the descriptor readable (a no-op when it already is and the signal is full).
    pub fn raise(&self) {
        let one: u64 = 1;
        let fd = self.write.as_ref().unwrap_or(&self.read).as_raw_fd();
        let len = if self.write.is_some() { 1 } else { 8 };
        // SAFETY: writes `len` (at most 8) bytes from a live u64 to a descriptor we own.
        let r = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, len) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // Full: the descriptor is readable anyway.
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::error!("raising a ready signal failed: {e}");
            }
        }
    }

    /// Whether the descriptor is readable now.
    pub fn is_raised(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.read.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    /// Makes the descriptor unreadable again.
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: reads at most 64 bytes into a live local array.
            let r = unsafe {
                libc::read(
                    self.read.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            // An eventfd is emptied by one read; a pipe may need several.
            if r <= 0 || self.write.is_none() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_and_drain() {
        let s = ReadySignal::new().unwrap();
        assert!(!s.is_raised());
        s.raise();
        s.raise();
        assert!(s.is_raised());
        s.drain();
        assert!(!s.is_raised());
    }
}
