//! Plain socket system calls used by both backends and by the runtime's setup code.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use crate::RecvBuf;

/// A listening TCP socket (non-blocking, `SO_REUSEADDR`, close-on-exec) and its bound address.
pub fn listen_tcp(host: &str, port: u16) -> io::Result<(OwnedFd, SocketAddr)> {
    let l = TcpListener::bind((host, port))?;
    l.set_nonblocking(true)?;
    let addr = l.local_addr()?;
    Ok((OwnedFd::from(l), addr))
}

/// A listening Unix socket. A stale socket file at `path` (no one listening) is removed first;
/// a live one is an `AddrInUse` error, and a path that is not a socket is left alone (an error).
pub fn listen_unix(path: &Path) -> io::Result<OwnedFd> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            Err(_) => std::fs::remove_file(path)?,
        }
    }
    let l = UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(OwnedFd::from(l))
}

/// Connects over TCP within `timeout` (every resolved address is tried), then makes the socket
/// non-blocking with `TCP_NODELAY`.
pub fn connect_tcp(host: &str, port: u16, timeout: Duration) -> io::Result<OwnedFd> {
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{host} resolves to no address"),
    );
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                s.set_nonblocking(true)?;
                tune_tcp(s.as_raw_fd());
                return Ok(OwnedFd::from(s));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Connects to a Unix socket within `timeout` and makes it non-blocking.
///
/// A Unix-socket connect never waits for the server to accept: it succeeds at once or fails
/// with `EAGAIN` while the server's backlog is full. The blocking form would wait without a
/// limit in that case, so the non-blocking form is retried until `timeout`.
pub fn connect_unix(path: &Path, timeout: Duration) -> io::Result<OwnedFd> {
    let deadline = std::time::Instant::now() + timeout;
    let addr = std::os::unix::net::SocketAddr::from_pathname(path)?;
    loop {
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let stream = UnixStream::from(fd);
        match connect_unix_once(&stream, &addr) {
            Ok(()) => return Ok(OwnedFd::from(stream)),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the server's backlog stayed full",
                ));
            }
            Err(e) => return Err(e),
        }
    }
}

fn connect_unix_once(stream: &UnixStream, addr: &std::os::unix::net::SocketAddr) -> io::Result<()> {
    let path = addr
        .as_pathname()
        .ok_or_else(|| io::Error::other("unnamed unix address"))?;
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid (empty) Unix address.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= sun.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "unix socket path too long",
        ));
    }
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in sun.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `sun` is a valid sockaddr_un that lives across the call; `len` covers the family
    // and the NUL-terminated path within it.
    let r = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            &sun as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Prepares an accepted socket: non-blocking, and for TCP `TCP_NODELAY` plus keep-alive.
pub fn prepare_accepted(fd: &OwnedFd) -> io::Result<()> {
    set_nonblocking(fd.as_raw_fd())?;
    tune_tcp(fd.as_raw_fd());
    Ok(())
}

