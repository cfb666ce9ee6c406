"""End to end, in one process: the direct layout (Client → Service), SPEC §1–5, 7, 9.

Every server listens on 127.0.0.1 (a free port) or on a Unix socket under ``tmp_path``; the
``make_service`` / ``make_client`` fixtures stop every node when the test ends. Timing checks
use wide margins: they assert order-of-magnitude facts, not exact durations.
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import os
import pickle
import queue
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import daffi
import daffi._native
import daffi._serialization
import daffi.exceptions
import daffi.registry
import pytest
from conftest import free_port, unique_name, wait_until
from daffi import Client, SerdeFormat, Service, callback
from daffi.exceptions import (
    CallTimeout,
    DaffiError,
    Disconnected,
    InitializationError,
    RemoteCallError,
    TransmissionFailure,
)

# -- callbacks shared by the tests of this module (names unique across the suite) ----------


@dataclasses.dataclass(frozen=True)
class DxPoint:
    x: int
    y: int


class DxCustomError(Exception):
    pass


@callback
def dx_echo(value):
    return value


@callback
def dx_add(a, b=0, *, scale=1):
    return (a + b) * scale


@callback
def dx_type_name(value):
    return type(value).__name__


@callback
def dx_len(value):
    # Returns a str so that it answers in every format, OPAQUE included.
    return str(len(value))


@callback
def dx_fail_value(message):
    raise ValueError(message)


@callback
def dx_fail_key():
    return {}["missing-key"]


@callback
def dx_fail_custom():
    raise DxCustomError("custom failure")


@callback
def dx_sleep(seconds, tag=None):
    time.sleep(seconds)
    return tag if tag is not None else seconds


@callback
def dx_unpicklable():
    return threading.Lock()


@callback
def dx_pid():
    return os.getpid()


# Per-test inboxes for callbacks that report what they saw (set by the tests that use them).
_SINK: dict[str, queue.Queue] = {}


@callback
def dx_sink(key, value):
    _SINK[key].put(value)


@callback
def dx_chunk(chunk):
    # OPAQUE: the chunk is the only argument. The chunk says which inbox it belongs to.
    if isinstance(chunk, str):
        chunk = chunk.encode()
    key, _, body = bytes(chunk).partition(b":")
    _SINK[key.decode()].put(body)
    if body == b"explode":
        raise ValueError("chunk refused")


@callback
def dx_collect(item):
    # PICKLE stream chunks: ``{"key": k, "v": value}`` or ``(k, value)``.
    key, value = (item["key"], item["v"]) if isinstance(item, dict) else item
    _SINK[key].put(value)


@callback
def dx_count(key):
    return _SINK[key].qsize()


@pytest.fixture
def sink():
    """A fresh inbox for ``dx_sink``/``dx_chunk``: ``(key, queue)``."""
    key = unique_name("sink")
    q: queue.Queue = queue.Queue()
    _SINK[key] = q
    yield key, q
    _SINK.pop(key, None)


@pytest.fixture
def svc(make_service):
    return make_service()


@pytest.fixture
def conn(svc, make_client):
    return make_client(svc)[1]


def drain(q: queue.Queue, count: int, timeout: float = 5.0) -> list:
    """``count`` items from ``q`` (fails if they do not all arrive within ``timeout``)."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)} of {count} items arrived: {out!r}"
        try:
            out.append(q.get(timeout=left))
        except queue.Empty:
            pass
    return out


# -- §1 import surface ----------------------------------------------------------------------


def test_top_level_names():
    for name in ("Service", "Client", "SerdeFormat", "callback", "local", "alias", "__version__"):
        assert hasattr(daffi, name), name
    assert daffi.callback is daffi.registry.callback
    assert daffi.local is daffi.registry.local
    assert daffi.alias is daffi.registry.alias
    assert daffi.SerdeFormat is daffi._serialization.SerdeFormat
    assert isinstance(daffi.__version__, str) and re.match(r"^\d+\.\d+", daffi.__version__)


def test_serde_format_values():
    assert [(f.name, int(f)) for f in sorted(SerdeFormat)] == [
        ("OPAQUE", 0), ("JSON", 1), ("PICKLE", 2), ("MSGPACK", 3)
    ]


def test_exceptions_module_surface():
    ex = daffi.exceptions
    for name in ("DaffiError", "InitializationError", "Disconnected", "Evicted", "TransmissionFailure",
                 "RemoteCallError", "CallTimeout"):
        assert issubclass(getattr(ex, name), ex.DaffiError), name
    assert issubclass(ex.CallTimeout, TimeoutError)
    assert issubclass(ex.Disconnected, ConnectionError)
    # The old name stays importable but never shadows the builtin through star imports.
    assert ex.BaseException is ex.DaffiError
    namespace: dict = {}
    exec("from daffi.exceptions import *", namespace)
    exec("from daffi import *", namespace)
    assert "BaseException" not in namespace
    assert not hasattr(daffi, "BaseException")
    assert builtins.BaseException is not ex.DaffiError


def test_type_information_is_shipped():
    package = Path(daffi.__file__).parent
    assert (package / "py.typed").is_file()
    # SPEC §1: stubs for the native module.
    assert (package / "_native.pyi").is_file(), "daffi/_native.pyi (stubs of the native module) is missing"


# -- §2 constructors --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Service, Client])
def test_default_name_is_hostname_and_8_hex_digits(cls):
    a = cls(port=free_port())
    b = cls(port=free_port())
    pattern = re.escape(socket.gethostname()) + r"-0x[0-9a-f]{8}"
    assert re.fullmatch(pattern, a.app_name), a.app_name
    assert re.fullmatch(pattern, b.app_name), b.app_name
    assert a.app_name != b.app_name


@pytest.mark.parametrize("cls", [Service, Client])
@pytest.mark.parametrize(
    "name",
    ["", "x" * 256, "é" * 128, "tab\there", "new\nline", "nul\x00", "del\x7f", 123, b"bytes"],
    ids=["empty", "256-bytes", "256-utf8-bytes", "tab", "newline", "nul", "del", "int", "bytes"],
)
def test_bad_app_name_is_an_initialization_error(cls, name):
    with pytest.raises(InitializationError):
        cls(app_name=name, port=free_port())


@pytest.mark.parametrize("cls", [Service, Client])
def test_longest_and_unicode_names_are_accepted(cls):
    assert cls(app_name="x" * 255, port=free_port()).app_name == "x" * 255
    assert cls(app_name="é" * 127, port=free_port()).app_name == "é" * 127
    assert cls(app_name="grüß-服务 1", port=free_port()).app_name == "grüß-服务 1"


def test_a_long_name_works_on_the_wire(make_service, make_client):
    svc = make_service(app_name="s" * 255)
    client, conn = make_client(svc, app_name="ü" * 127)
    assert conn.cast(timeout=5).dx_echo(1) == {"s" * 255: 1}
    assert wait_until(lambda: svc.members == ["ü" * 127])


@pytest.mark.parametrize("cls", [Service, Client])
def test_both_address_forms_are_refused(cls, tmp_path):
    with pytest.raises(InitializationError):
        cls(host="127.0.0.1", port=free_port(), unix_sock_path=str(tmp_path / "s.sock"))
    with pytest.raises(InitializationError):
        cls(port=free_port(), unix_sock_path=tmp_path / "s.sock")


@pytest.mark.parametrize("cls", [Service, Client])
@pytest.mark.parametrize("workers", [0, -1])
def test_workers_below_one_is_a_value_error(cls, workers):
    with pytest.raises(ValueError):
        cls(port=free_port(), workers=workers)


@pytest.mark.parametrize("cls", [Service, Client])
def test_tls_is_refused_for_now(cls):
    with pytest.raises(InitializationError):
        cls(port=free_port(), tls=True)


def test_positional_parameter_order():
    port = free_port()
    svc = Service("pos-svc", "127.0.0.1", port, None, 3)
    assert (svc.app_name, svc.host, svc.port, svc.unix_sock_path, svc.workers) == (
        "pos-svc", "127.0.0.1", port, None, 3
    )


