//! Servers and clients: the thread-safe handles a binding holds.
//!
//! Each handle shares state with the engine thread; calling into a handle never blocks the
//! engine, and the engine never waits for a handle.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use daffi_driver::sys;
use daffi_proto::frame::{Kind, encode_head, error_code};
use daffi_proto::handshake::add_names;
use daffi_proto::{Flags, Local, Peer};

use crate::call::{CallError, CallTable, Reply};
use crate::direct::{Direct, Worker};
use crate::engine::{Command, Engine};
use crate::inbox::{Inbox, Next};
use crate::notify::{Completions, Notifier};
use crate::payload::Payload;
use crate::wire::Wire;

/// Where a node listens or connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A call from a peer, waiting for the binding to run it.
#[derive(Debug)]
pub struct IncomingCall {
    /// The connection it came on; answer through the same node.
    pub conn: u64,
    pub call_id: u64,
    pub name: String,
    pub serde: u8,
    pub flags: Flags,
    pub payload: Payload,
}

/// A peer joined or left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberEvent {
    pub connected: bool,
    pub member: String,
}

/// Why a node could not start or connect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("address {0} is already in use")]
    InUse(Address),
    #[error("cannot listen on {0}: {1}")]
    Listen(Address, io::Error),
    #[error("cannot connect to {0}: {1}")]
    Connect(Address, io::Error),
    #[error("handshake with {0} failed: {1}")]
    Handshake(Address, String),
    #[error("no handshake from {0} within {1:?}")]
    Timeout(Address, Duration),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The receiving half every node has: calls to run, membership events, exported functions.
#[derive(Debug, Default)]
pub(crate) struct Callee {
    pub(crate) calls: Inbox<IncomingCall>,
    pub(crate) events: Inbox<MemberEvent>,
    pub(crate) functions: Mutex<Vec<String>>,
}

/// Back-pressure on a Service, and on a Client exporting callbacks (a worker behind a Router)
/// while none of its own calls waits for an answer: once the calls received and not yet taken
/// by its workers weigh more than this (payload bytes plus `CALL_WEIGHT` each), its connections
/// are not read until they weigh half as much; the kernel's buffers fill and the senders'
/// sends wait.
pub(crate) const CALLS_HIGH: usize = 64 << 20;
/// What each waiting call counts on top of its payload, so that floods of tiny calls are
/// bounded too.
pub(crate) const CALL_WEIGHT: usize = 256;

impl Callee {
    fn new(functions: Vec<String>) -> Callee {
        Callee {
            functions: Mutex::new(functions),
            ..Default::default()
        }
    }

    /// A Service's or a Client's: its calls inbox is bounded (see `CALLS_HIGH`).
    fn bounded(functions: Vec<String>) -> Callee {
        Callee {
            calls: Inbox::with_limit(CALLS_HIGH),
            ..Callee::new(functions)
        }
    }

    fn watch(&self, n: &Arc<Notifier>) {
        self.calls.watch(n.clone());
        self.events.watch(n.clone());
    }

    /// Whether function `name` is exported.
    pub(crate) fn exports(&self, name: &str) -> bool {
        lock(&self.functions).iter().any(|f| f == name)
    }

    /// Whether any function is exported.
    pub(crate) fn exports_any(&self) -> bool {
        !lock(&self.functions).is_empty()
    }

    /// Adds new names; returns those that were not exported yet.
    fn add_functions(&self, names: &[String]) -> Vec<String> {
        add_names(&mut lock(&self.functions), names)
    }
}

// ───────────────────────────────────────── server ─────────────────────────────────────────

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub name: String,
    pub address: Address,
    pub max_message_size: u64,
    pub functions: Vec<String>,
    /// A shared secret every client must present in its handshake (empty: none).
    pub token: Vec<u8>,
    /// The serde formats (numbers) accepted in requests; others are refused unread. `None`:
    /// all of them.
    pub serde_formats: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
pub(crate) struct ServerState {
    /// Connections that completed the handshake: connection id → peer name.
    pub(crate) members: HashMap<u64, String>,
    pub(crate) listening: bool,
    pub(crate) connections: usize,
    /// The sending side of every connection, for answers.
    pub(crate) wires: HashMap<u64, Arc<Wire>>,
    /// The receiving side of every connection, for workers that receive themselves.
    pub(crate) directs: HashMap<u64, Arc<Direct>>,
    /// Connections holding deferred answers (see [`Node::respond_deferred`]).
    pub(crate) corked: Vec<Arc<Wire>>,
    /// Set while an event loop watches the Service: connections are lent to it, not to the
    /// workers.
    pub(crate) loop_notifier: Option<Arc<Notifier>>,
}

#[derive(Debug)]
pub(crate) struct ServerShared {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) max_message_size: u64,
    pub(crate) token: Vec<u8>,
    /// Bit `n` set: serde format `n` is accepted.
    pub(crate) serde_mask: u64,
    /// A Router: forwards between its clients, runs no calls of its own.
    pub(crate) router: bool,
    pub(crate) callee: Callee,
    pub(crate) unix_path: Option<PathBuf>,
    pub(crate) state: Mutex<ServerState>,
    pub(crate) changed: Condvar,
    /// The connection lent to the workers, if any (see [`crate::direct`]).
    pub(crate) reader: Mutex<Option<(u64, Arc<Direct>)>>,
    /// Raised by the engine to take the lent connection back from a worker reading it.
    pub(crate) alarm: Option<sys::Alarm>,
}

impl ServerShared {
    /// How many connections the server has.
    pub(crate) fn connection_count(&self) -> usize {
        lock(&self.state).connections
    }

    /// Connection `conn` is no longer lent to the workers or the event loop (if it was).
    pub(crate) fn forget_reader(&self, conn: u64) {
        let mut reader = lock(&self.reader);
        if reader.as_ref().is_some_and(|(c, _)| *c == conn) {
            *reader = None;
        }
    }

    /// What a worker reading this Service's connection needs (see [`crate::direct`]); with
    /// `alarm`, one the engine can wake to take the connection back.
    pub(crate) fn worker(&self, alarm: bool) -> Worker<'_> {
        Worker {
            callee: &self.callee,
            serde_mask: Some(self.serde_mask),
            alarm: self.alarm.as_ref().filter(|_| alarm),
            routed: false,
        }
    }

    pub(crate) fn local(&self) -> Local {
        Local {
            name: self.name.clone(),
            functions: lock(&self.callee.functions).clone(),
            max_message_size: self.max_message_size,
            token: self.token.clone(),
            router: self.router,
        }
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut ServerState)) {
        f(&mut lock(&self.state));
        self.changed.notify_all();
    }
}

