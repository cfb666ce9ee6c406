//! The engine thread: one driver, every connection of every node of the process.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_queue::SegQueue;
use daffi_driver::sys::Pipe;
use daffi_driver::{
    AnyDriver, Backend, Body, Completion, Driver, Op, Outcome, PoolBuf, RecvBuf, Wake, sys,
};
use daffi_proto::frame::error_code;
use daffi_proto::handshake::add_names;
use daffi_proto::{
    Action, Connection, Event, Flags, Forward, Kind, Local, Payload as WirePayload, Role,
    RoutingTable,
};

use crate::call::{CallError, Reply};
use crate::direct::PARK_IDLE;
use crate::node::{ClientShared, IncomingCall, MemberEvent, Phase, ServerShared};
use crate::payload::{Payload, alloc_body, alloc_heap};
use crate::wire::Wire;

/// Work handed to the engine thread by node handles.
#[derive(Debug)]
pub(crate) enum Command {
    Listen {
        fd: OwnedFd,
        server: Arc<ServerShared>,
    },
    Attach {
        fd: OwnedFd,
        client: Arc<ClientShared>,
        local: Local,
    },
    /// An encoded frame from a binding thread (see [`crate::wire`]), less its first `skip`
    /// bytes, which went out directly.
    SendRaw {
        conn: u64,
        bufs: Vec<Bytes>,
        skip: usize,
    },
    Announce {
        owner: u64,
        names: Vec<String>,
    },
    Close {
        conn: u64,
        reason: String,
    },
    StopServer {
        id: u64,
    },
    /// Closes a connection at once, without sending what is queued (its stream is broken).
    Abort {
        conn: u64,
        reason: String,
    },
    /// A binding thread that was receiving on connection `conn` handed it back (see
    /// [`crate::direct`]).
    Resume {
        conn: u64,
    },
    /// A Service worker would like to receive on connection `conn` itself.
    Park {
        conn: u64,
    },
    /// Server `server`'s workers caught up: read its connections again.
    Unthrottle {
        server: u64,
    },
    /// Decide again whether client connection `conn` is read: its callbacks caught up, or it
    /// opened a call while it was not read (its answer must be).
    Recheck {
        conn: u64,
    },
    /// Ends an engine that has no nodes (a duplicate started by `auto`).
    Exit,
}

#[derive(Debug)]
struct Shared {
    queue: SegQueue<Command>,
    waker: Arc<dyn Wake>,
    sleeping: AtomicBool,
    backend: &'static str,
}

/// A handle to one engine thread. Cheap to clone; a node keeps the one it was started on.
#[derive(Debug, Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

/// The engine threads of one backend, handed out in turn to the nodes that start.
#[derive(Debug)]
struct Group {
    threads: Vec<Engine>,
    next: AtomicUsize,
}

impl Group {
    fn pick(&self) -> Engine {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len();
        self.threads[i].clone()
    }
}

static ENGINES: OnceLock<Mutex<HashMap<Backend, Arc<Group>>>> = OnceLock::new();
/// Node and connection ids, unique in the process (across engine threads).
static IDS: AtomicU64 = AtomicU64::new(1);

/// Most engine threads per backend `DAFFI_ENGINE_THREADS` may ask for.
pub const MAX_ENGINE_THREADS: usize = 64;

/// The thread count chosen with [`set_engine_threads`], if any.
static THREADS: OnceLock<usize> = OnceLock::new();

/// Sets how many engine threads each backend runs, before the first node starts (this wins over
/// `DAFFI_ENGINE_THREADS`). Fails for a count outside 1..=[`MAX_ENGINE_THREADS`], or once a
/// different count was set.
pub fn set_engine_threads(n: usize) -> io::Result<()> {
    if !(1..=MAX_ENGINE_THREADS).contains(&n) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{n} engine threads: expected 1 to {MAX_ENGINE_THREADS}"),
        ));
    }
    match *THREADS.get_or_init(|| n) {
        set if set == n => Ok(()),
        set => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("engine threads already set to {set}"),
        )),
    }
}

/// How many engine threads each backend runs: as set by [`set_engine_threads`], else
/// `DAFFI_ENGINE_THREADS`, else 1.
pub fn engine_threads() -> io::Result<usize> {
    if let Some(n) = THREADS.get() {
        return Ok(*n);
    }
    let Some(v) = std::env::var_os("DAFFI_ENGINE_THREADS") else {
        return Ok(1);
    };
    let v = v.to_string_lossy();
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_ENGINE_THREADS).contains(&n) => Ok(n),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "DAFFI_ENGINE_THREADS={v:?}: expected a whole number from 1 to {MAX_ENGINE_THREADS}"
            ),
        )),
    }
}

impl Engine {
    /// An engine thread for `backend`, started with the others of its backend on first use
    /// (`DAFFI_ENGINE_THREADS` of them, see [`engine_threads`]). With several, successive calls
    /// hand them out in turn: each node runs on the thread it got, and so does every connection
    /// it has.
    pub fn get(backend: Backend) -> io::Result<Engine> {
        let mut engines = ENGINES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(g) = engines.get(&backend) {
            return Ok(g.pick());
        }
        if backend == Backend::Auto {
            if let Some(g) = engines.get(&Backend::Uring) {
                return Ok(g.pick());
            }
        }
        let threads = engine_threads()?;
        let first = Engine::spawn(backend)?;
        let resolved = if first.backend() == "uring" {
            Backend::Uring
        } else {
            Backend::Poll
        };
        // `auto` shares the threads of the backend it resolved to; a duplicate thread ends.
        if let Some(g) = engines.get(&resolved).cloned() {
            first.send(Command::Exit);
            engines.insert(backend, g.clone());
            return Ok(g.pick());
        }
        let mut all = vec![first];
        while all.len() < threads {
            match Engine::spawn(resolved) {
                Ok(e) => all.push(e),
                Err(e) => {
                    for started in &all {
                        started.send(Command::Exit);
                    }
                    return Err(e);
                }
            }
        }
        let g = Arc::new(Group {
            threads: all,
            next: AtomicUsize::new(0),
        });
        engines.insert(resolved, g.clone());
        engines.insert(backend, g.clone());
        Ok(g.pick())
    }

    /// The engine picked by `DAFFI_BACKEND` (`auto` when unset).
    pub fn from_env() -> io::Result<Engine> {
        let v = std::env::var("DAFFI_BACKEND").unwrap_or_default();
        let backend = Backend::parse(&v).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("DAFFI_BACKEND={v:?}: expected auto, uring or poll"),
            )
        })?;
        Engine::get(backend)
    }

    fn spawn(backend: Backend) -> io::Result<Engine> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("daffi-engine".into())
            .spawn(move || {
                // Relayed payloads are spliced into sockets, which may raise SIGPIPE.
                sys::block_sigpipe();
                // The driver is created on the thread that uses it (io_uring SINGLE_ISSUER).
                let driver = match AnyDriver::new(backend) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let shared = Arc::new(Shared {
                    queue: SegQueue::new(),
                    waker: driver.waker(),
                    sleeping: AtomicBool::new(false),
                    backend: driver.name(),
                });
                let _ = tx.send(Ok(shared.clone()));
                Loop::new(driver, shared).run();
            })?;
        let shared = rx
            .recv()
            .map_err(|_| io::Error::other("engine thread died at start"))??;
        tracing::debug!("daffi engine started on the {} backend", shared.backend);
        Ok(Engine { shared })
    }

    /// `"uring"` or `"poll"`.
    pub fn backend(&self) -> &'static str {
        self.shared.backend
    }

    /// Whether `other` is a handle to the same engine thread.
    pub fn same_thread(&self, other: &Engine) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    pub(crate) fn next_id(&self) -> u64 {
        IDS.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn send(&self, cmd: Command) {
        self.shared.queue.push(cmd);
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            self.shared.waker.wake();
        }
    }
}

const ACCEPT: u64 = 0;
const RECV: u64 = 1;
const SEND: u64 = 2;
const POOLED: u64 = 3;

fn token(id: u64, op: u64) -> u64 {
    (id << 2) | op
}

/// A Router passes a large payload on in pieces of this size, as they arrive.
const RELAY_CHUNK: usize = 1 << 20;
/// A Router relays payloads of at least this many bytes with `splice(2)` where the driver can
/// (Linux): from the sender's socket into a pipe of the receiver's connection (of
/// `RELAY_CHUNK` bytes), then from the pipe to the receiver's socket, without the bytes
/// entering user space. `DAFFI_SPLICE=0` turns it off.
const SPLICE_MIN: u64 = 256 * 1024;

/// Whether a Router splices large payloads (see `SPLICE_MIN`).
fn splice_wanted(driver: &AnyDriver) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    driver.splice()
        && *ON.get_or_init(|| {
            !matches!(
                std::env::var("DAFFI_SPLICE").as_deref(),
                Ok("0" | "never" | "off")
            )
        })
}
/// A Router stops reading a connection whose frames go to a peer with more than this queued
/// for it (not yet written to its socket: it reads slower than they come), until that queue is
/// down to `ROUTE_LOW`. A Router's memory stays bounded by about this much per peer.
const ROUTE_HIGH: usize = 16 << 20;
const ROUTE_LOW: usize = 8 << 20;
/// How long a payload relayed through a Router may go without a byte arriving: its receiver's
/// connection carries nothing else meanwhile, so a sender that stalls longer is cut off (its
/// frame ends as lost).
const RELAY_STALL: Duration = Duration::from_secs(10);

/// How long a peer may take to complete the handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to flush what is queued.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(500);
/// Sends of at least this many bytes go zero-copy where the connection does (see
/// `zero_copy_for`).
const ZERO_COPY_MIN: usize = 16 * 1024;

