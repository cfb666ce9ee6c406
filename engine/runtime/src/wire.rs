//! The sending side of one connection, shared by the engine and the binding's threads.
//!
//! A thread that sends a frame while the connection has nothing queued writes it to the socket
//! itself (non-blocking `sendmsg`s), sparing the hand-off to the engine thread and its wake-up,
//! the largest cost of a small call. Whatever cannot go out at once (or past a budget, see
//! [`DIRECT_BUDGET`]), and every frame sent while something is already queued, goes through the
//! engine in order. The lock is held only while the kernel takes at most that budget.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use daffi_driver::sys;

use crate::engine::{Command, Engine};
use crate::notify::Notifier;

/// A sending thread writes at most this many bytes of a frame itself, then leaves the rest to
/// the engine: the engine thread takes this connection's lock too and must not wait long for
/// it. Writing the start of a large frame on the sender's own CPU, and waking the engine once
/// for the rest, measured faster than handing the engine all of it.
const DIRECT_BUDGET: usize = 4 << 20;
/// The budget of an event loop's writes (held frames sent by [`Wire::uncork`]), which should not
/// stop the loop for long, and on connections that send zero-copy, where only the engine sends
/// large frames without copying them (frames larger than this go to it whole there).
const DIRECT_MAX: usize = 256 * 1024;
/// The most bytes [`Wire::cork`] holds before sending them anyway.
const CORK_MAX: usize = 256 * 1024;
/// Back-pressure: a sending thread that finds more than this many bytes handed to the engine
/// and not yet written waits ([`Wire::wait_room`]) until they are down to `SEND_LOW`.
pub(crate) const SEND_HIGH: usize = 16 << 20;
const SEND_LOW: usize = SEND_HIGH / 2;

#[derive(Debug)]
struct State {
    fd: RawFd,
    /// The engine sends large frames zero-copy on this connection (see [`DIRECT_MAX`]).
    zero_copy: bool,
    /// The engine has a send in flight or frames of its own to send.
    engine_sending: bool,
    /// Frames handed to the engine that it has not taken yet.
    queued: usize,
    /// Bytes handed to the engine that it has not written yet.
    pending: usize,
    /// Threads waiting in `wait_room`.
    waiting: usize,
    /// The descriptor is closed (or about to be): nobody may use it.
    closed: bool,
    /// The largest message the peer accepts (known once the handshake completed).
    peer_max: u64,
    /// Frames held by [`Wire::cork`] until [`Wire::uncork`], and their length in bytes.
    corked: Vec<Bytes>,
    corked_len: usize,
    /// An event loop's sender waits for room (see [`Wire::room_for_loop`]): its notifier is
    /// raised once there is.
    loop_waits: bool,
    notifier: Option<Arc<Notifier>>,
    /// The engine stopped reading this connection (a client whose callbacks are behind, see
    /// [`Wire::pause_reading`]); whoever starts waiting for something only reading brings (room
    /// to send: the peer may be held back by us; a member joining) has it read again.
    reading_paused: bool,
    /// Threads waiting for something only reading this connection brings (see
    /// [`Wire::need_reading`]).
    need_reading: usize,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Wire {
    conn: u64,
    state: Mutex<State>,
    room: Condvar,
}

impl Wire {
    pub(crate) fn new(conn: u64, fd: RawFd) -> Wire {
        Wire {
            conn,
            state: Mutex::new(State {
                fd,
                zero_copy: false,
                engine_sending: false,
                queued: 0,
                pending: 0,
                waiting: 0,
                closed: false,
                peer_max: u64::MAX,
                corked: Vec::new(),
                corked_len: 0,
                loop_waits: false,
                notifier: None,
                reading_paused: false,
                need_reading: 0,
            }),
            room: Condvar::new(),
        }
    }