/// A listening node: a daffi Service (see [`crate::Router`] for the other kind).
#[derive(Debug)]
pub struct Server {
    engine: Engine,
    shared: Arc<ServerShared>,
    address: Address,
}

impl Server {
    /// Binds `cfg.address` and starts accepting; returns once connections are accepted.
    pub fn start(engine: &Engine, cfg: ServerConfig) -> Result<Server, StartError> {
        Server::start_as(engine, cfg, false)
    }

    pub(crate) fn start_as(
        engine: &Engine,
        cfg: ServerConfig,
        router: bool,
    ) -> Result<Server, StartError> {
        let (fd, address, unix_path) = match &cfg.address {
            Address::Tcp { host, port } => {
                let (fd, addr) =
                    sys::listen_tcp(host, *port).map_err(|e| listen_error(&cfg.address, e))?;
                (
                    fd,
                    Address::Tcp {
                        host: host.clone(),
                        port: addr.port(),
                    },
                    None,
                )
            }
            Address::Unix(p) => {
                let fd = sys::listen_unix(p).map_err(|e| listen_error(&cfg.address, e))?;
                (fd, cfg.address.clone(), Some(p.clone()))
            }
        };
        let shared = Arc::new(ServerShared {
            id: engine.next_id(),
            name: cfg.name,
            max_message_size: cfg.max_message_size,
            token: cfg.token,
            serde_mask: match &cfg.serde_formats {
                None => u64::MAX,
                Some(f) => f.iter().filter(|n| **n < 64).fold(0, |m, n| m | 1 << n),
            },
            // A Router's connections are never throttled: its callee is only for events.
            callee: if router {
                Callee::new(cfg.functions)
            } else {
                Callee::bounded(cfg.functions)
            },
            router,
            unix_path,
            state: Mutex::new(ServerState {
                listening: true,
                ..Default::default()
            }),
            changed: Condvar::new(),
            reader: Mutex::new(None),
            alarm: if router { None } else { sys::Alarm::new().ok() },
        });
        let (hook_engine, id) = (engine.clone(), shared.id);
        shared.callee.calls.on_drain(Box::new(move || {
            hook_engine.send(Command::Unthrottle { server: id });
        }));
        engine.send(Command::Listen {
            fd,
            server: shared.clone(),
        });
        Ok(Server {
            engine: engine.clone(),
            shared,
            address,
        })
    }

    /// The bound address (with the real port when port 0 was asked for).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Names of the connected peers.
    pub fn members(&self) -> Vec<String> {
        let mut m: Vec<String> = lock(&self.shared.state).members.values().cloned().collect();
        m.sort();
        m
    }

    fn wire(&self, conn: u64) -> Option<Arc<Wire>> {
        lock(&self.shared.state).wires.get(&conn).cloned()
    }

    /// Closes the listener and every connection. Returns once the address can be bound again
    /// (bounded wait: connections whose peers do not read are cut after a grace period).
    /// How many requests this Service's workers received on their own threads rather than
    /// through the engine thread, on the connections still open (a diagnostic; see the
    /// `direct` module).
    pub fn requests_read_by_workers(&self) -> u64 {
        lock(&self.shared.state)
            .directs
            .values()
            .map(|d| d.requests())
            .sum()
    }

    /// An idle worker asks the engine to lend it the Service's only connection.
    fn ask_to_read(&self) {
        if self.shared.alarm.is_none() {
            return;
        }
        let st = lock(&self.shared.state);
        if st.directs.len() != 1 {
            return;
        }
        if let Some((conn, d)) = st.directs.iter().next() {
            if d.ask() {
                self.engine.send(Command::Park { conn: *conn });
            }
        }
    }

    /// Calls received and not yet taken by a worker: how many, and their weight (payload bytes
    /// plus a fixed 256 each). Above 64 MiB of weight the Service stops reading its connections
    /// until its workers are down to half that (back-pressure).
    pub fn backlog(&self) -> (usize, usize) {
        self.shared.callee.calls.backlog()
    }

    pub fn stop(&self) {
        // Answers held for an event loop go out before the goodbyes.
        Node::flush(self);
        self.engine.send(Command::StopServer { id: self.shared.id });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut s = lock(&self.shared.state);
        let mut in_time = true;
        while s.listening || s.connections > 0 {
            let now = Instant::now();
            if now >= deadline {
                in_time = false;
                break;
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(s);
        if !in_time {
            // Logged after the lock is released: the binding's log handler may need a lock (the
            // GIL) that another thread holds while it waits for this one.
            tracing::warn!(
                "server {} did not close every connection in time",
                self.shared.name
            );
        }
        self.shared.callee.calls.close();
        self.shared.callee.events.close();
    }
}

// ───────────────────────────────────────── router ─────────────────────────────────────────

#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub name: String,
    pub address: Address,
    /// The largest payload the Router accepts from a client (it forwards nothing larger).
    pub max_message_size: u64,
    /// A shared secret every client must present in its handshake (empty: none).
    pub token: Vec<u8>,
}

/// A Router: clients connect to it and call each other through it. It forwards requests and
/// answers between connections on the engine thread, without decoding payloads and without
/// involving its binding; it tells every client who else is connected and what they export.
/// See `daffi_proto::RoutingTable`.
#[derive(Debug)]
pub struct Router {
    server: Server,
}

impl Router {
    /// Binds `cfg.address` and starts accepting; returns once connections are accepted.
    pub fn start(engine: &Engine, cfg: RouterConfig) -> Result<Router, StartError> {
        let cfg = ServerConfig {
            name: cfg.name,
            address: cfg.address,
            max_message_size: cfg.max_message_size,
            functions: Vec::new(),
            token: cfg.token,
            serde_formats: None,
        };
        Ok(Router {
            server: Server::start_as(engine, cfg, true)?,
        })
    }
}

/// A Router runs no calls: `next_call` only waits, and answers are never needed. Its binding
/// uses `next_event` for its membership handlers.
impl Node for Router {
    fn core(&self) -> NodeCore<'_> {
        self.server.core()
    }

    fn respond(&self, _conn: u64, _call_id: u64, _serde: u8, _flags: u8, _payload: Bytes) {}