/// Whether sends on connection `fd` go zero-copy (`SENDMSG_ZC`): `DAFFI_SEND_ZC=auto` (the
/// default) for peers on other hosts only — on loopback the kernel copies anyway and the
/// notification costs extra —, `always`, or `never`.
fn zero_copy_for(driver: &AnyDriver, fd: RawFd) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Auto,
        Always,
        Never,
    }
    static MODE: OnceLock<Mode> = OnceLock::new();
    let mode = *MODE.get_or_init(|| match std::env::var("DAFFI_SEND_ZC").as_deref() {
        Ok("always" | "1") => Mode::Always,
        Ok("never" | "0") => Mode::Never,
        Ok("auto" | "") | Err(_) => Mode::Auto,
        Ok(other) => {
            tracing::warn!("DAFFI_SEND_ZC={other:?} is not auto, always or never: using auto");
            Mode::Auto
        }
    });
    driver.zero_copy_send()
        && match mode {
            Mode::Always => true,
            Mode::Never => false,
            Mode::Auto => !sys::peer_is_local(fd),
        }
}

/// A large payload with at least this much still to come is received straight into its own
/// buffer (a pooled receive in progress is stopped for it); less is copied out of the pool.
const TARGETED_RECV: u64 = 256 * 1024;

#[derive(Debug)]
enum Owner {
    Server(Arc<ServerShared>),
    Client(Arc<ClientShared>),
}

impl Owner {
    fn id(&self) -> u64 {
        match self {
            Owner::Server(s) => s.id,
            Owner::Client(c) => c.conn,
        }
    }

    /// The Router this connection belongs to, if it does.
    /// What runs the calls that arrive here.
    fn callee(&self) -> &crate::node::Callee {
        match self {
            Owner::Server(s) => &s.callee,
            Owner::Client(c) => &c.callee,
        }
    }

