//! `daffi._native`: the Python face of daffi's engine.
//!
//! Only type conversion, GIL handling and error mapping live here: every wait on the engine
//! runs with the GIL released, payloads cross without copies where Python allows (a `bytes`
//! argument is sent from its own memory), and engine errors become the exception classes of
//! `daffi.exceptions`. The protocol and the event loop are in `daffi-runtime`.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How often a wait without a deadline lets Python run its signal handlers.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

use bytes::Bytes;
use daffi_runtime::{
    Address, Backend, CallError, CatchUp, Client as RtClient, ClientConfig, Engine, Listening,
    Next, Node, Notifier, PendingCall, Reply, Router as RtRouter, RouterConfig, Server as RtServer,
    ServerConfig, StartError,
};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyList, PyTuple};

mod body;
mod logging;
mod msgpack;

use body::payload_bytes;

/// Raises `daffi.exceptions.<name>(msg)`.
fn daffi_error(py: Python<'_>, name: &str, msg: String) -> PyErr {
    match py.import("daffi.exceptions").and_then(|m| m.getattr(name)) {
        Ok(cls) => match cls.call1((msg.clone(),)) {
            Ok(inst) => PyErr::from_value(inst),
            Err(e) => e,
        },
        Err(_) => PyRuntimeError::new_err(msg),
    }
}

fn call_error(py: Python<'_>, e: CallError) -> PyErr {
    match e {
        CallError::Timeout => {
            daffi_error(py, "CallTimeout", "no response within the timeout".into())
        }
        CallError::Disconnected(r) => daffi_error(py, "Disconnected", format!("disconnected: {r}")),
        CallError::Evicted(r) => daffi_error(py, "Evicted", format!("evicted: {r}")),
        CallError::Transmission(m) => daffi_error(py, "TransmissionFailure", m),
        // Remote errors are returned, not raised: the Python layer decodes them.
        CallError::Remote(_) => PyRuntimeError::new_err("remote error reached the raise path"),
        other => daffi_error(py, "TransmissionFailure", other.to_string()),
    }
}

/// `CallTimeout(call=name, timeout=..., receivers=[peer])`, which words its own message.
fn timeout_error(py: Python<'_>, name: &str, timeout: Option<f64>, peer: Option<String>) -> PyErr {
    let make = || -> PyResult<PyErr> {
        let cls = py.import("daffi.exceptions")?.getattr("CallTimeout")?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("call", name)?;
        kwargs.set_item("timeout", timeout)?;
        kwargs.set_item("receivers", peer.map(|p| vec![p]))?;
        Ok(PyErr::from_value(cls.call((), Some(&kwargs))?))
    };
    make().unwrap_or_else(|e| e)
}

fn start_error(py: Python<'_>, e: StartError) -> PyErr {
    daffi_error(py, "InitializationError", e.to_string())
}

fn engine(py: Python<'_>, backend: Option<&str>) -> PyResult<Engine> {
    let r = match backend {
        None => py.detach(Engine::from_env),
        Some(b) => {
            let b = Backend::parse(b).ok_or_else(|| {
                PyValueError::new_err(format!("backend {b:?}: expected auto, uring or poll"))
            })?;
            py.detach(|| Engine::get(b))
        }
    };
    r.map_err(|e| {
        daffi_error(
            py,
            "InitializationError",
            format!("cannot start the daffi engine: {e}"),
        )
    })
}

fn address(
    host: Option<String>,
    port: Option<u16>,
    unix_path: Option<PathBuf>,
) -> PyResult<Address> {
    match (unix_path, port) {
        (Some(p), _) => Ok(Address::Unix(p)),
        (None, Some(port)) => Ok(Address::Tcp {
            host: host.unwrap_or_else(|| "127.0.0.1".into()),
            port,
        }),
        (None, None) => Err(PyValueError::new_err(
            "an address needs a port or a unix socket path",
        )),
    }
}

/// A payload to send: `bytes` travel from their own memory; other buffers are copied once.
fn payload(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Bytes::from_owner(PyBackedBytes::from(b.clone())));
    }
    let buf = PyBuffer::<u8>::get(obj)?;
    Ok(Bytes::from(buf.to_vec(py)?))
}