    fn respond_error(&self, _conn: u64, _call_id: u64, _code: &'static str, _payload: Bytes) {}

    fn announce(&self, _names: &[String]) {}

    fn respond_deferred(&self, _conn: u64, _call_id: u64, _serde: u8, _flags: u8, _p: Bytes) {}

    fn flush(&self) {}
}

/// How long a client that had stopped reading (its callbacks are behind) reads on for news of
/// a call's receiver before the call fails for want of one (see `Client::route`).
const CATCH_UP: Duration = Duration::from_secs(1);

/// Whether a call that finds no receiver while its client's reading is paused waits for news
/// of one (see `Client::route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// No: an event loop's call, which must not wait.
    Never,
    /// Yes: for up to [`CATCH_UP`], and never past the call's deadline, if it has one.
    By(Option<Instant>),
}

/// What every listening node (a [`Server`] or a [`Router`]) offers its binding.
pub trait Listening {
    /// The bound address (with the real port when port 0 was asked for).
    fn address(&self) -> &Address;
    /// Names of the connected peers.
    fn members(&self) -> Vec<String>;
    /// Closes the listener and every connection (see [`Server::stop`]).
    fn stop(&self);
}

impl Listening for Server {
    fn address(&self) -> &Address {
        Server::address(self)
    }

    fn members(&self) -> Vec<String> {
        Server::members(self)
    }

    fn stop(&self) {
        Server::stop(self)
    }
}

impl Listening for Router {
    fn address(&self) -> &Address {
        self.server.address()
    }

    fn members(&self) -> Vec<String> {
        self.server.members()
    }

    fn stop(&self) {
        self.server.stop()
    }
}

fn listen_error(address: &Address, e: io::Error) -> StartError {
    if e.kind() == io::ErrorKind::AddrInUse {
        StartError::InUse(address.clone())
    } else {
        StartError::Listen(address.clone(), e)
    }
}

// ───────────────────────────────────────── client ─────────────────────────────────────────

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: String,
    pub address: Address,
    pub max_message_size: u64,
    pub functions: Vec<String>,
    /// The server's shared secret, if it requires one.
    pub token: Vec<u8>,
    /// Limit for the TCP connect plus the handshake.
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Connecting,
    Open,
    Closed,
}

#[derive(Debug)]
pub(crate) struct ClientState {
    pub(crate) phase: Phase,
    /// The server: a Service, or a Router (`peer.router`).
    pub(crate) peer: Option<Peer>,
    /// Through a Router: the other peers, by name.
    pub(crate) peers: BTreeMap<String, Peer>,
    /// Through a Router: how many calls of each function went out, for round-robin.
    pub(crate) turns: HashMap<String, usize>,
    pub(crate) reason: String,
    pub(crate) evicted: bool,
}

impl ClientState {
    fn routed(&self) -> bool {
        self.peer.as_ref().is_some_and(|p| p.router)
    }

    /// Names of the peers calls can go to.
    fn reachable(&self) -> Vec<String> {
        if self.phase != Phase::Open {
            return Vec::new();
        }
        if self.routed() {
            self.peers.keys().cloned().collect()
        } else {
            self.peer.iter().map(|p| p.name.clone()).collect()
        }
    }
}

/// Where one call goes: the peer's name, and the meta of its request.
#[derive(Debug)]
struct Route {
    target: String,
    meta: String,
}

#[derive(Debug)]
pub(crate) struct ClientShared {
    pub(crate) conn: u64,
    pub(crate) name: String,
    pub(crate) callee: Callee,
    pub(crate) calls: CallTable,
    pub(crate) wire: Arc<Wire>,
    /// Who receives on the connection (see [`crate::direct`]).
    pub(crate) direct: Direct,
    pub(crate) state: Mutex<ClientState>,
    pub(crate) changed: Condvar,
}

impl ClientShared {
    /// What a worker (or event loop) reading this client's connection needs (see
    /// [`crate::direct`]).
    pub(crate) fn worker(&self) -> Worker<'_> {
        Worker {
            callee: &self.callee,
            serde_mask: None,
            alarm: None,
            routed: lock(&self.state).routed(),
        }
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut ClientState)) {
        f(&mut lock(&self.state));
        self.changed.notify_all();
    }

    /// The connection is gone: fail every waiting call. The phase changes first, so a caller
    /// that registers a call and then checks the phase can never be missed (see `Client::call`).
    pub(crate) fn closed(&self, reason: &str) {
        let mut evicted = false;
        self.update(|s| {
            s.phase = Phase::Closed;
            if s.reason.is_empty() {
                s.reason = reason.to_owned();
            }
            evicted = s.evicted;
        });
        let reason = lock(&self.state).reason.clone();
        self.calls.fail_all(if evicted {
            CallError::Evicted(reason)
        } else {
            CallError::Disconnected(reason)
        });
        self.callee.calls.close();
        self.callee.events.close();
    }
}

/// A connected node (a daffi Client): calls the peer's functions, may export its own.
#[derive(Debug)]
pub struct Client {
    engine: Engine,
    shared: Arc<ClientShared>,
    address: Address,
    /// Where the answers of [`Client::start_async`] calls go, once the client is watched.
    completions: OnceLock<Arc<Completions>>,
}