def test_construction_does_not_bind():
    port = free_port()
    Service(port=port)
    Service(port=port)  # nothing is bound until start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# -- §2 Service lifecycle ------------------------------------------------------------------------


def test_start_returns_once_connections_are_accepted():
    port = free_port()
    svc = Service(port=port)
    try:
        assert svc.start() is svc
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        svc.stop()


def test_port_only_listens_on_loopback(make_service):
    svc = make_service(host=None)
    with socket.create_connection(("127.0.0.1", svc.port), timeout=2):
        pass
    # Not on the wildcard address: another socket may still bind the port on a non-loopback
    # address only if the service did not take 0.0.0.0. Checked through /proc when available.
    listening = Path("/proc/net/tcp")
    if listening.exists():
        hexport = f"{svc.port:04X}"
        rows = [line.split() for line in listening.read_text().splitlines()[1:]]
        locals_ = [r[1] for r in rows if r[1].endswith(":" + hexport) and r[3] == "0A"]
        assert locals_ == ["0100007F:" + hexport], locals_


def test_second_start_is_a_runtime_error(svc):
    with pytest.raises(RuntimeError):
        svc.start()


def test_busy_port_says_in_use():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        svc = Service(port=port)
        with pytest.raises(InitializationError, match="in use"):
            svc.start()
        svc.stop()


def test_two_services_on_one_port(make_service):
    first = make_service()
    second = Service(port=first.port)
    with pytest.raises(InitializationError, match="in use"):
        second.start()
    second.stop()


def test_stop_unblocks_join_from_another_thread(make_service):
    svc = make_service()
    done = threading.Event()

    def joiner():
        svc.join()
        done.set()

    t = threading.Thread(target=joiner, daemon=True)
    t.start()
    time.sleep(0.2)
    assert not done.is_set(), "join() returned before stop()"
    started = time.monotonic()
    svc.stop()
    assert done.wait(5), "join() still blocked after stop()"
    assert time.monotonic() - started < 3


def test_stop_is_idempotent_and_works_before_start():
    svc = Service(port=free_port())
    svc.stop()
    svc.start()
    svc.stop()
    svc.stop()


_RELEASE: dict[str, threading.Event] = {}


@callback
def dx_block(key, started_key):
    _SINK[started_key].put(key)
    _RELEASE[key].wait(10)
    return key


def test_stop_is_prompt_with_callbacks_still_running(make_service, make_client, sink):
    # SPEC §2: stop() never hangs; §2 signals: a node ends well under a second. Callbacks
    # that are still running must not hold stop() for a grace period per worker thread.
    svc = make_service(workers=4)
    _, conn = make_client(svc)
    started_key, started = sink
    key = unique_name("block")
    _RELEASE[key] = threading.Event()
    release = threading.Timer(4.0, _RELEASE[key].set)  # bounds the cost of a failure
    release.start()
    try:
        for _ in range(4):
            conn.rpc_nowait().dx_block(key, started_key)
        drain(started, 4)
        t0 = time.monotonic()
        svc.stop()
        took = time.monotonic() - t0
        assert took < 2.0, f"stop() took {took:.2f} s with 4 callbacks running"
    finally:
        _RELEASE[key].set()
        release.cancel()
        _RELEASE.pop(key, None)


def test_port_rebinds_at_once_after_stop(make_service, make_client):
    svc = make_service()
    port = svc.port
    client, conn = make_client(svc)
    assert conn.rpc(timeout=5).dx_echo(1) == 1
    svc.stop()
    again = make_service(port=port)
    client.stop()
    _, conn2 = make_client(again)
    assert conn2.rpc(timeout=5).dx_echo(2) == 2


def test_restart_cycles(make_client):
    port = free_port()
    for i in range(5):
        with Service(port=port) as svc:
            client, conn = make_client(svc)
            assert conn.rpc(timeout=5).dx_echo(i) == i
            client.stop()


def test_service_context_manager():
    port = free_port()
    with Service(port=port) as svc:
        assert isinstance(svc, Service)
        with Client(port=port) as client:
            assert isinstance(client, Client)
            assert client.connected
            assert client.connection.rpc(timeout=5).dx_add(2, 3) == 5
        assert not client.connected
    with Service(port=port):  # stopped on exit: the port is free again
        pass


def test_service_context_manager_stops_on_error():
    port = free_port()
    with pytest.raises(KeyError):
        with Service(port=port):
            raise KeyError("boom")
    with Service(port=port):
        pass


def test_backend_matches_environment(svc, make_client, backend):
    client, _ = make_client(svc)
    assert svc.backend in ("uring", "poll")
    assert client.backend == svc.backend
    if backend is not None:
        assert svc.backend == backend
        assert client.backend == backend


def _backend_available(name: str) -> bool:
    try:
        return daffi._native.resolve_backend(name) == name
    except Exception:
        return False


@pytest.mark.parametrize("choice", ["poll", "uring"])
def test_backend_option(make_service, make_client, choice):
    if not _backend_available(choice):
        pytest.skip(f"the {choice} backend is not available here")
    svc = make_service(backend=choice)
    client, conn = make_client(svc, backend=choice)
    assert svc.backend == choice and client.backend == choice
    assert conn.rpc(timeout=5).dx_echo("ok") == "ok"
    with pytest.raises(ValueError):
        Service(port=free_port(), backend="epoll-please")


# -- §2 Client lifecycle ---------------------------------------------------------------------------


def test_connect_refused_is_quick_initialization_error():
    port = free_port()  # nothing listens there
    client = Client(port=port)
    started = time.monotonic()
    with pytest.raises(InitializationError):
        client.connect()
    assert time.monotonic() - started < 3
    assert not client.connected
    client.stop()


def test_connect_to_unix_path_without_server(tmp_path):
    client = Client(unix_sock_path=tmp_path / "nobody.sock")
    with pytest.raises(InitializationError):
        client.connect()


def test_double_connect_is_a_runtime_error(svc, make_client):
    client, conn = make_client(svc)
    with pytest.raises(RuntimeError):
        client.connect()
    assert conn.rpc(timeout=5).dx_echo(1) == 1  # the first connection is untouched


def test_connected_property(svc, make_client):
    client, _ = make_client(svc, connect=False)
    assert client.connected is False
    client.connect()
    assert client.connected is True
    client.stop()
    assert client.connected is False
    with pytest.raises(AttributeError):
        client.connected = True


def test_connected_turns_false_when_the_service_stops(make_service, make_client):
    svc = make_service()
    client, conn = make_client(svc)
    svc.stop()
    assert wait_until(lambda: not client.connected, 5)
    with pytest.raises((Disconnected, TransmissionFailure)):
        conn.rpc(timeout=5).dx_echo(1)


def test_client_stop_is_idempotent_and_thread_safe(svc, make_client):
    client, conn = make_client(svc)
    assert conn.rpc(timeout=5).dx_echo(1) == 1
    errors = []

    def stopper():
        try:
            client.stop()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=stopper) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert not any(t.is_alive() for t in threads)
    client.stop()
    assert not client.connected


def test_reconnect_after_stop_with_the_same_name(svc, make_client):
    name = unique_name("again")
    client, conn = make_client(svc, app_name=name)
    assert conn.rpc(timeout=5).dx_echo("one") == "one"
    assert wait_until(lambda: svc.members == [name])
    client.stop()
    assert wait_until(lambda: svc.members == [])
    conn2 = client.connect()
    assert client.connected
    assert conn2.rpc(timeout=5).dx_echo("two") == "two"
    assert wait_until(lambda: svc.members == [name])
    # The old handle does not resurrect: it belongs to the closed connection.
    with pytest.raises((Disconnected, TransmissionFailure)):
        conn.rpc(timeout=5).dx_echo("old")


def test_client_join_returns_after_stop(svc, make_client):
    client, _ = make_client(svc)
    done = threading.Event()
    t = threading.Thread(target=lambda: (client.join(), done.set()), daemon=True)
    t.start()
    time.sleep(0.1)
    assert not done.is_set()
    client.stop()
    assert done.wait(5)


