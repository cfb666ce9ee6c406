"""Service, Client and the connection handle: the synchronous public API.

The engine (``daffi._native``) owns every socket and runs on its own thread. This module only
encodes arguments, hands them to the engine with the GIL released, and runs incoming callbacks
on the node's worker threads (``workers`` of them; one thread keeps arrival order).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from daffi import _native
from daffi._serialization import (
    SerdeFormat,
    decode_call,
    decode_error,
    decode_result,
    encode_call,
    encode_error,
    encode_result,
)
from daffi.exceptions import InitializationError
from daffi.registry import REGISTRY

logger = logging.getLogger("daffi")

_NO_REPLY = 0x01
_TEXT = 0x02
_PICKLE = SerdeFormat.PICKLE
_OPAQUE = SerdeFormat.OPAQUE


def _default_name() -> str:
    return f"{socket.gethostname()}-0x{secrets.token_hex(4)}"


def _check_app_name(name: Any) -> str:
    if name is None:
        return _default_name()
    if not isinstance(name, str) or not name:
        raise InitializationError(f"app_name must be a non-empty string, not {name!r}")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise InitializationError("app_name must be at most 255 bytes of UTF-8")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in name):
        raise InitializationError(f"app_name must not contain control characters: {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InitializationError(f"app_name is not valid Unicode: {name!r}") from e
    return name


def _token_option(token: str | bytes | None) -> bytes | None:
    """The shared secret as bytes (a server requires it, a client presents it)."""
    if token is None:
        return None
    if isinstance(token, str):
        token = token.encode("utf-8")
    if not isinstance(token, bytes) or not token:
        raise InitializationError("token must be a non-empty str or bytes")
    if len(token) > 0xFFFF:
        raise InitializationError("token must be at most 65535 bytes")
    return token


def _backend_option(backend: str | None) -> str | None:
    if backend is None:
        return None
    if backend not in ("auto", "uring", "poll"):
        raise ValueError(f"backend must be 'auto', 'uring' or 'poll', not {backend!r}")
    return backend


class _Node:
    """What Service and Client share: address, workers, callbacks, membership handlers."""

    _server_side = False

    def __init__(
        self,
        app_name: str | None = None,
        host: str | None = None,
        port: int | None = None,
        unix_sock_path: str | os.PathLike | None = None,
        workers: int = 1,
        tls: bool = False,
        cert_file: str = "",
        key_file: str = "",
        ca_file: str = "",
        *,
        max_message_size: int = _native.DEFAULT_MAX_MESSAGE_SIZE,
        backend: str | None = None,
        token: str | bytes | None = None,
    ) -> None:
        self.app_name = _check_app_name(app_name)
        if unix_sock_path is not None and (host is not None or port is not None):
            raise InitializationError("give either host/port or unix_sock_path, not both")
        if unix_sock_path is None and port is None:
            raise InitializationError("an address is needed: port=... (with host=...) or unix_sock_path=...")
        bad_port = not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535
        if port is not None and bad_port:
            raise InitializationError(f"port must be an integer in 0..65535, not {port!r}")
        if not isinstance(workers, int) or isinstance(workers, bool):
            raise ValueError(f"workers must be an integer, not {workers!r}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if tls:
            raise InitializationError(
                "TLS is not available in this build of daffi yet; connect over plain TCP or a Unix socket"
            )
        if not isinstance(max_message_size, int) or max_message_size < 1:
            raise ValueError(f"max_message_size must be a positive integer, not {max_message_size!r}")
        self.host = host
        self.port = port
        self.unix_sock_path = os.fspath(unix_sock_path) if unix_sock_path is not None else None
        self.workers = workers
        self.tls = tls
        self.cert_file, self.key_file, self.ca_file = cert_file, key_file, ca_file
        self.max_message_size = max_message_size
        self._backend_option = _backend_option(backend)
        self._token = _token_option(token)
        # (which events, handler) in registration order: "all" handlers get the event dict,
        # "added"/"removed" handlers get the member name.
        self._handlers: list[tuple[str, Callable[[Any], Any]]] = []
        self._lock = threading.RLock()
        self._native: Any = None
        self._threads: list[threading.Thread] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._stopped = threading.Event()
        self._stopped.set()

    # -- membership handlers ------------------------------------------------------------

    def add_event_handler(self, fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
        """Call ``fn({"type": "connected" | "disconnected", "member": name})`` on changes."""
        self._handlers.append(("all", fn))
        return fn

    def on_member_added(self, fn: Callable[[str], Any]) -> Callable[[str], Any]:
        """Call ``fn(name)`` when a peer connects (usable as a decorator)."""
        self._handlers.append(("added", fn))
        return fn

    def on_member_removed(self, fn: Callable[[str], Any]) -> Callable[[str], Any]:
        """Call ``fn(name)`` when a peer leaves (usable as a decorator)."""
        self._handlers.append(("removed", fn))
        return fn

    def _dispatch_event(self, connected: bool, member: str) -> None:
        event = {"type": "connected" if connected else "disconnected", "member": member}
        mine = "added" if connected else "removed"
        for kind, fn in list(self._handlers):
            if kind == "all":
                self._run_handler(fn, event)
            elif kind == mine:
                self._run_handler(fn, member)

    def _run_handler(self, fn: Callable[[Any], Any], arg: Any) -> None:
        try:
            result = fn(arg)
            if asyncio.iscoroutine(result):
                asyncio.run(result)
        except BaseException:  # even SystemExit: a handler never stops the node's events
            logger.exception("event handler %r raised", fn)

    # -- engine side --------------------------------------------------------------------

    @property
    def backend(self) -> str | None:
        """The I/O backend in use (``"uring"`` or ``"poll"``), once started or connected."""
        native = self._native
        return native.backend if native is not None else None

    def _start_threads(self, native: Any) -> None:
        def announce(names: list[str]) -> None:
            native.announce(names)

        self._unsubscribe = REGISTRY.subscribe(announce)
        # Anything registered between the native start and the subscription above.
        native.announce(REGISTRY.names())
        threads = [
            threading.Thread(
                target=_serve, args=(native,), name=f"daffi-worker-{self.app_name}-{i}", daemon=True
            )
            for i in range(self.workers)
        ]
        threads.append(
            threading.Thread(target=self._events_loop, args=(native,), name=f"daffi-events-{self.app_name}",
                             daemon=True)
        )
        for t in threads:
            t.start()
        self._threads = threads

    def _events_loop(self, native: Any) -> None:
        while True:
            event = native.next_event()
            if event is None:
                return
            self._dispatch_event(*event)

    def _release_loop(self, native: Any) -> None:
        """Before a native stop: an asyncio node gives back what its event loop was lent."""

    def _stop_threads(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        # Idle workers and the event thread exit at once (their native queue closed). A worker
        # still inside a long callback is not waited for: stop() and signals stay prompt, and
        # its answer is dropped since the connection is gone. The threads are daemons.
        current = threading.current_thread()
        deadline = time.monotonic() + 0.25
        for t in self._threads:
            if t is not current:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads = []

    def join(self) -> None:
        """Block until :meth:`stop` is called (Ctrl+C or SIGTERM stop the node cleanly)."""
        restore = _install_sigterm()
        try:
            while not self._stopped.wait(0.25):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if restore is not None:
                signal.signal(signal.SIGTERM, restore)
            self.stop()

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def _install_sigterm() -> Any:
    """In the main thread, turn an unhandled SIGTERM into KeyboardInterrupt so join() stops."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    return signal.SIG_DFL