    /// The engine sends large frames on this connection zero-copy (set once it knows).
    pub(crate) fn set_zero_copy(&self, zero_copy: bool) {
        self.lock().zero_copy = zero_copy;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn peer_max(&self) -> u64 {
        self.lock().peer_max
    }

    /// Sends one encoded frame: at once when possible, else through `engine`, in order with
    /// every other frame of this connection. After the connection closed it is dropped.
    pub(crate) fn send(&self, engine: &Engine, bufs: Vec<Bytes>) {
        self.send_within(engine, bufs, DIRECT_BUDGET)
    }

    /// [`Wire::send`], writing at most `budget` bytes on this thread.
    fn send_within(&self, engine: &Engine, mut bufs: Vec<Bytes>, budget: usize) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        if !s.corked.is_empty() {
            // Held frames go first: the stream keeps the order frames were given in.
            let mut all = std::mem::take(&mut s.corked);
            s.corked_len = 0;
            all.append(&mut bufs);
            bufs = all;
        }
        if bufs.is_empty() {
            return;
        }
        let mut skip = 0;
        let total = sys::total_len(&bufs);
        // `engine_sending` is false only when nothing at all is pending: no frame queued, taken
        // or in flight. Only then may this thread write, and whatever it cannot finish goes to
        // the engine as the very next bytes of the stream. A large frame too: this thread
        // writes the first `DIRECT_BUDGET` bytes (or what the socket takes) on its own CPU, and
        // the engine, woken only for the rest, goes on from there (on io_uring, 28 MiB echoes
        // measured 14% faster so).
        let budget = if s.zero_copy {
            // Zero-copy sends are the engine's: small frames only, whole, here.
            if total <= DIRECT_MAX { total } else { 0 }
        } else {
            budget
        };
        if !s.engine_sending && budget > 0 {
            loop {
                match sys::send_at_most(s.fd, &bufs, skip, budget - skip) {
                    Ok(n) if n > 0 => {
                        skip += n;
                        if skip == total {
                            return;
                        }
                        if skip >= budget {
                            break;
                        }
                    }
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // A broken socket, possibly with part of this frame written: nothing
                        // more may follow it. Close the connection; the calls waiting on it
                        // fail with Disconnected.
                        s.closed = true;
                        drop(s);
                        engine.send(Command::Abort {
                            conn: self.conn,
                            reason: format!("send failed: {e}"),
                        });
                        return;
                    }
                }
            }
        }
        s.engine_sending = true;
        s.queued += 1;
        s.pending += total - skip;
        engine.send(Command::SendRaw {
            conn: self.conn,
            bufs,
            skip,
        });
    }

    /// Holds a frame until [`Wire::uncork`], so that a burst of frames (an event loop's calls
    /// or answers of one turn) is written with one system call. Returns true for the first
    /// frame held, when the caller should arrange an `uncork`.
    /// Past `CORK_MAX` bytes held, they are sent at once: a burst that never lets its event
    /// loop turn must not pile up.
    pub(crate) fn cork(&self, engine: &Engine, bufs: Vec<Bytes>) -> bool {
        let mut s = self.lock();
        if s.closed {
            return false;
        }
        let first = s.corked.is_empty();
        s.corked_len += sys::total_len(&bufs);
        s.corked.extend(bufs);
        let full = s.corked_len > CORK_MAX;
        drop(s);
        if full {
            self.uncork(engine);
        }
        first
    }

    /// Sends every held frame.
    pub(crate) fn uncork(&self, engine: &Engine) {
        // `send` takes the held frames under its lock, so nothing can slip in between. Held
        // frames are an event loop's: it writes little itself.
        self.send_within(engine, Vec::new(), DIRECT_MAX);
    }