/// `TCP_NODELAY`, and keep-alive probes after 10 s of silence, every 5 s, 3 times: a peer whose
/// host vanished (a half-open connection) is detected in about 25 s even when nothing is sent.
/// Errors (a Unix socket has no TCP options) are ignored.
fn tune_tcp(fd: RawFd) {
    let opts: [(libc::c_int, libc::c_int, libc::c_int); 5] = [
        (libc::IPPROTO_TCP, libc::TCP_NODELAY, 1),
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ];
    for (level, name, value) in opts {
        // SAFETY: `fd` is an open socket; the value points to a live c_int of the given size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; F_GETFL/F_SETFL touch no memory.
    let r = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Shuts both directions of a socket down: the peer sees end of stream and pending receives
/// complete, so the descriptor can be closed once its operations are back.
pub fn shutdown(fd: RawFd) {
    // SAFETY: shutdown touches no memory; an already closed/invalid fd just returns an error.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// `recv` into the free part of `buf`, at most `max` bytes; records what was filled.
pub fn recv(fd: RawFd, buf: &mut RecvBuf, max: usize) -> io::Result<usize> {
    let (ptr, room) = buf.target(max);
    // SAFETY: `ptr` points at `room` writable bytes owned by `buf`, which nothing else
    // references during the call.
    let n = unsafe { libc::recv(fd, ptr as *mut libc::c_void, room, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel initialised exactly `n <= room` bytes at `ptr`.
    unsafe { buf.filled(n as usize) };
    Ok(n as usize)
}

/// Whether the peer of connected socket `fd` is on this host: a Unix socket, or TCP to a
/// loopback address. Unknown (an error) counts as local.
pub fn peer_is_local(fd: RawFd) -> bool {
    // SAFETY: an all-zero sockaddr_storage is valid; getpeername writes at most `len` bytes
    // into it and the new length into `len`, both live on this stack frame.
    let (storage, r) = unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let r = libc::getpeername(fd, &mut storage as *mut _ as *mut libc::sockaddr, &mut len);
        (storage, r)
    };
    if r != 0 {
        return true;
    }
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(&storage as *const _ as *const libc::sockaddr_in) };
            std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).is_loopback()
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(&storage as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        _ => true,
    }
}

/// Waits until `fd` has something to read (data, end of stream or an error) or `alarm` (see
/// [`Alarm`]) is raised, at most `timeout`: which of the two are ready (neither when the time
/// ran out). A signal ends the wait early as if `fd` were ready, so that the caller tries its
/// read and sees nothing yet.
pub fn wait_either(
    fd: RawFd,
    alarm: Option<&Alarm>,
    timeout: Duration,
) -> io::Result<(bool, bool)> {
    let watch = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [watch(fd), watch(alarm.map_or(-1, |a| a.rx.as_raw_fd()))];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // Round up, so that a sub-millisecond wait does not become a busy loop.
    let ms = if ms == 0 && !timeout.is_zero() { 1 } else { ms };
    // SAFETY: two valid pollfds on the stack (a negative fd is ignored by poll), of which the
    // kernel only writes `revents`.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok((true, false))
        } else {
            Err(e)
        };
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
}

/// A wake-up another thread can raise to end a [`wait_either`]: raised until cleared.
#[derive(Debug)]
pub struct Alarm {
    tx: UnixStream,
    rx: UnixStream,
}

impl Alarm {
    pub fn new() -> io::Result<Alarm> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(Alarm { tx, rx })
    }

    /// Raises it (at once; a full pipe means it is raised already).
    pub fn raise(&self) {
        let _ = (&self.tx).write(&[1]);
    }

    /// Lowers it; true if it was raised.
    pub fn clear(&self) -> bool {
        let mut raised = false;
        let mut buf = [0u8; 64];
        while matches!((&self.rx).read(&mut buf), Ok(n) if n > 0) {
            raised = true;
        }
        raised
    }
}

/// Asks for transparent huge pages on a large buffer before it is first written, so that
/// filling it takes one page fault per 2 MiB instead of one per 4 KiB. Advisory: errors (no
/// THP support, unaligned edges) are ignored.
pub fn advise_huge(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).div_ceil(HUGE) * HUGE;
        let end = (ptr as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: madvise only changes paging hints for whole pages inside the caller's
            // allocation ([start, end) lies within [ptr, ptr + len)); no memory is accessed.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// `sendmsg` of the unsent part of `bufs`, with `MSG_NOSIGNAL` (a closed peer is an error, not
/// a signal).
pub fn send(fd: RawFd, bufs: &[Bytes], skip: usize) -> io::Result<usize> {
    send_at_most(fd, bufs, skip, usize::MAX)
}

/// [`send`] of at most `max` bytes (`max` > 0).
pub fn send_at_most(fd: RawFd, bufs: &[Bytes], skip: usize, max: usize) -> io::Result<usize> {
    let mut iov = crate::iovecs(bufs, skip, crate::MAX_IOV);
    let mut left = max;
    iov.retain_mut(|v| {
        let keep = left > 0;
        v.iov_len = v.iov_len.min(left);
        left -= v.iov_len;
        keep
    });
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: `msg` points at `iov`, whose entries point into `bufs`; all outlive the call.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `accept4` with close-on-exec and non-blocking set on the new socket.
pub fn accept(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed by accept4; flags are valid.
    let r = unsafe {
        libc::accept4(
            fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r) })
}

/// Sum of the lengths of `bufs`.
pub fn total_len(bufs: &[Bytes]) -> usize {
    bufs.iter().map(Bytes::len).sum()
}

/// Keeps glibc from returning multi-MiB blocks to the kernel after each use: payloads up to
/// 32 MiB (glibc's largest mmap threshold) are then served from memory that is already mapped, instead of fresh pages the kernel
/// must fault in and zero on every message (the dominant cost of large transfers otherwise).
/// Up to 128 MiB of freed memory may stay mapped. Larger payloads still use their own mappings.
/// Threads started afterwards (the engine's among them) share the main arena: a secondary arena
/// maps a fresh 64 MiB heap whenever two large payloads are alive at once and unmaps it when
/// they are freed, so every message would fault its pages in again.
/// No effect on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation parameters; it takes plain integers.
    unsafe {
        // Each returns 0 when glibc refuses the value; the defaults then stay, which is safe.
        let ok = libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20) == 1
            && libc::mallopt(libc::M_ARENA_MAX, 1) == 1;
        if !ok {
            tracing::debug!("glibc refused part of daffi's allocator tuning");
        }
    }
}

