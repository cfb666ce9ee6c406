//! Lending a client connection's receive side to the thread that waits for an answer.
//!
//! A sequential caller normally waits for the engine thread to receive its answer and wake it:
//! two thread hand-offs per call (engine woken by the kernel, caller woken by the engine). While
//! a client's calls come one at a time, the engine instead *parks* the connection (it stops
//! receiving on it) and the next caller reads the socket itself, as a plain blocking socket
//! would, handling the answers it finds there (see [`daffi_proto::answer`]): small ones in
//! place, large ones received straight into a buffer of their own (see
//! [`Direct::receive_large`]):
//!
//! ```text
//!   Engine ──(a caller asked, no call pending)──► Parked ──(a caller waits)──► Thread
//!     ▲                                              ▲                            │
//!     │                                              └────(answered, none left)───┤
//!     └──(anything else read, end of stream, other calls pending: Resume)─────────┘
//!     └──(parked and unused for PARK_IDLE: the engine takes it back)
//! ```
//!
//! Anything the thread cannot handle alone (a frame of another kind, a broken stream) is handed
//! back to the engine with every byte read after the last answer it handled, and the engine
//! parses on from there; a turn that ends in the middle of a large payload hands back its head
//! and the part received, which the engine goes on filling. Only the engine closes the
//! descriptor, never while a thread reads it.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use daffi_driver::{Body, RecvBuf, sys};
use daffi_proto::Flags;
use daffi_proto::answer::{self, Answer, LargeHead, Scan, ScanRequest};

use crate::call::{CallError, CallTable, Reply, Slot};
use crate::engine::{Command, Engine};
use crate::node::{Callee, IncomingCall};
use crate::notify::Notifier;
use crate::payload::{Payload, alloc_body};
use crate::spin::Spin;

/// A parked connection unused for this long goes back to the engine (so that whatever the peer
/// sends unasked, such as a goodbye, is seen promptly).
pub(crate) const PARK_IDLE: Duration = Duration::from_millis(2);
/// Room kept free in the read buffer: more than the largest frame a thread handles.
const READ_ROOM: usize = 64 * 1024;
/// The longest single wait for bytes without a deadline.
const MAX_WAIT: Duration = Duration::from_secs(1);
/// A worker that read several requests at once (calls overlap: the engine, which reads while
/// the workers run, serves that better) hands the connection back; workers do not ask for it
/// again for this long.
const OVERLAP_COOLDOWN: Duration = Duration::from_millis(50);
/// The most bytes an event loop reads in one turn (then it lets other work run).
const LOOP_READ_MAX: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The engine receives (the usual state).
    Engine,
    /// Nobody receives: the next caller may.
    Parked,
    /// A caller's thread receives.
    Thread,
    /// An event loop watches the socket and reads it when readable (see [`Direct::read_for_loop`]).
    Loop,
    /// The connection is gone.
    Closed,
}

#[derive(Debug)]
struct State {
    side: Side,
    /// A caller would like to receive itself: park when possible.
    want: bool,
    /// Bytes read by a thread after the last answer it handled.
    rest: Vec<u8>,
    /// When the connection was last parked or used by a thread.
    since: Instant,
    /// Workers do not ask for the connection before this (see `OVERLAP_COOLDOWN`).
    cooldown: Option<Instant>,
    /// The engine wants the connection back from the thread (or event loop) reading it.
    recall: bool,
    /// An event loop watches the node: the connection is lent to it, not to threads.
    for_loop: Option<Arc<Notifier>>,
    /// The event loop read something only the engine may handle: it stops watching the socket
    /// and gives the connection back.
    loop_done: bool,
    /// When the event loop started waiting for bytes it expects (see
    /// [`Direct::spin_for_loop`]) and did not get them spinning: the next read measures the
    /// wait.
    loop_wait: Option<Instant>,
    /// A thread or the event loop met the end of the stream or an error: the engine must
    /// receive itself (to see it), and the connection is never lent again.
    ended: bool,
    /// A thread's turn ended in the middle of a large payload: the part it received, whose
    /// head is `rest` (see [`Direct::resume`]).
    partial: Option<Body>,
}