fn timeout(t: Option<f64>) -> PyResult<Option<Duration>> {
    match t {
        None => Ok(None),
        Some(t) if t.is_nan() || t < 0.0 => Err(PyValueError::new_err(
            "timeout must be a non-negative number",
        )),
        // No deadline: zero, infinity, or beyond any meaningful wait (Instant + Duration would
        // overflow).
        Some(t) if t == 0.0 || t > 1e9 => Ok(None),
        Some(t) => Ok(Some(Duration::from_secs_f64(t))),
    }
}

fn call_tuple<'py>(
    py: Python<'py>,
    c: daffi_runtime::IncomingCall,
) -> PyResult<Bound<'py, PyTuple>> {
    let payload = payload_bytes(py, c.payload);
    (c.conn, c.call_id, c.name, c.serde, c.flags.0, payload).into_pyobject(py)
}

/// The Python object for `inner`: the shared `Node` base plus the class-specific part.
fn with_base<T, S>(inner: Arc<T>, make: impl FnOnce(Arc<T>) -> S) -> PyClassInitializer<S>
where
    T: Node + Send + Sync + 'static,
    S: pyo3::PyClass<BaseType = NodeBase>,
{
    PyClassInitializer::from(NodeBase {
        node: inner.clone(),
        notifier: OnceLock::new(),
    })
    .add_subclass(make(inner))
}

/// What servers and clients share: running the calls they receive (`daffi_runtime::Node`).
#[pyclass(frozen, subclass, module = "daffi._native", name = "Node")]
struct NodeBase {
    node: Arc<dyn Node + Send + Sync>,
    /// Set once an event loop watches the node (see `watch`).
    notifier: OnceLock<Arc<Notifier>>,
}

/// How a finished call is reported to Python: `(status, serde, text, value)`, status 0 = the
/// result payload, 1 = the callee's encoded exception, 2 = an exception instance.
fn outcome<'py>(
    py: Python<'py>,
    serde: u8,
    result: Result<Reply, CallError>,
) -> (u8, u8, bool, Bound<'py, PyAny>) {
    match result {
        Ok(r) => (
            0,
            r.serde,
            r.flags.text(),
            payload_bytes(py, r.payload).into_any(),
        ),
        Err(CallError::Remote(e)) => (1, serde, false, PyBytes::new(py, &e).into_any()),
        Err(e) => (
            2,
            serde,
            false,
            call_error(py, e).into_value(py).into_bound(py).into_any(),
        ),
    }
}

