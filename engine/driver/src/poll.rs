//! The readiness backend on mio (epoll on Linux, kqueue on the BSDs and macOS).
//!
//! Every operation is tried at once, which is the common fast path (a send to a socket with
//! room, a receive of data already queued). What would block is parked on its descriptor and
//! retried when mio reports the descriptor ready. Descriptors are registered edge-triggered for
//! both directions the first time an operation uses them.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll};

use crate::{Completion, Op, Outcome, RecvBuf, Token, Wake, Way, sys};

const WAKE: mio::Token = mio::Token(usize::MAX);

#[derive(Debug, Default)]
struct Parked {
    registered: bool,
    accept: Option<Token>,
    recv: Option<(Token, RecvBuf, usize)>,
    send: Option<(Token, Vec<Bytes>, usize)>,
    splice_in: Option<(Token, Arc<sys::Pipe>, usize)>,
    splice_out: Option<(Token, Arc<sys::Pipe>, usize)>,
    /// The last receive took less than it had room for: the socket was empty then, and (the
    /// readiness being edge-triggered) the next receive waits for the next event instead of
    /// trying at once, a system call that would only find nothing.
    drained: bool,
    /// An event said the peer closed its side (or the socket failed): the end of the stream
    /// may wait behind the bytes a receive takes, with no event to come for it, so receives
    /// are always tried at once.
    read_closed: bool,
}

/// The mio-based driver.
#[derive(Debug)]
pub struct Driver {
    poll: Poll,
    events: Events,
    waker: Arc<MioWaker>,
    fds: HashMap<RawFd, Parked>,
    accept_fds: HashMap<Token, RawFd>,
    ready: VecDeque<Completion>,
}

#[derive(Debug)]
struct MioWaker(mio::Waker);

