//! The io_uring backend.
//!
//! One ring per engine thread, created by that thread (`SINGLE_ISSUER`, `DEFER_TASKRUN` where
//! the kernel has them). Operations are queued as submission entries and handed to the kernel
//! in one `io_uring_enter` per loop turn, together with the wait for completions. Listeners use
//! multishot accept; small frames are received by multishot receives into a ring of provided
//! buffers (Linux 6.0+), large payloads by targeted receives straight into their destination;
//! sends are vectored `sendmsg`; a wake-up is an `eventfd` read kept armed on the ring.
//!
//! Every in-flight operation's buffers live in this driver's `ops` slab, keyed by the entry's
//! `user_data`, from submission until its completion is reaped: that is the invariant each
//! `SAFETY` comment below relies on.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};
use slab::Slab;

use crate::{Completion, Op, Outcome, Pool, PoolBuf, RecvBuf, Token, Wake, Way};

const ENTRIES: u32 = 1024;
/// The provided-buffer ring for small frames: this many buffers (a power of two)...
const POOL_BUFFERS: u16 = 256;
/// ... of this many bytes each: a small frame (up to 16 KiB of payload) fits in two.
const POOL_BUFFER_SIZE: usize = 8 * 1024;
/// The buffer group id of that ring.
const POOL_GROUP: u16 = 0;

#[derive(Debug)]
enum InFlight {
    Accept {
        token: Token,
    },
    Recv {
        token: Token,
        buf: RecvBuf,
    },
    RecvPooled {
        token: Token,
    },
    Send {
        token: Token,
        bufs: Vec<Bytes>,
        skip: usize,
        /// A zero-copy send: after its result, a notification says the kernel let go of `bufs`.
        zero_copy: bool,
        _iov: Vec<libc::iovec>,
        _msg: Box<libc::msghdr>,
    },
    /// A splice that would have blocked, waiting for its socket to be ready (`POLL_ADD`): it
    /// is tried again then, on this thread. io_uring's own `SPLICE` would block a kernel worker
    /// thread instead.
    Splice {
        token: Token,
        way: Way,
        fd: RawFd,
        pipe: Arc<crate::sys::Pipe>,
        len: usize,
        /// `cancel_recv` asked for it: it ends with `ECANCELED` rather than waiting again, even
        /// if its poll completed before the cancel reached it.
        cancelled: bool,
    },
    Wake {
        _buf: Box<u64>,
    },
    Cancel,
}

/// `IORING_ENTER_GETEVENTS`: the enter reaps completions (and runs deferred task work).
const ENTER_GETEVENTS: u32 = 1;

/// The io_uring driver.
pub struct Driver {
    ring: IoUring,
    ops: Slab<InFlight>,
    accepts: HashMap<Token, usize>,
    wake_fd: Arc<EventFd>,
    wake_armed: bool,
    /// Completions reaped while making room to submit (see `push`), for the next `wait`.
    backlog: Vec<Completion>,
    /// Provided buffers for pooled receives, when the kernel has them (6.0+).
    ring_bufs: Option<BufRing>,
    /// The receive in flight (targeted or pooled) of each token, for `cancel_recv`.
    recvs: HashMap<Token, usize>,
    /// The kernel has `SENDMSG_ZC` (Linux 6.1+).
    zero_copy: bool,
}

/// A ring of provided buffers registered with the kernel: the kernel takes buffers from its
/// head for pooled receives, the driver puts them back at its tail.
struct BufRing {
    /// `POOL_BUFFERS` ring entries, page-aligned, registered under `POOL_GROUP`.
    entries: Arc<Pool>,
    /// The buffers the entries point to.
    pool: Arc<Pool>,
    tail: u16,
}