def _serve(native: Any) -> None:
    """A worker thread: run incoming calls until the node stops."""
    lookup = REGISTRY.lookup
    loop: asyncio.AbstractEventLoop | None = None
    while True:
        item = native.next_call()
        if item is None:
            if loop is not None:
                loop.close()
            return
        conn, call_id, name, serde, flags, payload = item
        reply = not flags & _NO_REPLY
        try:
            entry = lookup(name)
            if entry is None:
                raise LookupError(f"no callback named {name!r} is registered")
            fn, is_async = entry
            args, kwargs = decode_call(serde, payload, bool(flags & _TEXT))
            del payload
            result = fn(*args, **kwargs)
            if is_async or asyncio.iscoroutine(result):
                # A coroutine callback on a sync node runs to completion on this worker's own
                # event loop.
                if loop is None:
                    loop = asyncio.new_event_loop()
                result = loop.run_until_complete(result)
            if reply:
                out, text = encode_result(serde, result)
                native.respond(conn, call_id, serde, text, out)
        except BaseException as exc:  # even SystemExit: it answers the caller, not this worker
            if reply:
                native.respond_error(conn, call_id, encode_error(exc, traceback.format_exc()))
            else:
                logger.warning("callback %r (no reply wanted) raised: %r", name, exc)


class _Listener(_Node):
    """What Service and Router share: a listening socket, its members, start and stop."""

    _kind = "server"

    def _open_native(self, host: str | None) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def start(self) -> Any:
        """Bind and start serving; returns once connections are accepted."""
        with self._lock:
            if self._native is not None:
                raise RuntimeError(f"{self._kind} {self.app_name!r} is already started")
            host = self.host
            if host is None and self.unix_sock_path is None:
                host = "127.0.0.1"
            native = self._open_native(host)
            if self.port == 0:
                self.port = native.port
            self._native = native
            self._stopped.clear()
            self._start_threads(native)
        return self

    @property
    def members(self) -> list[str]:
        """Names of the connected clients."""
        native = self._native
        return native.members() if native is not None else []

    def stop(self) -> None:
        """Close the listener and every connection; idempotent and bounded in time."""
        # All of it under the lock: a concurrent start() or stop() waits for this one to end.
        with self._lock:
            native, self._native = self._native, None
            if native is not None:
                self._release_loop(native)
                native.stop()
                self._stop_threads()
            self._stopped.set()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Service(_Listener):
    """A server that exposes the process's ``@callback`` functions to Clients.

    Options beyond the common ones: ``token=`` makes every client present the same secret in
    its handshake (others are refused before any call is read); ``serde_formats=`` lists the
    formats accepted in requests (for example ``[SerdeFormat.JSON]`` so that no peer can make
    this process unpickle anything); other requests fail with ``TransmissionFailure``.
    """

    _kind = "service"

    def __init__(self, *args: Any, serde_formats: Iterable[SerdeFormat] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if serde_formats is None:
            self._serde_formats = None
        else:
            formats = [SerdeFormat(f) for f in serde_formats]
            if not formats:
                raise InitializationError("serde_formats must name at least one format")
            self._serde_formats = [int(f) for f in formats]

    def _open_native(self, host: str | None) -> Any:
        return _native.Server(
            self.app_name,
            host=host,
            port=self.port,
            unix_path=self.unix_sock_path,
            max_message_size=self.max_message_size,
            functions=REGISTRY.names(),
            backend=self._backend_option,
            token=self._token,
            serde_formats=self._serde_formats,
        )

    def start(self) -> Service:
        """Bind and start serving; returns once connections are accepted."""
        return super().start()

    def __enter__(self) -> Service:
        return self.start()


class Router(_Listener):
    """Forwards calls between Clients, any of which may expose callbacks (workers), call
    others, or both.

    The Router runs no callbacks and never decodes a payload: requests and answers are passed
    between connections by the engine, without involving Python. ``workers`` is accepted and
    ignored. Its event handlers hear every client join and leave. ``token=`` makes every client
    present the same secret in its handshake; ``max_message_size`` bounds what it forwards.
    """

    _kind = "router"

    def _open_native(self, host: str | None) -> Any:
        return _native.Router(
            self.app_name,
            host=host,
            port=self.port,
            unix_path=self.unix_sock_path,
            max_message_size=self.max_message_size,
            backend=self._backend_option,
            token=self._token,
        )

    def _start_threads(self, native: Any) -> None:
        # No callbacks to run or announce: only membership events.
        t = threading.Thread(target=self._events_loop, args=(native,), name=f"daffi-events-{self.app_name}",
                             daemon=True)
        t.start()
        self._threads = [t]

    def start(self) -> Router:
        """Bind and start forwarding; returns once connections are accepted."""
        return super().start()

    def __enter__(self) -> Router:
        return self.start()


class Client(_Node):
    """Connects to a Service (or Router), calls remote functions, may expose its own."""

    def __init__(self, *args: Any, connect_timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connect_timeout = connect_timeout
        self._conn: Connection | None = None

    def connect(self) -> Connection:
        """Connect and return the connection handle used to make calls."""
        with self._lock:
            if self._native is not None:
                if self._native.connected:
                    raise RuntimeError(f"client {self.app_name!r} is already connected")
                self._shutdown_native()
            native = _native.Client(
                self.app_name,
                host=self.host if self.host is not None or self.unix_sock_path is not None else "127.0.0.1",
                port=self.port,
                unix_path=self.unix_sock_path,
                max_message_size=self.max_message_size,
                functions=REGISTRY.names(),
                connect_timeout=self.connect_timeout,
                backend=self._backend_option,
                token=self._token,
            )
            self._native = native
            self._stopped.clear()
            self._start_threads(native)
            self._conn = Connection(self, native)
            return self._conn

    @property
    def connected(self) -> bool:
        """Whether the client is connected right now."""
        native = self._native
        return native is not None and native.connected

    @property
    def connection(self) -> Connection | None:
        return self._conn

    def _shutdown_native(self) -> None:
        native, self._native = self._native, None
        if native is not None:
            self._release_loop(native)
            native.close()
            self._stop_threads()

    def stop(self) -> None:
        """Disconnect (sending whatever is queued first); idempotent and thread-safe."""
        with self._lock:
            self._shutdown_native()
            self._stopped.set()

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _PeerView:
    """What a connection handle tells about membership (sync and asyncio alike)."""

    __slots__ = ()
    _client: Any
    _native: Any

    @property
    def members(self) -> list[str]:
        """Names of the peers this connection can call: the Service, or every other client of
        the Router."""
        native = self._native
        return native.peers() if native.connected else []

    # -- membership handlers, as on the client ----------------------------------------------

    def add_event_handler(self, fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
        return self._client.add_event_handler(fn)

    def on_member_added(self, fn: Callable[[str], Any]) -> Callable[[str], Any]:
        return self._client.on_member_added(fn)

    def on_member_removed(self, fn: Callable[[str], Any]) -> Callable[[str], Any]:
        return self._client.on_member_removed(fn)


class Connection(_PeerView):
    """The handle returned by :meth:`Client.connect`: call styles and membership."""

    __slots__ = ("_client", "_native", "__weakref__")

    def __init__(self, client: Client, native: Any) -> None:
        self._client = client
        self._native = native

    # -- call styles ----------------------------------------------------------------------

    def rpc(self, timeout: float | None = None, receiver: str | None = None,
            serde: SerdeFormat = _PICKLE) -> _Proxy:
        """Call one peer and wait for its result."""
        return _Proxy(self._call, timeout, receiver, serde)

    def rpc_nowait(self, receiver: str | None = None, serde: SerdeFormat = _PICKLE) -> _Proxy:
        """Call one peer without waiting; returns None once sent."""
        return _Proxy(self._send, None, receiver, serde)

    def cast(self, timeout: float | None = None, receiver: str | Iterable[str] | None = None,
             serde: SerdeFormat = _PICKLE) -> _Proxy:
        """Call every peer exposing the function; returns ``{peer: result or exception}``."""
        return _Proxy(self._cast, timeout, receiver, serde)

    def cast_nowait(self, receiver: str | Iterable[str] | None = None,
                    serde: SerdeFormat = _PICKLE) -> _Proxy:
        return _Proxy(self._cast_nowait, None, receiver, serde)

    def stream(self, receiver: str | None = None, serde: SerdeFormat = _OPAQUE,
               timeout: float | None = None) -> _Proxy:
        """Send chunks one call each, waiting for each acknowledgement (back-pressure)."""
        return _Proxy(self._stream, timeout, receiver, serde)

    def stream_nowait(self, receiver: str | None = None, serde: SerdeFormat = _OPAQUE) -> _Proxy:
        return _Proxy(self._stream_nowait, None, receiver, serde)

    def wait_for_members(self, *names: str, timeout: float | None = None, interval: float = 1.0) -> None:
        """Return once every named peer is connected; TimeoutError names the missing ones."""
        if not names:
            return
        missing = self._native.wait_for_members(list(names), timeout)
        if missing:
            raise TimeoutError(f"members not connected after {timeout} s: {', '.join(missing)}")

    # -- the calls themselves ---------------------------------------------------------------
    # Receiver checks and round-robin happen in the engine (daffi._native), before anything is
    # sent: an unknown receiver, the caller itself or a function nobody exposes raise
    # daffi.exceptions.TransmissionFailure at once.

    def _call(self, name: str, timeout: float | None, receiver: str | None, serde: int,
              args: tuple, kwargs: dict) -> Any:
        payload, text = encode_call(serde, args, kwargs)
        ok, rserde, rtext, data = self._native.call(name, serde, text, payload, timeout, receiver)
        if ok:
            return decode_result(rserde, data, rtext)
        raise decode_error(data)

    def _send(self, name: str, timeout: float | None, receiver: str | None, serde: int,
              args: tuple, kwargs: dict) -> None:
        payload, text = encode_call(serde, args, kwargs)
        self._native.send(name, serde, text, payload, receiver)

    def _cast(self, name: str, timeout: float | None, receiver: Any, serde: int,
              args: tuple, kwargs: dict) -> dict[str, Any]:
        payload, text = encode_call(serde, args, kwargs)
        entries = self._native.cast(name, serde, text, payload, timeout, _targets(receiver))
        results: dict[str, Any] = {}
        for peer, status, rserde, rtext, value in entries:
            # A failing peer never fails the cast: its entry is the exception.
            try:
                results[peer] = _outcome(status, rserde, rtext, value)
            except Exception as exc:
                results[peer] = exc
        return results

    def _cast_nowait(self, name: str, timeout: float | None, receiver: Any, serde: int,
                     args: tuple, kwargs: dict) -> None:
        native = self._native
        targets = native.cast_targets(name, _targets(receiver), True)
        payload, text = encode_call(serde, args, kwargs)
        for target in targets:
            native.send(name, serde, text, payload, target)

    def _stream(self, name: str, timeout: float | None, receiver: str | None, serde: int,
                args: tuple, kwargs: dict, *, wait: bool = True) -> None:
        source = _stream_source(args, kwargs)
        native = self._native
        # Every chunk goes to the same peer, chosen once.
        target = native.resolve(name, receiver, True)
        for chunk in _chunks(source):
            payload, text = encode_call(serde, (chunk,), {})
            if wait:
                ok, rserde, rtext, data = native.call(name, serde, text, payload, timeout, target)
                if not ok:
                    raise decode_error(data)
            else:
                native.send(name, serde, text, payload, target)

    def _stream_nowait(self, name: str, timeout: float | None, receiver: str | None, serde: int,
                       args: tuple, kwargs: dict) -> None:
        self._stream(name, timeout, receiver, serde, args, kwargs, wait=False)


def _outcome(status: int, serde: int, text: bool, value: Any) -> Any:
    """The result of a finished call as ``_native`` reports it (status 0: the result payload,
    1: the callee's encoded exception, 2: an exception instance), or raises its error."""
    if status == 0:
        return decode_result(serde, value, text)
    if status == 1:
        raise decode_error(value)
    raise value


def _stream_source(args: tuple, kwargs: dict) -> Any:
    """A stream proxy's one argument: the chunks (or the only chunk)."""
    if len(args) != 1 or kwargs:
        raise TypeError("a stream takes exactly one positional argument (the chunks)")
    return args[0]


def _chunks(source: Any) -> Iterator[Any]:
    """The chunks of a stream: each item of an iterable, but a ``str``, a bytes-like object, a
    ``dict`` or anything not iterable is one chunk."""
    if isinstance(source, (str, bytes, bytearray, memoryview, dict)):
        return iter((source,))
    try:
        return iter(source)
    except TypeError:
        return iter((source,))


def _targets(receiver: Any) -> list[str] | None:
    if receiver is None:
        return None
    if isinstance(receiver, str):
        return [receiver]
    return list(receiver)


class _Proxy:
    """A call style bound to its options: ``proxy.name(*args, **kwargs)`` runs
    ``run(name, timeout, receiver, serde, args, kwargs)``. Cheap, immutable, shareable."""

    __slots__ = ("_run", "_timeout", "_receiver", "_serde")

    def __init__(self, run: Callable[..., Any], timeout: float | None, receiver: Any, serde: Any) -> None:
        object.__setattr__(self, "_run", run)
        object.__setattr__(self, "_timeout", timeout)
        object.__setattr__(self, "_receiver", receiver)
        object.__setattr__(self, "_serde", int(serde))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("call proxies are immutable")

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)
        run, timeout, receiver, serde = self._run, self._timeout, self._receiver, self._serde

        def call(*args: Any, **kwargs: Any) -> Any:
            return run(name, timeout, receiver, serde, args, kwargs)

        return call