def test_calls_after_client_stop_fail(svc, make_client):
    client, conn = make_client(svc)
    client.stop()
    started = time.monotonic()
    with pytest.raises((Disconnected, TransmissionFailure)):
        conn.rpc(timeout=5).dx_echo(1)
    with pytest.raises((Disconnected, TransmissionFailure)):
        conn.rpc_nowait().dx_echo(1)
    assert time.monotonic() - started < 1


# -- §4 call styles: rpc and serialisation --------------------------------------------------------


def test_rpc_pickle_preserves_types(conn):
    value = {"t": (1, 2), "s": {1, 2}, "p": DxPoint(1, 2), "b": b"\x00\xff", "f": 1.5, "n": None,
             3: [frozenset({4})]}
    assert conn.rpc(timeout=5).dx_echo(value) == value
    assert conn.rpc(timeout=5).dx_type_name(DxPoint(0, 0)) == "DxPoint"
    assert conn.rpc(timeout=5, serde=SerdeFormat.PICKLE).dx_echo((1, "a")) == (1, "a")


def test_rpc_json(conn):
    p = conn.rpc(timeout=5, serde=SerdeFormat.JSON)
    assert p.dx_echo({"a": [1, 2.5, "x", None, True]}) == {"a": [1, 2.5, "x", None, True]}
    assert p.dx_echo((1, 2)) == [1, 2]  # tuples come back as lists
    assert p.dx_type_name((1, 2)) == "list"
    assert p.dx_add(1, 2) == 3
    with pytest.raises(TypeError):
        p.dx_echo(b"bytes are not JSON")
    assert p.dx_echo("still usable") == "still usable"


def test_rpc_msgpack(conn):
    p = conn.rpc(timeout=5, serde=SerdeFormat.MSGPACK)
    assert p.dx_echo({"a": [1, 2.5, "x", None, True]}) == {"a": [1, 2.5, "x", None, True]}
    assert p.dx_echo(b"\x00raw\xff") == b"\x00raw\xff"
    assert p.dx_type_name(b"x") == "bytes"
    assert p.dx_echo({1: "one", 2: "two"}) == {1: "one", 2: "two"}
    assert p.dx_echo(2**40) == 2**40


def test_rpc_opaque(conn):
    p = conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE)
    assert p.dx_echo(b"\x00\x01binary\x00") == b"\x00\x01binary\x00"
    assert p.dx_echo("grüß 服务") == "grüß 服务"
    assert p.dx_type_name("text") == "str"
    assert p.dx_type_name(bytearray(b"abc")) == "bytes"
    assert p.dx_type_name(memoryview(b"abc")) == "bytes"
    assert p.dx_echo(bytearray(b"abc")) == b"abc"
    assert p.dx_echo(memoryview(b"abcdef")[1:4]) == b"bcd"
    assert p.dx_echo(value=b"kw") == b"kw"  # one keyword argument is fine too
    assert p.dx_echo(b"") == b""
    with pytest.raises(TypeError):
        p.dx_add(b"a", b"b")
    with pytest.raises(TypeError):
        p.dx_echo(12345)
    assert p.dx_echo(b"usable") == b"usable"


def test_rpc_keyword_arguments(conn):
    assert conn.rpc(timeout=5).dx_add(1, b=2, scale=10) == 30
    assert conn.rpc(timeout=5, serde=SerdeFormat.JSON).dx_add(a=1, b=2, scale=3) == 9
    assert conn.rpc(timeout=5, serde=SerdeFormat.MSGPACK).dx_add(4, scale=2) == 8


def test_proxy_getattr_and_immutability(conn):
    proxy = conn.rpc(timeout=5)
    name = "dx_echo"
    assert getattr(proxy, name)(7) == 7
    with pytest.raises(AttributeError):
        proxy.timeout = 3


def test_remote_exception_is_both_remote_call_error_and_builtin(conn):
    with pytest.raises(ValueError) as info:
        conn.rpc(timeout=5).dx_fail_value("bad input 42")
    err = info.value
    assert isinstance(err, RemoteCallError)
    assert isinstance(err, DaffiError)
    assert type(err).__name__ == "ValueError"
    assert err.remote_type == "ValueError"
    assert "bad input 42" in str(err)
    assert "dx_fail_value" in err.remote_traceback
    assert "raise ValueError(message)" in err.remote_traceback


def test_remote_key_error_and_custom_exception(conn):
    with pytest.raises(KeyError) as info:
        conn.rpc(timeout=5).dx_fail_key()
    assert isinstance(info.value, RemoteCallError)
    with pytest.raises(RemoteCallError) as info:
        conn.rpc(timeout=5).dx_fail_custom()
    assert type(info.value).__name__ == "DxCustomError"
    assert info.value.remote_type.endswith("DxCustomError")
    assert "custom failure" in str(info.value)
    # Same error whatever the request format.
    with pytest.raises(ValueError):
        conn.rpc(timeout=5, serde=SerdeFormat.JSON).dx_fail_value("j")
    with pytest.raises(ValueError):
        conn.rpc(timeout=5, serde=SerdeFormat.MSGPACK).dx_fail_value("m")


@callback
def dx_int(value):
    return 42


def test_opaque_result_of_the_wrong_type_is_a_remote_type_error(conn):
    # The result travels in the request's format: an int cannot go as OPAQUE.
    with pytest.raises(TypeError) as info:
        conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE).dx_int(b"x")
    assert isinstance(info.value, RemoteCallError)
    assert conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE).dx_echo(b"x") == b"x"
    assert conn.rpc(timeout=5).dx_int(b"x") == 42


def test_remote_error_does_not_break_the_connection(conn):
    for i in range(20):
        with pytest.raises(ValueError):
            conn.rpc(timeout=5).dx_fail_value(str(i))
        assert conn.rpc(timeout=5).dx_echo(i) == i


def test_unpicklable_result_is_a_remote_error(conn, make_client, svc):
    with pytest.raises(RemoteCallError) as info:
        conn.rpc(timeout=5).dx_unpicklable()
    assert "lock" in str(info.value).lower()
    assert conn.rpc(timeout=5).dx_echo("after") == "after"
    with pytest.raises(RemoteCallError):  # a result JSON cannot carry
        conn.rpc(timeout=5, serde=SerdeFormat.JSON).dx_echo_set_json()
    _, other = make_client(svc)
    assert other.rpc(timeout=5).dx_echo("other") == "other"


@callback
def dx_echo_set_json():
    return {1, 2, 3}


def test_async_def_callback_runs_on_sync_service(conn):
    def register():
        async def dx_async_double(x):
            return 2 * x

        callback(dx_async_double)

    register()
    assert wait_until(lambda: _callable(conn, "dx_async_double"), 3)
    assert conn.rpc(timeout=5).dx_async_double(21) == 42


def _callable(conn, name: str) -> bool:
    try:
        getattr(conn.rpc(timeout=5), name)(0)
        return True
    except TransmissionFailure:
        return False


# -- §4 rpc_nowait, cast, cast_nowait -----------------------------------------------------------


def test_rpc_nowait_is_delivered(conn, sink):
    key, q = sink
    assert conn.rpc_nowait().dx_sink(key, "hello") is None
    assert conn.rpc_nowait(serde=SerdeFormat.JSON).dx_sink(key, [1, 2]) is None
    assert sorted(map(repr, drain(q, 2))) == sorted([repr("hello"), repr([1, 2])])


def test_rpc_nowait_failing_callback_does_not_hurt(conn, sink):
    key, q = sink
    conn.rpc_nowait().dx_fail_value("ignored")
    conn.rpc_nowait().dx_sink(key, "next")
    assert drain(q, 1) == ["next"]
    assert conn.rpc(timeout=5).dx_echo(1) == 1