impl BufRing {
    /// Registers a ring with every buffer of a fresh pool in it.
    fn register(ring: &IoUring) -> io::Result<BufRing> {
        let oom = || io::Error::from(io::ErrorKind::OutOfMemory);
        let entry_size = std::mem::size_of::<types::BufRingEntry>();
        let entries = Pool::new(entry_size * POOL_BUFFERS as usize, 1).ok_or_else(oom)?;
        let pool = Pool::new(POOL_BUFFER_SIZE, POOL_BUFFERS as usize).ok_or_else(oom)?;
        let mut r = BufRing {
            entries,
            pool,
            tail: 0,
        };
        // The tail field lives inside the ring memory; it starts at 0 (fresh memory is not
        // zeroed, so write it before the kernel looks).
        r.store_tail();
        // SAFETY: the entries' memory is page-aligned, holds POOL_BUFFERS entries and stays
        // alive (an `Arc` in this driver) until the ring is unregistered in `Drop`; the kernel
        // pins it meanwhile.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                r.entries.addr(0) as u64,
                POOL_BUFFERS,
                POOL_GROUP,
                0,
            )?;
        }
        for id in 0..POOL_BUFFERS {
            r.put(id);
        }
        r.store_tail();
        Ok(r)
    }

    /// Writes entry `tail` for buffer `id` (published by `store_tail`).
    fn put(&mut self, id: u16) {
        let base = self.entries.addr(0) as *mut types::BufRingEntry;
        let slot = (self.tail & (POOL_BUFFERS - 1)) as usize;
        // SAFETY: `slot` < POOL_BUFFERS entries of the ring's memory; the kernel does not read an
        // entry at or past the published tail, so writing it races with nothing.
        let e = unsafe { &mut *base.add(slot) };
        e.set_addr(self.pool.addr(id) as u64);
        e.set_len(POOL_BUFFER_SIZE as u32);
        e.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the entries written so far to the kernel.
    fn store_tail(&self) {
        let base = self.entries.addr(0) as *const types::BufRingEntry;
        // SAFETY: the tail is the u16 the kernel reads at this offset of the ring's first entry
        // (what `BufRingEntry::tail` computes), aligned for an atomic u16; the release store
        // orders the entry writes before it.
        unsafe {
            let tail = types::BufRingEntry::tail(base) as *const std::sync::atomic::AtomicU16;
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("uring::Driver")
            .field("in_flight", &self.ops.len())
            .finish()
    }
}

#[derive(Debug)]
struct EventFd(OwnedFd);

impl Wake for EventFd {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let r = unsafe {
            libc::write(
                self.0.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            // EAGAIN: the counter is saturated, so a wake-up is pending anyway.
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::error!("waking the uring driver failed: {e}");
            }
        }
    }
}