#[pymethods]
impl NodeBase {
    #[getter]
    fn backend(&self) -> &'static str {
        self.node.backend()
    }

    #[getter]
    fn name(&self) -> &str {
        self.node.name()
    }

    /// `(conn, call_id, name, serde, flags, payload)`, or None on timeout or once stopped.
    #[pyo3(signature = (timeout=None))]
    fn next_call<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let t = self::timeout(timeout)?;
        match py.detach(|| self.node.next_call(t)) {
            Next::Item(c) => Ok(Some(call_tuple(py, c)?)),
            Next::Timeout | Next::Closed => Ok(None),
        }
    }

    /// `(connected, member)`, or None on timeout or once stopped.
    #[pyo3(signature = (timeout=None))]
    fn next_event(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<(bool, String)>> {
        let t = self::timeout(timeout)?;
        Ok(match py.detach(|| self.node.next_event(t)) {
            Next::Item(e) => Some((e.connected, e.member)),
            _ => None,
        })
    }

    /// Answers a call; with `defer`, the answer is held until `flush` (an event loop flushes
    /// once per turn, so that its answers leave together).
    #[pyo3(signature = (conn, call_id, serde, text, payload, defer=false))]
    #[allow(clippy::too_many_arguments)]
    fn respond(
        &self,
        py: Python<'_>,
        conn: u64,
        call_id: u64,
        serde: u8,
        text: bool,
        payload: &Bound<'_, PyAny>,
        defer: bool,
    ) -> PyResult<()> {
        let p = self::payload(py, payload)?;
        let flags = if text { daffi_runtime::Flags::TEXT } else { 0 };
        if defer {
            self.node.respond_deferred(conn, call_id, serde, flags, p);
        } else {
            py.detach(|| self.node.respond(conn, call_id, serde, flags, p));
        }
        Ok(())
    }

    /// Sends every frame held for this node (deferred answers; a client's async calls).
    fn flush(&self, py: Python<'_>) {
        py.detach(|| self.node.flush());
    }

    /// For an event loop's answers, which never wait here: False while too much waits to be
    /// written on connection `conn`; the watched descriptor then turns readable once there is
    /// room (ask again then).
    fn room_for(&self, conn: u64) -> bool {
        self.node.room_for(conn)
    }

    fn respond_error(
        &self,
        py: Python<'_>,
        conn: u64,
        call_id: u64,
        payload: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let p = self::payload(py, payload)?;
        py.detach(|| self.node.respond_error(conn, call_id, "remote", p));
        Ok(())
    }

    fn announce(&self, names: Vec<String>) {
        self.node.announce(&names);
    }

    /// Starts reporting readiness to an event loop: returns a descriptor that becomes readable
    /// when calls, events or async answers are ready (the same one on every call).
    fn watch(&self, py: Python<'_>) -> PyResult<i32> {
        if let Some(n) = self.notifier.get() {
            return Ok(n.fd());
        }
        let n = Notifier::new().map_err(|e| {
            daffi_error(
                py,
                "InitializationError",
                format!("cannot create a ready signal: {e}"),
            )
        })?;
        let n = self.notifier.get_or_init(|| n).clone();
        self.node.watch(n.clone());
        Ok(n.fd())
    }

    /// The socket the event loop should watch now (the connection lent to it), or -1. When it
    /// changes, stop watching the old one, then call `give_back`.
    fn lent_fd(&self) -> i32 {
        self.node.lent_fd().unwrap_or(-1)
    }

    /// The event loop stopped watching the socket `lent_fd` gave it.
    fn give_back(&self) {
        self.node.give_back();
    }

    /// Reads what the lent socket holds, without waiting; what it completes or queues is taken
    /// with `take_done`, `take_calls` and `take_events` next. False: stop watching the socket,
    /// then call `give_back`.
    fn read_lent(&self, py: Python<'_>) -> bool {
        py.detach(|| self.node.read_lent())
    }

    /// With nothing else for the event loop to do, waits a little, without sleeping, for the
    /// lent socket to turn readable; True when it did (then call `read_lent`).
    fn spin_lent(&self, py: Python<'_>) -> bool {
        py.detach(|| self.node.spin_lent())
    }

    /// `(answers, requests)` read by threads of this process or its event loop rather than by
    /// the engine thread (a diagnostic).
    fn direct_reads(&self) -> (u64, u64) {
        self.node.direct_reads()
    }

    /// The event loop stops watching the node (call it once it stopped watching the socket).
    fn end_loop_reading(&self) {
        self.node.end_loop_reading();
    }

    /// Makes the watched descriptor unreadable until something new is ready; call it before
    /// taking what is ready.
    fn clear_ready(&self) {
        if let Some(n) = self.notifier.get() {
            n.clear();
        }
    }

    /// Up to `max` calls to run, without waiting (the tuples of `next_call`); None once the
    /// node stopped.
    #[pyo3(signature = (max=256))]
    fn take_calls<'py>(
        &self,
        py: Python<'py>,
        max: usize,
    ) -> PyResult<Option<Vec<Bound<'py, PyTuple>>>> {
        match self.node.take_calls(max) {
            None => Ok(None),
            Some(calls) => Ok(Some(
                calls
                    .into_iter()
                    .map(|c| call_tuple(py, c))
                    .collect::<PyResult<_>>()?,
            )),
        }
    }

    /// Up to `max` membership events `(connected, member)`, without waiting; None once the
    /// node stopped.
    #[pyo3(signature = (max=256))]
    fn take_events(&self, max: usize) -> Option<Vec<(bool, String)>> {
        self.node
            .take_events(max)
            .map(|v| v.into_iter().map(|e| (e.connected, e.member)).collect())
    }
}

/// What servers and routers share: their address, members and stop.
#[pyclass(frozen, subclass, extends = NodeBase, module = "daffi._native")]
struct Listener {
    inner: Arc<dyn Listening + Send + Sync>,
}