impl Client {
    /// Connects and completes the handshake within `cfg.connect_timeout`.
    pub fn connect(engine: &Engine, cfg: ClientConfig) -> Result<Client, StartError> {
        let started = Instant::now();
        let fd: OwnedFd = match &cfg.address {
            Address::Tcp { host, port } => sys::connect_tcp(host, *port, cfg.connect_timeout),
            Address::Unix(p) => sys::connect_unix(p, cfg.connect_timeout),
        }
        .map_err(|e| StartError::Connect(cfg.address.clone(), e))?;
        let conn = engine.next_id();
        let shared = Arc::new(ClientShared {
            wire: Arc::new(Wire::new(conn, fd.as_raw_fd())),
            direct: Direct::new(fd.as_raw_fd(), cfg.max_message_size),
            conn,
            name: cfg.name.clone(),
            callee: Callee::bounded(cfg.functions.clone()),
            calls: CallTable::default(),
            state: Mutex::new(ClientState {
                phase: Phase::Connecting,
                peer: None,
                peers: BTreeMap::new(),
                turns: HashMap::new(),
                reason: String::new(),
                evicted: false,
            }),
            changed: Condvar::new(),
        });
        let local = Local {
            name: cfg.name,
            functions: cfg.functions,
            max_message_size: cfg.max_message_size,
            token: cfg.token,
            router: false,
        };
        engine.send(Command::Attach {
            fd,
            client: shared.clone(),
            local,
        });
        let hook_engine = engine.clone();
        shared.callee.calls.on_drain(Box::new(move || {
            hook_engine.send(Command::Recheck { conn });
        }));
        let client = Client {
            engine: engine.clone(),
            shared,
            address: cfg.address,
            completions: OnceLock::new(),
        };
        let deadline = started + cfg.connect_timeout;
        let mut s = lock(&client.shared.state);
        loop {
            match s.phase {
                Phase::Open => break,
                Phase::Closed => {
                    return Err(StartError::Handshake(
                        client.address.clone(),
                        s.reason.clone(),
                    ));
                }
                Phase::Connecting => {}
            }
            let now = Instant::now();
            if now >= deadline {
                drop(s);
                client.close();
                return Err(StartError::Timeout(
                    client.address.clone(),
                    cfg.connect_timeout,
                ));
            }
            s = client
                .shared
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(s);
        Ok(client)
    }

    pub fn address(&self) -> &Address {
        &self.address
    }

    pub fn is_open(&self) -> bool {
        lock(&self.shared.state).phase == Phase::Open
    }

    /// The server (a Service or a Router) as it announced itself.
    pub fn peer(&self) -> Option<Peer> {
        lock(&self.shared.state).peer.clone()
    }

    /// Why the connection closed (empty while open).
    pub fn close_reason(&self) -> String {
        lock(&self.shared.state).reason.clone()
    }

    /// How many answers this client's callers received on their own threads rather than
    /// through the engine thread (a diagnostic; see the `direct` module).
    pub fn answers_read_by_callers(&self) -> u64 {
        self.shared.direct.answered()
    }

    /// How many requests for this client's functions its workers received on their own
    /// threads rather than through the engine thread (a diagnostic; see the `direct` module).
    pub fn requests_read_by_workers(&self) -> u64 {
        self.shared.direct.requests()
    }

    /// True when connected to a Router (calls go to the peers behind it).
    pub fn is_routed(&self) -> bool {
        lock(&self.shared.state).routed()
    }

    /// Names of the peers this client can call now: the Service, or every other peer of the
    /// Router.
    pub fn peers(&self) -> Vec<String> {
        lock(&self.shared.state).reachable()
    }

    /// What a peer announced: its functions and message limit.
    pub fn peer_info(&self, name: &str) -> Option<Peer> {
        let s = lock(&self.shared.state);
        if s.routed() {
            s.peers.get(name).cloned()
        } else {
            s.peer.clone().filter(|p| p.name == name)
        }
    }

    /// Refuses a call that cannot be sent: not connected, or evicted.
    fn check_open(s: &ClientState) -> Result<(), CallError> {
        match s.phase {
            Phase::Open => Ok(()),
            _ if s.evicted => Err(CallError::Evicted(s.reason.clone())),
            _ => {
                let why = if s.reason.is_empty() {
                    "not connected".to_owned()
                } else {
                    s.reason.clone()
                };
                Err(CallError::Disconnected(why))
            }
        }
    }

    /// Checks that peer `target` may receive a call of `name`.
    fn check_target(&self, s: &ClientState, target: &str, name: &str) -> Result<(), CallError> {
        let connected = || format!("{:?}", s.reachable());
        if target == self.shared.name {
            return Err(CallError::Transmission(format!(
                "a node cannot call itself ({target:?}) for {name:?}"
            )));
        }
        let peer = if s.routed() {
            s.peers.get(target)
        } else {
            s.peer.as_ref().filter(|p| p.name == target)
        };
        let Some(peer) = peer else {
            return Err(CallError::Transmission(format!(
                "receiver {target:?} is not connected (connected: {}); cannot call {name:?}",
                connected()
            )));
        };
        if !peer.functions.iter().any(|f| f == name) {
            return Err(CallError::Transmission(format!(
                "receiver {target:?} exposes no function {name:?} (connected: {})",
                connected()
            )));
        }
        Ok(())
    }

    /// The peers exposing `name`, sorted by name.
    fn exposing(s: &ClientState, name: &str) -> Vec<String> {
        let has = |p: &Peer| p.functions.iter().any(|f| f == name);
        if s.routed() {
            s.peers
                .values()
                .filter(|p| has(p))
                .map(|p| p.name.clone())
                .collect()
        } else {
            s.peer
                .iter()
                .filter(|p| has(p))
                .map(|p| p.name.clone())
                .collect()
        }
    }

    fn nobody_exposes(s: &ClientState, name: &str) -> CallError {
        CallError::Transmission(format!(
            "no connected peer exposes function {name:?} (connected: {:?})",
            s.reachable()
        ))
    }

    /// Picks the receiver of one call (`receiver`, or the next peer exposing `name` in turn)
    /// and checks the payload against its limit.
    ///
    /// A client whose callbacks are behind stops reading (see `Wire::pause_reading`) and so
    /// stops hearing of peers that join. With `catch_up` (a thread that may wait, never an event
    /// loop's: see [`CatchUp`]), a call that finds no receiver while reading is paused has the
    /// connection read again and gives the news that long to arrive before it fails.
    fn route(
        &self,
        receiver: Option<&str>,
        name: &str,
        size: usize,
        catch_up: CatchUp,
    ) -> Result<Route, CallError> {
        self.catching_up(catch_up, |s| self.route_now(s, receiver, name, size))
    }

    /// `attempt` with what is known now; if it fails for want of a peer (its error's flag)
    /// while reading is paused, and `catch_up` allows, again as news of peers comes, for as long
    /// as it allows, the connection being read meanwhile.
    fn catching_up<T>(
        &self,
        catch_up: CatchUp,
        mut attempt: impl FnMut(&mut ClientState) -> Result<T, (CallError, bool)>,
    ) -> Result<T, CallError> {
        let until = match attempt(&mut lock(&self.shared.state)) {
            Ok(r) => return Ok(r),
            Err((e, missing)) => match catch_up {
                CatchUp::By(deadline) if missing && self.shared.wire.is_reading_paused() => {
                    let latest = Instant::now() + CATCH_UP;
                    deadline.map_or(latest, |d| d.min(latest))
                }
                _ => return Err(e),
            },
        };
        let _reading = self.shared.wire.need_reading(&self.engine);
        let mut s = lock(&self.shared.state);
        loop {
            // Tried again under the lock the wait releases: no news can slip in between.
            let missing = match attempt(&mut s) {
                Ok(r) => return Ok(r),
                Err((e, false)) => return Err(e),
                Err((e, true)) => e,
            };
            let now = Instant::now();
            if now >= until {
                return Err(missing);
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// [`Client::route`] with what is known now; an error says whether a receiver was missing
    /// (news of peers may help) or not.
    fn route_now(
        &self,
        s: &mut ClientState,
        receiver: Option<&str>,
        name: &str,
        size: usize,
    ) -> Result<Route, (CallError, bool)> {
        Self::check_open(s).map_err(|e| (e, false))?;
        let target = match receiver {
            Some(r) => {
                // Anything but calling itself: the receiver, or its function, is not known.
                self.check_target(s, r, name)
                    .map_err(|e| (e, r != self.shared.name))?;
                r.to_owned()
            }
            None => {
                let mut candidates = Self::exposing(s, name);
                if candidates.is_empty() {
                    return Err((Self::nobody_exposes(s, name), true));
                }
                let turn = s.turns.entry(name.to_owned()).or_insert(0);
                let i = *turn % candidates.len();
                *turn = turn.wrapping_add(1);
                candidates.swap_remove(i)
            }
        };
        let routed = s.routed();
        let server = s.peer.as_ref().expect("an open connection has a peer");
        let size = size as u64;
        // Through a Router, both the Router's limit and the receiver's apply.
        let (limit, whose) = match s.peers.get(&target).filter(|_| routed) {
            Some(p) if p.max_message_size <= server.max_message_size => {
                (p.max_message_size, format!("{target:?}"))
            }
            Some(_) => (server.max_message_size, format!("router {:?}", server.name)),
            None => (server.max_message_size, format!("{target:?}")),
        };
        if size > limit {
            let e = CallError::Transmission(format!(
                "message of {size} bytes exceeds the limit of {limit} bytes of {whose}"
            ));
            return Err((e, false));
        }
        let meta = if routed {
            format!("{target}\0{name}")
        } else {
            name.to_owned()
        };
        Ok(Route { target, meta })
    }

    /// The peer a call of `name` would go to now: `receiver` once checked, or the next peer
    /// exposing it in turn (a stream picks its receiver once for all its chunks).
    ///
    /// With `catch_up` (see [`CatchUp`]), a receiver not known while this client's reading is
    /// paused is waited for a little.
    pub fn pick(
        &self,
        receiver: Option<&str>,
        name: &str,
        catch_up: CatchUp,
    ) -> Result<String, CallError> {
        self.route(receiver, name, 0, catch_up).map(|r| r.target)
    }

    /// The receivers of a `cast` of `name`: the named ones (each checked), or every peer that
    /// exposes it. `catch_up` as for [`Client::pick`].
    pub fn cast_targets(
        &self,
        name: &str,
        receivers: Option<&[String]>,
        catch_up: CatchUp,
    ) -> Result<Vec<String>, CallError> {
        self.catching_up(catch_up, |s| {
            Self::check_open(s).map_err(|e| (e, false))?;
            match receivers {
                None => {
                    let all = Self::exposing(s, name);
                    if all.is_empty() {
                        return Err((Self::nobody_exposes(s, name), true));
                    }
                    Ok(all)
                }
                Some(list) => {
                    let mut out: Vec<String> = Vec::with_capacity(list.len());
                    for r in list {
                        self.check_target(s, r, name)
                            .map_err(|e| (e, *r != self.shared.name))?;
                        if !out.contains(r) {
                            out.push(r.clone());
                        }
                    }
                    Ok(out)
                }
            }
        })
    }

    /// Calls `name` on `receiver` (or on the next peer exposing it) and waits for the answer
    /// until `timeout`.
    pub fn call(
        &self,
        receiver: Option<&str>,
        name: &str,
        serde: u8,
        flags: u8,
        payload: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Reply, CallError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let pending = self.start_call(receiver, name, serde, flags, payload, deadline)?;
        pending
            .wait_until(deadline)
            .unwrap_or(Err(CallError::Timeout))
    }

    /// Sends a call and returns at once; the answer is waited for with
    /// [`PendingCall::wait_until`], in as many steps as the caller likes (a binding checks for
    /// signals between them). Dropping the handle abandons the call: a late answer is dropped.
    /// `deadline`, the call's, also bounds its wait for news of a receiver (see [`CatchUp`]).
    pub fn start_call(
        &self,
        receiver: Option<&str>,
        name: &str,
        serde: u8,
        flags: u8,
        payload: Bytes,
        deadline: Option<Instant>,
    ) -> Result<PendingCall<'_>, CallError> {
        let catch_up = CatchUp::By(deadline);
        let (call_id, slot, receiver) =
            self.begin(receiver, name, serde, flags, payload, None, catch_up)?;
        Ok(PendingCall {
            client: self,
            call_id,
            slot,
            receiver,
        })
    }

    /// Sends a call whose answer is not waited for on a thread: it is collected with
    /// [`Client::take_done`] once the notifier given to [`Node::watch`] says so. Returns the
    /// call's id and receiver; [`Client::abandon`] gives up on it.
    pub fn start_async(
        &self,
        receiver: Option<&str>,
        name: &str,
        serde: u8,
        flags: u8,
        payload: Bytes,
    ) -> Result<(u64, String), CallError> {
        let done = self.completions.get().cloned().ok_or_else(|| {
            CallError::Transmission("the client is not watched by an event loop".into())
        })?;
        let (call_id, _, receiver) = self.begin(
            receiver,
            name,
            serde,
            flags,
            payload,
            Some(done),
            CatchUp::Never,
        )?;
        // Nobody waits on a thread for this answer: the engine must be the one receiving.
        if self.shared.direct.reclaim() {
            self.engine.send(Command::Resume {
                conn: self.shared.conn,
            });
        }
        Ok((call_id, receiver))
    }

    /// Sends the frames held since the last flush (see [`Node::flush`]).
    fn flush_held(&self) {
        self.shared.wire.uncork(&self.engine);
    }

    /// The answers of [`Client::start_async`] calls that arrived since the last call.
    pub fn take_done(&self) -> Vec<(u64, Result<Reply, CallError>)> {
        self.completions.get().map(|c| c.take()).unwrap_or_default()
    }

    /// Gives up on call `call_id`: a late answer is dropped.
    pub fn abandon(&self, call_id: u64) {
        self.shared.calls.abandon(call_id);
    }

    #[allow(clippy::too_many_arguments)]
    fn begin(
        &self,
        receiver: Option<&str>,
        name: &str,
        serde: u8,
        flags: u8,
        payload: Bytes,
        done: Option<Arc<Completions>>,
        catch_up: CatchUp,
    ) -> Result<(u64, Arc<crate::call::Slot>, String), CallError> {
        let route = self.route(receiver, name, payload.len(), catch_up)?;
        let (call_id, slot) = match done {
            Some(d) => self.shared.calls.open_hooked(d),
            None => self.shared.calls.open(),
        };
        // Registered before the phase check below, so a close racing with us fails this call.
        if lock(&self.shared.state).phase != Phase::Open {
            self.shared.calls.abandon(call_id);
            return Err(CallError::Disconnected(self.close_reason()));
        }
        // The engine may have stopped reading while the callbacks were behind: the answer
        // needs it.
        self.shared.wire.call_opened(&self.engine);
        let f = frame(
            Kind::Request,
            call_id,
            serde,
            flags & !Flags::NO_REPLY,
            &route.meta,
            payload,
        );
        // An event loop's calls are held until it flushes, and leave together.
        // (No back-pressure wait here: the caller waits for the answer, within its timeout,
        // which cannot come before the request is written.)
        if slot.is_hooked() {
            self.shared.wire.cork(&self.engine, f);
        } else {
            self.shared.wire.send(&self.engine, f);
        }
        Ok((call_id, slot, route.target))
    }

    /// Sends a call that wants no answer; returns the receiver's name once the call is queued
    /// for sending. With `defer`, the call is held until [`Node::flush`], like the calls of
    /// [`Client::start_async`] (and in order with them). It never waits: a sender that may be
    /// held back calls [`Client::wait_room`] next.
    pub fn send_with(
        &self,
        receiver: Option<&str>,
        name: &str,
        serde: u8,
        flags: u8,
        payload: Bytes,
        defer: bool,
    ) -> Result<String, CallError> {
        let catch_up = if defer {
            CatchUp::Never
        } else {
            CatchUp::By(None)
        };
        let route = self.route(receiver, name, payload.len(), catch_up)?;
        let f = frame(
            Kind::Request,
            0,
            serde,
            flags | Flags::NO_REPLY,
            &route.meta,
            payload,
        );
        if defer {
            self.shared.wire.cork(&self.engine, f);
        } else {
            self.shared.wire.send(&self.engine, f);
        }
        Ok(route.target)
    }

    /// Back-pressure for senders of no-reply calls: while more than 16 MiB handed over wait to
    /// be written (the peer reads slower than this side sends), waits until they are down to
    /// 8 MiB, the connection closed, or `until` passed (then false).
    pub fn wait_room(&self, until: Option<Instant>) -> bool {
        self.shared.wire.wait_room(&self.engine, until)
    }

    /// Sends a call that wants no answer; returns the receiver's name once the call is queued
    /// for sending.
    pub fn send(
        &self,
        receiver: Option<&str>,
        name: &str,
        serde: u8,
        flags: u8,
        payload: Bytes,
    ) -> Result<String, CallError> {
        let to = self.send_with(receiver, name, serde, flags, payload, false)?;
        self.wait_room(None);
        Ok(to)
    }

    /// For an event loop that waits for members by looking at them now and then: while it does
    /// (until [`Client::unwant_members`]), this client reads its connection even when its
    /// callbacks are behind, since members are heard of by reading.
    pub fn want_members(&self) {
        self.shared.wire.want_reading(&self.engine);
    }

    pub fn unwant_members(&self) {
        self.shared.wire.unwant_reading();
    }

    /// Waits until every named peer is connected; returns the missing ones on timeout.
    pub fn wait_for_members(
        &self,
        names: &[String],
        timeout: Option<Duration>,
    ) -> Result<(), Vec<String>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        // Members are heard of by reading: a client whose callbacks are behind reads again.
        let _reading = self.shared.wire.need_reading(&self.engine);
        let mut s = lock(&self.shared.state);
        loop {
            // A connected node counts itself as present.
            let mut present = s.reachable();
            if s.phase == Phase::Open {
                present.push(self.shared.name.clone());
            }
            let missing: Vec<String> = names
                .iter()
                .filter(|n| !present.contains(n))
                .cloned()
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            let wait = match deadline {
                None => Duration::from_secs(3600),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(missing);
                    }
                    d - now
                }
            };
            s = self
                .shared
                .changed
                .wait_timeout(s, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sends what is queued, says goodbye and closes; waits (bounded) until closed.
    pub fn close(&self) {
        self.flush_held();
        self.engine.send(Command::Close {
            conn: self.shared.conn,
            reason: "client stopped".into(),
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut s = lock(&self.shared.state);
        while s.phase != Phase::Closed {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What a binding uses to run the calls a node receives; Servers and Clients both offer it.
pub trait Node {
    /// The parts every node has (its engine, name and inboxes); the other methods' defaults
    /// use them.
    #[doc(hidden)]
    fn core(&self) -> NodeCore<'_>;
    /// This node's name.
    fn name(&self) -> &str {
        self.core().name
    }
    /// The I/O backend it runs on: `"uring"` or `"poll"`.
    fn backend(&self) -> &'static str {
        self.core().engine.backend()
    }
    /// Waits for the next call to run, at most `timeout` (`None`: no limit).
    fn next_call(&self, timeout: Option<Duration>) -> Next<IncomingCall> {
        self.core().callee.calls.pop(timeout)
    }
    /// Waits for the next membership event.
    fn next_event(&self, timeout: Option<Duration>) -> Next<MemberEvent> {
        self.core().callee.events.pop(timeout)
    }
    /// Answers call `call_id` that arrived on connection `conn` (`IncomingCall::conn`); dropped
    /// when the caller has left.
    fn respond(&self, conn: u64, call_id: u64, serde: u8, flags: u8, payload: Bytes);
    /// Answers a call with an error (`code` is one of `daffi_proto::frame::error_code`).
    fn respond_error(&self, conn: u64, call_id: u64, code: &'static str, payload: Bytes);
    /// Exports more functions, announced to every connected peer.
    fn announce(&self, names: &[String]);
    /// Makes `n` readable whenever a call or an event is ready (and, on a client, the answer of
    /// a [`Client::start_async`] call), for an event loop that takes them without waiting.
    fn watch(&self, n: Arc<Notifier>) {
        self.core().callee.watch(&n);
    }
    /// Takes up to `max` calls to run without waiting; `None` once the node stopped.
    fn take_calls(&self, max: usize) -> Option<Vec<IncomingCall>> {
        self.core().callee.calls.take(max)
    }
    /// Takes up to `max` membership events without waiting; `None` once the node stopped.
    fn take_events(&self, max: usize) -> Option<Vec<MemberEvent>> {
        self.core().callee.events.take(max)
    }
    /// Like [`Node::respond`], but the answer is held until [`Node::flush`], so that an event
    /// loop's answers of one turn leave together.
    fn respond_deferred(&self, conn: u64, call_id: u64, serde: u8, flags: u8, payload: Bytes);
    /// Sends every frame held by `respond_deferred` (and, on a client, by
    /// [`Client::start_async`] and deferred sends).
    fn flush(&self);
    /// Back-pressure for a watched node's answers, which never wait here: true when more may
    /// be sent on connection `conn` (no more than 16 MiB wait to be written there, or it is
    /// gone); otherwise false, and the notifier given to [`Node::watch`] is raised once they
    /// are down to 8 MiB (or the connection closed).
    fn room_for(&self, _conn: u64) -> bool {
        true
    }
    /// On a watched node: the socket the event loop should watch now (its connection is lent
    /// to the loop, see the runtime's `direct` module), if any. When it changes, the loop stops
    /// watching the old one and calls [`Node::give_back`].
    fn lent_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The event loop stopped watching the socket [`Node::lent_fd`] gave it.
    fn give_back(&self) {}
    /// The event loop's turn at the lent socket, when it is readable: reads what is there
    /// without waiting; answers, calls and events become ready to take. False when the loop
    /// must stop watching the socket and call [`Node::give_back`].
    fn read_lent(&self) -> bool {
        false
    }
    /// The event loop has nothing else to do and expects bytes on the lent socket soon:
    /// waits for them a little without sleeping. True when the socket turned readable (then
    /// call [`Node::read_lent`]).
    fn spin_lent(&self) -> bool {
        false
    }
    /// The event loop stops watching the node: nothing is lent to it any more (call it after
    /// it stopped watching the lent socket).
    fn end_loop_reading(&self) {}
    /// How many answers and requests were read by the binding's threads or event loop rather
    /// than the engine thread (a diagnostic; see the runtime's `direct` module).
    fn direct_reads(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// What [`Node`]'s provided methods work on (opaque outside this crate).
#[derive(Debug)]
pub struct NodeCore<'a> {
    name: &'a str,
    engine: &'a Engine,
    callee: &'a Callee,
}

impl Node for Server {
    fn core(&self) -> NodeCore<'_> {
        NodeCore {
            name: &self.shared.name,
            engine: &self.engine,
            callee: &self.shared.callee,
        }
    }

    /// While the Service has one connection and its workers keep up, the waiting worker
    /// receives the next request itself (see [`crate::direct`]).
    fn next_call(&self, timeout: Option<Duration>) -> Next<IncomingCall> {
        let shared = &self.shared;
        let worker = shared.worker(true);
        worker_loop(&shared.callee.calls, timeout, |deadline| {
            let reader = lock(&shared.reader).clone();
            match reader {
                Some((conn, direct)) => direct.read_request(conn, &self.engine, &worker, deadline),
                None => {
                    self.ask_to_read();
                    None
                }
            }
        })
    }

    fn respond(&self, conn: u64, call_id: u64, serde: u8, flags: u8, payload: Bytes) {
        if let Some(wire) = self.wire(conn) {
            respond(&self.engine, &wire, call_id, serde, flags, payload);
        }
    }

    fn respond_error(&self, conn: u64, call_id: u64, code: &'static str, payload: Bytes) {
        if let Some(wire) = self.wire(conn) {
            wire.send(
                &self.engine,
                frame(Kind::Error, call_id, 0, 0, code, payload),
            );
        }
    }

    fn announce(&self, names: &[String]) {
        announce(&self.engine, &self.shared.callee, self.shared.id, names);
    }

    fn respond_deferred(&self, conn: u64, call_id: u64, serde: u8, flags: u8, payload: Bytes) {
        let Some(wire) = self.wire(conn) else {
            return;
        };
        if wire.cork(&self.engine, answer(&wire, call_id, serde, flags, payload)) {
            lock(&self.shared.state).corked.push(wire);
        }
    }

    fn flush(&self) {
        let held = std::mem::take(&mut lock(&self.shared.state).corked);
        for wire in held {
            wire.uncork(&self.engine);
        }
    }

    fn watch(&self, n: Arc<Notifier>) {
        self.shared.callee.watch(&n);
        let mut st = lock(&self.shared.state);
        for d in st.directs.values() {
            d.lend_to_loop(n.clone());
        }
        for w in st.wires.values() {
            w.watch(n.clone());
        }
        st.loop_notifier = Some(n);
    }

    fn room_for(&self, conn: u64) -> bool {
        let wire = lock(&self.shared.state).wires.get(&conn).cloned();
        wire.is_none_or(|w| w.room_for_loop(&self.engine))
    }

    fn lent_fd(&self) -> Option<std::os::fd::RawFd> {
        lock(&self.shared.reader).as_ref()?.1.lent_fd()
    }

    fn give_back(&self) {
        let lent = lock(&self.shared.reader).clone();
        if let Some((conn, d)) = lent {
            if d.give_back() {
                self.engine.send(Command::Resume { conn });
            }
        }
    }

    fn read_lent(&self) -> bool {
        let Some((conn, d)) = lock(&self.shared.reader).clone() else {
            return false;
        };
        d.read_for_loop(conn, &self.engine, None, Some(&self.shared.worker(false)))
    }

    fn spin_lent(&self) -> bool {
        let lent = lock(&self.shared.reader).clone();
        lent.is_some_and(|(_, d)| d.spin_for_loop())
    }

    fn direct_reads(&self) -> (u64, u64) {
        (0, self.requests_read_by_workers())
    }

    fn end_loop_reading(&self) {
        let mut st = lock(&self.shared.state);
        st.loop_notifier = None;
        for (conn, d) in &st.directs {
            if d.end_loop() {
                self.engine.send(Command::Resume { conn: *conn });
            }
        }
    }
}

impl Node for Client {
    fn core(&self) -> NodeCore<'_> {
        NodeCore {
            name: &self.shared.name,
            engine: &self.engine,
            callee: &self.shared.callee,
        }
    }

    /// While the client's workers keep up and it waits for no answer, the waiting worker
    /// receives the next request itself (see [`crate::direct`]).
    fn next_call(&self, timeout: Option<Duration>) -> Next<IncomingCall> {
        let shared = &self.shared;
        worker_loop(&shared.callee.calls, timeout, |deadline| {
            // A client that exports nothing gets no requests: its workers would only ever read
            // its callers' answers, and hand them over (a wake-up more per answer).
            if !shared.callee.exports_any() {
                return None;
            }
            let worker = shared.worker();
            if let Some(call) =
                shared
                    .direct
                    .read_request(shared.conn, &self.engine, &worker, deadline)
            {
                return Some(call);
            }
            if shared.direct.ask() {
                self.engine.send(Command::Park { conn: shared.conn });
            }
            None
        })
    }

    /// A client has one connection; `conn` is ignored.
    fn respond(&self, _conn: u64, call_id: u64, serde: u8, flags: u8, payload: Bytes) {
        respond(
            &self.engine,
            &self.shared.wire,
            call_id,
            serde,
            flags,
            payload,
        );
    }

    fn respond_error(&self, _conn: u64, call_id: u64, code: &'static str, payload: Bytes) {
        let f = frame(Kind::Error, call_id, 0, 0, code, payload);
        self.shared.wire.send(&self.engine, f);
    }

    fn announce(&self, names: &[String]) {
        announce(&self.engine, &self.shared.callee, self.shared.conn, names);
    }

    fn room_for(&self, _conn: u64) -> bool {
        self.shared.wire.room_for_loop(&self.engine)
    }

    fn watch(&self, n: Arc<Notifier>) {
        let _ = self.completions.set(Completions::new(n.clone()));
        self.shared.callee.watch(&n);
        self.shared.wire.watch(n.clone());
        self.shared.direct.lend_to_loop(n);
        // Lent at the engine's next chance.
        self.engine.send(Command::Park {
            conn: self.shared.conn,
        });
    }

    fn lent_fd(&self) -> Option<std::os::fd::RawFd> {
        self.shared.direct.lent_fd()
    }

    fn give_back(&self) {
        if self.shared.direct.give_back() {
            self.engine.send(Command::Resume {
                conn: self.shared.conn,
            });
        }
    }

    fn spin_lent(&self) -> bool {
        self.shared.direct.spin_for_loop()
    }

    fn read_lent(&self) -> bool {
        let shared = &self.shared;
        let worker = shared.worker();
        shared.direct.read_for_loop(
            shared.conn,
            &self.engine,
            Some(&shared.calls),
            Some(&worker),
        )
    }

    fn direct_reads(&self) -> (u64, u64) {
        (
            self.answers_read_by_callers(),
            self.requests_read_by_workers(),
        )
    }

    fn end_loop_reading(&self) {
        if self.shared.direct.end_loop() {
            self.engine.send(Command::Resume {
                conn: self.shared.conn,
            });
        }
    }

    fn respond_deferred(&self, _conn: u64, call_id: u64, serde: u8, flags: u8, payload: Bytes) {
        let wire = &self.shared.wire;
        wire.cork(&self.engine, answer(wire, call_id, serde, flags, payload));
    }

    fn flush(&self) {
        self.flush_held();
    }
}

/// The workers' side of [`Node::next_call`] on a node whose workers may receive themselves:
/// the next call queued, else a `turn` at reading the connection lent to them (which asks the
/// engine for it when it is not lent), else a wait for either.
fn worker_loop(
    calls: &Inbox<IncomingCall>,
    timeout: Option<Duration>,
    mut turn: impl FnMut(Option<Instant>) -> Option<IncomingCall>,
) -> Next<IncomingCall> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        match calls.pop(Some(Duration::ZERO)) {
            Next::Timeout => {}
            other => return other,
        }
        if let Some(call) = turn(deadline) {
            return Next::Item(call);
        }
        let wait = match deadline {
            None => None,
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return Next::Timeout;
                }
                Some(d - now)
            }
        };
        // Woken by a call, by the engine lending a connection, or by a reader leaving.
        match calls.pop_or_wake(wait) {
            Some(Next::Timeout) if deadline.is_some_and(|d| Instant::now() >= d) => {
                return Next::Timeout;
            }
            Some(Next::Timeout) => {}
            Some(other) => return other,
            None => {}
        }
    }
}

fn announce(engine: &Engine, callee: &Callee, owner: u64, names: &[String]) {
    let new = callee.add_functions(names);
    if !new.is_empty() {
        engine.send(Command::Announce { owner, names: new });
    }
}

/// A call sent by [`Client::start_call`] whose answer has not been taken yet.
#[derive(Debug)]
pub struct PendingCall<'a> {
    client: &'a Client,
    call_id: u64,
    slot: Arc<crate::call::Slot>,
    receiver: String,
}

impl PendingCall<'_> {
    /// The peer the call went to.
    pub fn receiver(&self) -> &str {
        &self.receiver
    }

    /// Waits for the answer until `until` (`None`: no limit); `None` if it has not come yet.
    /// While the client's calls come one at a time, this thread receives the answer itself
    /// (see [`crate::direct`]).
    pub fn wait_until(&self, until: Option<Instant>) -> Option<Result<Reply, CallError>> {
        let _waiting = crate::direct::Waiting::new();
        if !self.slot.is_hooked() {
            let shared = &self.client.shared;
            shared.direct.read_until(
                shared.conn,
                &self.client.engine,
                &shared.calls,
                &self.slot,
                until,
            );
        }
        self.slot.wait(until, self.client.shared.direct.is_quiet())
    }
}

impl Drop for PendingCall<'_> {
    fn drop(&mut self) {
        // A no-op when the answer came; otherwise a late answer finds no one and is dropped.
        self.client.shared.calls.abandon(self.call_id);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if lock(&self.shared.state).phase != Phase::Closed {
            self.engine.send(Command::Close {
                conn: self.shared.conn,
                reason: "client dropped".into(),
            });
        }
    }
}