impl Driver {
    /// Creates a ring and checks that the kernel has every operation daffi uses.
    pub fn new() -> io::Result<Driver> {
        // Multishot accept shares its opcode with plain accept, so the probe below cannot see
        // it: it arrived in Linux 5.19.
        if let Some(v) = crate::sys::kernel_version() {
            if v < (5, 19) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("Linux {}.{} lacks multishot accept (5.19+)", v.0, v.1),
                ));
            }
        }
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .build(ENTRIES)
            .or_else(|_| IoUring::builder().build(ENTRIES))?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::AcceptMulti::CODE, "accept"),
            (opcode::Recv::CODE, "recv"),
            (opcode::SendMsg::CODE, "sendmsg"),
            (opcode::Read::CODE, "read"),
            (opcode::AsyncCancel::CODE, "async cancel"),
            (opcode::PollAdd::CODE, "poll add"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring lacks {name}"),
                ));
            }
        }
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring without EXT_ARG (kernel < 5.11)",
            ));
        }
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor owned by nobody else.
        let wake_fd = Arc::new(EventFd(unsafe { OwnedFd::from_raw_fd(efd) }));
        let zero_copy = probe.is_supported(opcode::SendMsgZc::CODE);
        // Pooled (multishot) receives arrived in Linux 6.0; without them receives are targeted.
        let multishot_recv = crate::sys::kernel_version().is_some_and(|v| v >= (6, 0));
        let ring_bufs = if multishot_recv && std::env::var_os("DAFFI_NO_POOLED_RECV").is_none() {
            match BufRing::register(&ring) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::debug!("no provided-buffer ring ({e}): receives are targeted");
                    None
                }
            }
        } else {
            None
        };
        let mut d = Driver {
            ring,
            ops: Slab::with_capacity(256),
            accepts: HashMap::new(),
            wake_fd,
            wake_armed: false,
            backlog: Vec::new(),
            ring_bufs,
            recvs: HashMap::new(),
            zero_copy,
        };
        d.arm_wake();
        Ok(d)
    }

    fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every pointer in `sqe` refers to memory owned by `self.ops` (or by the
            // caller's slab entry created just before), which lives until the completion.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            // The queue is full: hand what is there to the kernel and retry. The kernel refuses
            // new work (EBUSY) while completions it could not post wait: reap them first, kept
            // for the next `wait`, so that this loop always makes progress.
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) {
                    tracing::error!("io_uring submit failed: {e}");
                }
            }
            self.reap_into_backlog();
        }
    }

    fn reap_into_backlog(&mut self) {
        let cqes: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        // `complete` may push (re-arming the wake-up), and so come back here: append.
        let mut reaped = Vec::new();
        for (key, res, flags) in cqes {
            self.complete(key as usize, res, flags, &mut reaped);
        }
        self.backlog.append(&mut reaped);
    }

    /// Asks the kernel to cancel the operation in slab entry `key`.
    fn cancel(&mut self, key: usize) {
        let cancel = self.ops.insert(InFlight::Cancel);
        let sqe = opcode::AsyncCancel::new(key as u64)
            .build()
            .user_data(cancel as u64);
        self.push(sqe);
    }

    fn arm_wake(&mut self) {
        let mut buf = Box::new(0u64);
        let ptr = &mut *buf as *mut u64 as *mut u8;
        let key = self.ops.insert(InFlight::Wake { _buf: buf });
        let sqe = opcode::Read::new(types::Fd(self.wake_fd.0.as_raw_fd()), ptr, 8)
            .build()
            .user_data(key as u64);
        self.push(sqe);
        self.wake_armed = true;
    }

    /// Tries a splice now; if the socket is not ready, waits for it with a `POLL_ADD`.
    fn try_splice(
        &mut self,
        token: Token,
        way: Way,
        fd: RawFd,
        pipe: Arc<crate::sys::Pipe>,
        len: usize,
        out: &mut Vec<Completion>,
    ) {
        match way.splice(&pipe, fd, len) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mask = match way {
                    Way::In => libc::POLLIN,
                    Way::Out => libc::POLLOUT,
                };
                let key = self.ops.insert(InFlight::Splice {
                    token,
                    way,
                    fd,
                    pipe,
                    len,
                    cancelled: false,
                });
                if way == Way::In {
                    self.recvs.insert(token, key);
                }
                let sqe = opcode::PollAdd::new(types::Fd(fd), mask as u32)
                    .build()
                    .user_data(key as u64);
                self.push(sqe);
            }
            res => out.push(Completion {
                token,
                outcome: Outcome::Spliced { pipe, res },
            }),
        }
    }

    /// A splice submitted: tried at once; its result is reported by the next `wait`.
    fn submit_splice(
        &mut self,
        token: Token,
        way: Way,
        fd: RawFd,
        pipe: Arc<crate::sys::Pipe>,
        len: usize,
    ) {
        let mut done = Vec::new();
        self.try_splice(token, way, fd, pipe, len, &mut done);
        self.backlog.append(&mut done);
    }

    fn complete(&mut self, key: usize, res: i32, flags: u32, out: &mut Vec<Completion>) {
        let err = || io::Error::from_raw_os_error(-res);
        match &self.ops[key] {
            InFlight::Accept { token } => {
                let token = *token;
                let more = cqueue::more(flags);
                if !more {
                    self.ops.remove(key);
                    self.accepts.remove(&token);
                }
                let res = if res >= 0 {
                    // SAFETY: a successful accept completion carries a new descriptor we own.
                    Ok(unsafe { OwnedFd::from_raw_fd(res as RawFd) })
                } else {
                    Err(err())
                };
                out.push(Completion {
                    token,
                    outcome: Outcome::Accepted { res, more },
                });
            }
            InFlight::Recv { .. } => {
                let InFlight::Recv { token, mut buf } = self.ops.remove(key) else {
                    unreachable!()
                };
                self.recvs.remove(&token);
                let res = if res >= 0 {
                    // SAFETY: the kernel wrote `res` bytes at the target we lent it, and never
                    // more than the room we gave.
                    unsafe { buf.filled(res as usize) };
                    Ok(res as usize)
                } else {
                    Err(err())
                };
                out.push(Completion {
                    token,
                    outcome: Outcome::Recv { buf, res },
                });
            }
            InFlight::RecvPooled { token } => {
                let token = *token;
                let more = cqueue::more(flags);
                if !more {
                    self.ops.remove(key);
                    self.recvs.remove(&token);
                }
                let mut buf = None;
                let res = if res >= 0 {
                    match (cqueue::buffer_select(flags), &self.ring_bufs) {
                        (Some(id), Some(r)) if (id as usize) < r.pool.count() => {
                            // SAFETY: the kernel wrote `res` bytes to buffer `id`, which it took
                            // from the ring and no longer uses; it comes back via `recycle`.
                            buf = Some(unsafe { PoolBuf::new(r.pool.clone(), id, res as usize) });
                        }
                        _ if res == 0 => {}
                        // Bytes the driver cannot show: the stream is broken from here on.
                        _ => {
                            return out.push(Completion {
                                token,
                                outcome: Outcome::Pooled {
                                    buf: None,
                                    res: Err(io::Error::other(
                                        "a pooled receive completed without a valid buffer",
                                    )),
                                    more,
                                },
                            });
                        }
                    }
                    Ok(res as usize)
                } else {
                    Err(err())
                };
                out.push(Completion {
                    token,
                    outcome: Outcome::Pooled { buf, res, more },
                });
            }
            InFlight::Send { .. } if cqueue::notif(flags) => {
                // The kernel let go of a zero-copy send's buffers.
                self.ops.remove(key);
            }
            InFlight::Send {
                token,
                bufs,
                skip,
                zero_copy,
                ..
            } => {
                // A zero-copy send whose notification is still to come keeps its buffers here
                // until then: the runtime gets handles to the same memory.
                let (token, bufs, skip) = if *zero_copy && cqueue::more(flags) {
                    (*token, bufs.clone(), *skip)
                } else {
                    let InFlight::Send {
                        token, bufs, skip, ..
                    } = self.ops.remove(key)
                    else {
                        unreachable!()
                    };
                    (token, bufs, skip)
                };
                let res = if res >= 0 {
                    Ok(res as usize)
                } else {
                    Err(err())
                };
                out.push(Completion {
                    token,
                    outcome: Outcome::Sent { bufs, skip, res },
                });
            }
            InFlight::Splice { .. } => {
                let InFlight::Splice {
                    token,
                    way,
                    fd,
                    pipe,
                    len,
                    cancelled,
                } = self.ops.remove(key)
                else {
                    unreachable!()
                };
                if way == Way::In {
                    self.recvs.remove(&token);
                }
                if res < 0 || cancelled {
                    // Cancelled (`cancel_recv`) or a bad descriptor.
                    let e = if cancelled {
                        io::Error::from_raw_os_error(libc::ECANCELED)
                    } else {
                        err()
                    };
                    out.push(Completion {
                        token,
                        outcome: Outcome::Spliced { pipe, res: Err(e) },
                    });
                } else {
                    self.try_splice(token, way, fd, pipe, len, out);
                }
            }
            InFlight::Wake { .. } => {
                self.ops.remove(key);
                self.wake_armed = false;
            }
            InFlight::Cancel => {
                self.ops.remove(key);
            }
        }
    }
}