def test_cast_returns_service_name_to_result(svc, conn):
    assert conn.cast(timeout=5).dx_add(1, 2) == {svc.app_name: 3}
    assert conn.cast().dx_echo("x") == {svc.app_name: "x"}
    assert conn.cast(timeout=5, serde=SerdeFormat.JSON).dx_echo((1,)) == {svc.app_name: [1]}


def test_cast_with_failing_callback_gives_the_exception_as_value(svc, conn):
    result = conn.cast(timeout=5).dx_fail_value("cast failure")
    assert list(result) == [svc.app_name]
    err = result[svc.app_name]
    assert isinstance(err, ValueError) and isinstance(err, RemoteCallError)
    assert "cast failure" in str(err)


def test_cast_timeout_is_a_value_too(make_service, make_client):
    svc = make_service(workers=2)
    _, conn = make_client(svc)
    started = time.monotonic()
    result = conn.cast(timeout=0.3).dx_sleep(1.0)
    elapsed = time.monotonic() - started
    assert list(result) == [svc.app_name]
    assert isinstance(result[svc.app_name], CallTimeout)
    assert elapsed < 1.2


def test_cast_with_receiver(svc, make_client):
    client, conn = make_client(svc)
    assert conn.cast(timeout=5, receiver=svc.app_name).dx_echo(1) == {svc.app_name: 1}
    assert conn.cast(timeout=5, receiver=[svc.app_name]).dx_echo(2) == {svc.app_name: 2}
    with pytest.raises(TransmissionFailure):
        conn.cast(timeout=5, receiver="no-such-peer").dx_echo(3)


def test_cast_nowait_is_delivered(conn, sink):
    key, q = sink
    assert conn.cast_nowait().dx_sink(key, 1) is None
    assert conn.cast_nowait(serde=SerdeFormat.MSGPACK).dx_sink(key, 2) is None
    assert sorted(drain(q, 2)) == [1, 2]


# -- §4 stream and stream_nowait -------------------------------------------------------------------


def test_stream_sends_every_chunk_in_order(conn, sink):
    key, q = sink
    chunks = [f"{key}:{i}".encode() for i in range(30)]
    assert conn.stream().dx_chunk(chunks) is None
    # stream() returns after the last acknowledgement: everything is there already.
    assert q.qsize() == 30
    assert drain(q, 30) == [str(i).encode() for i in range(30)]


def test_stream_waits_for_each_acknowledgement(make_service, make_client, sink):
    # workers=4 would run chunks at once if the stream did not wait for each answer.
    svc = make_service(workers=4)
    _, conn = make_client(svc)
    key, q = sink
    active = []
    peak = []
    lock = threading.Lock()

    def dx_stream_slow(chunk):
        with lock:
            active.append(chunk)
            peak.append(len(active))
        time.sleep(0.02)
        with lock:
            active.remove(chunk)
        q.put(chunk)

    callback(dx_stream_slow)
    assert wait_until(lambda: _callable_opaque(conn, "dx_stream_slow"), 3)
    while not q.empty():
        q.get()
    peak.clear()
    conn.stream(timeout=5).dx_stream_slow(iter([b"a", b"b", b"c", b"d", b"e", b"f"]))
    assert max(peak) == 1
    assert drain(q, 6) == [b"a", b"b", b"c", b"d", b"e", b"f"]


def _callable_opaque(conn, name: str) -> bool:
    try:
        getattr(conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE), name)(b"")
        return True
    except TransmissionFailure:
        return False


def test_stream_single_chunk_sources(conn, sink):
    key, q = sink
    conn.stream().dx_chunk(f"{key}:whole".encode())  # bytes: one chunk
    conn.stream().dx_chunk(f"{key}:text")  # str: one chunk
    conn.stream().dx_chunk(bytearray(f"{key}:ba".encode()))
    assert drain(q, 3) == [b"whole", b"text", b"ba"]


def test_stream_generator_and_pickle(conn, sink):
    key, q = sink
    assert conn.stream(serde=SerdeFormat.PICKLE).dx_collect({"key": key, "v": "dict"}) is None
    conn.stream(serde=SerdeFormat.PICKLE, timeout=5).dx_collect((key, i) for i in range(3))
    conn.stream(serde=SerdeFormat.MSGPACK).dx_collect([[key, b"m1"], [key, b"m2"]])
    assert drain(q, 6) == ["dict", 0, 1, 2, b"m1", b"m2"]


def test_stream_of_an_empty_iterable_sends_nothing(conn, sink):
    key, q = sink
    assert conn.stream().dx_chunk([]) is None
    assert conn.rpc(timeout=5).dx_count(key) == 0


def test_stream_stops_at_remote_error(conn, sink):
    key, q = sink
    chunks = [f"{key}:{c}".encode() for c in ("1", "2", "explode", "4", "5")]
    with pytest.raises(ValueError) as info:
        conn.stream(timeout=5).dx_chunk(chunks)
    assert isinstance(info.value, RemoteCallError)
    assert "chunk refused" in str(info.value)
    time.sleep(0.2)
    assert drain(q, 3) == [b"1", b"2", b"explode"]
    assert q.empty(), "chunks after the failing one were sent"
    assert conn.rpc(timeout=5).dx_echo("ok") == "ok"


def test_stream_nowait_then_rpc_sees_every_chunk_first(make_service, make_client, sink):
    svc = make_service(workers=1)
    _, conn = make_client(svc)
    key, q = sink
    n = 300
    assert conn.stream_nowait().dx_chunk(f"{key}:{i}".encode() for i in range(n)) is None
    assert conn.rpc(timeout=10).dx_count(key) == n
    assert drain(q, n) == [str(i).encode() for i in range(n)]


def test_large_and_small_nowait_chunks_keep_their_order(make_service, make_client, sink):
    # Large frames queue up in the engine while small ones could take a shortcut: order must
    # hold anyway, and an rpc sent after them must run after all of them (workers=1).
    svc = make_service(workers=1)
    _, conn = make_client(svc)
    key, q = sink
    sizes = [(2 << 20) if i % 3 == 0 else 10 for i in range(30)]
    for i, size in enumerate(sizes):
        conn.stream_nowait().dx_chunk(f"{key}:".encode() + str(i).encode().ljust(size, b"."))
    assert conn.rpc(timeout=30).dx_count(key) == len(sizes)
    got = [int(body.rstrip(b".")) for body in drain(q, len(sizes))]
    assert got == list(range(len(sizes)))


def test_workers_1_keeps_arrival_order_of_nowait_calls(conn, sink):
    key, q = sink
    for i in range(200):
        conn.rpc_nowait().dx_sink(key, i)
    assert conn.rpc(timeout=10).dx_count(key) == 200
    assert drain(q, 200) == list(range(200))


# -- §4 wait_for_members, receivers, unknown functions -------------------------------------------


def test_wait_for_members(svc, conn):
    started = time.monotonic()
    assert conn.wait_for_members(svc.app_name, timeout=2) is None
    assert conn.wait_for_members() is None
    assert conn.wait_for_members(svc.app_name) is None
    assert time.monotonic() - started < 1


def test_wait_for_members_times_out_naming_the_missing(svc, conn):
    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        conn.wait_for_members(svc.app_name, "ghost-member", timeout=0.5)
    elapsed = time.monotonic() - started
    assert "ghost-member" in str(info.value)
    assert svc.app_name not in str(info.value)
    assert 0.4 <= elapsed < 2.0


def test_unknown_function_fails_at_once(svc, conn):
    for style in (conn.rpc(timeout=30), conn.rpc()):
        started = time.monotonic()
        with pytest.raises(TransmissionFailure) as info:
            style.dx_no_such_function(1)
        assert time.monotonic() - started < 0.5
        assert "dx_no_such_function" in str(info.value)
    with pytest.raises(TransmissionFailure, match="dx_no_such_function"):
        conn.cast(timeout=30).dx_no_such_function()
    with pytest.raises(TransmissionFailure, match="dx_no_such_function"):
        conn.rpc_nowait().dx_no_such_function()
    assert conn.rpc(timeout=5).dx_echo(1) == 1