impl Wake for MioWaker {
    fn wake(&self) {
        if let Err(e) = self.0.wake() {
            tracing::error!("waking the poll driver failed: {e}");
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Driver {
    pub fn new() -> io::Result<Driver> {
        let poll = Poll::new()?;
        let waker = Arc::new(MioWaker(mio::Waker::new(poll.registry(), WAKE)?));
        Ok(Driver {
            poll,
            events: Events::with_capacity(1024),
            waker,
            fds: HashMap::new(),
            accept_fds: HashMap::new(),
            ready: VecDeque::new(),
        })
    }

    fn parked(&mut self, fd: RawFd) -> io::Result<&mut Parked> {
        let p = self.fds.entry(fd).or_default();
        if !p.registered {
            self.poll.registry().register(
                &mut SourceFd(&fd),
                mio::Token(fd as usize),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            p.registered = true;
        }
        Ok(p)
    }

    fn try_accept(&mut self, fd: RawFd) {
        let Some(p) = self.fds.get_mut(&fd) else {
            return;
        };
        let Some(token) = p.accept else { return };
        loop {
            match sys::accept(fd) {
                Ok(s) => self.ready.push_back(Completion {
                    token,
                    outcome: Outcome::Accepted {
                        res: Ok(s),
                        more: true,
                    },
                }),
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A connection that died in the backlog: skip it.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                // Out of descriptors or memory: the backlog cannot be drained now, and with
                // edge-triggered readiness no new event would come for it. End this accept
                // (as io_uring ends a multishot accept) so that its owner starts it again.
                Err(e) => {
                    p.accept = None;
                    self.accept_fds.remove(&token);
                    self.ready.push_back(Completion {
                        token,
                        outcome: Outcome::Accepted {
                            res: Err(e),
                            more: false,
                        },
                    });
                    return;
                }
            }
        }
    }

    fn try_recv(&mut self, fd: RawFd) {
        let Some(p) = self.fds.get_mut(&fd) else {
            return;
        };
        let Some((token, mut buf, max)) = p.recv.take() else {
            return;
        };
        let room = buf.target(max).1;
        let res = loop {
            match sys::recv(fd, &mut buf, max) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        p.drained = !p.read_closed && matches!(res, Ok(n) if n > 0 && n < room);
        match res {
            Err(e) if would_block(&e) => p.recv = Some((token, buf, max)),
            res => self.ready.push_back(Completion {
                token,
                outcome: Outcome::Recv { buf, res },
            }),
        }
    }

    fn try_send(&mut self, fd: RawFd) {
        let Some(p) = self.fds.get_mut(&fd) else {
            return;
        };
        let Some((token, bufs, skip)) = p.send.take() else {
            return;
        };
        let res = loop {
            match sys::send(fd, &bufs, skip) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        match res {
            Err(e) if would_block(&e) => p.send = Some((token, bufs, skip)),
            res => self.ready.push_back(Completion {
                token,
                outcome: Outcome::Sent { bufs, skip, res },
            }),
        }
    }

    fn try_splice(&mut self, fd: RawFd, way: Way) {
        let Some(p) = self.fds.get_mut(&fd) else {
            return;
        };
        let slot = match way {
            Way::In => &mut p.splice_in,
            Way::Out => &mut p.splice_out,
        };
        let Some((token, pipe, len)) = slot.take() else {
            return;
        };
        match way.splice(&pipe, fd, len) {
            Err(e) if would_block(&e) => *slot = Some((token, pipe, len)),
            res => self.ready.push_back(Completion {
                token,
                outcome: Outcome::Spliced { pipe, res },
            }),
        }
    }

    fn fail(&mut self, token: Token, op: Op, e: io::Error) {
        let outcome = match op {
            Op::Accept { .. } => Outcome::Accepted {
                res: Err(e),
                more: false,
            },
            Op::Recv { buf, .. } => Outcome::Recv { buf, res: Err(e) },
            Op::RecvPooled { .. } => Outcome::Pooled {
                buf: None,
                res: Err(e),
                more: false,
            },
            Op::Send { bufs, skip, .. } => Outcome::Sent {
                bufs,
                skip,
                res: Err(e),
            },
            Op::SpliceIn { pipe, .. } | Op::SpliceOut { pipe, .. } => {
                Outcome::Spliced { pipe, res: Err(e) }
            }
        };
        self.ready.push_back(Completion { token, outcome });
    }
}

impl crate::Driver for Driver {
    fn submit(&mut self, token: Token, op: Op) {
        let fd = match &op {
            Op::Accept { fd }
            | Op::Recv { fd, .. }
            | Op::Send { fd, .. }
            | Op::SpliceIn { fd, .. }
            | Op::SpliceOut { fd, .. } => *fd,
            Op::RecvPooled { .. } => {
                let e = io::Error::new(io::ErrorKind::Unsupported, "no pooled receives on poll");
                return self.fail(token, op, e);
            }
        };
        let p = match self.parked(fd) {
            Ok(p) => p,
            Err(e) => return self.fail(token, op, e),
        };
        match op {
            Op::Accept { .. } => {
                p.accept = Some(token);
                self.accept_fds.insert(token, fd);
                self.try_accept(fd);
            }
            Op::Recv { buf, max, .. } => {
                debug_assert!(p.recv.is_none(), "two receives on one descriptor");
                p.recv = Some((token, buf, max));
                if !p.drained {
                    self.try_recv(fd);
                }
            }
            Op::RecvPooled { .. } => unreachable!("refused above"),
            Op::Send { bufs, skip, .. } => {
                debug_assert!(p.send.is_none(), "two sends on one descriptor");
                p.send = Some((token, bufs, skip));
                self.try_send(fd);
            }
            Op::SpliceIn { pipe, len, .. } => {
                debug_assert!(
                    p.recv.is_none() && p.splice_in.is_none(),
                    "two receives on one descriptor"
                );
                p.splice_in = Some((token, pipe, len));
                self.try_splice(fd, Way::In);
            }
            Op::SpliceOut { pipe, len, .. } => {
                debug_assert!(
                    p.send.is_none() && p.splice_out.is_none(),
                    "two sends on one descriptor"
                );
                p.splice_out = Some((token, pipe, len));
                self.try_splice(fd, Way::Out);
            }
        }
    }

    fn cancel_accept(&mut self, token: Token) {
        if let Some(fd) = self.accept_fds.remove(&token) {
            if let Some(p) = self.fds.get_mut(&fd) {
                p.accept = None;
            }
            self.ready.push_back(Completion {
                token,
                outcome: Outcome::Accepted {
                    res: Err(io::Error::from_raw_os_error(libc::ECANCELED)),
                    more: false,
                },
            });
        }
    }

    fn cancel_recv(&mut self, token: Token, fd: RawFd) {
        let Some(p) = self.fds.get_mut(&fd) else {
            return;
        };
        let cancelled = || Err(io::Error::from_raw_os_error(libc::ECANCELED));
        if p.recv.as_ref().is_some_and(|(t, _, _)| *t == token) {
            let (token, buf, _) = p.recv.take().expect("checked above");
            self.ready.push_back(Completion {
                token,
                outcome: Outcome::Recv {
                    buf,
                    res: cancelled(),
                },
            });
        }
        if p.splice_in.as_ref().is_some_and(|(t, _, _)| *t == token) {
            let (token, pipe, _) = p.splice_in.take().expect("checked above");
            self.ready.push_back(Completion {
                token,
                outcome: Outcome::Spliced {
                    pipe,
                    res: cancelled(),
                },
            });
        }
    }

    fn lend(&mut self, fd: RawFd, lent: bool) {
        let Some(p) = self.fds.get_mut(&fd) else {
            return;
        };
        // Whoever borrowed it read what it read: nothing is known of the socket now.
        p.drained = false;
        if !p.registered {
            return;
        }
        debug_assert!(
            p.recv.is_none() && p.splice_in.is_none(),
            "lending a descriptor with a receive parked"
        );
        let interest = if lent {
            Interest::WRITABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        // Re-registering reports readiness afresh, so nothing that arrived meanwhile is missed.
        if let Err(e) =
            self.poll
                .registry()
                .reregister(&mut SourceFd(&fd), mio::Token(fd as usize), interest)
        {
            tracing::warn!("re-registering descriptor {fd} failed: {e}");
        }
    }

    fn close(&mut self, fd: OwnedFd) {
        let raw = fd.as_raw_fd();
        if let Some(p) = self.fds.remove(&raw) {
            debug_assert!(
                p.recv.is_none()
                    && p.send.is_none()
                    && p.splice_in.is_none()
                    && p.splice_out.is_none(),
                "closing a descriptor with operations"
            );
            if p.registered {
                let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
            }
        }
        drop(fd);
    }

    fn wait(&mut self, out: &mut Vec<Completion>, timeout: Option<Duration>) -> io::Result<()> {
        let timeout = if self.ready.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        let ready: Vec<(RawFd, bool, bool, bool)> = self
            .events
            .iter()
            .filter(|e| e.token() != WAKE)
            .map(|e| {
                let err = e.is_error() || e.is_read_closed() || e.is_write_closed();
                (
                    e.token().0 as RawFd,
                    e.is_readable() || err,
                    e.is_writable() || err,
                    e.is_error() || e.is_read_closed(),
                )
            })
            .collect();
        for (fd, readable, writable, read_closed) in ready {
            if readable {
                if let Some(p) = self.fds.get_mut(&fd) {
                    p.drained = false;
                    p.read_closed |= read_closed;
                }
                self.try_accept(fd);
                self.try_recv(fd);
                self.try_splice(fd, Way::In);
            }
            if writable {
                self.try_send(fd);
                self.try_splice(fd, Way::Out);
            }
        }
        out.extend(self.ready.drain(..));
        Ok(())
    }

    fn splice(&self) -> bool {
        cfg!(target_os = "linux")
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn name(&self) -> &'static str {
        "poll"
    }
}