impl crate::Driver for Driver {
    fn submit(&mut self, token: Token, op: Op) {
        match op {
            Op::Accept { fd } => {
                let key = self.ops.insert(InFlight::Accept { token });
                self.accepts.insert(token, key);
                let sqe = opcode::AcceptMulti::new(types::Fd(fd))
                    .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
                    .build()
                    .user_data(key as u64);
                self.push(sqe);
            }
            Op::Recv { fd, mut buf, max } => {
                // The target's memory is on the heap (a Vec's block or a RawBuf, which promises
                // not to move), so moving `buf` into the slab below keeps `ptr` valid.
                let (ptr, room) = buf.target(max);
                let max = room.min(u32::MAX as usize);
                let key = self.ops.insert(InFlight::Recv { token, buf });
                self.recvs.insert(token, key);
                let sqe = opcode::Recv::new(types::Fd(fd), ptr, max as u32)
                    .build()
                    .user_data(key as u64);
                self.push(sqe);
            }
            Op::RecvPooled { fd } => {
                if self.ring_bufs.is_none() {
                    self.backlog.push(Completion {
                        token,
                        outcome: Outcome::Pooled {
                            buf: None,
                            res: Err(io::Error::new(
                                io::ErrorKind::Unsupported,
                                "no provided-buffer ring",
                            )),
                            more: false,
                        },
                    });
                    return;
                }
                let key = self.ops.insert(InFlight::RecvPooled { token });
                self.recvs.insert(token, key);
                let sqe = opcode::RecvMulti::new(types::Fd(fd), POOL_GROUP)
                    .build()
                    .user_data(key as u64);
                self.push(sqe);
            }
            Op::Send {
                fd,
                bufs,
                skip,
                zero_copy,
            } => {
                let zero_copy = zero_copy && self.zero_copy;
                let iov = crate::iovecs(&bufs, skip, crate::MAX_IOV);
                // SAFETY: an all-zero msghdr is valid (no name, no control data).
                let mut msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
                msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = iov.len() as _;
                let msg_ptr = &*msg as *const libc::msghdr;
                let key = self.ops.insert(InFlight::Send {
                    token,
                    bufs,
                    skip,
                    zero_copy,
                    _iov: iov,
                    _msg: msg,
                });
                let sqe = if zero_copy {
                    opcode::SendMsgZc::new(types::Fd(fd), msg_ptr)
                        .flags(libc::MSG_NOSIGNAL as u32)
                        .build()
                } else {
                    opcode::SendMsg::new(types::Fd(fd), msg_ptr)
                        .flags(libc::MSG_NOSIGNAL as u32)
                        .build()
                };
                self.push(sqe.user_data(key as u64));
            }
            Op::SpliceIn { fd, pipe, len } => self.submit_splice(token, Way::In, fd, pipe, len),
            Op::SpliceOut { fd, pipe, len } => self.submit_splice(token, Way::Out, fd, pipe, len),
        }
    }