def test_unknown_function_message_names_the_connected_peer(svc, conn):
    with pytest.raises(TransmissionFailure) as info:
        conn.rpc(timeout=5).dx_no_such_function()
    assert svc.app_name in str(info.value)


def test_receiver(svc, make_client):
    client, conn = make_client(svc)
    assert conn.rpc(timeout=5, receiver=svc.app_name).dx_echo(1) == 1
    started = time.monotonic()
    with pytest.raises(TransmissionFailure) as info:
        conn.rpc(timeout=30, receiver="wrong-name").dx_echo(1)
    assert time.monotonic() - started < 0.5
    assert "wrong-name" in str(info.value)
    with pytest.raises(TransmissionFailure):
        conn.rpc(timeout=5, receiver=client.app_name).dx_echo(1)  # never to itself
    with pytest.raises(TransmissionFailure):
        conn.rpc_nowait(receiver="wrong-name").dx_echo(1)
    with pytest.raises(TransmissionFailure):
        conn.stream(receiver="wrong-name").dx_echo(b"x")
    assert conn.rpc(timeout=5).dx_echo(2) == 2


# -- §4 timeouts ----------------------------------------------------------------------------------


def test_rpc_timeout_then_later_calls_get_their_own_results(make_service, make_client):
    svc = make_service(workers=1)
    _, conn = make_client(svc)
    started = time.monotonic()
    with pytest.raises(CallTimeout) as info:
        conn.rpc(timeout=0.2).dx_sleep(0.8, tag="late")
    elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert 0.18 <= elapsed < 0.7, elapsed
    # The late "late" answer arrives while these wait (workers=1): it must be dropped.
    results = [conn.rpc(timeout=10).dx_echo(i) for i in range(5)]
    assert results == list(range(5))
    assert conn.rpc(timeout=10).dx_sleep(0.01, tag="mine") == "mine"


def test_many_timeouts_do_not_poison_the_connection(make_service, make_client):
    svc = make_service(workers=4)
    _, conn = make_client(svc)
    for i in range(5):
        with pytest.raises(CallTimeout):
            conn.rpc(timeout=0.05).dx_sleep(0.2, tag=f"late-{i}")
    time.sleep(0.4)  # every late answer has come back by now
    assert [conn.rpc(timeout=5).dx_echo(i) for i in range(10)] == list(range(10))


def test_zero_and_none_timeout_mean_no_deadline(conn):
    assert conn.rpc(timeout=0).dx_sleep(0.3, tag="zero") == "zero"
    assert conn.rpc(timeout=None).dx_sleep(0.05, tag="none") == "none"


def test_negative_timeout_is_refused(conn):
    with pytest.raises(ValueError):
        conn.rpc(timeout=-1).dx_echo(1)


# -- §2/§4 workers and concurrency ------------------------------------------------------------------


def _concurrent_sleeps(conn, count: int, seconds: float) -> float:
    barrier = threading.Barrier(count)
    results: list = []

    def one(i):
        barrier.wait()
        results.append(conn.rpc(timeout=30).dx_sleep(seconds, tag=i))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - started
    assert sorted(results) == list(range(count))
    return elapsed


def test_workers_4_runs_calls_at_once(make_service, make_client):
    svc = make_service(workers=4)
    _, conn = make_client(svc)
    elapsed = _concurrent_sleeps(conn, 4, 0.5)
    assert elapsed < 1.5, f"4 calls of 0.5 s took {elapsed:.2f} s with workers=4"


def test_workers_1_serialises_calls(make_service, make_client):
    svc = make_service(workers=1)
    _, conn = make_client(svc)
    elapsed = _concurrent_sleeps(conn, 4, 0.25)
    assert elapsed >= 0.95, f"4 calls of 0.25 s took {elapsed:.2f} s with workers=1"


def test_threads_sharing_one_connection(make_service, make_client):
    svc = make_service(workers=2)
    _, conn = make_client(svc)
    errors: list = []
    proxy = conn.rpc(timeout=10)  # proxies are shared between threads too

    def worker(tid):
        try:
            for i in range(40):
                value = (tid, i, "x" * (i % 7))
                got = proxy.dx_echo(value)
                if got != value:
                    errors.append((value, got))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]


def test_fifty_clients_in_one_process(make_service, make_client):
    svc = make_service(workers=2)
    clients = [make_client(svc, app_name=f"many-{i:02d}-{svc.app_name}") for i in range(50)]
    for i, (_, conn) in enumerate(clients):
        assert conn.rpc(timeout=10).dx_echo(i) == i
    assert wait_until(lambda: len(svc.members) == 50)
    assert sorted(svc.members) == sorted(c.app_name for c, _ in clients)
    for client, _ in clients[:25]:
        client.stop()
    assert wait_until(lambda: len(svc.members) == 25)
    for i, (_, conn) in enumerate(clients[25:]):
        assert conn.rpc(timeout=10).dx_echo(i) == i


def test_many_calls_in_flight(make_service, make_client):
    svc = make_service(workers=4)
    _, conn = make_client(svc)
    results: Counter = Counter()
    lock = threading.Lock()

    def worker(base):
        for i in range(200):
            r = conn.rpc(timeout=10).dx_add(base, i)
            with lock:
                results[r == base + i] += 1

    threads = [threading.Thread(target=worker, args=(b * 1000,)) for b in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == Counter({True: 800})


# -- §5/§9 large payloads and limits ----------------------------------------------------------


def test_opaque_64_mib_round_trip(conn):
    size = 64 << 20
    blob = os.urandom(1 << 20) * 64
    assert len(blob) == size
    started = time.monotonic()
    out = conn.rpc(timeout=60, serde=SerdeFormat.OPAQUE).dx_echo(blob)
    assert time.monotonic() - started < 20
    assert type(out) is bytes and len(out) == size
    assert out == blob
    assert conn.rpc(timeout=60, serde=SerdeFormat.OPAQUE).dx_len(bytearray(blob)) == str(size)


def test_pickle_large_payload(conn):
    data = {"rows": [bytes([i % 256]) * 1000 for i in range(4000)]}
    assert conn.rpc(timeout=30).dx_echo(data) == data


def test_message_over_the_peers_limit_is_refused_before_sending(make_service, make_client):
    svc = make_service(max_message_size=1 << 20)
    _, conn = make_client(svc)
    started = time.monotonic()
    with pytest.raises(TransmissionFailure) as info:
        conn.rpc(timeout=30, serde=SerdeFormat.OPAQUE).dx_len(b"x" * (2 << 20))
    assert time.monotonic() - started < 1
    assert "limit" in str(info.value) or "large" in str(info.value)
    with pytest.raises(TransmissionFailure):
        conn.rpc_nowait(serde=SerdeFormat.OPAQUE).dx_len(b"x" * (2 << 20))
    assert conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE).dx_len(b"x" * (512 << 10)) == str(512 << 10)
    assert conn.rpc(timeout=5).dx_echo("still connected") == "still connected"


def test_result_over_the_callers_limit_is_an_error_not_a_dead_connection(make_service, make_client):
    svc = make_service()
    _, conn = make_client(svc, max_message_size=1 << 20)
    started = time.monotonic()
    with pytest.raises(DaffiError):
        conn.rpc(timeout=10, serde=SerdeFormat.OPAQUE).dx_echo(b"y" * (2 << 20))
    assert time.monotonic() - started < 5
    assert conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE).dx_echo(b"small") == b"small"


def test_max_message_size_must_be_positive():
    with pytest.raises(ValueError):
        Service(port=free_port(), max_message_size=0)


# -- §9 surviving bad callers ------------------------------------------------------------------------


def test_caller_disconnecting_mid_call(make_service, make_client):
    svc = make_service(workers=2)
    leaver, leaving_conn = make_client(svc)
    stayer_client, stayer = make_client(svc)
    outcome: list = []

    def call():
        try:
            outcome.append(leaving_conn.rpc(timeout=10).dx_sleep(0.5, tag="gone"))
        except Exception as e:
            outcome.append(e)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.1)
    leaver.stop()
    t.join(10)
    assert not t.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], (Disconnected, TransmissionFailure)), outcome
    time.sleep(0.6)  # the service answers a caller that has gone: nothing must break
    assert stayer.rpc(timeout=5).dx_echo("alive") == "alive"
    assert wait_until(lambda: svc.members == [stayer_client.app_name])