/// The Python object for a listening node: `Node`, then `Listener`, then `class`.
fn listener_init<T, S>(inner: Arc<T>, class: S) -> PyClassInitializer<S>
where
    T: Node + Listening + Send + Sync + 'static,
    S: pyo3::PyClass<BaseType = Listener>,
{
    with_base(inner, |inner| Listener { inner }).add_subclass(class)
}

#[pymethods]
impl Listener {
    /// The bound TCP port, or None for a Unix socket.
    #[getter]
    fn port(&self) -> Option<u16> {
        match self.inner.address() {
            Address::Tcp { port, .. } => Some(*port),
            Address::Unix(_) => None,
        }
    }

    #[getter]
    fn address(&self) -> String {
        self.inner.address().to_string()
    }

    fn members(&self, py: Python<'_>) -> Vec<String> {
        py.detach(|| self.inner.members())
    }

    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.inner.stop());
    }
}

/// A Service's listening node. Binds on construction.
#[pyclass(frozen, extends = Listener, module = "daffi._native")]
struct Server {}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (name, host=None, port=None, unix_path=None, max_message_size=daffi_runtime::DEFAULT_MAX_MESSAGE_SIZE, functions=Vec::new(), backend=None, token=None, serde_formats=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name: String,
        host: Option<String>,
        port: Option<u16>,
        unix_path: Option<PathBuf>,
        max_message_size: u64,
        functions: Vec<String>,
        backend: Option<&str>,
        token: Option<PyBackedBytes>,
        serde_formats: Option<Vec<u8>>,
    ) -> PyResult<PyClassInitializer<Server>> {
        let engine = engine(py, backend)?;
        let cfg = ServerConfig {
            name,
            address: address(host, port, unix_path)?,
            max_message_size,
            functions,
            token: token.map(|t| t.to_vec()).unwrap_or_default(),
            serde_formats,
        };
        let inner = py
            .detach(|| RtServer::start(&engine, cfg))
            .map_err(|e| start_error(py, e))?;
        Ok(listener_init(Arc::new(inner), Server {}))
    }
}

/// A Router: forwards calls between its clients. Binds on construction.
#[pyclass(frozen, extends = Listener, module = "daffi._native")]
struct Router {}

#[pymethods]
impl Router {
    #[new]
    #[pyo3(signature = (name, host=None, port=None, unix_path=None, max_message_size=daffi_runtime::DEFAULT_MAX_MESSAGE_SIZE, backend=None, token=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name: String,
        host: Option<String>,
        port: Option<u16>,
        unix_path: Option<PathBuf>,
        max_message_size: u64,
        backend: Option<&str>,
        token: Option<PyBackedBytes>,
    ) -> PyResult<PyClassInitializer<Router>> {
        let engine = engine(py, backend)?;
        let cfg = RouterConfig {
            name,
            address: address(host, port, unix_path)?,
            max_message_size,
            token: token.map(|t| t.to_vec()).unwrap_or_default(),
        };
        let inner = py
            .detach(|| RtRouter::start(&engine, cfg))
            .map_err(|e| start_error(py, e))?;
        Ok(listener_init(Arc::new(inner), Router {}))
    }
}

/// Waits for a started call until `deadline`, in slices so that signal handlers run.
fn wait_call(
    py: Python<'_>,
    pending: &PendingCall<'_>,
    deadline: Option<Instant>,
) -> PyResult<Result<Reply, CallError>> {
    loop {
        let slice = Instant::now() + SIGNAL_CHECK;
        let until = deadline.map_or(slice, |d| d.min(slice));
        if let Some(r) = py.detach(|| pending.wait_until(Some(until))) {
            return Ok(r);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Err(CallError::Timeout));
        }
        py.check_signals()?;
    }
}