    fn cancel_accept(&mut self, token: Token) {
        if let Some(&key) = self.accepts.get(&token) {
            self.cancel(key);
        }
    }

    fn close(&mut self, fd: OwnedFd) {
        drop(fd);
    }

    fn pooled_recv(&self) -> bool {
        self.ring_bufs.is_some()
    }

    fn zero_copy_send(&self) -> bool {
        self.zero_copy
    }

    fn splice(&self) -> bool {
        true
    }

    fn cancel_recv(&mut self, token: Token, _fd: RawFd) {
        if let Some(&key) = self.recvs.get(&token) {
            if let Some(InFlight::Splice { cancelled, .. }) = self.ops.get_mut(key) {
                *cancelled = true;
            }
            self.cancel(key);
        }
    }

    fn recycle(&mut self, buf: PoolBuf) {
        if let Some(r) = &mut self.ring_bufs {
            r.put(buf.id());
            r.store_tail();
        }
    }

    fn wait(&mut self, out: &mut Vec<Completion>, timeout: Option<Duration>) -> io::Result<()> {
        if !self.wake_armed {
            self.arm_wake();
        }
        out.append(&mut self.backlog);
        let want = if self.ring.completion().is_empty() && out.is_empty() {
            1
        } else {
            0
        };
        let r = match timeout {
            // Only a look: run the deferred task work (which posts what arrived) and reap,
            // without the kernel arming a timer and scheduling, as a zero timeout would.
            Some(t) if want > 0 && t.is_zero() => {
                let pending = self.ring.submission().len() as u32;
                // SAFETY: `enter` with no argument (`None`, so no size or pointer is read);
                // GETEVENTS with `min_complete` 0 never waits.
                unsafe {
                    self.ring
                        .submitter()
                        .enter::<libc::sigset_t>(pending, 0, ENTER_GETEVENTS, None)
                }
            }
            Some(t) if want > 0 => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            _ => self.ring.submitter().submit_and_wait(want),
        };
        match r {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        let cqes: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (key, res, flags) in cqes {
            self.complete(key as usize, res, flags, out);
        }
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.wake_fd.clone()
    }

    fn name(&self) -> &'static str {
        "uring"
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Buffers of operations still in flight must outlive the kernel's use of them: cancel
        // everything and reap until the slab is empty (bounded, in case a kernel misbehaves).
        // SAFETY: AsyncCancel2 with ANY touches no user memory.
        let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(u64::MAX);
        // SAFETY: see above; the entry holds no pointers.
        let _ = unsafe { self.ring.submission().push(&sqe) };
        for _ in 0..100 {
            if self.ops.is_empty() {
                break;
            }
            let _ = self.ring.submitter().submit_with_args(
                1,
                &types::SubmitArgs::new()
                    .timespec(&types::Timespec::from(Duration::from_millis(10))),
            );
            let cqes: Vec<(u64, i32, u32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags()))
                .collect();
            let mut sink = Vec::new();
            for (key, res, flags) in cqes {
                if key != u64::MAX && self.ops.contains(key as usize) {
                    self.complete(key as usize, res, flags, &mut sink);
                }
            }
        }
        if !self.ops.is_empty() {
            // Leak rather than free memory the kernel may still write to.
            std::mem::forget(std::mem::take(&mut self.ops));
            if let Some(r) = self.ring_bufs.take() {
                std::mem::forget(r);
            }
        } else if self.ring_bufs.is_some() {
            let _ = self.ring.submitter().unregister_buf_ring(POOL_GROUP);
        }
    }
}