def _read_until_closed(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closed ``sock`` within ``timeout`` (reads and drops what comes)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        if not data:
            return True


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: example.org\r\nAccept: */*\r\n\r\n",
        b"\x00" * 64,
        bytes(range(256)) * 4,
        # A daffi-looking header with an unknown version.
        b"DF\x09\x01" + b"\x00" * 28,
        # A request before any handshake.
        b"DF\x01\x03" + b"\x00" * 4 + (1).to_bytes(8, "little") + (4).to_bytes(4, "little")
        + b"\x00" * 4 + (0).to_bytes(8, "little") + b"evil",
        # A hello larger than any node's list of functions (over 1 MiB): refused from its
        # header, before its payload is waited for.
        b"DF\x01\x01" + b"\x00" * 4 + (0).to_bytes(8, "little") + (0).to_bytes(4, "little")
        + b"\x00" * 4 + (2 << 20).to_bytes(8, "little") + b"\x00" * 4096,
    ],
    ids=["http", "zeros", "bytes", "bad-version", "request-before-hello", "huge-hello"],
)
def test_garbage_gets_the_connection_closed_and_others_keep_working(svc, conn, garbage):
    with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as raw:
        raw.sendall(garbage)
        assert _read_until_closed(raw, 5), "the service kept a connection that sent garbage"
    assert conn.rpc(timeout=5).dx_echo("fine") == "fine"


def test_short_garbage_is_closed_promptly(svc, conn):
    # Fewer bytes than a frame header, but the first two already are not daffi's magic.
    with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert _read_until_closed(raw, 3), "a peer whose first bytes are not 'DF' was kept open"
    assert conn.rpc(timeout=5).dx_echo("fine") == "fine"


def test_oversized_frame_header_is_never_allocated(svc, conn):
    # A header announcing an exabyte: the service must neither allocate it nor stall others.
    header = (b"DF\x01\x01" + b"\x00" * 4 + (0).to_bytes(8, "little") + (3).to_bytes(4, "little")
              + b"\x00" * 4 + (1 << 60).to_bytes(8, "little"))
    with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as raw:
        raw.sendall(header + b"abc" + b"\x00" * 4096)
        time.sleep(0.2)
        assert conn.rpc(timeout=5).dx_echo("fine") == "fine"
    assert conn.rpc(timeout=5).dx_echo("still fine") == "still fine"


def test_silent_connection_does_not_block_others(svc, make_client):
    silent = [socket.create_connection(("127.0.0.1", svc.port), timeout=5) for _ in range(5)]
    try:
        started = time.monotonic()
        _, conn = make_client(svc)
        assert conn.rpc(timeout=5).dx_echo("through") == "through"
        assert time.monotonic() - started < 2
    finally:
        for s in silent:
            s.close()
    assert conn.rpc(timeout=5).dx_echo("after") == "after"


def test_half_handshake_then_close(svc, conn):
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as raw:
            raw.sendall(b"DF\x01\x01")  # a partial header, then gone
    assert conn.rpc(timeout=5).dx_echo("ok") == "ok"
    assert wait_until(lambda: len(svc.members) == 1)


# -- §7 membership events ----------------------------------------------------------------------------


def test_service_event_handler_hears_connect_and_disconnect(make_service, make_client):
    events: queue.Queue = queue.Queue()
    port = free_port()
    svc = Service(port=port, app_name=unique_name("ev"))

    def handler(event):
        events.put(event)

    assert svc.add_event_handler(handler) is handler
    with svc:
        client, conn = make_client(svc)
        assert drain(events, 1, 3) == [{"type": "connected", "member": client.app_name}]
        client.stop()
        assert drain(events, 1, 3) == [{"type": "disconnected", "member": client.app_name}]


def test_member_added_and_removed_as_decorators(make_service, make_client):
    svc = make_service()
    added: queue.Queue = queue.Queue()
    removed: queue.Queue = queue.Queue()

    @svc.on_member_added
    def on_added(name):
        added.put(name)

    @svc.on_member_removed
    def on_removed(name):
        removed.put(name)

    assert callable(on_added) and callable(on_removed)
    on_added("direct-call")  # the decorator returns the function itself
    assert added.get_nowait() == "direct-call"
    client, conn = make_client(svc)
    assert drain(added, 1, 3) == [client.app_name]
    assert removed.empty()
    client.stop()
    assert drain(removed, 1, 3) == [client.app_name]


def test_handlers_run_in_registration_order(make_service, make_client):
    svc = make_service()
    seen: list = []
    done = threading.Event()
    svc.add_event_handler(lambda e: seen.append(("first", e["type"])))
    svc.add_event_handler(lambda e: seen.append(("second", e["type"])))
    svc.add_event_handler(lambda e: done.set())
    client, _ = make_client(svc)
    assert done.wait(3)
    assert seen == [("first", "connected"), ("second", "connected")]


def test_raising_handler_does_not_stop_the_node(make_service, make_client, caplog):
    svc = make_service()
    events: queue.Queue = queue.Queue()

    def broken(event):
        raise RuntimeError("handler bug")

    svc.add_event_handler(broken)
    svc.add_event_handler(events.put)
    svc.on_member_added(broken)
    a, conn_a = make_client(svc)
    assert drain(events, 1, 3)[0]["member"] == a.app_name
    b, conn_b = make_client(svc)
    assert drain(events, 1, 3)[0]["member"] == b.app_name
    assert conn_a.rpc(timeout=5).dx_echo(1) == 1
    assert conn_b.rpc(timeout=5).dx_echo(2) == 2
    a.stop()
    assert drain(events, 1, 3) == [{"type": "disconnected", "member": a.app_name}]
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("daffi")]
    assert logged, "a raising handler must be logged"
    assert any("handler bug" in (r.exc_text or "") or "handler bug" in r.getMessage() for r in logged) or \
        any(r.exc_info and "handler bug" in str(r.exc_info[1]) for r in logged)


def test_events_for_many_clients(make_service, make_client):
    svc = make_service()
    events: queue.Queue = queue.Queue()
    svc.add_event_handler(events.put)
    clients = [make_client(svc)[0] for _ in range(5)]
    got = drain(events, 5, 5)
    assert sorted(e["member"] for e in got) == sorted(c.app_name for c in clients)
    assert {e["type"] for e in got} == {"connected"}


def test_a_client_of_a_service_hears_nothing(svc, make_client):
    heard: list = []
    client, conn = make_client(svc, connect=False)
    client.add_event_handler(heard.append)
    client.on_member_added(heard.append)
    client.on_member_removed(heard.append)
    conn = client.connect()
    conn.add_event_handler(heard.append)
    _, other = make_client(svc)  # another client joining the service
    assert conn.rpc(timeout=5).dx_echo(1) == 1
    time.sleep(0.5)
    client.stop()
    time.sleep(0.2)
    assert heard == []


def test_connection_handle_has_membership_methods(conn):
    for name in ("add_event_handler", "on_member_added", "on_member_removed"):
        fn = getattr(conn, name)
        handler = lambda arg: None  # noqa: E731
        assert fn(handler) is handler


# -- §3 late registration ------------------------------------------------------------------------------


def test_callback_registered_after_connect_is_announced(svc, make_client):
    events: queue.Queue = queue.Queue()
    svc.add_event_handler(events.put)
    client, conn = make_client(svc)
    drain(events, 1, 3)
    with pytest.raises(TransmissionFailure):
        conn.rpc(timeout=5).dx_late_one(1)

    def dx_late_one(x):
        return x + 100

    callback(dx_late_one)
    assert wait_until(lambda: _callable(conn, "dx_late_one"), 2), "the new callback was never announced"
    assert conn.rpc(timeout=5).dx_late_one(1) == 101
    assert conn.cast(timeout=5).dx_late_one(2) == {svc.app_name: 102}
    # Announced on the live connection: no reconnect, no disconnect event.
    assert events.empty()
    assert client.connected


# -- §2/§8 Unix sockets ------------------------------------------------------------------------------------


@pytest.fixture
def sock_path(tmp_path):
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path is usually well under that.
    path = tmp_path / "d.sock"
    assert len(os.fsencode(path)) < 100
    return path


def test_unix_socket_service_and_client(make_service, make_client, sock_path):
    svc = make_service(unix_sock_path=sock_path)
    assert sock_path.exists()
    client, conn = make_client(svc)
    assert conn.rpc(timeout=5).dx_add(2, 2) == 4
    assert conn.cast(timeout=5).dx_echo("u") == {svc.app_name: "u"}
    blob = os.urandom(4 << 20)
    assert conn.rpc(timeout=30, serde=SerdeFormat.OPAQUE).dx_echo(blob) == blob
    assert wait_until(lambda: svc.members == [client.app_name])


def test_unix_socket_accepts_pathlike_and_str(make_service, make_client, sock_path):
    make_service(unix_sock_path=str(sock_path))
    _, conn = make_client(unix_sock_path=sock_path)
    assert conn.rpc(timeout=5).dx_echo(1) == 1


def test_unix_socket_stale_file_is_replaced(make_service, make_client, sock_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays, nobody listens: stale
    assert sock_path.exists()
    svc = make_service(unix_sock_path=sock_path)
    _, conn = make_client(svc)
    assert conn.rpc(timeout=5).dx_echo("fresh") == "fresh"


def test_unix_socket_file_removed_on_stop(make_service, sock_path):
    svc = make_service(unix_sock_path=sock_path)
    assert sock_path.exists()
    svc.stop()
    assert not sock_path.exists()


def test_unix_socket_in_use_by_a_live_service(make_service, sock_path):
    make_service(unix_sock_path=sock_path)
    second = Service(unix_sock_path=sock_path)
    with pytest.raises(InitializationError, match="in use"):
        second.start()
    second.stop()
    assert sock_path.exists()  # the live service's file was left alone


def test_unix_socket_garbage_and_silence(make_service, make_client, sock_path):
    svc = make_service(unix_sock_path=sock_path)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(sock_path))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(str(sock_path))
            raw.sendall(b"not daffi at all" * 10)
            assert _read_until_closed(raw, 5)
        _, conn = make_client(svc)
        assert conn.rpc(timeout=5).dx_echo("ok") == "ok"
    finally:
        silent.close()


# -- pickling of errors across the wire stays usable ---------------------------------------------------


def test_remote_error_pickles(conn):
    with pytest.raises(RemoteCallError) as info:
        conn.rpc(timeout=5).dx_fail_value("pickle me")
    again = pickle.loads(pickle.dumps(info.value))
    assert isinstance(again, ValueError) and isinstance(again, RemoteCallError)
    assert "pickle me" in str(again)


# -- more of §2/§4/§9 -----------------------------------------------------------------------------------


def test_two_services_in_one_process(make_service, make_client):
    a = make_service()
    b = make_service()
    _, conn_a = make_client(a)
    _, conn_b = make_client(b)
    assert conn_a.cast(timeout=5).dx_echo(1) == {a.app_name: 1}
    assert conn_b.cast(timeout=5).dx_echo(2) == {b.app_name: 2}
    a.stop()
    assert conn_b.rpc(timeout=5).dx_echo(3) == 3


_NESTED: dict[str, int] = {}


@callback
def dx_relay(function, *args):
    """Calls ``function`` on the service listening at ``_NESTED['port']`` (a nested call)."""
    client = Client(port=_NESTED["port"])
    try:
        return getattr(client.connect().rpc(timeout=5), function)(*args)
    finally:
        client.stop()


def test_nested_call_passes_remote_errors_through(make_service, make_client):
    inner = make_service()
    outer = make_service(workers=2)
    _NESTED["port"] = inner.port
    try:
        _, conn = make_client(outer)
        assert conn.rpc(timeout=10).dx_relay("dx_add", 2, 3) == 5
        with pytest.raises(ValueError) as info:
            conn.rpc(timeout=10).dx_relay("dx_fail_value", "deep")
        assert isinstance(info.value, RemoteCallError)
        assert info.value.remote_type == "ValueError"
        assert "deep" in str(info.value)
    finally:
        _NESTED.clear()


def test_stream_timeout_applies_to_each_chunk(make_service, make_client):
    svc = make_service(workers=2)
    _, conn = make_client(svc)
    started = time.monotonic()
    with pytest.raises(CallTimeout):
        conn.stream(serde=SerdeFormat.PICKLE, timeout=0.2).dx_sleep([0.01, 0.01, 1.0, 0.01])
    assert time.monotonic() - started < 0.9
    assert conn.rpc(timeout=5).dx_echo("after") == "after"


def test_many_nowait_calls_then_one_rpc(conn, sink):
    key, q = sink
    for i in range(3000):
        conn.rpc_nowait(serde=SerdeFormat.MSGPACK).dx_sink(key, i)
    assert conn.rpc(timeout=30).dx_count(key) == 3000
    assert drain(q, 3000) == list(range(3000))


def test_connect_to_a_listener_that_never_answers_times_out():
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        client = Client(port=mute.getsockname()[1], connect_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(InitializationError):
            client.connect()
        assert time.monotonic() - started < 3
        assert not client.connected
        client.stop()


def test_connect_to_a_non_daffi_server_fails_fast():
    with socket.socket() as http:
        http.bind(("127.0.0.1", 0))
        http.listen()

        def answer():
            peer, _ = http.accept()
            with peer:
                peer.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                time.sleep(0.2)

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        client = Client(port=http.getsockname()[1], connect_timeout=30)
        started = time.monotonic()
        with pytest.raises(InitializationError):
            client.connect()
        assert time.monotonic() - started < 3
        client.stop()
        t.join(5)


@pytest.mark.parametrize("serde", [SerdeFormat.OPAQUE, SerdeFormat.PICKLE, SerdeFormat.MSGPACK])
def test_payload_sizes_around_buffer_boundaries(conn, serde):
    sizes = [0, 1, 31, 32, 33, 4095, 4096, 4097, 65535, 65536, 65537,
             (1 << 20) - 1, 1 << 20, (1 << 20) + 1, (3 << 20) + 7]
    for size in sizes:
        blob = os.urandom(size)
        out = conn.rpc(timeout=30, serde=serde).dx_echo(blob)
        assert type(out) is bytes and out == blob, size


def test_concurrent_large_payloads_on_one_connection(make_service, make_client):
    svc = make_service(workers=4)
    _, conn = make_client(svc)
    errors: list = []

    def worker(tid):
        for i in range(4):
            blob = bytes([tid * 16 + i]) * ((2 << 20) + tid * 1000 + i)
            try:
                out = conn.rpc(timeout=30, serde=SerdeFormat.OPAQUE).dx_echo(blob)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
                return
            if out != blob:
                errors.append((tid, i, len(out)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_max_message_size_boundary_is_consistent(make_service, make_client):
    # Whatever the sender lets through, the receiver must accept: no frame may be refused by
    # the peer after the sender's own check passed.
    limit = 1 << 20
    svc = make_service(max_message_size=limit)
    _, conn = make_client(svc)
    proxy = conn.rpc(timeout=10, serde=SerdeFormat.OPAQUE)
    accepted = 0
    for size in range(limit - 64, limit + 2):
        try:
            assert proxy.dx_len(b"z" * size) == str(size)
            accepted = size
        except TransmissionFailure:
            break
    assert limit - 64 < accepted <= limit
    with pytest.raises(TransmissionFailure):
        proxy.dx_len(b"z" * (accepted + 1))
    assert proxy.dx_len(b"ok") == "2"


def test_a_tight_message_limit_still_lets_a_client_connect(make_service, make_client):
    # The Service exports more functions than 64 bytes of names: its welcome is larger than
    # the limit, which bounds calls only.
    svc = make_service(max_message_size=64)
    client, conn = make_client(svc, max_message_size=64)
    assert conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE).dx_len(b"small") == "5"
    with pytest.raises(TransmissionFailure):
        conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE).dx_len(b"x" * 65)
    assert client.connected


def test_connection_members(make_service, make_client):
    svc = make_service()
    _, conn = make_client(svc)
    assert conn.members == [svc.app_name]
    conn.wait_for_members(svc.app_name, timeout=1, interval=0.05)
    svc.stop()
    assert wait_until(lambda: conn.members == [], 5)
    with pytest.raises(TimeoutError):
        conn.wait_for_members(svc.app_name, timeout=0.2)


class DxCalculator:
    def __init__(self):
        self.base = 100

    def dx_plus_base(self, x):
        return self.base + x

    @daffi.local
    def dx_hidden(self):
        return "hidden"

    def _dx_private(self):
        return "private"


class DxCounter:
    def __init__(self, start):
        self.value = start

    def dx_counter_next(self):
        self.value += 1
        return self.value


def test_class_bound_method_and_alias_callbacks_are_callable(conn):
    callback(DxCalculator)
    counter = DxCounter(10)
    callback(counter.dx_counter_next)

    @callback
    @daffi.alias("dx_aliased_name")
    def dx_original_name():
        return "aliased"

    assert wait_until(lambda: _callable_noargs(conn, "dx_aliased_name"), 3)
    assert conn.rpc(timeout=5).dx_plus_base(1) == 101
    assert conn.rpc(timeout=5).dx_counter_next() == 11
    assert conn.rpc(timeout=5).dx_counter_next() == 12
    assert counter.value == 12
    assert conn.rpc(timeout=5).dx_original_name() == "aliased"
    assert conn.rpc(timeout=5).dx_aliased_name() == "aliased"
    for hidden in ("dx_hidden", "_dx_private"):
        with pytest.raises(TransmissionFailure):
            getattr(conn.rpc(timeout=5), hidden)()


def _callable_noargs(conn, name: str) -> bool:
    try:
        getattr(conn.rpc(timeout=5), name)()
        return True
    except TransmissionFailure:
        return False


def test_concurrent_connect_calls_one_wins(svc):
    client = Client(port=svc.port)
    outcomes: list = []
    barrier = threading.Barrier(4)

    def go():
        barrier.wait()
        try:
            client.connect()
            outcomes.append("ok")
        except RuntimeError:
            outcomes.append("busy")

    threads = [threading.Thread(target=go) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(outcomes) == ["busy", "busy", "busy", "ok"]
        assert wait_until(lambda: len(svc.members) == 1)
        time.sleep(0.2)
        assert len(svc.members) == 1
    finally:
        client.stop()


# -- callbacks and handlers that raise BaseException ---------------------------------------------------


class DxUnprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


@callback
def dx_fail_unprintable():
    raise DxUnprintable()


@callback
def dx_sys_exit(code):
    raise SystemExit(code)


def test_exception_that_cannot_be_printed(conn):
    with pytest.raises(RemoteCallError) as info:
        conn.rpc(timeout=5).dx_fail_unprintable()
    assert "DxUnprintable" in info.value.remote_type
    assert conn.rpc(timeout=5).dx_echo(1) == 1


def test_callback_raising_system_exit_does_not_kill_the_worker(make_service, make_client):
    # sys.exit() inside user code must not take the (only) worker thread down with it:
    # the caller gets an error and the service keeps serving.
    svc = make_service(workers=1)
    _, conn = make_client(svc)
    started = time.monotonic()
    with pytest.raises(DaffiError) as info:
        conn.rpc(timeout=1).dx_sys_exit(3)
    assert not isinstance(info.value, CallTimeout), "the worker died: no answer at all"
    assert isinstance(info.value, RemoteCallError) and "SystemExit" in info.value.remote_type
    assert time.monotonic() - started < 0.9
    assert conn.rpc(timeout=1).dx_echo("served") == "served"


def test_event_handler_raising_system_exit_does_not_stop_events(make_service, make_client):
    svc = make_service()
    events: queue.Queue = queue.Queue()

    def exits(event):
        raise SystemExit(1)

    def record(event):
        events.put(event)

    svc.add_event_handler(record)
    svc.add_event_handler(exits)
    a, _ = make_client(svc)
    assert drain(events, 1, 3) == [{"type": "connected", "member": a.app_name}]
    a.stop()
    assert drain(events, 1, 3) == [{"type": "disconnected", "member": a.app_name}]


# -- nothing leaks ---------------------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_start_stop_and_connect_cycles_leak_no_threads_or_fds():
    port = free_port()
    # One warm-up cycle: the engine (and its threads and fds) is created once per process.
    with Service(port=port) as svc, Client(port=port) as client:
        client.connection.rpc(timeout=5).dx_echo(0)
    time.sleep(0.3)
    threads, fds = threading.active_count(), _open_fds()
    for i in range(15):
        with Service(port=port, workers=3) as svc:
            for _ in range(2):
                client = Client(port=port)
                assert client.connect().rpc(timeout=5).dx_echo(i) == i
                client.stop()
            assert wait_until(lambda: svc.members == [], 5)  # noqa: B023
    assert wait_until(lambda: threading.active_count() <= threads, 5), (
        f"{threading.active_count() - threads} threads left behind"
    )
    assert wait_until(lambda: _open_fds() <= fds, 5), f"{_open_fds() - fds} file descriptors left open"


# -- §2 logging ----------------------------------------------------------------------------------------------


def test_a_closed_bad_connection_is_logged_under_daffi(svc, conn, caplog):
    caplog.set_level(logging.WARNING)
    with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as raw:
        raw.sendall(b"\x00" * 64)
        assert _read_until_closed(raw, 5)

    def logged():
        return [r for r in caplog.records if r.name.startswith("daffi") and r.levelno >= logging.WARNING]

    assert wait_until(logged, 3), (
        f"the engine closed a connection without a logged reason: {[r.getMessage() for r in caplog.records]}"
    )
    assert conn.rpc(timeout=5).dx_echo(1) == 1


def test_call_timeout_names_the_call_and_the_deadline(svc, conn):
    with pytest.raises(CallTimeout) as info:
        conn.rpc(timeout=0.2).dx_sleep(1)
    e = info.value
    assert (e.call, e.timeout, e.receivers) == ("dx_sleep", 0.2, [svc.app_name])
    assert "dx_sleep" in str(e) and "0.2 s" in str(e)


def test_handlers_of_every_kind_run_in_registration_order(make_service, make_client):
    svc = make_service()
    seen = []
    done = threading.Event()
    svc.on_member_added(lambda name: seen.append("added-1"))
    svc.add_event_handler(lambda ev: seen.append(f"all-{ev['type']}"))
    svc.on_member_removed(lambda name: seen.append("removed"))
    svc.on_member_added(lambda name: (seen.append("added-2"), done.set()))
    make_client(svc)
    assert done.wait(5)
    assert seen == ["added-1", "all-connected", "added-2"]


def test_a_large_nowait_chunk_is_never_overtaken_by_a_small_call(make_service, make_client):
    got = []

    @callback
    def dx_order_sink(chunk):
        got.append(len(chunk))

    @callback
    def dx_order_count():
        return list(got)

    svc = make_service(workers=1)
    _, conn = make_client(svc)
    big = b"\x5a" * (1 << 20)  # over the size sent directly: it goes through the engine
    expected = []
    for i in range(30):
        conn.stream_nowait().dx_order_sink([big, b"s" * i])
        expected += [len(big), i]
        # The rpc must see every chunk sent before it, intact, whatever path each took.
        assert conn.rpc(timeout=10).dx_order_count() == expected


def test_a_unix_path_that_is_not_a_socket_is_never_removed(tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    with pytest.raises(InitializationError, match="not a socket"):
        Service(app_name=unique_name("unix-file"), unix_sock_path=str(path)).start()
    assert path.read_text() == "keep me"