/// The receive side of one client connection. See the module documentation.
#[derive(Debug)]
pub(crate) struct Direct {
    fd: RawFd,
    /// Frames with larger payloads (over the node's `max_message_size`) are left to the
    /// engine, which reports them.
    max_payload: u64,
    /// Off with `DAFFI_NO_DIRECT_RECV=1` (for comparison): the engine always receives.
    enabled: bool,
    /// Answers read by callers so far (a diagnostic).
    answered: std::sync::atomic::AtomicU64,
    /// Requests read by workers so far (a diagnostic).
    requests: std::sync::atomic::AtomicU64,
    /// How long reading threads spin before they sleep (see [`crate::spin`]).
    spin: Spin,
    /// The same for the rest of a large payload, which comes at the pace of the socket.
    body_spin: Spin,
    state: Mutex<State>,
}

/// Threads of this process waiting for an answer right now (see [`Direct::read_until`]).
static CALLERS_WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a thread as waiting for an answer while it lives.
pub(crate) struct Waiting(());

impl Waiting {
    pub(crate) fn new() -> Waiting {
        CALLERS_WAITING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        CALLERS_WAITING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a worker's turn at reading needs to know of the node it works for.
pub(crate) struct Worker<'a> {
    /// The node's functions, and the inbox the requests read after the first go to, in order.
    pub(crate) callee: &'a Callee,
    /// A Service's accepted serde formats (bit `n`: format `n`); a client takes any. Requests
    /// for other functions or formats are the engine's to refuse.
    pub(crate) serde_mask: Option<u64>,
    /// Raised by the engine to take the connection back from a worker waiting on it.
    pub(crate) alarm: Option<&'a sys::Alarm>,
    /// Requests name their caller first (a client's connection through a Router).
    pub(crate) routed: bool,
}

impl Worker<'_> {
    /// Queues a request read for the node's workers, weighed like the engine's.
    fn queue(&self, call: IncomingCall) {
        let weight = call.payload.len() + crate::node::CALL_WEIGHT;
        self.callee.calls.push_weighed(call, weight);
    }

    /// Whether a request for `name` in format `serde` runs here.
    pub(crate) fn runs(&self, name: &str, serde: u8) -> bool {
        self.serde_mask
            .is_none_or(|mask| serde < 64 && mask & (1 << serde) != 0)
            && self.callee.exports(name)
    }
}

/// Where a scan of the bytes read stopped.
enum Stop {
    /// More bytes are needed.
    More,
    /// At something only the engine may handle.
    Other,
    /// At the head of a large payload for this thread's calls or functions, which it may
    /// receive itself.
    Large(Large),
}

/// A frame whose large payload a reading thread receives itself: an answer (`name` is `None`)
/// or a request for one of the node's functions.
struct Large {
    call_id: u64,
    head_len: usize,
    payload_len: usize,
    serde: u8,
    flags: Flags,
    trailer: bool,
    name: Option<String>,
}

impl Large {
    fn new(h: &LargeHead<'_>, request: bool) -> Option<Large> {
        Some(Large {
            call_id: h.call_id,
            head_len: h.head_len,
            payload_len: usize::try_from(h.payload_len).ok()?,
            serde: h.serde,
            flags: h.flags,
            trailer: h.trailer,
            name: request.then(|| h.name.to_owned()),
        })
    }
}

/// How a thread's turn at reading ended.
enum Turn {
    /// Its answer arrived.
    Answered,
    /// Its time ran out.
    Waited,
    /// It read something only the engine may handle, was asked to stop, or its time ran out
    /// in the middle of a large payload.
    HandBack,
    /// The stream ended or failed: only the engine may see that (and never lends it again).
    Ended,
}

impl Direct {
    /// Threads reading this connection sleep at once instead of spinning (`true`), or spin
    /// again (see [`crate::spin::routed_clients_spin`]).
    pub(crate) fn set_quiet(&self, quiet: bool) {
        self.spin.set_quiet(quiet);
        self.body_spin.set_quiet(quiet);
    }

    /// Whether threads waiting on this connection's answers sleep at once (see `set_quiet`).
    pub(crate) fn is_quiet(&self) -> bool {
        self.spin.is_quiet()
    }