    fn router(&self) -> Option<&Arc<ServerShared>> {
        match self {
            Owner::Server(s) if s.router => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Conn {
    fd: OwnedFd,
    proto: Connection,
    owner: Owner,
    /// A receive is in flight (targeted, or pooled while `pooled`).
    recv_busy: bool,
    /// The receive in flight is a pooled one, which goes on until it ends or is cancelled.
    pooled: bool,
    /// Its cancel was asked for (a large payload is to be received into its own buffer, or the
    /// connection is throttled).
    cancelling: bool,
    /// Not read from until its server's workers catch up (see `CALLS_HIGH`).
    throttled: bool,
    /// Lent to the client's callers or the server's workers (see [`crate::direct`]): the
    /// engine does not receive.
    parked: bool,
    /// Bytes received elsewhere are being parsed (`feed`): receiving starts again once they
    /// all are, never in between.
    feeding: bool,
    /// A Service connection's receiving side as its workers see it.
    direct: Option<Arc<crate::direct::Direct>>,
    /// Large sends go zero-copy (see `zero_copy_for`).
    zero_copy: bool,
    /// The send in flight: total bytes of its buffers.
    send_busy: bool,
    opened: Instant,
    /// Set once closing started: the reason, and when to stop waiting for a flush.
    closing: Option<(String, Instant)>,
    /// Shut down: nothing more is sent or received.
    shut: bool,
    /// The buffer of the large payload being received, while it is not lent to the kernel.
    body: Option<Body>,
    /// The partly received payload a reading thread handed back with the connection: the
    /// buffer of the next large payload to start, instead of a fresh one (see `unpark`).
    adopt: Option<Body>,
    /// Shared with the binding threads that send on this connection.
    wire: Arc<Wire>,
    /// Frames from binding threads, sent before the engine's own (`proto`'s) frames.
    raw: VecDeque<(Vec<Bytes>, usize)>,
    /// Bytes of such frames in the send in flight (reported to the wire once written).
    raw_sending: usize,
    /// On a Router's connection: where the large payload being received goes.
    relay: Option<Relay>,
    /// When the relayed payload last made progress (see `RELAY_STALL`).
    relay_progress: Instant,
    /// Bytes of the send in flight not written yet.
    in_flight: usize,
    /// On a Router: the connections not read from until this one's queue is down to
    /// `ROUTE_LOW` (they sent it more than it takes).
    held_back: Vec<u64>,
    /// On a Router: how many peers' queues keep this connection from being read.
    waits_for: usize,
    /// On a Router: the pipe through which large payloads relayed to this connection pass
    /// (see `Relay::Stream`), made for the first one.
    pipe: Option<Arc<Pipe>>,
    /// Bytes in that pipe not written to the socket yet.
    piped: usize,
    /// The pipe had no room for what a sender's socket held (many small pieces fill it before
    /// its byte capacity): nothing more goes in until some came out.
    pipe_full: bool,
    /// Bytes of the spliced stretch being written (see `Connection::take_spliced`).
    splicing_out: usize,
}

/// Who would receive on a connection in the engine's place (see [`Conn::lend_wanted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lend {
    /// A thread that asked: a sequential caller, or an idle worker.
    Thread,
    /// The node's event loop.
    Loop,
}

impl Conn {
    /// The receiving side threads or an event loop may take over (see [`crate::direct`]): a
    /// client's, or a Service's (a Router's connections have none).
    fn direct_side(&self) -> Option<&crate::direct::Direct> {
        match (&self.owner, &self.direct) {
            (Owner::Client(cl), _) => Some(&cl.direct),
            (_, Some(d)) => Some(d),
            _ => None,
        }
    }

    /// Whether the calls received on this connection's node are all taken by its workers (and,
    /// on a client, no answer is awaited): a thread may then receive instead. Checked again
    /// under the receiving side's lock when it is lent (see `Direct::try_park`).
    fn idle(&self) -> bool {
        match &self.owner {
            Owner::Client(cl) => cl.calls.is_empty() && cl.callee.calls.backlog().0 == 0,
            Owner::Server(s) => s.callee.calls.backlog().0 == 0,
        }
    }

    /// Who would like to receive on this connection instead of the engine: a watched node's
    /// event loop whenever it can (a Service's only while it has this one connection), or a
    /// thread that asked, while the node is idle (a request its workers have not taken yet
    /// makes them forget asking: they ask again once they have taken it).
    fn lend_wanted(&self) -> Option<Lend> {
        let d = self.direct_side()?;
        let wanted = match &self.owner {
            // Not while its callbacks are behind (the engine throttles it below).
            Owner::Client(cl) if d.for_loop() => {
                return (!cl.callee.calls.over_limit()).then_some(Lend::Loop);
            }
            Owner::Server(s) if d.for_loop() => {
                // A Service whose callbacks are behind is not read by anyone (the engine
                // throttles it below) until they caught up.
                let ok = s.connection_count() == 1 && !s.callee.calls.over_limit();
                return ok.then_some(Lend::Loop);
            }
            Owner::Client(cl) => {
                d.wanted()
                    && cl.calls.is_empty()
                    && (cl.callee.calls.backlog().0 == 0 || d.forget_want())
            }
            Owner::Server(s) => {
                let ok = s.callee.calls.backlog().0 == 0 && s.connection_count() == 1;
                d.wanted() && (ok || d.forget_want())
            }
        };
        wanted.then_some(Lend::Thread)
    }

    /// What is queued on this connection and not written yet: `sendable` only what may go
    /// now (not the frames held behind a payload being relayed into it).
    fn unsent(&self, sendable: bool) -> usize {
        self.proto.queued(sendable) + self.in_flight
    }

    /// This connection's pipe for spliced relays, made the first time (`None`: the system
    /// refused one; the payload then goes through memory).
    fn pipe(&mut self) -> Option<Arc<Pipe>> {
        if self.pipe.is_none() {
            match Pipe::new(RELAY_CHUNK) {
                // A user past their pipe budget (`pipe-user-pages-soft`) gets pipes of a few
                // pages: splicing through those costs more than copying.
                Ok(p) if (p.capacity() as u64) < SPLICE_MIN => {
                    tracing::debug!("pipes of {} bytes only: relaying in memory", p.capacity())
                }
                Ok(p) => self.pipe = Some(Arc::new(p)),
                Err(e) => tracing::debug!("no pipe to splice through ({e}): relaying in memory"),
            }
        }
        self.pipe.clone()
    }

    /// The write of the rest of the spliced stretch being sent (`splicing_out` bytes) from this
    /// connection's pipe.
    fn splice_out_op(&self) -> Option<Op> {
        Some(Op::SpliceOut {
            fd: self.fd.as_raw_fd(),
            pipe: self.pipe.clone()?,
            len: self.splicing_out,
        })
    }

    /// Where the large payload arriving on this connection goes through a pipe: its receiver.
    fn splices_to(&self) -> Option<u64> {
        match self.relay {
            Some(Relay::Stream {
                to, splice: true, ..
            }) if self.proto.body_wanted().is_some() => Some(to),
            _ => None,
        }
    }

    /// The send of `bufs` less its first `skip` bytes; zero-copy when large enough on a
    /// connection that sends so.
    fn send_op(&self, bufs: Vec<Bytes>, skip: usize) -> Op {
        let zero_copy = self.zero_copy && sys::total_len(&bufs) - skip >= ZERO_COPY_MIN;
        Op::Send {
            fd: self.fd.as_raw_fd(),
            bufs,
            skip,
            zero_copy,
        }
    }
}

/// What a Router does with a large payload while it arrives.
#[derive(Debug)]
enum Relay {
    /// Passed on to connection `to`, piece by piece, in a streamed frame (`begin_stream`).
    /// `request`: the call id it has there, when it is a request that wants an answer.
    /// `splice`: the pieces go through `to`'s pipe (see `SPLICE_MIN`), else through memory.
    Stream {
        to: u64,
        request: Option<u64>,
        splice: bool,
    },
    /// Received whole, then queued to `to`, because `to` was already streaming a payload.
    Whole {
        to: u64,
        kind: Kind,
        serde: u8,
        flags: u8,
        forward: Forward<u64>,
    },
    /// Nobody takes it (undeliverable, or its receiver left): received and dropped.
    Drop,
}

#[derive(Debug)]
struct Listener {
    fd: Option<OwnedFd>,
    server: Arc<ServerShared>,
    stopping: bool,
    /// The accept operation ended by itself (e.g. out of descriptors): start it again at the
    /// next tick rather than at once, so a lasting error does not spin.
    rearm: bool,
}

struct Loop {
    driver: AnyDriver,
    shared: Arc<Shared>,
    conns: HashMap<u64, Conn>,
    listeners: HashMap<u64, Listener>,
    /// Each Router's table, by server id.
    routes: HashMap<u64, RoutingTable<u64>>,
    /// What a routing table asked for, waiting to be applied.
    actions: Vec<Action<u64>>,
    dirty: Vec<u64>,
    completions: Vec<Completion>,
    /// Client connections lent to their callers.
    parked: Vec<u64>,
    /// How long the thread spins for completions before it sleeps (see [`crate::spin`]).
    spin: crate::spin::Spin,
}

impl Loop {
    fn new(driver: AnyDriver, shared: Arc<Shared>) -> Loop {
        Loop {
            driver,
            shared,
            conns: HashMap::new(),
            listeners: HashMap::new(),
            routes: HashMap::new(),
            actions: Vec::new(),
            dirty: Vec::new(),
            completions: Vec::new(),
            parked: Vec::new(),
            spin: crate::spin::Spin::default(),
        }
    }

    fn run(mut self) {
        let mut last_tick = Instant::now();
        loop {
            while let Some(cmd) = self.shared.queue.pop() {
                if let Command::Exit = cmd {
                    return;
                }
                self.apply(cmd);
            }
            self.flush_dirty();
            let mut completions = std::mem::take(&mut self.completions);
            // Ask without sleeping for a while first: completions and commands expected soon
            // come without the cost of a wake-up.
            let (shared, driver, parked) = (&self.shared, &mut self.driver, &self.parked);
            let waited = self.spin.wait(None, |sleep| {
                if !sleep {
                    if !shared.queue.is_empty() {
                        return Some(Ok(()));
                    }
                    return match driver.wait(&mut completions, Some(Duration::ZERO)) {
                        Ok(()) if completions.is_empty() => None,
                        other => Some(other),
                    };
                }
                shared.sleeping.store(true, Ordering::SeqCst);
                let mut r = Ok(());
                if shared.queue.is_empty() {
                    // Parked connections are checked often, to take back those nobody uses.
                    let timeout = if parked.is_empty() { TICK } else { PARK_IDLE };
                    r = driver.wait(&mut completions, Some(timeout));
                }
                shared.sleeping.store(false, Ordering::SeqCst);
                Some(r)
            });
            if let Some(Err(e)) = waited {
                tracing::error!("daffi engine wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            self.completions = completions;
            self.drain_completions();
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.tick(last_tick);
            }
        }
    }

    /// Handles the completions the driver gave, then takes back parked connections nobody
    /// used for a while.
    fn drain_completions(&mut self) {
        let mut completions = std::mem::take(&mut self.completions);
        for c in completions.drain(..) {
            self.complete(c);
        }
        self.completions = completions;
        if !self.parked.is_empty() {
            self.reclaim_parked();
        }
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Listen { fd, server } => {
                let id = server.id;
                if server.router {
                    self.routes
                        .insert(id, RoutingTable::new(server.name.clone()));
                }
                self.driver
                    .submit(token(id, ACCEPT), Op::Accept { fd: fd.as_raw_fd() });
                self.listeners.insert(
                    id,
                    Listener {
                        fd: Some(fd),
                        server,
                        stopping: false,
                        rearm: false,
                    },
                );
            }
            Command::Attach { fd, client, local } => {
                let id = client.conn;
                let proto = Connection::new(Role::Client, local);
                let wire = client.wire.clone();
                self.add_conn(id, fd, proto, Owner::Client(client), wire);
            }
            Command::SendRaw { conn, bufs, skip } => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    tracing::debug!("dropping a frame for connection {conn}: it is closed");
                    return;
                };
                c.wire.taken();
                if c.shut {
                    // Never sent: no longer pending either.
                    c.wire.written(sys::total_len(&bufs) - skip);
                    return;
                }
                c.raw.push_back((bufs, skip));
                self.dirty.push(conn);
            }
            Command::Announce { owner, names } => {
                for (id, c) in self.conns.iter_mut() {
                    if c.owner.id() == owner && c.closing.is_none() {
                        c.proto.announce(&names);
                        self.dirty.push(*id);
                    }
                }
            }
            Command::Close { conn, reason } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    if c.closing.is_none() && c.proto.is_open() {
                        c.proto.goodbye(&reason);
                    }
                }
                self.close(conn, reason, true)
            }
            Command::Exit => unreachable!("handled by the loop"),
            Command::Abort { conn, reason } => self.close(conn, reason, false),
            Command::Resume { conn } => self.unpark(conn, None),
            Command::Park { conn } | Command::Recheck { conn } => self.start_recv(conn),
            Command::Unthrottle { server } => {
                let ids: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.throttled && c.owner.id() == server)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    self.start_recv(id);
                }
            }
            Command::StopServer { id } => {
                if let Some(l) = self.listeners.get_mut(&id) {
                    if !l.stopping {
                        l.stopping = true;
                        if l.rearm {
                            // No accept in flight: nothing will complete; close right away.
                            self.close_listener(id);
                        } else {
                            self.driver.cancel_accept(token(id, ACCEPT));
                        }
                    }
                }
                let ids: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.owner.id() == id)
                    .map(|(k, _)| *k)
                    .collect();
                for c in ids {
                    if let Some(conn) = self.conns.get_mut(&c) {
                        if conn.closing.is_none() && conn.proto.is_open() {
                            conn.proto.goodbye("server stopping");
                        }
                    }
                    self.close(c, "server stopping".into(), true);
                }
            }
        }
    }

    fn add_conn(&mut self, id: u64, fd: OwnedFd, proto: Connection, owner: Owner, wire: Arc<Wire>) {
        if let Owner::Server(s) = &owner {
            s.update(|st| st.connections += 1);
        }
        let c = Conn {
            fd,
            proto,
            owner,
            recv_busy: false,
            pooled: false,
            cancelling: false,
            throttled: false,
            parked: false,
            feeding: false,
            direct: None,
            zero_copy: false,
            send_busy: false,
            opened: Instant::now(),
            closing: None,
            shut: false,
            body: None,
            adopt: None,
            wire,
            raw: VecDeque::new(),
            raw_sending: 0,
            relay: None,
            relay_progress: Instant::now(),
            in_flight: 0,
            held_back: Vec::new(),
            waits_for: 0,
            pipe: None,
            piped: 0,
            pipe_full: false,
            splicing_out: 0,
        };
        self.conns.insert(id, c);
        if let Some(c) = self.conns.get_mut(&id) {
            c.zero_copy = zero_copy_for(&self.driver, c.fd.as_raw_fd());
            c.wire.set_zero_copy(c.zero_copy);
        }
        self.start_recv(id);
        self.dirty.push(id);
    }

    fn start_recv(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.parked || c.feeding {
            return;
        }
        // A sequential caller, a Service's idle worker or a watched node's event loop may
        // receive in the engine's place (see `crate::direct`): lend the connection when nothing
        // else needs the engine to read. Never before the handshake completed: only the engine
        // checks it (a Service's token, the peer's name).
        let lend = c.lend_wanted();
        if lend.is_some()
            && c.proto.is_open()
            && !c.shut
            && c.closing.is_none()
            && c.body.is_none()
            && c.relay.is_none()
            && c.proto.recv_idle()
        {
            if c.recv_busy {
                // Lent once the receive in flight has ended.
                if !c.cancelling {
                    c.cancelling = true;
                    let op = if c.pooled { POOLED } else { RECV };
                    self.driver.cancel_recv(token(id, op), c.fd.as_raw_fd());
                }
                return;
            }
            let for_loop = lend == Some(Lend::Loop);
            // An event loop is told once the connection is lent (and the Service's reader
            // set, which the loop looks at).
            let (lent, tell) = match c.direct_side() {
                Some(d) if for_loop => {
                    let tell = d.try_lend_to_loop();
                    (tell.is_some(), tell)
                }
                Some(d) => (d.try_park(|| c.idle()), None),
                None => (false, None),
            };
            if lent {
                c.parked = true;
                // Whoever reads now, reads: the connection is not paused.
                c.wire.reading_resumed();
                // Idle parks are taken back after a while; an event loop, which watches the
                // socket all along, keeps it until it gives it back.
                if !for_loop {
                    self.parked.push(id);
                }
                self.driver.lend(c.fd.as_raw_fd(), true);
                if let (Owner::Server(s), Some(d)) = (&c.owner, &c.direct) {
                    *s.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some((id, d.clone()));
                }
                match tell {
                    Some(n) => n.notify(),
                    // The worker waiting for it, if any (a caller reads at its next call);
                    // workers of a node that exports nothing have nothing to read.
                    None if c.owner.callee().exports_any() => c.owner.callee().calls.wake_one(),
                    None => {}
                }
                return;
            }
        }
        // Back-pressure: a Service whose workers are behind stops reading, and so does a
        // Router's connection that sends more than its receivers take (see `ROUTE_HIGH`).
        c.throttled = match &c.owner {
            Owner::Server(s) if !s.router => s.callee.calls.throttle(),
            Owner::Server(_) => c.waits_for > 0,
            // A client whose callbacks are behind (a worker behind a Router) too, but only
            // while nothing waits for what only this connection brings: an answer to one of
            // its calls, room to send (its peer may be held back by it: two workers calling
            // each other through a Router would wait for each other for ever), a member (a
            // callback may be the one waiting). A wait that starts meanwhile has the engine
            // told (`Recheck`).
            Owner::Client(cl) => {
                // In this order: a call opened after the check below finds the wire paused.
                let paused =
                    cl.callee.calls.throttle() && c.wire.pause_reading() && cl.calls.is_empty();
                if !paused {
                    c.wire.reading_resumed();
                }
                paused
            }
        };
        let splices_to = c.splices_to();
        let large =
            c.proto.body_wanted().is_some_and(|w| w >= TARGETED_RECV) || splices_to.is_some();
        if c.pooled {
            // Small frames keep arriving through the pool; a large payload is worth a targeted
            // receive once the pooled one has ended, and a throttled connection none.
            if (large || c.throttled) && !c.cancelling && !c.shut {
                c.cancelling = true;
                self.driver.cancel_recv(token(id, POOLED), c.fd.as_raw_fd());
            }
            return;
        }
        if c.recv_busy || c.shut || c.throttled {
            return;
        }
        if let Some(to) = splices_to {
            return self.splice_in(id, to);
        }
        if c.body.is_none() && c.relay.is_some() {
            // A relay that stopped splicing (its receiver left) goes on through memory.
            if let Some(want) = c.proto.body_wanted() {
                let size = want.min(RELAY_CHUNK as u64) as usize;
                match alloc_heap(size) {
                    Some(b) => c.body = Some(b),
                    None => {
                        return self.protocol_error(id, format!("cannot allocate {size} bytes"));
                    }
                }
            }
        }
        if !large && self.driver.pooled_recv() {
            c.recv_busy = true;
            c.pooled = true;
            let fd = c.fd.as_raw_fd();
            self.driver.submit(token(id, POOLED), Op::RecvPooled { fd });
            return;
        }
        let (buf, max) = match (c.proto.body_wanted(), c.body.take()) {
            // A large payload goes straight into its own buffer.
            (Some(want), Some(body)) => (RecvBuf::Body(body), want.min(usize::MAX as u64) as usize),
            (_, body) => {
                c.body = body;
                let t = c.proto.recv_target();
                (RecvBuf::Vec(t.buf), t.max)
            }
        };
        c.recv_busy = true;
        self.driver.submit(
            token(id, RECV),
            Op::Recv {
                fd: c.fd.as_raw_fd(),
                buf,
                max,
            },
        );
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty.drain(..) {
            self.flush(id);
        }
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    fn flush(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.send_busy || c.shut {
            return;
        }
        if c.raw.is_empty() && !c.proto.has_transmit() {
            // A graceful close waits for the queue to drain.
            if c.closing.is_some() {
                self.shut(id);
            }
            return;
        }
        if !c.wire.engine_may_send() {
            // Frames handed over by binding threads must go first; they are on their way.
            return;
        }
        let mut bufs = Vec::new();
        let mut skip = 0;
        for (i, (frame, s)) in c.raw.drain(..).enumerate() {
            // Only the first frame can have been started by a binding thread: a direct write
            // happens only when nothing at all is pending (see `Wire::send`).
            debug_assert!(
                i == 0 || s == 0,
                "a frame after the first was partly written"
            );
            if i == 0 {
                skip = s;
            }
            c.raw_sending += sys::total_len(&frame) - s;
            bufs.extend(frame);
        }
        c.proto.poll_transmit(&mut bufs, 64);
        if bufs.is_empty() {
            // The next bytes are a stretch of a payload spliced into this connection's pipe.
            let Some(n) = c.proto.take_spliced() else {
                return;
            };
            c.splicing_out = n as usize;
            let Some(op) = c.splice_out_op() else {
                return self.close(id, "spliced bytes without a pipe".into(), false);
            };
            c.send_busy = true;
            c.in_flight = c.splicing_out;
            self.driver.submit(token(id, SEND), op);
            return;
        }
        c.send_busy = true;
        c.in_flight = sys::total_len(&bufs) - skip;
        self.driver.submit(token(id, SEND), c.send_op(bufs, skip));
    }

    fn complete(&mut self, c: Completion) {
        let id = c.token >> 2;
        match c.outcome {
            Outcome::Accepted { res, more } => self.accepted(id, res, more),
            Outcome::Recv { buf, res } => self.received(id, buf, res),
            Outcome::Pooled { buf, res, more } => self.received_pooled(id, buf, res, more),
            Outcome::Sent { bufs, skip, res } => self.sent(id, bufs, skip, res),
            Outcome::Spliced { res, .. } if c.token & 3 == RECV => self.spliced_in(id, res),
            Outcome::Spliced { res, .. } => self.spliced_out(id, res),
        }
    }

    /// Connection `id`'s relayed payload goes on through `to`'s pipe: moves the next piece
    /// into it while it has room (`spliced_out` calls again when it has more).
    fn splice_in(&mut self, id: u64, to: u64) {
        let (pipe, room) = match self.conns.get(&to) {
            // A receiver going away: `relays_lose` turns the relay to memory (and drops it).
            Some(d) if d.shut => return,
            Some(d) if d.pipe_full && d.piped > 0 => return,
            Some(d) => match &d.pipe {
                Some(p) => (p.clone(), p.capacity().saturating_sub(d.piped)),
                None => return,
            },
            None => return,
        };
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let Some(want) = c.proto.body_wanted() else {
            return;
        };
        // In pieces of at least half the pipe (or what is left): fewer, larger splices, while
        // the other half is being written out.
        let pipe_half = pipe.capacity() as u64 / 2;
        if (room as u64) < want.min(pipe_half.max(1)) {
            return;
        }
        let len = want.min(room as u64) as usize;
        c.recv_busy = true;
        let fd = c.fd.as_raw_fd();
        self.driver
            .submit(token(id, RECV), Op::SpliceIn { fd, pipe, len });
    }

    /// `n` more bytes of connection `id`'s relayed payload are in its receiver's pipe.
    fn spliced_in(&mut self, id: u64, res: io::Result<usize>) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.recv_busy = false;
        c.cancelling = false;
        let n = match res {
            Ok(0) => {
                self.peer_closed(id);
                return self.maybe_finish(id);
            }
            Ok(n) => n,
            Err(e) if daffi_driver::cancelled(&e) && !c.shut => {
                self.start_recv(id);
                return self.maybe_finish(id);
            }
            Err(e) if daffi_driver::pipe_full(&e) && !c.shut => {
                // The pipe is full: go on once some of it was written out (at once if it has
                // been meanwhile).
                if let Some(d) = c.splices_to().and_then(|to| self.conns.get_mut(&to)) {
                    d.pipe_full = true;
                }
                self.start_recv(id);
                return self.maybe_finish(id);
            }
            Err(e) => {
                self.close(id, e.to_string(), false);
                return self.maybe_finish(id);
            }
        };
        c.relay_progress = Instant::now();
        // The bytes are in `to`'s pipe: queued there in their place. If `to` is going away
        // (its pipe with it) or the relay was dropped, they go with the pipe.
        if let Some(Relay::Stream { to, .. }) = c.relay {
            if let Some(d) = self.conns.get_mut(&to) {
                if d.proto.is_streaming() && !d.shut {
                    d.piped += n;
                    d.proto.stream_spliced(n as u64);
                    self.dirty.push(to);
                }
            }
            self.hold_back(id, to);
        }
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        match c.proto.body_received(n as u64) {
            Err(e) => self.protocol_error(id, e.to_string()),
            Ok(()) => {
                if let Err(e) = self.after_parse(id) {
                    self.protocol_error(id, e);
                } else {
                    self.dirty.push(id);
                    self.start_recv(id);
                }
            }
        }
        self.maybe_finish(id);
    }

    /// Bytes of a spliced stretch were written from connection `id`'s pipe to its socket.
    fn spliced_out(&mut self, id: u64, res: io::Result<usize>) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        match res {
            Ok(n) if n > 0 => {
                c.splicing_out -= n.min(c.splicing_out);
                c.piped -= n.min(c.piped);
                c.pipe_full = false;
                // A stretch being written keeps its pipe (see `pipe_drained`).
                let more = (c.splicing_out > 0 && !c.shut)
                    .then(|| c.splice_out_op())
                    .flatten();
                if let Some(op) = more {
                    c.in_flight = c.splicing_out;
                    self.driver.submit(token(id, SEND), op);
                } else {
                    c.send_busy = false;
                    c.in_flight = 0;
                    c.splicing_out = 0;
                    if c.raw.is_empty() && !c.proto.has_transmit() {
                        c.wire.engine_idle();
                    }
                    self.flush(id);
                }
                self.pipe_drained(id);
                self.release_held_back(id);
            }
            Ok(_) => {
                c.send_busy = false;
                self.close(id, "send made no progress".into(), false);
            }
            Err(e) => {
                c.send_busy = false;
                c.in_flight = 0;
                self.close(id, e.to_string(), false);
            }
        }
        self.maybe_finish(id);
    }

    /// Connection `id`'s pipe has room again (or the relay through it ended): the payload
    /// being spliced into it may go on; with none, the pipe is given back once empty, since
    /// pipes count against a per-user budget (a Router with many peers keeps one only per
    /// payload in flight).
    fn pipe_drained(&mut self, id: u64) {
        let splicer = self
            .conns
            .iter()
            .find(|(_, s)| matches!(s.relay, Some(Relay::Stream { to, splice: true, .. }) if to == id))
            .map(|(k, s)| (*k, s.recv_busy || s.splices_to().is_none()));
        match splicer {
            None => {
                if let Some(c) = self.conns.get_mut(&id) {
                    if c.piped == 0 && c.splicing_out == 0 {
                        c.pipe = None;
                        c.pipe_full = false;
                    }
                }
            }
            Some((from, false)) => {
                if let Some(c) = self.conns.get_mut(&from) {
                    // Waiting for the receiver is no stall of the sender.
                    c.relay_progress = Instant::now();
                }
                self.start_recv(from);
            }
            Some((_, true)) => {}
        }
    }

    fn close_listener(&mut self, id: u64) {
        let Some(mut l) = self.listeners.remove(&id) else {
            return;
        };
        if let Some(fd) = l.fd.take() {
            self.driver.close(fd);
        }
        if let Some(p) = &l.server.unix_path {
            let _ = std::fs::remove_file(p);
        }
        l.server.update(|s| s.listening = false);
    }

    fn accepted(&mut self, id: u64, res: io::Result<OwnedFd>, more: bool) {
        let Some(l) = self.listeners.get_mut(&id) else {
            return;
        };
        let server = l.server.clone();
        if !more && !l.stopping {
            // The kernel ended the multishot accept (out of descriptors, out of memory, a full
            // completion queue...): keep the listener and try again shortly. The last
            // completion may still carry a connection.
            tracing::warn!(
                "server {} paused accepting: {:?}",
                server.name,
                res.as_ref().err()
            );
            l.rearm = true;
            if let Ok(fd) = res {
                self.adopt(server, fd);
            }
            return;
        }
        if !more {
            // The accept operation ended after a stop: the listener can go.
            self.close_listener(id);
            return;
        }
        if l.stopping {
            return;
        }
        match res {
            Ok(fd) => self.adopt(server, fd),
            Err(e) => tracing::warn!("accept on server {} failed: {e}", server.name),
        }
    }

    /// Starts serving an accepted connection.
    fn adopt(&mut self, server: Arc<ServerShared>, fd: OwnedFd) {
        if let Err(e) = sys::prepare_accepted(&fd) {
            tracing::warn!("dropping an accepted connection: {e}");
            return;
        }
        let conn_id = IDS.fetch_add(1, Ordering::Relaxed);
        let proto = Connection::new(Role::Server, server.local());
        let wire = Arc::new(Wire::new(conn_id, fd.as_raw_fd()));
        // Workers may receive on a Service's connection themselves (not on a Router's).
        let direct = (!server.router && server.alarm.is_some()).then(|| {
            Arc::new(crate::direct::Direct::new(
                fd.as_raw_fd(),
                server.max_message_size,
            ))
        });
        server.update(|st| {
            st.wires.insert(conn_id, wire.clone());
            if let Some(n) = &st.loop_notifier {
                // An event loop's answers wait for room (see `Node::room_for`).
                wire.watch(n.clone());
            }
            if let Some(d) = &direct {
                if let Some(n) = &st.loop_notifier {
                    d.lend_to_loop(n.clone());
                }
                st.directs.insert(conn_id, d.clone());
            }
        });
        // A second connection: the one lent to a worker comes back to the engine.
        self.take_back_reader(&server);
        self.add_conn(conn_id, fd, proto, Owner::Server(server), wire);
        if let Some(c) = self.conns.get_mut(&conn_id) {
            c.direct = direct;
        }
    }

    /// Takes back the connection lent to `server`'s workers, if any: at once when it is parked,
    /// else by raising the alarm of the worker reading it (which then hands it back).
    fn take_back_reader(&mut self, server: &ServerShared) {
        let lent = server
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some((conn, d)) = lent else {
            return;
        };
        if d.reclaim() {
            self.unpark(conn, None);
        } else if d.recall() && !d.for_loop() {
            // A worker is reading it: it hands it back at the end of its turn, or at once
            // when woken by the alarm. (An event loop is told through its notifier.)
            if let Some(alarm) = &server.alarm {
                alarm.raise();
            }
        }
    }

    fn received(&mut self, id: u64, buf: RecvBuf, res: io::Result<usize>) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.recv_busy = false;
        // A cancel asked for is over either way (it may have lost the race with data).
        c.cancelling = false;
        if res.as_ref().is_err_and(daffi_driver::cancelled) {
            // Stopped on purpose (the connection is being parked): nothing was received.
            match buf {
                RecvBuf::Vec(v) => {
                    if let Err(e) = c.proto.recv_done(v) {
                        self.protocol_error(id, e.to_string());
                        return;
                    }
                }
                RecvBuf::Body(b) => c.body = Some(b),
            }
            self.start_recv(id);
            self.maybe_finish(id);
            return;
        }
        self.parse_received(id, buf, res);
    }

    /// A pooled receive completed: its bytes go where a targeted receive would have put them.
    fn received_pooled(
        &mut self,
        id: u64,
        buf: Option<PoolBuf>,
        res: io::Result<usize>,
        more: bool,
    ) {
        if let Some(b) = &buf {
            self.feed(id, b.as_slice());
        }
        if let Some(b) = buf {
            self.driver.recycle(b);
        }
        if let (Err(e), true) = (&res, more) {
            // The stream is broken (its receive goes on until the shutdown ends it).
            self.close(id, e.to_string(), false);
            return;
        }
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if more {
            // What the bytes just parsed call for (a cancel for a large payload, a throttle,
            // a park), decided once they all are.
            self.start_recv(id);
            return;
        }
        c.recv_busy = false;
        c.pooled = false;
        c.cancelling = false;
        match res {
            Ok(0) => self.peer_closed(id),
            // Data with the last completion, the cancel we asked for, or a pool that ran dry
            // (buffers are back by now): receive on.
            Ok(_) => self.start_recv(id),
            Err(e) if daffi_driver::pooled_restart(&e) => {
                self.start_recv(id);
            }
            Err(e) => self.close(id, e.to_string(), false),
        }
        self.maybe_finish(id);
    }

    /// Parses bytes that arrived in a pool buffer, a piece at a time: each piece goes where a
    /// targeted receive would have written it (the staging buffer, or a large payload's own).
    fn feed(&mut self, id: u64, data: &[u8]) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.feeding = true;
        }
        self.feed_pieces(id, data);
        if let Some(c) = self.conns.get_mut(&id) {
            c.feeding = false;
        }
    }

    fn feed_pieces(&mut self, id: u64, mut data: &[u8]) {
        while !data.is_empty() {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if c.shut {
                return;
            }
            let (buf, n) = match (c.proto.body_wanted(), c.body.take()) {
                (Some(want), Some(mut body)) => {
                    let room = (body.capacity() - body.len()) as u64;
                    let n = want.min(room).min(data.len() as u64) as usize;
                    body.extend_from_slice(&data[..n]);
                    (RecvBuf::Body(body), n)
                }
                (Some(want), None) if c.relay.is_some() => {
                    // Bytes of a spliced relay that came with a pooled receive (before it
                    // ended): they go on through memory.
                    let n = want.min(data.len() as u64) as usize;
                    let Some(mut body) = alloc_heap(n) else {
                        return self.protocol_error(id, format!("cannot allocate {n} bytes"));
                    };
                    body.extend_from_slice(&data[..n]);
                    (RecvBuf::Body(body), n)
                }
                (_, body) => {
                    c.body = body;
                    let t = c.proto.recv_target();
                    let n = t.max.min(data.len());
                    let mut v = t.buf;
                    v.extend_from_slice(&data[..n]);
                    (RecvBuf::Vec(v), n)
                }
            };
            if n == 0 {
                // Hand the buffer back untouched, then stop: a parser that takes nothing would
                // never progress (a runtime bug, reported as a broken connection, not a spin).
                match buf {
                    RecvBuf::Vec(v) => {
                        let _ = c.proto.recv_done(v);
                    }
                    RecvBuf::Body(b) => c.body = Some(b),
                }
                self.protocol_error(id, "a receive buffer without room".into());
                return;
            }
            data = &data[n..];
            // After a protocol error nothing more is parsed.
            if !self.parse_received(id, buf, Ok(n)) {
                return;
            }
        }
    }

    /// Gives a receive's buffer back to the parser and acts on what it found (`Ok(0)`: the
    /// peer closed). Returns whether the connection is still read from.
    fn parse_received(&mut self, id: u64, buf: RecvBuf, res: io::Result<usize>) -> bool {
        let Some(c) = self.conns.get_mut(&id) else {
            return false;
        };
        let mut go_on = false;
        // Every buffer goes back where it came from, whatever the outcome.
        let n = *res.as_ref().unwrap_or(&0) as u64;
        let parsed = match buf {
            RecvBuf::Vec(v) => c.proto.recv_done(v),
            RecvBuf::Body(b) => {
                c.body = Some(b);
                c.proto.body_received(n)
            }
        };
        match (res, parsed) {
            (Ok(0), _) => self.peer_closed(id),
            (Ok(_), Err(e)) => self.protocol_error(id, e.to_string()),
            (Ok(_), Ok(())) => {
                self.relay_piece(id);
                if let Err(e) = self.after_parse(id) {
                    // Nothing more is read from a connection that broke the protocol.
                    self.protocol_error(id, e);
                } else {
                    // The handshake answer, `no function` errors, ... were queued by proto.
                    self.dirty.push(id);
                    self.start_recv(id);
                    go_on = true;
                }
            }
            (Err(e), _) => self.close(id, e.to_string(), false),
        }
        self.maybe_finish(id);
        go_on
    }

    /// Client connection `id` comes back from its callers: parse what they read past their
    /// answers (`rest`, else what the handback left), then receive again.
    fn unpark(&mut self, id: u64, rest: Option<Vec<u8>>) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if !c.parked {
            return;
        }
        if let Owner::Server(s) = &c.owner {
            s.forget_reader(id);
        }
        let (rest, partial) = match rest {
            Some(rest) => (rest, None),
            None => c.direct_side().map(|d| d.resume()).unwrap_or_default(),
        };
        c.parked = false;
        // A thread that stopped in the middle of a large payload hands back its head (`rest`)
        // and the part it received: the payload goes on into that buffer.
        c.adopt = partial;
        self.driver.lend(c.fd.as_raw_fd(), false);
        self.parked.retain(|p| *p != id);
        self.feed(id, &rest);
        if let Some(c) = self.conns.get_mut(&id) {
            // Unused when the connection is closing (nothing more is parsed) or the head broke
            // the protocol; otherwise never, since the head came with it.
            if c.adopt.take().is_some() && !c.shut && c.closing.is_none() {
                tracing::error!("connection {id}: a partly received payload lost its frame");
                self.close(id, "a partly received payload lost its frame".into(), false);
                return;
            }
        }
        self.start_recv(id);
        self.maybe_finish(id);
    }

    /// Takes back the parked connections nobody used lately.
    fn reclaim_parked(&mut self) {
        let ids = self.parked.clone();
        for id in ids {
            let rest = self
                .conns
                .get(&id)
                .and_then(Conn::direct_side)
                .and_then(|d| d.reclaim_idle(PARK_IDLE));
            if rest.is_some() {
                self.unpark(id, rest);
            }
        }
    }

    /// The peer ended the stream.
    fn peer_closed(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let why = if c.proto.recv_idle() {
            "peer closed the connection"
        } else {
            "peer closed mid-frame"
        };
        self.close(id, why.into(), false);
    }

    fn protocol_error(&mut self, id: u64, e: String) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        tracing::warn!("closing connection {id}: protocol error: {e}");
        c.proto.goodbye(&format!("protocol error: {e}"));
        self.dirty.push(id);
        self.close(id, format!("protocol error: {e}"), true);
    }

    /// Hands parsed frames to their owners and, when a large payload starts, gives it a buffer
    /// (filled first with the part already received with the header).
    fn after_parse(&mut self, id: u64) -> Result<(), String> {
        loop {
            self.drain_events(id);
            let Some(c) = self.conns.get_mut(&id) else {
                return Ok(());
            };
            let len = match (c.body.is_some(), c.proto.body_len()) {
                (false, Some(len)) => len,
                _ => return Ok(()),
            };
            if c.owner.router().is_some() {
                if !self.relay_body(id)? {
                    return Ok(());
                }
                continue;
            }
            let len = usize::try_from(len).map_err(|_| format!("payload of {len} bytes"))?;
            let body = match c.adopt.take() {
                Some(b) if b.capacity() == len => Some(b),
                Some(b) => {
                    return Err(format!(
                        "a payload of {len} bytes continues in a buffer of {}",
                        b.capacity()
                    ));
                }
                None => alloc_body(len),
            };
            let mut body = body.ok_or_else(|| format!("cannot allocate {len} bytes"))?;
            let filled = body.len() as u64;
            body.extend_from_slice(c.proto.take_body_prefix());
            c.body = Some(body);
            c.proto.body_received(filled).map_err(|e| e.to_string())?;
        }
    }

    /// A Router's connection is receiving a large payload: route it when it starts, and give it
    /// its next buffer. Returns true when the parser may have more to report (parse on).
    fn relay_body(&mut self, id: u64) -> Result<bool, String> {
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(false);
        };
        if c.relay.is_none() {
            c.relay_progress = Instant::now();
            self.start_relay(id)?;
            let Some(c) = self.conns.get_mut(&id) else {
                return Ok(false);
            };
            if let Some(Relay::Whole { .. }) = c.relay {
                // One buffer for all of it, as on any other connection.
                let len = c.proto.body_len().unwrap_or(0);
                let len = usize::try_from(len).map_err(|_| format!("payload of {len} bytes"))?;
                let mut body =
                    alloc_heap(len).ok_or_else(|| format!("cannot allocate {len} bytes"))?;
                body.extend_from_slice(c.proto.take_body_prefix());
                c.body = Some(body);
                c.proto.body_received(0).map_err(|e| e.to_string())?;
                return Ok(true);
            }
            // What arrived with the header goes first.
            let prefix = Bytes::copy_from_slice(c.proto.take_body_prefix());
            c.proto.body_received(0).map_err(|e| e.to_string())?;
            self.relay_data(id, prefix);
        }
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(false);
        };
        let Some(want) = c.proto.body_wanted() else {
            // All of it is there: the frame (or its trailer byte) is next.
            return Ok(c.proto.body_len().is_none());
        };
        if c.splices_to().is_some() {
            // The kernel moves it (see `start_recv`).
            return Ok(false);
        }
        let size = match c.relay {
            Some(Relay::Whole { .. }) => want,
            _ => want.min(RELAY_CHUNK as u64),
        };
        let size = usize::try_from(size).map_err(|_| format!("payload of {size} bytes"))?;
        c.body = Some(alloc_heap(size).ok_or_else(|| format!("cannot allocate {size} bytes"))?);
        Ok(false)
    }

    /// Routes the large payload that starts on connection `id` (header and meta are there).
    fn start_relay(&mut self, id: u64) -> Result<(), String> {
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        let Some(router) = c.owner.router().cloned() else {
            return Ok(());
        };
        let Some((h, meta)) = c.proto.body_head() else {
            return Ok(());
        };
        let (h, meta) = (*h, meta.to_owned());
        let Some(table) = self.routes.get_mut(&router.id) else {
            c.relay = Some(Relay::Drop);
            return Ok(());
        };
        let out = &mut self.actions;
        let forward = if h.kind == Kind::Request {
            let (target, function) = meta
                .split_once('\0')
                .ok_or("a request without a peer name on a routed connection")?;
            table.route_request(id, h.call_id, target, function, h.flags, h.payload_len, out)
        } else {
            table.route_answer(id, h.kind, h.call_id, h.payload_len, out)
        };
        let flags = h.flags.without_wire().0;
        let splice = h.payload_len >= SPLICE_MIN && splice_wanted(&self.driver);
        let relay = match forward {
            None => Relay::Drop,
            Some(f) => match self.conns.get_mut(&f.to) {
                Some(d) if d.closing.is_none() && !d.shut => {
                    if d.proto.is_streaming() {
                        Relay::Whole {
                            to: f.to,
                            kind: h.kind,
                            serde: h.serde,
                            flags,
                            forward: f,
                        }
                    } else {
                        let meta = if h.kind == Kind::Request {
                            &f.meta
                        } else {
                            &meta
                        };
                        d.proto.begin_stream(
                            h.kind,
                            f.call_id,
                            h.serde,
                            flags,
                            meta,
                            h.payload_len,
                        );
                        self.dirty.push(f.to);
                        let request =
                            (h.kind == Kind::Request && f.call_id != 0).then_some(f.call_id);
                        let splice = splice && d.pipe().is_some();
                        Relay::Stream {
                            to: f.to,
                            request,
                            splice,
                        }
                    }
                }
                _ => Relay::Drop,
            },
        };
        if let Some(c) = self.conns.get_mut(&id) {
            c.relay = Some(relay);
        }
        self.apply_actions(&router, Some(id));
        Ok(())
    }

    /// Passes on the piece of a relayed payload that just filled its buffer (or ended it).
    fn relay_piece(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.relay.is_some() {
            c.relay_progress = Instant::now();
        }
        if !matches!(c.relay, Some(Relay::Stream { .. }) | Some(Relay::Drop)) {
            return;
        }
        let done = c.body.as_ref().is_some_and(|b| b.is_full()) || c.proto.body_wanted().is_none();
        if !done {
            return;
        }
        if let Some(b) = c.body.take() {
            let piece = Payload::Body(b).into_bytes();
            self.relay_data(id, piece);
        }
    }

    fn relay_data(&mut self, id: u64, data: Bytes) {
        let to = match self.conns.get(&id).and_then(|c| c.relay.as_ref()) {
            Some(Relay::Stream { to, .. }) => *to,
            _ => return,
        };
        if data.is_empty() {
            return;
        }
        if let Some(d) = self.conns.get_mut(&to) {
            if d.proto.is_streaming() && !d.shut {
                d.proto.stream_data(data);
                self.dirty.push(to);
            }
        }
        self.hold_back(id, to);
    }

    /// The relayed frame on connection `id` ended, complete or not (`aborted`). `payload`: the
    /// frame's payload when it was received whole.
    fn end_relay(&mut self, id: u64, aborted: bool, payload: Option<Payload>) {
        let Some(relay) = self.conns.get_mut(&id).and_then(|c| c.relay.take()) else {
            return;
        };
        let to = match relay {
            Relay::Stream { to, .. } | Relay::Whole { to, .. } => Some(to),
            Relay::Drop => None,
        };
        self.finish_relay(relay, aborted, payload);
        if let Some(to) = to {
            self.hold_back(id, to);
        }
    }

    fn finish_relay(&mut self, relay: Relay, aborted: bool, payload: Option<Payload>) {
        match relay {
            Relay::Stream { to, request, .. } => {
                if let Some(d) = self.conns.get_mut(&to) {
                    if d.proto.is_streaming() {
                        if aborted {
                            d.proto.abort_stream();
                        } else {
                            d.proto.end_stream();
                        }
                        self.dirty.push(to);
                    }
                }
                self.pipe_drained(to);
                if let (true, Some(call_id)) = (aborted, request) {
                    // The callee drops an aborted request: nobody is to wait for its answer.
                    for table in self.routes.values_mut() {
                        table.cancel(to, call_id);
                    }
                }
            }
            Relay::Whole {
                to,
                kind,
                serde,
                flags,
                forward,
            } => {
                let Some(d) = self
                    .conns
                    .get_mut(&to)
                    .filter(|d| d.closing.is_none() && !d.shut)
                else {
                    return;
                };
                match (aborted, payload) {
                    (false, Some(p)) => {
                        let bytes = p.into_bytes();
                        let (id, meta) = (forward.call_id, &forward.meta);
                        d.proto.queue_frame(kind, id, serde, flags, meta, bytes);
                    }
                    // A lost answer: its caller learns at once that it will not come.
                    _ if kind != Kind::Request => {
                        let msg = Bytes::from_static(b"the answer was cut off: its sender left");
                        d.proto
                            .send_error(forward.call_id, error_code::DISCONNECTED, msg);
                    }
                    // A lost request: nobody is to wait for its answer.
                    _ => {
                        if forward.call_id != 0 {
                            for table in self.routes.values_mut() {
                                table.cancel(to, forward.call_id);
                            }
                        }
                        return;
                    }
                }
                self.dirty.push(to);
            }
            Relay::Drop => {}
        }
    }

    /// Connection `gone` is closing: relays into it drop their payloads from now on.
    fn relays_lose(&mut self, gone: u64) {
        let mut waiting = Vec::new();
        for (id, c) in self.conns.iter_mut() {
            if let Some(Relay::Stream { to, .. } | Relay::Whole { to, .. }) = c.relay {
                if to == gone {
                    if c.splices_to().is_some() && !c.recv_busy {
                        waiting.push(*id);
                    }
                    c.relay = Some(Relay::Drop);
                }
            }
        }
        // Those that waited for its pipe to drain receive again, into memory.
        for id in waiting {
            self.start_recv(id);
        }
    }

    fn sent(&mut self, id: u64, bufs: Vec<Bytes>, skip: usize, res: io::Result<usize>) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        match res {
            Ok(0) if skip < sys::total_len(&bufs) => {
                // A stream socket that takes nothing is gone; never let a truncated frame be
                // followed by another.
                c.send_busy = false;
                self.close(id, "send made no progress".into(), false);
            }
            Ok(n) => {
                let skip = skip + n;
                if skip < sys::total_len(&bufs) && !c.shut {
                    // The rest of the same buffers, from where the kernel stopped.
                    c.in_flight = sys::total_len(&bufs) - skip;
                    self.driver.submit(token(id, SEND), c.send_op(bufs, skip));
                    self.release_held_back(id);
                    return;
                }
                c.send_busy = false;
                c.in_flight = 0;
                c.wire.written(std::mem::take(&mut c.raw_sending));
                if c.raw.is_empty() && !c.proto.has_transmit() {
                    c.wire.engine_idle();
                }
                self.flush(id);
                self.release_held_back(id);
            }
            Err(e) => {
                c.send_busy = false;
                c.in_flight = 0;
                self.close(id, e.to_string(), false);
            }
        }
        self.maybe_finish(id);
    }

    /// On a Router: connection `from` just queued something on `to`. If `to` has more than
    /// `ROUTE_HIGH` waiting to be written, `from` is not read from again until it is down to
    /// `ROUTE_LOW` (its receive stops at the next `start_recv`, right after this parse).
    fn hold_back(&mut self, from: u64, to: u64) {
        if from == to {
            return;
        }
        let relaying = self.relays_into(from, to);
        let Some(d) = self.conns.get_mut(&to) else {
            return;
        };
        if d.shut || d.unsent(relaying) <= ROUTE_HIGH || d.held_back.contains(&from) {
            return;
        }
        d.held_back.push(from);
        if let Some(c) = self.conns.get_mut(&from) {
            c.waits_for += 1;
        }
    }

    /// Reads again the connections that `id`'s queue held back, once it is down to
    /// `ROUTE_LOW` for them (or `id` is shut or gone: nothing more goes to it).
    fn release_held_back(&mut self, id: u64) {
        let Some(d) = self.conns.get_mut(&id) else {
            return;
        };
        if d.held_back.is_empty() {
            return;
        }
        let held = std::mem::take(&mut d.held_back);
        let (gone, total, sendable) = (d.shut, d.unsent(false), d.unsent(true));
        let (released, kept): (Vec<u64>, Vec<u64>) = held.into_iter().partition(|&from| {
            let left = if self.relays_into(from, id) {
                sendable
            } else {
                total
            };
            gone || left <= ROUTE_LOW
        });
        if let Some(d) = self.conns.get_mut(&id) {
            d.held_back = kept;
        }
        self.release(&released);
    }

    /// Whether `from` is relaying a payload into `to`: it is held back only by what may go
    /// now there, never by the frames waiting behind its own payload.
    fn relays_into(&self, from: u64, to: u64) -> bool {
        matches!(
            self.conns.get(&from).and_then(|c| c.relay.as_ref()),
            Some(Relay::Stream { to: t, .. }) if *t == to
        )
    }

    fn release(&mut self, released: &[u64]) {
        for &from in released {
            let Some(c) = self.conns.get_mut(&from) else {
                continue;
            };
            c.waits_for = c.waits_for.saturating_sub(1);
            if c.waits_for == 0 {
                // Its relayed payload, if any, was not stalled by its sender meanwhile.
                c.relay_progress = Instant::now();
                self.start_recv(from);
            }
        }
    }

    fn drain_events(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if let Some(router) = c.owner.router() {
            let router = router.clone();
            return self.drain_router(id, &router);
        }
        while let Some(ev) = c.proto.poll_event() {
            match ev {
                Event::Open(peer) => {
                    c.wire.set_peer_max(peer.max_message_size);
                    match &c.owner {
                        Owner::Server(s) => {
                            tracing::debug!("{} connected to {}", peer.name, s.name);
                            s.update(|st| {
                                st.members.insert(id, peer.name.clone());
                            });
                            s.callee.events.push(MemberEvent {
                                connected: true,
                                member: peer.name,
                            });
                        }
                        // Through a Router, the connection is open once the list of the peers
                        // present arrived (the first `Joined`), so that calls can be routed.
                        Owner::Client(cl) => {
                            cl.direct
                                .set_quiet(peer.router && !crate::spin::routed_clients_spin());
                            cl.update(|st| {
                                if !peer.router {
                                    st.phase = Phase::Open;
                                }
                                st.peer = Some(peer);
                            })
                        }
                    }
                }
                Event::Request {
                    call_id,
                    name,
                    serde,
                    flags,
                    payload,
                    ..
                } => {
                    // The payload's buffer is consumed whatever happens to the call.
                    let payload = take_payload(payload, &mut c.body);
                    if !c.proto.local().functions.contains(&name) {
                        if !flags.no_reply() {
                            let msg =
                                format!("{:?} exposes no function {name:?}", c.proto.local().name);
                            c.proto
                                .send_error(call_id, error_code::NO_FUNCTION, Bytes::from(msg));
                            self.dirty.push(id);
                        }
                        continue;
                    }
                    let Some(payload) = payload else {
                        continue;
                    };
                    if let Owner::Server(s) = &c.owner {
                        if serde >= 64 || s.serde_mask & (1 << serde) == 0 {
                            if !flags.no_reply() {
                                let msg =
                                    format!("{:?} does not accept serde format {serde}", s.name);
                                c.proto
                                    .send_error(call_id, error_code::REFUSED, Bytes::from(msg));
                                self.dirty.push(id);
                            }
                            continue;
                        }
                    }
                    let call = IncomingCall {
                        conn: id,
                        call_id,
                        name,
                        serde,
                        flags,
                        payload,
                    };
                    let weight = call.payload.len() + crate::node::CALL_WEIGHT;
                    c.owner.callee().calls.push_weighed(call, weight);
                }
                Event::Response {
                    call_id,
                    serde,
                    flags,
                    payload,
                } => {
                    let Some(payload) = take_payload(payload, &mut c.body) else {
                        continue;
                    };
                    if let Owner::Client(cl) = &c.owner {
                        cl.calls.complete(
                            call_id,
                            Ok(Reply {
                                serde,
                                flags,
                                payload,
                            }),
                        );
                    }
                }
                Event::Error {
                    call_id,
                    code,
                    payload,
                } => {
                    let Some(payload) = take_payload(payload, &mut c.body) else {
                        continue;
                    };
                    if let Owner::Client(cl) = &c.owner {
                        let bytes = match payload {
                            Payload::Inline(v) => v,
                            Payload::Body(b) => b.as_slice().to_vec(),
                        };
                        cl.calls
                            .complete(call_id, Err(CallError::from_wire(&code, bytes)));
                    }
                }
                Event::Announce(_) => {
                    if let Owner::Client(cl) = &c.owner {
                        let peer = c.proto.peer().cloned();
                        cl.update(|st| st.peer = peer);
                    }
                }
                Event::Aborted {
                    kind,
                    call_id,
                    payload,
                } => {
                    // Its sender lost the payload midway: release it, never use it.
                    let _ = take_payload(payload, &mut c.body);
                    if let (Owner::Client(cl), false) = (&c.owner, kind == Kind::Request) {
                        let why = "the answer was cut off: its sender lost it midway".to_owned();
                        cl.calls
                            .complete(call_id, Err(CallError::Disconnected(why)));
                    }
                }
                Event::Joined(peers) => {
                    if let Owner::Client(cl) = &c.owner {
                        cl.update(|st| {
                            for p in peers {
                                cl.callee.events.push(MemberEvent {
                                    connected: true,
                                    member: p.name.clone(),
                                });
                                st.peers.insert(p.name.clone(), p);
                            }
                            if st.phase == Phase::Connecting {
                                st.phase = Phase::Open;
                            }
                        });
                    }
                }
                Event::Left(name) => {
                    if let Owner::Client(cl) = &c.owner {
                        cl.update(|st| {
                            if st.peers.remove(&name).is_some() {
                                cl.callee.events.push(MemberEvent {
                                    connected: false,
                                    member: name,
                                });
                            }
                        });
                    }
                }
                Event::PeerAnnounce { peer, names } => {
                    if let Owner::Client(cl) = &c.owner {
                        cl.update(|st| {
                            if let Some(p) = st.peers.get_mut(&peer) {
                                add_names(&mut p.functions, &names);
                            }
                        });
                    }
                }
                Event::Goodbye(reason) => {
                    tracing::debug!("connection {id}: peer says goodbye: {reason}");
                    if let Owner::Client(cl) = &c.owner {
                        cl.update(|st| {
                            if reason.starts_with("evicted") {
                                st.evicted = true;
                            }
                            st.reason = reason;
                        });
                    }
                }
                _ => {}
            }
        }
    }

    /// A Router's connection: everything it receives goes through the routing table.
    fn drain_router(&mut self, id: u64, router: &Arc<ServerShared>) {
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            let Some(ev) = c.proto.poll_event() else {
                return;
            };
            let ends_relay = matches!(
                ev,
                Event::Request { .. }
                    | Event::Response { .. }
                    | Event::Error { .. }
                    | Event::Aborted { .. }
            );
            if c.relay.is_some() && ends_relay {
                // The end of a payload relayed while it arrived (it is the next frame).
                let (aborted, payload) = match ev {
                    Event::Aborted { payload, .. } => (true, payload),
                    Event::Request { payload, .. }
                    | Event::Response { payload, .. }
                    | Event::Error { payload, .. } => (false, payload),
                    _ => unreachable!("checked above"),
                };
                let whole = match c.relay {
                    Some(Relay::Whole { .. }) => take_payload(payload, &mut c.body),
                    _ => None,
                };
                self.end_relay(id, aborted, whole);
                continue;
            }
            let Some(table) = self.routes.get_mut(&router.id) else {
                continue;
            };
            let out = &mut self.actions;
            match ev {
                Event::Aborted {
                    kind,
                    call_id,
                    payload,
                } => {
                    // A peer gave up on an answer midway: its caller learns it is gone.
                    let _ = take_payload(payload, &mut c.body);
                    if kind != Kind::Request {
                        let msg = Bytes::from_static(b"the answer was cut off: its sender lost it");
                        let code = error_code::DISCONNECTED.to_owned();
                        table.answer(id, Kind::Error, call_id, 0, Flags(0), code, msg, out);
                    }
                }
                Event::Open(peer) => {
                    c.wire.set_peer_max(peer.max_message_size);
                    tracing::debug!("{} joined router {}", peer.name, router.name);
                    router.update(|st| {
                        st.members.insert(id, peer.name.clone());
                    });
                    table.join(id, peer, out);
                }
                Event::Request {
                    call_id,
                    peer,
                    name,
                    serde,
                    flags,
                    payload,
                } => {
                    if let Some(p) = take_payload(payload, &mut c.body) {
                        let target = peer.unwrap_or_default();
                        let p = p.into_bytes();
                        table.request(id, call_id, &target, &name, serde, flags, p, out);
                    }
                }
                Event::Response {
                    call_id,
                    serde,
                    flags,
                    payload,
                } => {
                    if let Some(p) = take_payload(payload, &mut c.body) {
                        let p = p.into_bytes();
                        let k = Kind::Response;
                        table.answer(id, k, call_id, serde, flags, String::new(), p, out);
                    }
                }
                Event::Error {
                    call_id,
                    code,
                    payload,
                } => {
                    if let Some(p) = take_payload(payload, &mut c.body) {
                        let p = p.into_bytes();
                        table.answer(id, Kind::Error, call_id, 0, Flags(0), code, p, out);
                    }
                }
                Event::Announce(names) => table.announce(id, &names, out),
                Event::Goodbye(reason) => {
                    tracing::debug!("connection {id}: peer says goodbye: {reason}");
                }
                _ => {}
            }
            // Only a connection's own calls and answers hold it back (see `hold_back`): what
            // the table tells the others about it (joined, announced) must never stop it.
            self.apply_actions(router, ends_relay.then_some(id));
        }
    }

    /// Carries out what a routing table asked for.
    fn apply_actions(&mut self, router: &Arc<ServerShared>, from: Option<u64>) {
        let mut actions = std::mem::take(&mut self.actions);
        for a in actions.drain(..) {
            match a {
                Action::Send {
                    to,
                    kind,
                    call_id,
                    serde,
                    flags,
                    meta,
                    payload,
                } => {
                    if let Some(c) = self.conns.get_mut(&to) {
                        if c.closing.is_none() && !c.shut {
                            c.proto
                                .queue_frame(kind, call_id, serde, flags, &meta, payload);
                            self.dirty.push(to);
                        }
                    }
                    if let Some(from) = from {
                        self.hold_back(from, to);
                    }
                }
                Action::Evict { conn, reason } => {
                    tracing::info!("router {}: connection {conn} {reason}", router.name);
                    router.update(|st| {
                        st.members.remove(&conn);
                    });
                    if let Some(c) = self.conns.get_mut(&conn) {
                        if c.closing.is_none() && !c.shut {
                            c.proto.goodbye(&reason);
                        }
                    }
                    self.close(conn, reason, true);
                }
                Action::Member { connected, name } => {
                    router.callee.events.push(MemberEvent {
                        connected,
                        member: name,
                    });
                }
            }
        }
        if self.actions.is_empty() {
            self.actions = actions;
        }
    }

    /// Starts closing connection `id`. `graceful`: send what is queued first (bounded by
    /// [`CLOSE_GRACE`]); otherwise shut the socket down now.
    fn close(&mut self, id: u64, reason: String, graceful: bool) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.closing.is_none() {
            c.closing = Some((reason, Instant::now() + CLOSE_GRACE));
        }
        if graceful && c.proto.is_streaming() {
            // A payload relayed into this connection ends here, marked lost, so that the
            // frames held behind it (the goodbye) follow a whole frame; its sender's bytes
            // are dropped from now on.
            c.proto.abort_stream();
            self.relays_lose(id);
        }
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if graceful && !c.shut {
            self.dirty.push(id);
        } else {
            self.shut(id);
        }
    }

    fn shut(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if !c.shut {
            c.shut = true;
            sys::shutdown(c.fd.as_raw_fd());
        }
        // Nothing more goes to it: what it held back is read again.
        self.release_held_back(id);
        self.maybe_finish(id);
    }

    /// Removes a shut connection once the kernel has given back all its buffers (and no caller
    /// thread reads it).
    fn maybe_finish(&mut self, id: u64) {
        let Some(c) = self.conns.get(&id) else { return };
        if !c.shut || c.recv_busy || c.send_busy {
            return;
        }
        if let Some(d) = c.direct_side() {
            if !d.close_unless_lent() {
                // Its reader sees the end of the stream and hands it back (Resume).
                return;
            }
        }
        if let (Owner::Server(s), true) = (&c.owner, c.parked) {
            s.forget_reader(id);
        }
        if c.parked {
            self.parked.retain(|p| *p != id);
        }
        let mut c = self.conns.remove(&id).expect("checked above");
        self.release(&std::mem::take(&mut c.held_back));
        if let Some(relay) = c.relay.take() {
            // Its payload stopped midway: whoever was receiving it is told so.
            self.finish_relay(relay, true, None);
        }
        self.relays_lose(id);
        let reason = c.closing.map(|(r, _)| r).unwrap_or_default();
        c.wire.close();
        self.driver.close(c.fd);
        match c.owner {
            Owner::Server(s) => {
                let mut left = None;
                s.update(|st| {
                    st.wires.remove(&id);
                    st.directs.remove(&id);
                    st.connections -= 1;
                    left = st.members.remove(&id);
                });
                if s.router {
                    // The table tells the others, fails the calls waiting on this peer and
                    // reports the departure.
                    if let Some(table) = self.routes.get_mut(&s.id) {
                        table.leave(id, &mut self.actions);
                        self.apply_actions(&s, None);
                    }
                    if let Some(member) = left {
                        tracing::debug!("{member} left router {} ({reason})", s.name);
                    }
                } else if let Some(member) = left {
                    tracing::debug!("{member} left {} ({reason})", s.name);
                    s.callee.events.push(MemberEvent {
                        connected: false,
                        member,
                    });
                }
            }
            Owner::Client(cl) => cl.closed(&reason),
        }
    }

    fn tick(&mut self, now: Instant) {
        for (id, l) in self.listeners.iter_mut() {
            if l.rearm && !l.stopping {
                if let Some(fd) = &l.fd {
                    l.rearm = false;
                    self.driver
                        .submit(token(*id, ACCEPT), Op::Accept { fd: fd.as_raw_fd() });
                }
            }
        }
        let mut cut = Vec::new();
        for (id, c) in &self.conns {
            match &c.closing {
                Some((_, deadline)) if now >= *deadline && !c.shut => cut.push((*id, None)),
                None if !c.proto.is_open() && now - c.opened > HANDSHAKE_LIMIT => {
                    cut.push((*id, Some("no handshake in time")))
                }
                None if matches!(c.relay, Some(Relay::Stream { .. }))
                    && c.waits_for == 0
                    // Waiting for its receiver to take what is in the pipe is no stall.
                    && c
                        .splices_to()
                        .and_then(|to| self.conns.get(&to))
                        .is_none_or(|d| d.piped == 0)
                    && now - c.relay_progress > RELAY_STALL =>
                {
                    cut.push((*id, Some("a relayed payload stalled")))
                }
                _ => {}
            }
        }
        for (id, why) in cut {
            if let Some(why) = why {
                tracing::warn!("closing connection {id}: {why}");
                self.close(id, why.into(), false);
            } else {
                self.shut(id);
            }
        }
    }
}

/// The payload of a parsed frame: inline bytes, or the large-payload buffer it was received into.
fn take_payload(wire: WirePayload, body: &mut Option<Body>) -> Option<Payload> {
    match wire {
        WirePayload::Inline(v) => Some(Payload::Inline(v)),
        WirePayload::External(len) => match body.take() {
            Some(b) if b.len() as u64 == len => Some(Payload::Body(b)),
            other => {
                tracing::error!("large payload of {len} bytes arrived without its buffer");
                *body = other;
                None
            }
        },
    }
}