/// The running kernel's `(major, minor)` version, when it can be read.
pub fn kernel_version() -> Option<(u32, u32)> {
    // SAFETY: an all-zero utsname is a valid buffer for uname to fill.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a live, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    // SAFETY: uname NUL-terminates `release` within the array.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A kernel pipe through which a Router passes a payload from one socket to another without it
/// entering user space (`splice(2)`): the pages the sender's kernel filled are handed on by
/// reference. Both ends are non-blocking. Linux only: elsewhere [`Pipe::new`] fails.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A pipe that holds up to `size` bytes, or its default size where the system's limits
    /// (`/proc/sys/fs/pipe-max-size`, the per-user pipe budget) refuse more.
    #[cfg(not(target_os = "linux"))]
    pub fn new(_size: usize) -> io::Result<Pipe> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "splice is Linux only",
        ))
    }

    /// A pipe that holds up to `size` bytes, or its default size where the system's limits
    /// (`/proc/sys/fs/pipe-max-size`, the per-user pipe budget) refuse more.
    #[cfg(target_os = "linux")]
    pub fn new(size: usize) -> io::Result<Pipe> {
        use std::os::fd::FromRawFd;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the two-element array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: F_SETPIPE_SZ and F_GETPIPE_SZ take an int (or nothing) and touch no memory.
        let capacity = unsafe {
            match libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size) {
                n if n > 0 => n,
                _ => libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ),
            }
        };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            read,
            write,
            capacity: capacity as usize,
        })
    }

    /// The most bytes the pipe holds (fewer when the bytes come in many small pieces).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves up to `len` bytes that arrived on socket `fd` into the pipe: `Ok(0)` is the end of
    /// the stream, `WouldBlock` that nothing arrived, `StorageFull` (`ENOSPC`) that the pipe
    /// has no room for the bytes waiting.
    pub fn fill_from(&self, fd: RawFd, len: usize) -> io::Result<usize> {
        match splice(fd, self.write.as_raw_fd(), len) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && unread(fd) > 0 => {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            r => r,
        }
    }

    /// Moves up to `len` bytes from the pipe to socket `fd`: `WouldBlock` when the socket has
    /// no room (or the pipe is empty).
    pub fn drain_to(&self, fd: RawFd, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), fd, len)
    }
}

/// Blocks SIGPIPE for the calling thread. `splice(2)` into a socket whose peer is gone has no
/// `MSG_NOSIGNAL`: the kernel raises SIGPIPE at the thread, which would end the whole process
/// wherever the signal is not ignored (an embedding program, a Python started without its
/// signal handlers). Blocked, the splice just fails with `EPIPE`. For the engine threads.
pub fn block_sigpipe() {
    // SAFETY: the set is a local initialised by sigemptyset before use; pthread_sigmask reads
    // it and changes only this thread's mask (no old mask is asked for).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Bytes waiting to be read on socket `fd` (0 when unknown).
fn unread(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into the live local it is given.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    if r < 0 { 0 } else { n.max(0) as usize }
}

#[cfg(not(target_os = "linux"))]
fn splice(_from: RawFd, _to: RawFd, _len: usize) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "splice is Linux only",
    ))
}

#[cfg(target_os = "linux")]
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: splice between two descriptors without offsets (both are a socket or a pipe)
        // touches no user memory.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