    pub(crate) fn new(fd: RawFd, max_payload: u64) -> Direct {
        Direct {
            fd,
            max_payload,
            enabled: enabled(),
            answered: Default::default(),
            requests: Default::default(),
            spin: Spin::default(),
            body_spin: Spin::default(),
            state: Mutex::new(State {
                side: Side::Engine,
                want: false,
                rest: Vec::new(),
                since: Instant::now(),
                cooldown: None,
                recall: false,
                for_loop: None,
                loop_done: false,
                loop_wait: None,
                ended: false,
                partial: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many answers were read by their callers' threads.
    pub(crate) fn answered(&self) -> u64 {
        self.answered.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many requests were read by workers' threads.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    // ── engine side ──

    /// Whether a caller asked to receive itself.
    pub(crate) fn wanted(&self) -> bool {
        self.lock().want
    }

    /// Parks the connection if a caller asked and nothing is waiting (`idle`, checked under
    /// this lock, which every caller takes after registering its call: no answer can be left
    /// unread). Otherwise forgets the request.
    pub(crate) fn try_park(&self, idle: impl FnOnce() -> bool) -> bool {
        let mut s = self.lock();
        let park = s.want && s.side == Side::Engine && !s.ended && idle();
        s.want = false;
        if park {
            s.side = Side::Parked;
            s.since = Instant::now();
        }
        park
    }

    /// A worker asks for the connection (see [`Direct::read_request`]): true the first time,
    /// when the engine must be told (`Command::Park`).
    pub(crate) fn ask(&self) -> bool {
        if !self.enabled {
            return false;
        }
        let mut s = self.lock();
        if s.ended || s.cooldown.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        let first = !s.want && s.side == Side::Engine;
        s.want = true;
        first
    }

    /// A parked connection unused for `idle` goes back to the engine: the bytes to parse first.
    pub(crate) fn reclaim_idle(&self, idle: Duration) -> Option<Vec<u8>> {
        let mut s = self.lock();
        if s.side != Side::Parked || s.since.elapsed() < idle {
            return None;
        }
        s.side = Side::Engine;
        s.want = false;
        Some(std::mem::take(&mut s.rest))
    }

    /// Takes a parked connection back for the engine (an answer nobody waits for on a thread
    /// is coming); true when the engine must be told (`Command::Resume`).
    pub(crate) fn reclaim(&self) -> bool {
        let mut s = self.lock();
        s.want = false;
        if s.side == Side::Parked {
            s.side = Side::Engine;
            true
        } else {
            false
        }
    }

    /// A thread handed the connection back (`Command::Resume`): the bytes to parse first and,
    /// when they end with the head of a large payload the thread was receiving, the part of it
    /// received so far.
    pub(crate) fn resume(&self) -> (Vec<u8>, Option<Body>) {
        let mut s = self.lock();
        (std::mem::take(&mut s.rest), s.partial.take())
    }

    /// Drops a pending request to park; returns false (for use in a condition).
    pub(crate) fn forget_want(&self) -> bool {
        self.lock().want = false;
        false
    }

    /// Asks the thread reading the connection to hand it back at the end of its turn, or the
    /// event loop watching it to give it back; false when neither has it.
    pub(crate) fn recall(&self) -> bool {
        Self::recall_locked(&mut self.lock())
    }

    fn recall_locked(s: &mut State) -> bool {
        match s.side {
            Side::Thread => {}
            Side::Loop => {
                if let Some(n) = &s.for_loop {
                    n.notify();
                }
            }
            _ => return false,
        }
        s.recall = true;
        true
    }

    /// The connection is going away: nobody may read it any more. Refused (false) while a
    /// thread reads the descriptor or an event loop watches it, which must then not be closed:
    /// it is asked to give it back (a thread also sees the end of the stream the engine's
    /// shutdown makes).
    pub(crate) fn close_unless_lent(&self) -> bool {
        let mut s = self.lock();
        if Self::recall_locked(&mut s) {
            return false;
        }
        s.side = Side::Closed;
        s.rest = Vec::new();
        s.partial = None;
        true
    }

    // ── event loop side ──
    //
    // A watched node's event loop takes the place of the reading thread: while the connection
    // is lent to it (`Side::Loop`), the loop watches the socket itself (`add_reader`) and reads
    // whatever is there each time it is readable, answers and requests alike, without waiting.
    // The engine tells it through the node's notifier when it lends the connection and when it
    // wants it back; the loop stops watching the socket *before* giving it back, so that the
    // descriptor is never closed while registered with the loop.

    /// From now on the connection is lent to the event loop behind `n`, not to threads.
    pub(crate) fn lend_to_loop(&self, n: Arc<Notifier>) {
        if self.enabled {
            self.lock().for_loop = Some(n);
        }
    }

    /// Whether the connection is lent to an event loop rather than to threads.
    pub(crate) fn for_loop(&self) -> bool {
        self.lock().for_loop.is_some()
    }

    /// The event loop stops watching the node (it no longer watches the socket): the
    /// connection is no longer lent to it. True when the engine must be told (`Resume`).
    pub(crate) fn end_loop(&self) -> bool {
        let mut s = self.lock();
        s.for_loop = None;
        Self::loop_returns(&mut s)
    }

    /// Lends the connection to the event loop (engine side, under the same conditions as a
    /// park): the notifier to tell the loop through, once everything it will look at is in
    /// place; `None` when it is not for a loop or the stream ended.
    pub(crate) fn try_lend_to_loop(&self) -> Option<Arc<Notifier>> {
        let mut s = self.lock();
        if s.side != Side::Engine || s.ended {
            return None;
        }
        let n = s.for_loop.clone()?;
        s.side = Side::Loop;
        s.want = false;
        s.recall = false;
        s.loop_done = false;
        Some(n)
    }

    /// The descriptor the event loop should watch now: `Some` while the connection is lent to
    /// it and neither the engine nor the loop itself wants it back.
    pub(crate) fn lent_fd(&self) -> Option<RawFd> {
        let s = self.lock();
        (s.side == Side::Loop && !s.recall && !s.loop_done).then_some(self.fd)
    }

    /// An event loop with nothing else to do expects bytes on the socket lent to it soon (it
    /// just sent a lone call, or answered one): spins a little (see [`crate::spin`]) for the
    /// socket to turn readable, sparing the loop a sleep and a wake-up. True when it did: the
    /// loop reads it ([`Direct::read_for_loop`]) at once.
    pub(crate) fn spin_for_loop(&self) -> bool {
        // While lent to the loop, the engine never closes the descriptor: it stays valid for
        // the spin even if the engine asks for it back meanwhile.
        if self.lent_fd().is_none() {
            return false;
        }
        let started = Instant::now();
        let readable = self.spin.spin(started, None, || {
            match sys::wait_either(self.fd, None, Duration::ZERO) {
                Ok((false, _)) => None,
                Ok((true, _)) => Some(true),
                Err(_) => Some(false),
            }
        });
        if readable.is_some() {
            self.spin.record(started.elapsed());
        } else {
            // The loop sleeps until the bytes come: its next read tells how long it waited.
            self.lock().loop_wait = Some(started);
        }
        readable == Some(true)
    }

    /// The event loop stopped watching the socket, which it or the engine wanted back: the
    /// connection goes back to the engine. True when the engine must be told (`Resume`).
    pub(crate) fn give_back(&self) -> bool {
        let mut s = self.lock();
        if !(s.recall || s.loop_done) {
            // Lent afresh since the loop looked (it watches this one next).
            return false;
        }
        Self::loop_returns(&mut s)
    }

    fn loop_returns(s: &mut State) -> bool {
        if s.side != Side::Loop {
            return false;
        }
        s.side = Side::Engine;
        s.recall = false;
        s.loop_done = false;
        true
    }

    /// The event loop's turn, when the socket is readable: reads what it holds without
    /// waiting (at most `LOOP_READ_MAX` bytes a turn), completes the answers in `calls` and
    /// queues the requests `requests` runs. False when the loop must stop watching the socket
    /// and give the connection back ([`Direct::give_back`]): something only the engine may
    /// handle was read, the stream ended, or the engine wants it back.
    pub(crate) fn read_for_loop(
        &self,
        conn: u64,
        engine: &Engine,
        calls: Option<&CallTable>,
        requests: Option<&Worker<'_>>,
    ) -> bool {
        let (mut rest, notifier) = {
            let mut s = self.lock();
            if let Some(t) = s.loop_wait.take() {
                self.spin.record(t.elapsed());
            }
            if s.side != Side::Loop || s.recall || s.loop_done {
                return false;
            }
            s.side = Side::Thread;
            (std::mem::take(&mut s.rest), s.for_loop.clone())
        };
        // What this turn completes or queues is taken by the loop right after it: no need to
        // make the notifier readable for it.
        let mut read = || -> Result<(), bool> {
            let mut budget = LOOP_READ_MAX;
            loop {
                let mut taken = Vec::new();
                let (used, stop) = self.scan_frames(&rest, conn, calls, requests, &mut taken);
                rest.drain(..used);
                // An event loop never waits: a large payload is the engine's to receive.
                let other = !matches!(stop, Stop::More);
                if let Some(w) = requests {
                    taken.into_iter().for_each(|call| w.queue(call));
                    // The node's callbacks are behind: the engine takes the connection back,
                    // and stops reading it until they caught up (back-pressure).
                    if w.callee.calls.over_limit() {
                        return Err(false);
                    }
                }
                if other {
                    return Err(false);
                }
                if budget == 0 {
                    return Ok(());
                }
                match self.recv_more(&mut rest, budget) {
                    Ok(0) => return Err(true),
                    Ok(n) => budget = budget.saturating_sub(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(_) => return Err(true),
                }
            }
        };
        let outcome = match &notifier {
            Some(n) => n.quiet(read),
            None => read(),
        };
        let mut s = self.lock();
        s.rest = rest;
        if s.for_loop.is_none() {
            // The loop stopped watching the node meanwhile (`end_loop` found it being read):
            // the connection goes back to the engine now.
            s.side = Side::Engine;
            s.recall = false;
            s.loop_done = false;
            drop(s);
            engine.send(Command::Resume { conn });
            return false;
        }
        s.side = Side::Loop;
        match outcome {
            Ok(()) if !s.recall => true,
            Ok(()) => false,
            Err(ended) => {
                s.loop_done = true;
                s.ended |= ended;
                false
            }
        }
    }

    /// Handles the whole small frames at the front of `rest` that a thread or an event loop
    /// may: answers are completed in `calls`; requests for functions the worker runs are added
    /// to `taken`. Returns the bytes they took, and where it stopped: at a frame only the
    /// engine may handle (anything else, including refusals, which are the engine's to answer),
    /// or at the head of a large answer or request the reading thread may receive itself.
    fn scan_frames(
        &self,
        rest: &[u8],
        conn: u64,
        calls: Option<&CallTable>,
        requests: Option<&Worker<'_>>,
        taken: &mut Vec<IncomingCall>,
    ) -> (usize, Stop) {
        let mut used = 0;
        loop {
            let front = &rest[used..];
            if let Some(calls) = calls {
                match answer::scan(front, self.max_payload) {
                    Scan::Answer {
                        call_id,
                        len,
                        answer,
                    } => {
                        calls.complete(call_id, result(answer));
                        self.answered
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        used += len;
                        continue;
                    }
                    Scan::Large(h) => {
                        let stop = Large::new(&h, false).map_or(Stop::Other, Stop::Large);
                        return (used, stop);
                    }
                    Scan::Partial => return (used, Stop::More),
                    Scan::Other => {}
                }
            }
            let Some(worker) = requests else {
                return (used, Stop::Other);
            };
            match answer::scan_request(front, self.max_payload, worker.routed) {
                ScanRequest::Request(r) if worker.runs(r.name, r.serde) => {
                    used += r.len;
                    self.requests
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    taken.push(IncomingCall {
                        conn,
                        call_id: r.call_id,
                        name: r.name.to_owned(),
                        serde: r.serde,
                        flags: r.flags,
                        payload: Payload::Inline(r.payload.to_vec()),
                    });
                }
                ScanRequest::Large(h) if worker.runs(h.name, h.serde) => {
                    let stop = Large::new(&h, true).map_or(Stop::Other, Stop::Large);
                    return (used, stop);
                }
                ScanRequest::Partial => return (used, Stop::More),
                ScanRequest::Request(_) | ScanRequest::Large(_) | ScanRequest::Other => {
                    return (used, Stop::Other);
                }
            }
        }
    }

    /// Receives on this thread the large payload whose head (`large.head_len` bytes) is at the
    /// front of `rest`, straight into a buffer of its own, then its status byte if it has one.
    /// `Ok(None)`: its sender lost it midway (the status byte says so); drop it. When the turn
    /// ends first (`until` passed, `alarm` raised, the stream ended), the head stays in `rest`
    /// and the part received is kept for the engine, which receives the rest into it (see
    /// [`Direct::resume`]).
    fn receive_large(
        &self,
        rest: &mut Vec<u8>,
        large: &Large,
        until: Option<Instant>,
        alarm: Option<&sys::Alarm>,
    ) -> Result<Option<Payload>, Turn> {
        // The engine reports a buffer it cannot get either.
        let Some(mut body) = alloc_body(large.payload_len) else {
            return Err(Turn::HandBack);
        };
        let head = large.head_len;
        let have = (rest.len() - head).min(large.payload_len);
        body.extend_from_slice(&rest[head..head + have]);
        rest.drain(head..head + have);
        while !body.is_full() {
            let mut buf = RecvBuf::Body(body);
            let r = sys::recv(self.fd, &mut buf, usize::MAX);
            let RecvBuf::Body(b) = buf else {
                unreachable!("a body receive buffer stays a body")
            };
            body = b;
            if let Err(turn) = self.go_on(r, until, alarm) {
                self.lock().partial = Some(body);
                return Err(turn);
            }
        }
        if !large.trailer {
            rest.drain(..head);
            return Ok(Some(Payload::Body(body)));
        }
        while rest.len() == head {
            let r = self.recv_more(rest, usize::MAX);
            if let Err(turn) = self.go_on(r, until, alarm) {
                self.lock().partial = Some(body);
                return Err(turn);
            }
        }
        let complete = rest[head] == 0;
        rest.drain(..=head);
        Ok(complete.then_some(Payload::Body(body)))
    }

    /// One non-blocking receive of at most `max` bytes onto the end of `rest` (made room for
    /// first).
    fn recv_more(&self, rest: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        if rest.capacity() - rest.len() < READ_ROOM {
            rest.reserve(READ_ROOM);
        }
        let mut buf = RecvBuf::Vec(std::mem::take(rest));
        let r = sys::recv(self.fd, &mut buf, max);
        let RecvBuf::Vec(v) = buf else {
            unreachable!("a Vec receive buffer stays a Vec")
        };
        *rest = v;
        r
    }

    /// After one receive of a large payload's bytes (`r`): `Err` when the turn ends there.
    fn go_on(
        &self,
        r: io::Result<usize>,
        until: Option<Instant>,
        alarm: Option<&sys::Alarm>,
    ) -> Result<(), Turn> {
        match r {
            Ok(0) => Err(Turn::Ended),
            // While bytes keep coming, the deadline is all that may end the turn (an alarm is
            // seen once they pause: the payload's end is usually nearer).
            Ok(_) if until.is_some_and(|t| Instant::now() >= t) => Err(Turn::HandBack),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait_more(until, alarm),
            Err(_) => Err(Turn::Ended),
        }
    }

    /// Waits for more of a payload that is on its way: `Err` ends the turn when `until` passed
    /// ([`Turn::HandBack`]: the engine goes on with it), `alarm` was raised, or the socket
    /// failed.
    fn wait_more(&self, until: Option<Instant>, alarm: Option<&sys::Alarm>) -> Result<(), Turn> {
        match self.wait_readable(&self.body_spin, until, alarm)? {
            true => Ok(()),
            false => Err(Turn::HandBack),
        }
    }

    /// Waits, spinning first as `spin` allows, until the socket is readable (`Ok(true)`) or
    /// `until` passed (`Ok(false)`); `Err` ends the turn: [`Turn::HandBack`] when `alarm` was
    /// raised, [`Turn::Ended`] when the wait failed.
    fn wait_readable(
        &self,
        spin: &Spin,
        until: Option<Instant>,
        alarm: Option<&sys::Alarm>,
    ) -> Result<bool, Turn> {
        let woke = spin.wait(until, |sleep| {
            let wait = match (sleep, until) {
                (false, _) => Duration::ZERO,
                (true, None) => MAX_WAIT,
                (true, Some(t)) => (t.checked_duration_since(Instant::now())?).min(MAX_WAIT),
            };
            match sys::wait_either(self.fd, alarm, wait) {
                Ok((false, false)) if !sleep => None,
                other => Some(other),
            }
        });
        match woke {
            // `until` passed.
            None => Ok(false),
            Some(Ok((_, true))) => {
                if let Some(a) = alarm {
                    a.clear();
                }
                Err(Turn::HandBack)
            }
            Some(Ok(_)) => Ok(true),
            Some(Err(_)) => Err(Turn::Ended),
        }
    }

    // ── caller side ──

    /// Receives on the caller's thread until `slot` is answered or `until`, if the connection
    /// is parked; else asks the engine to park it for the next call. Returns whether `slot`
    /// was answered here. Call only after the call was registered in `calls`.
    pub(crate) fn read_until(
        &self,
        conn: u64,
        engine: &Engine,
        calls: &CallTable,
        slot: &Slot,
        until: Option<Instant>,
    ) -> bool {
        if !self.enabled {
            return false;
        }
        // Several threads of this process waiting at once (many clients, or threads sharing
        // one): the engine, which receives for all of them in one wake-up, does better than
        // each reading its own socket. Take a parked connection back for it.
        if CALLERS_WAITING.load(std::sync::atomic::Ordering::Relaxed) > 1 {
            if self.reclaim() {
                engine.send(Command::Resume { conn });
            }
            return false;
        }
        // A caller finding the engine receiving asks for a park, for its next call.
        let Some(mut rest) = self.take_turn(true) else {
            return false;
        };
        let turn = self.read(&mut rest, calls, slot, until);
        let mut s = self.lock();
        s.rest = rest;
        s.since = Instant::now();
        s.ended |= matches!(turn, Turn::Ended);
        // Calls of other threads may be waiting for answers only the engine would read.
        if matches!(turn, Turn::HandBack | Turn::Ended)
            || !calls.is_empty()
            || std::mem::take(&mut s.recall)
        {
            s.side = Side::Engine;
            drop(s);
            engine.send(Command::Resume { conn });
        } else {
            s.side = Side::Parked;
        }
        matches!(turn, Turn::Answered)
    }

    fn read(
        &self,
        rest: &mut Vec<u8>,
        calls: &CallTable,
        slot: &Slot,
        until: Option<Instant>,
    ) -> Turn {
        let mut fresh = true;
        loop {
            let (used, stop) = self.scan_frames(rest, 0, Some(calls), None, &mut Vec::new());
            rest.drain(..used);
            match stop {
                Stop::More => {}
                Stop::Other => return Turn::HandBack,
                // This caller's answer is in: the large one after it is not worth its wait.
                Stop::Large(_) if slot.is_filled() => return Turn::Answered,
                Stop::Large(large) => {
                    let outcome = match self.receive_large(rest, &large, until, None) {
                        Ok(Some(payload)) => Ok(Reply {
                            serde: large.serde,
                            flags: large.flags,
                            payload,
                        }),
                        Ok(None) => Err(CallError::Disconnected(
                            "the answer was cut off: its sender lost it midway".to_owned(),
                        )),
                        Err(turn) => return turn,
                    };
                    calls.complete(large.call_id, outcome);
                    self.answered
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
            }
            if slot.is_filled() {
                return Turn::Answered;
            }
            match self.receive(rest, until, None, std::mem::take(&mut fresh)) {
                Ok(true) => {}
                Ok(false) => return Turn::Waited,
                Err(turn) => return turn,
            }
        }
    }

    /// A worker's turn (a Service's, or a Client's that exports functions): if the connection
    /// is parked, receives on this thread until at least one request for a function run here
    /// arrives (the first is returned, small ones read with it are queued after it; a large one
    /// only as the first), `until` passes, or the node's alarm is raised.
    pub(crate) fn read_request(
        &self,
        conn: u64,
        engine: &Engine,
        node: &Worker<'_>,
        until: Option<Instant>,
    ) -> Option<IncomingCall> {
        if !self.enabled {
            return None;
        }
        let mut rest = self.take_turn(false)?;
        let mut calls = Vec::new();
        let mut fresh = true;
        let turn = loop {
            let (used, stop) = self.scan_frames(&rest, conn, None, Some(node), &mut calls);
            rest.drain(..used);
            match stop {
                Stop::More => {}
                Stop::Other => break Turn::HandBack,
                // One large payload a turn: the next one waits for a worker with nothing to
                // do (the engine's back-pressure counts what the workers have not taken).
                Stop::Large(_) if !calls.is_empty() => break Turn::Answered,
                Stop::Large(large) => {
                    match self.receive_large(&mut rest, &large, until, node.alarm) {
                        Ok(Some(payload)) => {
                            self.requests
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            calls.push(IncomingCall {
                                conn,
                                call_id: large.call_id,
                                name: large.name.unwrap_or_default(),
                                serde: large.serde,
                                flags: large.flags,
                                payload,
                            });
                        }
                        // Its sender lost it midway: it is neither run nor answered.
                        Ok(None) => {}
                        Err(turn) => break turn,
                    }
                    continue;
                }
            }
            if !calls.is_empty() {
                break Turn::Answered;
            }
            match self.receive(&mut rest, until, node.alarm, std::mem::take(&mut fresh)) {
                Ok(true) => {}
                Ok(false) => break Turn::Waited,
                Err(turn) => break turn,
            }
        };
        let mut s = self.lock();
        s.rest = rest;
        s.since = Instant::now();
        s.ended |= matches!(turn, Turn::Ended);
        let overlap = calls.len() > 1;
        if overlap {
            s.cooldown = Some(Instant::now() + OVERLAP_COOLDOWN);
        }
        let mut calls = calls.into_iter();
        let first = calls.next();
        // Those read with the first run after it, in order, before anything read later.
        calls.for_each(|call| node.queue(call));
        if matches!(turn, Turn::HandBack | Turn::Ended) || overlap || std::mem::take(&mut s.recall)
        {
            s.side = Side::Engine;
            drop(s);
            engine.send(Command::Resume { conn });
        } else {
            s.side = Side::Parked;
            drop(s);
            // Another idle worker may take the next turn at reading.
            node.callee.calls.wake_one();
        }
        first
    }

    /// Takes a parked connection for this thread: the bytes read past the last frame handled.
    /// `None` when it is not parked; then, with `ask`, the engine is asked to park it.
    fn take_turn(&self, ask: bool) -> Option<Vec<u8>> {
        let mut s = self.lock();
        match s.side {
            Side::Parked => {
                // Kept only while the engine has yet to take the connection back.
                debug_assert!(
                    s.partial.is_none(),
                    "a partial payload outlived its hand-back"
                );
                s.side = Side::Thread;
                s.want = false;
                Some(std::mem::take(&mut s.rest))
            }
            Side::Engine => {
                s.want |= ask;
                None
            }
            Side::Thread | Side::Loop | Side::Closed => None,
        }
    }

    /// Receives more bytes into `rest`: `Ok(true)` when some came (or may have), `Ok(false)`
    /// when `until` passed; `Err` ends the turn: [`Turn::Ended`] at end of stream or on an
    /// error, [`Turn::HandBack`] when `alarm` was raised. `fresh`: the turn just began, right
    /// after this thread sent its call or answer, so nothing is likely there yet: wait for the
    /// socket first instead of a receive that would find it empty (one system call less per
    /// call; the wait is level-triggered, so bytes already there end it at once).
    fn receive(
        &self,
        rest: &mut Vec<u8>,
        until: Option<Instant>,
        alarm: Option<&sys::Alarm>,
        fresh: bool,
    ) -> Result<bool, Turn> {
        // Past `until` the wait below would not look at the socket at all.
        let fresh = fresh && until.is_none_or(|t| Instant::now() < t);
        if !fresh {
            match self.recv_more(rest, usize::MAX) {
                Ok(0) => return Err(Turn::Ended),
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The engine sees the same error when it reads, and closes the connection.
                Err(_) => return Err(Turn::Ended),
            }
        }
        self.wait_readable(&self.spin, until, alarm)
    }
}

fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("DAFFI_NO_DIRECT_RECV").is_none_or(|v| v == "0"))
}

/// The outcome an answer frame gives its call.
fn result(a: Answer<'_>) -> Result<Reply, CallError> {
    match a {
        Answer::Result {
            serde,
            flags,
            payload,
        } => Ok(Reply {
            serde,
            flags,
            payload: Payload::Inline(payload.to_vec()),
        }),
        Answer::Error { code, payload } => Err(CallError::from_wire(code, payload.to_vec())),
    }
}