/// One encoded frame: header and meta, then the payload (sent from its own memory).
fn frame(kind: Kind, call_id: u64, serde: u8, flags: u8, meta: &str, payload: Bytes) -> Vec<Bytes> {
    // Only the flags a binding may choose; the others describe how a frame travels.
    let flags = Flags(flags).without_wire().0;
    let head = encode_head(kind, call_id, serde, flags, meta, payload.len() as u64);
    if payload.is_empty() {
        vec![head]
    } else {
        vec![head, payload]
    }
}

/// Sends an answer (see [`answer`]).
/// Sends an answer, then waits while the connection has too much unsent (back-pressure).
fn respond(engine: &Engine, wire: &Wire, call_id: u64, serde: u8, flags: u8, payload: Bytes) {
    wire.send(engine, answer(wire, call_id, serde, flags, payload));
    wire.wait_room(engine, None);
}

/// The frame that answers a call: the result, or a `too-large` error when the caller would
/// refuse it.
fn answer(wire: &Wire, call_id: u64, serde: u8, flags: u8, payload: Bytes) -> Vec<Bytes> {
    let limit = wire.peer_max();
    if payload.len() as u64 > limit {
        let msg = format!(
            "result of {} bytes exceeds the caller's limit of {limit} bytes",
            payload.len()
        );
        return frame(
            Kind::Error,
            call_id,
            0,
            0,
            error_code::TOO_LARGE,
            Bytes::from(msg),
        );
    }
    frame(Kind::Response, call_id, serde, flags, "", payload)
}