/// A connected node. Connects (and completes the handshake) on construction.
#[pyclass(frozen, extends = NodeBase, module = "daffi._native")]
struct Client {
    inner: Arc<RtClient>,
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (name, host=None, port=None, unix_path=None, max_message_size=daffi_runtime::DEFAULT_MAX_MESSAGE_SIZE, functions=Vec::new(), connect_timeout=10.0, backend=None, token=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name: String,
        host: Option<String>,
        port: Option<u16>,
        unix_path: Option<PathBuf>,
        max_message_size: u64,
        functions: Vec<String>,
        connect_timeout: f64,
        backend: Option<&str>,
        token: Option<PyBackedBytes>,
    ) -> PyResult<PyClassInitializer<Client>> {
        let engine = engine(py, backend)?;
        let cfg = ClientConfig {
            name,
            address: address(host, port, unix_path)?,
            max_message_size,
            functions,
            connect_timeout: timeout(Some(connect_timeout))?.unwrap_or(Duration::from_secs(3600)),
            token: token.map(|t| t.to_vec()).unwrap_or_default(),
        };
        let inner = py
            .detach(|| RtClient::connect(&engine, cfg))
            .map_err(|e| start_error(py, e))?;
        Ok(with_base(Arc::new(inner), |inner| Client { inner }))
    }

    #[getter]
    fn connected(&self) -> bool {
        self.inner.is_open()
    }

    #[getter]
    fn peer_name(&self) -> Option<String> {
        self.inner.peer().map(|p| p.name)
    }

    /// The functions peer `name` exports (the server's when `name` is None).
    #[pyo3(signature = (name=None))]
    fn peer_functions(&self, name: Option<&str>) -> Vec<String> {
        let peer = match name {
            Some(n) => self.inner.peer_info(n),
            None => self.inner.peer(),
        };
        peer.map(|p| p.functions).unwrap_or_default()
    }

    /// Names of the peers calls can go to: the Service, or the Router's other clients.
    fn peers(&self) -> Vec<String> {
        self.inner.peers()
    }

    /// True when connected to a Router.
    #[getter]
    fn routed(&self) -> bool {
        self.inner.is_routed()
    }

    #[getter]
    fn close_reason(&self) -> String {
        self.inner.close_reason()
    }