    /// Back-pressure for threads that may block: while more than `SEND_HIGH` bytes wait for
    /// the engine to write them (a peer reading slower than this side sends), waits until they
    /// are down to half that, or the connection closed. Returns at once otherwise.
    /// Gives up at `until` (false).
    pub(crate) fn wait_room(&self, engine: &Engine, until: Option<Instant>) -> bool {
        let mut s = self.lock();
        if s.pending <= SEND_HIGH {
            return true;
        }
        self.resume_reading(&mut s, engine);
        s.waiting += 1;
        let mut room = true;
        while s.pending > SEND_LOW && !s.closed {
            s = match until {
                None => self.room.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(t) => {
                    let now = Instant::now();
                    if now >= t {
                        room = false;
                        break;
                    }
                    self.room
                        .wait_timeout(s, t - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        s.waiting -= 1;
        room
    }

    /// Where an event loop that sends on this connection hears of room (see
    /// [`Wire::room_for_loop`]).
    pub(crate) fn watch(&self, n: Arc<Notifier>) {
        self.lock().notifier = Some(n);
    }

    /// Back-pressure for an event loop, which must not block: true when it may send on (no
    /// more than `SEND_HIGH` bytes wait to be written, or the connection closed). Otherwise
    /// false, and the notifier given to [`Wire::watch`] is raised once they are down to
    /// `SEND_LOW` (or the connection closed): the loop asks again then.
    pub(crate) fn room_for_loop(&self, engine: &Engine) -> bool {
        let mut s = self.lock();
        if s.pending <= SEND_HIGH || s.closed || s.notifier.is_none() {
            return true;
        }
        self.resume_reading(&mut s, engine);
        s.loop_waits = true;
        false
    }

    /// Someone waits for what only reading brings: the engine must read again if it paused.
    /// Returns whether it had.
    fn resume_reading(&self, s: &mut State, engine: &Engine) -> bool {
        let paused = std::mem::take(&mut s.reading_paused);
        if paused {
            engine.send(Command::Recheck { conn: self.conn });
        }
        paused
    }

    /// A call was just opened (registered, so the engine's check for calls waiting, which
    /// follows its [`Wire::pause_reading`], sees it): its answer comes by reading, so the
    /// engine reads again if it had paused. True when it had.
    pub(crate) fn call_opened(&self, engine: &Engine) -> bool {
        self.resume_reading(&mut self.lock(), engine)
    }

    /// Counts a thread waiting for something only reading this connection brings (a member
    /// joining) while the returned guard lives; reading resumes if it was paused.
    pub(crate) fn need_reading<'a>(&'a self, engine: &Engine) -> NeedReading<'a> {
        self.want_reading(engine);
        NeedReading(self)
    }

    /// [`Wire::need_reading`] without a guard: each call needs its [`Wire::unwant_reading`].
    pub(crate) fn want_reading(&self, engine: &Engine) {
        let mut s = self.lock();
        s.need_reading += 1;
        self.resume_reading(&mut s, engine);
    }

    pub(crate) fn unwant_reading(&self) {
        let mut s = self.lock();
        s.need_reading = s.need_reading.saturating_sub(1);
    }

    /// For the engine, about to stop reading this connection: true (and paused) unless a
    /// sender waits for room on it, or a thread for what only reading brings. The engine then
    /// checks that no call waits for an answer (see [`Wire::call_opened`]), else calls
    /// [`Wire::reading_resumed`].
    pub(crate) fn pause_reading(&self) -> bool {
        let mut s = self.lock();
        let idle = s.pending <= SEND_HIGH && s.waiting == 0 && !s.loop_waits && s.need_reading == 0;
        s.reading_paused = idle;
        idle
    }

    /// Whether the engine stopped reading this connection (see [`Wire::pause_reading`]).
    pub(crate) fn is_reading_paused(&self) -> bool {
        self.lock().reading_paused
    }

    /// The engine reads this connection again.
    pub(crate) fn reading_resumed(&self) {
        self.lock().reading_paused = false;
    }

    /// Raises the loop's notifier if it waits and there is room (or the connection closed).
    fn tell_loop(s: &mut State) {
        if s.loop_waits && (s.pending <= SEND_LOW || s.closed) {
            s.loop_waits = false;
            if let Some(n) = &s.notifier {
                n.notify();
            }
        }
    }

    // ── engine side ──

    /// The engine wrote `n` bytes of frames handed over by [`Wire::send`].
    pub(crate) fn written(&self, n: usize) {
        let mut s = self.lock();
        s.pending = s.pending.saturating_sub(n);
        if s.waiting > 0 && s.pending <= SEND_LOW {
            self.room.notify_all();
        }
        Self::tell_loop(&mut s);
    }

    /// A frame handed over by [`Wire::send`] was taken.
    pub(crate) fn taken(&self) {
        let mut s = self.lock();
        s.queued = s.queued.saturating_sub(1);
    }

    /// The engine wants to send: allowed unless frames it has not taken yet must go first.
    pub(crate) fn engine_may_send(&self) -> bool {
        let mut s = self.lock();
        if s.queued > 0 {
            return false;
        }
        s.engine_sending = true;
        true
    }

    /// The engine sent everything it had taken; binding threads may write directly again,
    /// unless frames are still on their way to the engine.
    pub(crate) fn engine_idle(&self) {
        let mut s = self.lock();
        if s.queued == 0 {
            s.engine_sending = false;
        }
    }

    pub(crate) fn set_peer_max(&self, max: u64) {
        self.lock().peer_max = max;
    }

    /// The descriptor is about to be closed.
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        Self::tell_loop(&mut s);
        drop(s);
        self.room.notify_all();
    }
}

/// See [`Wire::need_reading`].
pub(crate) struct NeedReading<'a>(&'a Wire);

impl Drop for NeedReading<'_> {
    fn drop(&mut self) {
        self.0.unwant_reading();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daffi_driver::Backend;

    #[test]
    fn reading_pauses_only_while_nobody_needs_it() {
        let engine = Engine::get(Backend::Poll).unwrap();
        // Never written to: no descriptor needed.
        let wire = Wire::new(u64::MAX, -1);
        assert!(wire.pause_reading(), "idle: the engine may stop reading");
        {
            let _members = wire.need_reading(&engine);
            assert!(!wire.lock().reading_paused, "a member wait resumed reading");
            assert!(
                !wire.pause_reading(),
                "not while someone waits for a member"
            );
        }
        assert!(wire.pause_reading(), "the wait is over");
        wire.reading_resumed();
        assert!(!wire.lock().reading_paused);
    }

    #[test]
    fn a_call_opened_while_paused_asks_for_reading_once() {
        let engine = Engine::get(Backend::Poll).unwrap();
        let wire = Wire::new(u64::MAX, -1);
        let t = crate::call::CallTable::default();
        assert!(
            wire.pause_reading() && t.is_empty(),
            "no call waits: the engine may stop reading"
        );
        let (a, _slot) = t.open();
        assert!(wire.call_opened(&engine), "opened while paused: read again");
        assert!(!wire.call_opened(&engine), "asked once");
        assert!(!t.is_empty(), "a call waits for its answer");
        t.abandon(a);
        // Reading resumed on its own: a call opened now asks for nothing.
        assert!(wire.pause_reading() && t.is_empty());
        wire.reading_resumed();
        let (_b, _slot) = t.open();
        assert!(!wire.call_opened(&engine));
    }
}