    /// Calls `name` (on `receiver`, or the next peer exposing it) and waits. Returns `(ok,
    /// serde, text, payload)`; when `ok` is false the payload is the callee's encoded exception.
    #[pyo3(signature = (name, serde, text, payload, timeout=None, receiver=None))]
    #[allow(clippy::too_many_arguments)]
    fn call<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        serde: u8,
        text: bool,
        payload: &Bound<'py, PyAny>,
        timeout: Option<f64>,
        receiver: Option<&str>,
    ) -> PyResult<(bool, u8, bool, Bound<'py, PyBytes>)> {
        let p = self::payload(py, payload)?;
        let t = self::timeout(timeout)?;
        let deadline = t.map(|t| Instant::now() + t);
        let flags = if text { daffi_runtime::Flags::TEXT } else { 0 };
        let pending = py
            .detach(|| {
                self.inner
                    .start_call(receiver, name, serde, flags, p, deadline)
            })
            .map_err(|e| call_error(py, e))?;
        // Dropping `pending` (on a signal's exception too) abandons the call.
        let result = wait_call(py, &pending, deadline)?;
        match result {
            Ok(r) => Ok((true, r.serde, r.flags.text(), payload_bytes(py, r.payload))),
            Err(CallError::Remote(e)) => Ok((false, serde, false, PyBytes::new(py, &e))),
            Err(CallError::Timeout) => Err(timeout_error(
                py,
                name,
                timeout,
                Some(pending.receiver().to_owned()),
            )),
            Err(e) => Err(call_error(py, e)),
        }
    }

    /// Calls `name` on several peers at once (`receivers`, or every peer exposing it) and
    /// waits for all of them under one deadline. Returns a list of `(peer, status, serde,
    /// text, value)`: status 0 = result payload, 1 = the callee's encoded exception, 2 = an
    /// exception instance (timeout, disconnection...).
    #[pyo3(signature = (name, serde, text, payload, timeout=None, receivers=None))]
    #[allow(clippy::too_many_arguments)]
    fn cast<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        serde: u8,
        text: bool,
        payload: &Bound<'py, PyAny>,
        timeout: Option<f64>,
        receivers: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let p = self::payload(py, payload)?;
        let t = self::timeout(timeout)?;
        let deadline = t.map(|t| Instant::now() + t);
        let flags = if text { daffi_runtime::Flags::TEXT } else { 0 };
        let targets = py
            .detach(|| {
                let catch_up = CatchUp::By(deadline);
                self.inner
                    .cast_targets(name, receivers.as_deref(), catch_up)
            })
            .map_err(|e| call_error(py, e))?;
        let started: Vec<(String, Result<PendingCall<'_>, CallError>)> = py.detach(|| {
            targets
                .into_iter()
                .map(|target| {
                    let r = self.inner.start_call(
                        Some(&target),
                        name,
                        serde,
                        flags,
                        p.clone(),
                        deadline,
                    );
                    (target, r)
                })
                .collect()
        });
        let out = PyList::empty(py);
        for (target, started) in started {
            let result = match &started {
                Ok(pending) => wait_call(py, pending, deadline)?,
                Err(e) => Err(e.clone()),
            };
            let entry = match result {
                Ok(r) => (
                    target,
                    0u8,
                    r.serde,
                    r.flags.text(),
                    payload_bytes(py, r.payload).into_any(),
                ),
                Err(CallError::Remote(e)) => {
                    (target, 1, serde, false, PyBytes::new(py, &e).into_any())
                }
                Err(CallError::Timeout) => {
                    let e = timeout_error(py, name, timeout, Some(target.clone()));
                    (
                        target,
                        2,
                        serde,
                        false,
                        e.into_value(py).into_bound(py).into_any(),
                    )
                }
                Err(e) => {
                    let e = call_error(py, e);
                    (
                        target,
                        2,
                        serde,
                        false,
                        e.into_value(py).into_bound(py).into_any(),
                    )
                }
            };
            out.append(entry)?;
        }
        Ok(out)
    }

    /// The receivers of a cast of `name`: `receivers` once checked, or every peer exposing it.
    /// With `catch_up` (a thread's call, never an event loop's), a receiver not heard of while
    /// this client's reading is paused is waited for a little, without the GIL.
    #[pyo3(signature = (name, receivers=None, catch_up=false))]
    fn cast_targets(
        &self,
        py: Python<'_>,
        name: &str,
        receivers: Option<Vec<String>>,
        catch_up: bool,
    ) -> PyResult<Vec<String>> {
        let how = if catch_up {
            CatchUp::By(None)
        } else {
            CatchUp::Never
        };
        let targets = || self.inner.cast_targets(name, receivers.as_deref(), how);
        if catch_up {
            py.detach(targets)
        } else {
            targets()
        }
        .map_err(|e| call_error(py, e))
    }

    /// The peer a call of `name` goes to: `receiver` once checked, or the next in turn.
    /// `catch_up` as for `cast_targets`.
    #[pyo3(signature = (name, receiver=None, catch_up=false))]
    fn resolve(
        &self,
        py: Python<'_>,
        name: &str,
        receiver: Option<&str>,
        catch_up: bool,
    ) -> PyResult<String> {
        let how = if catch_up {
            CatchUp::By(None)
        } else {
            CatchUp::Never
        };
        let pick = || self.inner.pick(receiver, name, how);
        if catch_up { py.detach(pick) } else { pick() }.map_err(|e| call_error(py, e))
    }

    /// Sends a call that wants no answer; returns the receiver's name. With `defer`, it is
    /// held until `flush`, in order with the async calls.
    #[pyo3(signature = (name, serde, text, payload, receiver=None, defer=false))]
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        py: Python<'_>,
        name: &str,
        serde: u8,
        text: bool,
        payload: &Bound<'_, PyAny>,
        receiver: Option<&str>,
        defer: bool,
    ) -> PyResult<String> {
        let p = self::payload(py, payload)?;
        let flags = if text { daffi_runtime::Flags::TEXT } else { 0 };
        // Without the GIL unless held for a flush (the write may take a while: a thread writes
        // up to a few MiB of a large frame itself).
        let to = if defer {
            self.inner.send_with(receiver, name, serde, flags, p, defer)
        } else {
            py.detach(|| self.inner.send_with(receiver, name, serde, flags, p, defer))
        }
        .map_err(|e| call_error(py, e))?;
        // Back-pressure: wait, without the GIL and in slices (for Ctrl+C), while too much is
        // unsent. An event loop's sends never wait.
        while !defer && !py.detach(|| self.inner.wait_room(Some(Instant::now() + SIGNAL_CHECK))) {
            py.check_signals()?;
        }
        Ok(to)
    }

    /// Sends a call whose answer comes through `take_done` (the client must be watched); the
    /// request is held until `flush`. Returns `(call_id, receiver)`; refusals (no such
    /// receiver...) raise at once.
    #[pyo3(signature = (name, serde, text, payload, receiver=None))]
    fn start_async(
        &self,
        py: Python<'_>,
        name: &str,
        serde: u8,
        text: bool,
        payload: &Bound<'_, PyAny>,
        receiver: Option<&str>,
    ) -> PyResult<(u64, String)> {
        let p = self::payload(py, payload)?;
        let flags = if text { daffi_runtime::Flags::TEXT } else { 0 };
        py.detach(|| self.inner.start_async(receiver, name, serde, flags, p))
            .map_err(|e| call_error(py, e))
    }

    /// The answers of `start_async` calls that arrived: `(call_id, status, serde, text,
    /// value)` (see `cast` for the statuses).
    fn take_done<'py>(&self, py: Python<'py>) -> Vec<(u64, u8, u8, bool, Bound<'py, PyAny>)> {
        self.inner
            .take_done()
            .into_iter()
            .map(|(id, r)| {
                let (status, serde, text, value) = outcome(py, 0, r);
                (id, status, serde, text, value)
            })
            .collect()
    }

    /// Gives up on an async call: its answer, if it comes, is dropped.
    fn abandon(&self, call_id: u64) {
        self.inner.abandon(call_id);
    }

    /// An event loop waits for members (until `unwant_members`): the connection is read even
    /// while the callbacks are behind.
    fn want_members(&self) {
        self.inner.want_members();
    }

    fn unwant_members(&self) {
        self.inner.unwant_members();
    }

    /// Waits until every named peer is connected; returns the names still missing on timeout.
    #[pyo3(signature = (names, timeout=None))]
    fn wait_for_members(
        &self,
        py: Python<'_>,
        names: Vec<String>,
        timeout: Option<f64>,
    ) -> PyResult<Vec<String>> {
        let deadline = self::timeout(timeout)?.map(|t| Instant::now() + t);
        loop {
            // In slices, so that signal handlers run while we wait (see `call`).
            let now = Instant::now();
            let slice = deadline.map_or(SIGNAL_CHECK, |d| {
                d.saturating_duration_since(now).min(SIGNAL_CHECK)
            });
            match py.detach(|| self.inner.wait_for_members(&names, Some(slice))) {
                Ok(()) => return Ok(Vec::new()),
                Err(missing) if deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Ok(missing);
                }
                Err(_) => py.check_signals()?,
            }
        }
    }

    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.close());
    }
}

/// Which backend `DAFFI_BACKEND` (or `auto`) resolves to on this machine.
#[pyfunction]
#[pyo3(signature = (backend=None))]
fn resolve_backend(py: Python<'_>, backend: Option<&str>) -> PyResult<&'static str> {
    Ok(engine(py, backend)?.backend())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logging::install(m.py())?;
    daffi_runtime::set_body_allocator(Box::new(body::alloc));
    if std::env::var("DAFFI_MALLOC_TUNING")
        .map(|v| v != "0")
        .unwrap_or(true)
    {
        daffi_runtime::tune_allocator();
    }
    m.add_class::<NodeBase>()?;
    m.add_class::<Listener>()?;
    m.add_class::<Server>()?;
    m.add_class::<Client>()?;
    m.add_class::<Router>()?;
    m.add_function(wrap_pyfunction!(resolve_backend, m)?)?;
    m.add_function(wrap_pyfunction!(msgpack::msgpack_dumps, m)?)?;
    m.add_function(wrap_pyfunction!(msgpack::msgpack_loads, m)?)?;
    m.add(
        "DEFAULT_MAX_MESSAGE_SIZE",
        daffi_runtime::DEFAULT_MAX_MESSAGE_SIZE,
    )?;
    Ok(())
}
