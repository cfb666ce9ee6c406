"""The asyncio interface ``daffi.aio`` end to end: AsyncService, AsyncRouter, AsyncClient
(SPEC §2-7 and the ``daffi.aio`` lines).

There is no pytest-asyncio here: each test is a plain function that runs one coroutine through
``aio.run(coro, loop_kind)``, on ``asyncio.run`` or ``uvloop.run``, under a deadline, and
stops every node made with the ``aio`` factories on the loop when the coroutine ends (pass or
fail). ``aio.run`` also fails the test when the loop reported an unhandled error (a reader
callback that raised, a future whose exception nobody retrieved...).

An AsyncService and its clients in this process share one event loop, so a callback that
blocked the loop would stall the test itself: sync ``daffi.Client`` calls from these tests run
in a thread (``asyncio.to_thread``). Peers that must behave differently (their own name, their
own process id) run in child processes: the callback registry is process-wide.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import pytest
import uvloop
from conftest import call_without_handshake, free_port, unique_name, wait_until
from daffi import Client, Router, SerdeFormat, Service, callback
from daffi.aio import AsyncClient, AsyncConnection, AsyncRouter, AsyncService
from daffi.exceptions import (
    CallTimeout,
    DaffiError,
    Disconnected,
    InitializationError,
    RemoteCallError,
    TransmissionFailure,
)

GONE = (Disconnected, TransmissionFailure)
# Whole-test deadline inside the loop (pytest itself has no timeout plugin here).
TEST_TIMEOUT = 30.0
LOOP_KINDS = ["asyncio", "uvloop"]
loops = pytest.mark.parametrize("loop_kind", LOOP_KINDS)


# -- callbacks of this process (names unique across the suite: ax_*) ----------------------------


@dataclasses.dataclass(frozen=True)
class AxPoint:
    x: int
    y: int


class AxCustomError(Exception):
    pass


@callback
async def ax_echo(value):
    await asyncio.sleep(0)
    return value


@callback
def ax_echo_sync(value):
    return value


@callback
async def ax_add(a, b=0, *, scale=1):
    return (a + b) * scale


@callback
def ax_add_sync(a, b=0, *, scale=1):
    return (a + b) * scale


@callback
async def ax_type_name(value):
    return type(value).__name__


@callback
async def ax_sleep(seconds, tag=None):
    await asyncio.sleep(seconds)
    return tag if tag is not None else seconds


@callback
def ax_block(seconds, tag=None):
    time.sleep(seconds)  # blocks its thread, never the loop
    return tag if tag is not None else seconds


@callback
async def ax_where():
    """The thread an async callback runs on (the node's loop thread)."""
    return threading.get_ident()


@callback
def ax_where_sync():
    """The thread a plain callback runs on (a thread of the node's pool)."""
    return threading.current_thread().name


@callback
async def ax_fail(message):
    await asyncio.sleep(0)
    raise ValueError(message)


@callback
def ax_fail_sync(message):
    raise ValueError(message)


@callback
async def ax_fail_key():
    return {}["missing-key"]


@callback
async def ax_fail_custom():
    raise AxCustomError("custom failure")


@callback
async def ax_fail_cancelled():
    raise asyncio.CancelledError()


@callback
async def ax_exit():
    raise SystemExit(3)


@callback
async def ax_unpicklable():
    return threading.Lock()


@callback
def ax_unpicklable_sync():
    return threading.Lock()


@callback
async def ax_a_set():
    return {1, 2, 3}


@callback
async def ax_int(value):
    return 42


# Per-test inboxes (see the ``sink`` fixture): lists appended to from the loop or a pool thread.
_SINK: dict[str, list] = {}
# Per-test concurrency gauges: key -> [running now, peak].
_GAUGE: dict[str, list[int]] = {}
_GAUGE_LOCK = threading.Lock()


@callback
async def ax_note(key, value):
    _SINK[key].append(value)


@callback
def ax_note_sync(key, value):
    _SINK[key].append(value)


@callback
async def ax_notes(key):
    return list(_SINK[key])


@callback
async def ax_count(key):
    return len(_SINK[key])


def _chunk_into_sink(chunk) -> None:
    # OPAQUE stream chunk b"KEY:BODY"; BODY "explode" is recorded, then refused.
    if isinstance(chunk, str):
        chunk = chunk.encode()
    key, _, body = bytes(chunk).partition(b":")
    _SINK[key.decode()].append(body)
    if body == b"explode":
        raise ValueError("chunk refused")


@callback
def ax_chunk(chunk):
    _chunk_into_sink(chunk)


@callback
async def ax_achunk(chunk):
    await asyncio.sleep(0)
    _chunk_into_sink(chunk)


@callback
async def ax_collect(item):
    # PICKLE/MSGPACK stream chunks: (key, value) or [key, value].
    key, value = item
    _SINK[key].append(value)


def _enter(key: str) -> None:
    with _GAUGE_LOCK:
        gauge = _GAUGE[key]
        gauge[0] += 1
        gauge[1] = max(gauge[1], gauge[0])


def _leave(key: str) -> None:
    with _GAUGE_LOCK:
        _GAUGE[key][0] -= 1


@callback
async def ax_track(key, seconds):
    _enter(key)
    try:
        await asyncio.sleep(seconds)
    finally:
        _leave(key)
    return key


@callback
def ax_track_sync(key, seconds):
    _enter(key)
    try:
        time.sleep(seconds)
    finally:
        _leave(key)
    return key


@callback
async def ax_track_chunk(item):
    # A stream chunk is one argument: ``[key, seconds]``.
    return await ax_track(*item)


@callback
def ax_track_sync_chunk(item):
    return ax_track_sync(*item)


@pytest.fixture
def sink():
    """A fresh inbox key for ``ax_note``/``ax_chunk``/...; the list is ``_SINK[key]``."""
    key = unique_name("axsink")
    _SINK[key] = []
    yield key
    _SINK.pop(key, None)


@pytest.fixture
def gauge():
    """A fresh concurrency gauge key for ``ax_track``/``ax_track_sync``; read ``peak(key)``."""
    key = unique_name("axgauge")
    _GAUGE[key] = [0, 0]
    yield key
    _GAUGE.pop(key, None)


def peak(key: str) -> int:
    with _GAUGE_LOCK:
        return _GAUGE[key][1]


# -- the test harness ------------------------------------------------------------------------------


class Aio:
    """Node factories and the runner of one test (see the ``aio`` fixture)."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []  # async nodes, stopped on the loop at the end
        self.sync_nodes: list[Any] = []  # sync nodes, stopped in a thread at the end
        self.loop_errors: list[dict] = []

    # factories: nothing is started or connected here

    def service(self, **kwargs: Any) -> AsyncService:
        return self._track(AsyncService(**self._server_options("asvc", kwargs)))

    def router(self, **kwargs: Any) -> AsyncRouter:
        return self._track(AsyncRouter(**self._server_options("arouter", kwargs)))

    def client(self, target: Any, **kwargs: Any) -> AsyncClient:
        return self._track(AsyncClient(**self._client_options("acli", target, kwargs)))

    def sync_router(self, **kwargs: Any) -> Router:
        node = Router(**self._server_options("router", kwargs))
        self.sync_nodes.append(node)
        return node

    def sync_client(self, target: Any, **kwargs: Any) -> Client:
        node = Client(**self._client_options("cli", target, kwargs))
        self.sync_nodes.append(node)
        return node

    def _track(self, node: Any) -> Any:
        self.nodes.append(node)
        return node

    @staticmethod
    def _server_options(prefix: str, kwargs: dict) -> dict:
        if "unix_sock_path" not in kwargs:
            kwargs.setdefault("host", "127.0.0.1")
            kwargs.setdefault("port", 0)
        kwargs.setdefault("app_name", unique_name(prefix))
        return kwargs

    @staticmethod
    def _client_options(prefix: str, target: Any, kwargs: dict) -> dict:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", target if isinstance(target, int) else target.port)
        kwargs.setdefault("app_name", unique_name(prefix))
        return kwargs

    # running

    def run(self, coro: Any, loop_kind: str = "asyncio", timeout: float = TEST_TIMEOUT) -> Any:
        """Run ``coro`` on a fresh loop of ``loop_kind`` within ``timeout`` seconds; then stop
        every node made by this fixture and check the loop reported no unhandled error."""

        async def main() -> Any:
            asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
            try:
                return await asyncio.wait_for(coro, timeout)
            finally:
                await asyncio.wait_for(self._stop_all(), 15)

        runner = uvloop.run if loop_kind == "uvloop" else asyncio.run
        result = runner(main())
        assert not self.loop_errors, f"the event loop reported errors: {self.loop_errors!r}"
        return result

    async def _stop_all(self) -> None:
        for node in reversed(self.nodes):
            await node.stop()
        for node in reversed(self.sync_nodes):
            await asyncio.to_thread(node.stop)

    def close(self) -> None:
        """Fallback after a loop that ended without stopping everything: stop natively."""
        for node in reversed(self.nodes):
            if node._native is None:
                continue
            if isinstance(node, AsyncClient):
                Client.stop(node)
            elif isinstance(node, AsyncRouter):
                Router.stop(node)
            else:
                Service.stop(node)
        for node in reversed(self.sync_nodes):
            node.stop()


@pytest.fixture
def aio():
    harness = Aio()
    yield harness
    harness.close()


async def eventually(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` on the loop until it is true or ``timeout`` seconds passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value or loop.time() >= deadline:
            return bool(value)
        await asyncio.sleep(interval)


class Ticker:
    """Counts turns of the event loop (a task sleeping ``interval`` in a loop) and the longest
    gap between two of them: proof that nothing blocks the loop."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.ticks = 0
        self.longest_gap = 0.0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.interval)
            now = loop.time()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now
            self.ticks += 1

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()


async def service_and_conn(aio: Aio, **kwargs: Any) -> tuple[AsyncService, AsyncConnection]:
    svc = await aio.service(**kwargs).start()
    conn = await aio.client(svc).connect()
    return svc, conn


async def expect_remote_error(awaitable: Any, builtin: type[BaseException] | None = None) -> RemoteCallError:
    """Await ``awaitable``, which must raise a RemoteCallError (also ``builtin`` if given)."""
    with pytest.raises(RemoteCallError) as info:
        await awaitable
    if builtin is not None:
        assert isinstance(info.value, builtin), type(info.value).__mro__
    return info.value


# -- child processes ------------------------------------------------------------------------------

# ``aio_service.py PORT NAME WORKERS LOOP``: an AsyncService with async and plain callbacks.
AIO_SERVICE_PY = """
import asyncio
import os
import sys
import time

from daffi import callback
from daffi.aio import AsyncService


@callback
async def ac_echo(value):
    return value


@callback
async def ac_sleep(seconds, tag=None):
    await asyncio.sleep(seconds)
    return tag if tag is not None else seconds


@callback
def ac_block(seconds):
    time.sleep(seconds)
    return seconds


@callback
def ac_pid():
    return os.getpid()


async def main():
    port, name, workers = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    async with AsyncService(app_name=name, host="127.0.0.1", port=port, workers=workers) as svc:
        print("READY", flush=True)
        await svc.join()
    print("JOINED", flush=True)


if sys.argv[4] == "uvloop":
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
"""

# ``aio_worker.py PORT NAME LOOP``: an AsyncClient worker behind a Router; its callbacks answer
# with its own name and record what they receive; its handlers record the other peers.
AIO_WORKER_PY = """
import asyncio
import os
import sys

from daffi import callback
from daffi.aio import AsyncClient

port, name, loop_kind = int(sys.argv[1]), sys.argv[2], sys.argv[3]
notes = {}
events = []


@callback
async def aw_whoami():
    await asyncio.sleep(0)
    return name


@callback
def aw_pid():
    return os.getpid()


@callback
async def aw_echo(value):
    return value


@callback
async def aw_note(key, value):
    notes.setdefault(key, []).append(value)


@callback
async def aw_notes(key):
    return list(notes.get(key, []))


@callback
async def aw_fail(message):
    raise ValueError(f"{name}: {message}")


@callback
async def aw_events():
    return list(events)


async def main():
    client = AsyncClient(app_name=name, host="127.0.0.1", port=port)

    async def record(event):
        await asyncio.sleep(0)
        events.append(event)

    client.add_event_handler(record)
    await client.connect()
    print("ready", flush=True)
    await client.join()


if loop_kind == "uvloop":
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
"""

# ``sync_worker.py PORT NAME``: a sync Client worker with the same function names.
SYNC_WORKER_PY = """
import os
import sys
import threading

from daffi import Client, callback

port, name = int(sys.argv[1]), sys.argv[2]
notes = {}
lock = threading.Lock()


@callback
def aw_whoami():
    return name


@callback
def aw_pid():
    return os.getpid()


@callback
def aw_echo(value):
    return value


@callback
def aw_note(key, value):
    with lock:
        notes.setdefault(key, []).append(value)


@callback
def aw_notes(key):
    with lock:
        return list(notes.get(key, []))


client = Client(app_name=name, host="127.0.0.1", port=port, workers=4)
client.connect()
print("ready", flush=True)
client.join()
"""

# ``sync_caller.py PORT``: a sync Client in another process calling an AsyncService.
SYNC_CALLER_PY = """
import sys

from daffi import Client, SerdeFormat
from daffi.exceptions import RemoteCallError

with Client(host="127.0.0.1", port=int(sys.argv[1])) as client:
    conn = client.connection
    print("rpc", repr(conn.rpc(timeout=5).ax_add(2, 3, scale=10)), flush=True)
    print("opaque", repr(conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE).ax_echo(b"\\x00raw")), flush=True)
    print("cast", repr(sorted(conn.cast(timeout=5).ax_echo_sync("c").values())), flush=True)
    try:
        conn.rpc(timeout=5).ax_fail("from a child")
    except ValueError as e:
        print("error", type(e).__name__, isinstance(e, RemoteCallError), "from a child" in str(e), flush=True)
"""


def start_aio_service(spawn: Any, workers: int = 1, loop_kind: str = "asyncio") -> tuple[Any, int, str]:
    """An AsyncService in a child process: ``(proc, port, name)`` once it accepts."""
    port = free_port()
    name = unique_name("remote-asvc")
    proc = spawn(AIO_SERVICE_PY, port, name, workers, loop_kind, name=f"aio_service_{name}.py")
    proc.wait_line("READY")
    return proc, port, name


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until the kernel shows ``pid`` as stopped (SIGSTOP is delivered asynchronously)."""

    def state() -> str:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]

    assert wait_until(lambda: state() in ("T", "t"), timeout), f"process {pid} did not stop"


# == 1. call styles against an AsyncService ====================================================


def test_public_names():
    import daffi.aio

    assert set(daffi.aio.__all__) >= {"AsyncService", "AsyncRouter", "AsyncClient"}
    assert issubclass(AsyncService, Service) and issubclass(AsyncRouter, Router)
    assert issubclass(AsyncClient, Client)


@loops
def test_rpc_in_every_serde_format(aio, loop_kind):
    async def main():
        _, conn = await service_and_conn(aio)
        for fn in ("ax_echo", "ax_echo_sync"):  # an async callback and a plain one
            # PICKLE (the default): types preserved exactly.
            value = {"t": (1, 2), "s": {1, 2}, "p": AxPoint(1, 2), "b": b"\x00\xff", 3: [frozenset({4})]}
            assert await getattr(conn.rpc(timeout=5), fn)(value) == value
            got = await getattr(conn.rpc(timeout=5, serde=SerdeFormat.PICKLE), fn)((1, "a"))
            assert got == (1, "a") and type(got) is tuple
            # JSON: tuples come back as lists.
            json = getattr(conn.rpc(timeout=5, serde=SerdeFormat.JSON), fn)
            assert await json({"a": [1, 2.5, "x", None, True], "t": (1, 2)}) == {
                "a": [1, 2.5, "x", None, True], "t": [1, 2]}
            # MSGPACK: bytes stay bytes, integer keys stay integers.
            msgpack = getattr(conn.rpc(timeout=5, serde=SerdeFormat.MSGPACK), fn)
            packed = await msgpack({1: b"\x00bin", "k": [2**40]})
            assert packed == {1: b"\x00bin", "k": [2**40]}
            # OPAQUE: bytes and str, untouched.
            opaque = getattr(conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE), fn)
            raw = await opaque(b"\x00\x01binary\x00")
            assert raw == b"\x00\x01binary\x00" and type(raw) is bytes
            text = await opaque("grüß 服务")
            assert text == "grüß 服务" and type(text) is str
            assert await opaque(bytearray(b"abc")) == b"abc"
            assert await opaque(memoryview(b"abcdef")[1:4]) == b"bcd"
            assert await opaque(b"") == b""
            assert await opaque(value=b"kw") == b"kw"
        type_name = conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE).ax_type_name
        assert await type_name(bytearray(b"x")) == "bytes"
        assert await type_name("x") == "str"
        assert await conn.rpc(timeout=5, serde=SerdeFormat.MSGPACK).ax_type_name(b"x") == "bytes"
        assert await conn.rpc(timeout=5, serde=SerdeFormat.JSON).ax_type_name((1, 2)) == "list"
        assert await conn.rpc(timeout=5).ax_type_name(AxPoint(0, 0)) == "AxPoint"

    aio.run(main(), loop_kind)


def test_bad_arguments_are_refused_before_sending(aio):
    async def main():
        _, conn = await service_and_conn(aio)
        with pytest.raises(TypeError):
            await conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE).ax_add(b"a", b"b")  # two arguments
        with pytest.raises(TypeError):
            await conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE).ax_echo(12345)
        with pytest.raises(TypeError):
            await conn.rpc(timeout=5, serde=SerdeFormat.JSON).ax_echo(b"bytes are not JSON")
        with pytest.raises(ValueError):
            await conn.rpc(timeout=-1).ax_echo(1)
        assert await conn.rpc(timeout=5).ax_echo("still usable") == "still usable"
        # Proxies are immutable; getattr works.
        proxy = conn.rpc(timeout=5)
        with pytest.raises(AttributeError):
            proxy.timeout = 3
        name = "ax_echo"
        assert await getattr(proxy, name)(7) == 7

    aio.run(main())


@loops
def test_keyword_arguments_in_every_format(aio, loop_kind):
    async def main():
        _, conn = await service_and_conn(aio)
        for fn in ("ax_add", "ax_add_sync"):
            assert await getattr(conn.rpc(timeout=5), fn)(1, b=2, scale=10) == 30
            assert await getattr(conn.rpc(timeout=5, serde=SerdeFormat.JSON), fn)(a=1, b=2, scale=3) == 9
            assert await getattr(conn.rpc(timeout=5, serde=SerdeFormat.MSGPACK), fn)(4, scale=2) == 8
        assert await conn.cast(timeout=5).ax_add(a=1, scale=5) == {conn.members[0]: 5}

    aio.run(main(), loop_kind)


@loops
def test_rpc_nowait_cast_and_cast_nowait(aio, sink, loop_kind):
    async def main():
        svc, conn = await service_and_conn(aio)
        # rpc_nowait: None once sent; delivered (workers=1: before the rpc that follows).
        assert await conn.rpc_nowait().ax_note(sink, "async") is None
        assert await conn.rpc_nowait(serde=SerdeFormat.JSON).ax_note_sync(sink, [1, 2]) is None
        pinned = conn.rpc_nowait(receiver=svc.app_name, serde=SerdeFormat.MSGPACK)
        assert await pinned.ax_note(sink, b"m") is None
        assert await conn.rpc(timeout=5).ax_notes(sink) == ["async", [1, 2], b"m"]
        # cast: {service name: result}, every format.
        assert await conn.cast(timeout=5).ax_add(1, 2) == {svc.app_name: 3}
        assert await conn.cast().ax_echo_sync("x") == {svc.app_name: "x"}
        assert await conn.cast(timeout=5, serde=SerdeFormat.JSON).ax_echo((1,)) == {svc.app_name: [1]}
        assert await conn.cast(timeout=5, serde=SerdeFormat.OPAQUE).ax_echo(b"o") == {svc.app_name: b"o"}
        assert await conn.cast(timeout=5, serde=SerdeFormat.MSGPACK).ax_echo(b"m") == {svc.app_name: b"m"}
        assert await conn.cast(timeout=5, receiver=svc.app_name).ax_echo(1) == {svc.app_name: 1}
        assert await conn.cast(timeout=5, receiver=[svc.app_name]).ax_echo(2) == {svc.app_name: 2}
        # A failing callback is the cast's value, not an exception.
        result = await conn.cast(timeout=5).ax_fail("cast failure")
        assert list(result) == [svc.app_name]
        err = result[svc.app_name]
        assert isinstance(err, ValueError) and isinstance(err, RemoteCallError)
        assert "cast failure" in str(err)
        # cast_nowait: delivered.
        assert await conn.cast_nowait().ax_note(sink, "cast") is None
        listed = conn.cast_nowait(receiver=[svc.app_name], serde=SerdeFormat.MSGPACK)
        assert await listed.ax_note(sink, 9) is None
        assert await conn.rpc(timeout=5).ax_notes(sink) == ["async", [1, 2], b"m", "cast", 9]

    aio.run(main(), loop_kind)


def test_cast_timeout_is_a_value_under_one_deadline(aio):
    async def main():
        svc, conn = await service_and_conn(aio, workers=2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await conn.cast(timeout=0.3).ax_sleep(1.5)
        elapsed = loop.time() - started
        assert list(result) == [svc.app_name]
        assert isinstance(result[svc.app_name], CallTimeout)
        assert 0.25 <= elapsed < 1.2, elapsed
        assert await conn.cast(timeout=5).ax_echo("after") == {svc.app_name: "after"}

    aio.run(main())


async def _agen(key: str, count: int):
    for i in range(count):
        await asyncio.sleep(0)
        yield f"{key}:{i}".encode()


@loops
def test_stream_every_source_kind_in_order(aio, sink, loop_kind):
    async def main():
        _, conn = await service_and_conn(aio, workers=4)
        for fn in ("ax_chunk", "ax_achunk"):  # a plain and an async callback
            _SINK[sink].clear()
            stream = getattr(conn.stream(timeout=5), fn)
            assert await stream([f"{sink}:{i}".encode() for i in range(20)]) is None
            # stream returns after the last acknowledgement: everything is there already.
            assert _SINK[sink] == [str(i).encode() for i in range(20)]
            await stream(f"{sink}:{i}".encode() for i in range(3))  # a generator
            await stream(_agen(sink, 3))  # an async generator
            await stream(f"{sink}:whole".encode())  # bytes: one chunk
            await stream(f"{sink}:text")  # str: one chunk
            await stream(bytearray(f"{sink}:ba".encode()))
            await stream([])  # nothing
            assert _SINK[sink][20:] == [b"0", b"1", b"2", b"0", b"1", b"2", b"whole", b"text", b"ba"]
        # Other formats: one item per chunk.
        _SINK[sink].clear()
        await conn.stream(serde=SerdeFormat.PICKLE, timeout=5).ax_collect((sink, i) for i in range(3))
        await conn.stream(serde=SerdeFormat.MSGPACK).ax_collect([[sink, b"m1"], [sink, b"m2"]])
        await conn.stream(serde=SerdeFormat.JSON).ax_collect([[sink, {"j": 1}]])
        assert _SINK[sink] == [0, 1, 2, b"m1", b"m2", {"j": 1}]

    aio.run(main(), loop_kind)


@loops
def test_stream_waits_for_each_acknowledgement(aio, gauge, loop_kind):
    async def main():
        # workers=4 would run chunks at once if the stream did not wait for each answer.
        _, conn = await service_and_conn(aio, workers=4)

        async def chunks():
            for _ in range(6):
                yield [gauge, 0.03]

        await conn.stream(serde=SerdeFormat.PICKLE, timeout=5).ax_track_chunk(chunks())
        await conn.stream(serde=SerdeFormat.PICKLE, timeout=5).ax_track_sync_chunk([[gauge, 0.03]] * 4)
        assert peak(gauge) == 1
        # The same chunks as concurrent rpcs do overlap (so the check above can fail).
        await asyncio.gather(*(conn.rpc(timeout=5).ax_track_chunk([gauge, 0.1]) for _ in range(4)))
        assert peak(gauge) >= 2

    aio.run(main(), loop_kind)


def test_stream_stops_at_the_remote_error(aio, sink):
    async def main():
        _, conn = await service_and_conn(aio)
        for fn in ("ax_chunk", "ax_achunk"):
            _SINK[sink].clear()
            chunks = [f"{sink}:{c}".encode() for c in ("1", "2", "explode", "4", "5")]
            with pytest.raises(ValueError, match="chunk refused") as info:
                await getattr(conn.stream(timeout=5), fn)(chunks)
            assert isinstance(info.value, RemoteCallError)
            await asyncio.sleep(0.2)
            assert _SINK[sink] == [b"1", b"2", b"explode"], "chunks after the failing one were sent"
        assert await conn.rpc(timeout=5).ax_echo("ok") == "ok"

    aio.run(main())


@loops
def test_stream_nowait_then_rpc_sees_every_chunk_first(aio, sink, loop_kind):
    async def main():
        _, conn = await service_and_conn(aio, workers=1)
        n = 300
        assert await conn.stream_nowait().ax_chunk(f"{sink}:{i}".encode() for i in range(n)) is None
        # workers=1: strict arrival order, so the rpc runs after every chunk.
        assert await conn.rpc(timeout=10).ax_count(sink) == n
        assert _SINK[sink] == [str(i).encode() for i in range(n)]
        # Async source, async callback.
        _SINK[sink].clear()
        await conn.stream_nowait().ax_achunk(_agen(sink, 50))
        assert await conn.rpc(timeout=10).ax_count(sink) == 50
        assert _SINK[sink] == [str(i).encode() for i in range(50)]
        # rpc_nowait too, mixing async and plain callbacks.
        _SINK[sink].clear()
        for i in range(200):
            fn = "ax_note" if i % 2 else "ax_note_sync"
            await getattr(conn.rpc_nowait(), fn)(sink, i)
        assert await conn.rpc(timeout=10).ax_notes(sink) == list(range(200))

    aio.run(main(), loop_kind)


@loops
def test_wait_for_members_and_members(aio, loop_kind):
    async def main():
        svc = await aio.service().start()
        client = aio.client(svc)
        conn = await client.connect()
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await conn.wait_for_members(svc.app_name, timeout=2) is None
        assert await conn.wait_for_members() is None
        assert await conn.wait_for_members(svc.app_name) is None
        assert await conn.wait_for_members(client.app_name, timeout=1) is None  # present to itself
        assert loop.time() - started < 1
        assert conn.members == [svc.app_name]
        started = loop.time()
        with pytest.raises(TimeoutError) as info:
            await conn.wait_for_members(svc.app_name, "ghost-member", timeout=0.5)
        elapsed = loop.time() - started
        assert "ghost-member" in str(info.value) and svc.app_name not in str(info.value)
        assert 0.45 <= elapsed < 2.0, elapsed
        # The wait does not block the loop: a member that joins meanwhile is seen.
        assert await eventually(lambda: svc.members == [client.app_name], 3)

    aio.run(main(), loop_kind)


@loops
def test_receivers_and_unknown_functions_fail_at_once(aio, loop_kind):
    async def main():
        svc = await aio.service().start()
        client = aio.client(svc)
        conn = await client.connect()
        loop = asyncio.get_running_loop()
        assert await conn.rpc(timeout=5, receiver=svc.app_name).ax_echo(1) == 1
        attempts = {
            "unknown function": lambda: conn.rpc(timeout=30).ax_no_such_function(1),
            "unknown function, no deadline": lambda: conn.rpc().ax_no_such_function(1),
            "unknown receiver": lambda: conn.rpc(timeout=30, receiver="wrong-name").ax_echo(1),
            "to itself": lambda: conn.rpc(timeout=30, receiver=client.app_name).ax_echo(1),
            "nowait unknown function": lambda: conn.rpc_nowait().ax_no_such_function(),
            "nowait unknown receiver": lambda: conn.rpc_nowait(receiver="wrong-name").ax_echo(1),
            "cast unknown function": lambda: conn.cast(timeout=30).ax_no_such_function(),
            "cast unknown receiver": lambda: conn.cast(timeout=30, receiver="wrong-name").ax_echo(1),
            "cast_nowait unknown receiver": lambda: conn.cast_nowait(receiver=["wrong-name"]).ax_echo(1),
            "stream unknown receiver": lambda: conn.stream(receiver="wrong-name").ax_chunk(b"x"),
            "stream_nowait unknown function": lambda: conn.stream_nowait().ax_no_such_function(b"x"),
        }
        for what, attempt in attempts.items():
            started = loop.time()
            with pytest.raises(TransmissionFailure) as info:
                await attempt()
            assert loop.time() - started < 0.5, what
            text = str(info.value)
            named = ("ax_no_such_function", "wrong-name", client.app_name)
            assert any(n in text for n in named), (what, text)
        with pytest.raises(TransmissionFailure) as info:
            await conn.rpc(timeout=5).ax_no_such_function()
        assert svc.app_name in str(info.value)  # names the connected peer
        assert await conn.rpc(timeout=5).ax_echo(2) == 2

    aio.run(main(), loop_kind)


@loops
def test_opaque_28_mib_round_trip(aio, loop_kind):
    async def main():
        _, conn = await service_and_conn(aio)
        blob = os.urandom(1 << 20) * 28
        blob = blob[:-3] + b"end"
        loop = asyncio.get_running_loop()
        with Ticker() as ticker:
            started = loop.time()
            for fn in ("ax_echo", "ax_echo_sync"):
                got = await getattr(conn.rpc(timeout=30, serde=SerdeFormat.OPAQUE), fn)(blob)
                assert type(got) is bytes and len(got) == len(blob)
                assert got == blob
            assert loop.time() - started < 20
        assert ticker.ticks > 0
        assert await conn.rpc(timeout=5).ax_echo("healthy") == "healthy"

    aio.run(main(), loop_kind)


def test_callback_registered_after_start_is_callable(aio):
    async def main():
        _, conn = await service_and_conn(aio)

        async def ax_late_async(x):
            await asyncio.sleep(0)
            return ("late", x)

        callback(ax_late_async)

        async def callable_now() -> bool:
            try:
                return await conn.rpc(timeout=5).ax_late_async(1) == ("late", 1)
            except TransmissionFailure:
                return False

        deadline = asyncio.get_running_loop().time() + 3
        while not await callable_now():
            assert asyncio.get_running_loop().time() < deadline, "the late callback was never announced"
            await asyncio.sleep(0.02)

    aio.run(main())


@loops
def test_event_loops_read_their_own_sockets_and_hand_the_rest_to_the_engine(aio, loop_kind):
    """Sequential calls: each side's event loop reads its socket itself (no hop through the
    engine thread); what it may not handle (large payloads, a second client) still works."""

    async def main():
        svc, conn = await service_and_conn(aio)
        echo = conn.rpc(timeout=10).ax_echo
        for i in range(300):
            assert await echo(i) == i
        answers = conn._native.direct_reads()[0]
        requests = svc._native.direct_reads()[1]
        assert answers >= 200 and requests >= 200, (answers, requests)
        blob = bytes(range(256)) * 4096  # 1 MiB: received by the engine, both ways
        assert await conn.rpc(timeout=10, serde=SerdeFormat.OPAQUE).ax_echo(blob) == blob
        for i in range(100):
            assert await echo(i) == i
        assert conn._native.direct_reads()[0] >= answers + 50
        # A second client: the Service's loop gives its connection back; both are served, in
        # turn and at once, and again once the second has left.
        other = await aio.client(svc).connect()
        other_echo = other.rpc(timeout=10).ax_echo
        for i in range(50):
            assert (await echo(i), await other_echo(-i)) == (i, -i)
        assert await asyncio.gather(*(f(i) for i in range(100) for f in (echo, other_echo))) == [
            i for i in range(100) for _ in range(2)
        ]
        await other._client.stop()
        assert await eventually(lambda: len(svc.members) == 1)
        for i in range(100):
            assert await echo(i) == i

    aio.run(main(), loop_kind)


def test_no_call_runs_before_the_handshake(aio, sink):
    # The loop reads the only connection of its Service itself: never before the handshake
    # has checked the token.
    async def main():
        svc = await aio.service(token="open sesame").start()
        sock = await asyncio.to_thread(call_without_handshake, svc.port, "ax_note", (sink, "intruder"))
        await asyncio.sleep(0.5)
        assert _SINK[sink] == []
        sock.close()
        conn = await aio.client(svc, token="open sesame").connect()
        await conn.rpc(timeout=5).ax_note(sink, "member")
        assert _SINK[sink] == ["member"]

    aio.run(main())


# == 2. many calls at once on one connection ===================================================


def test_sequential_calls_answered_inline_leave_the_loop_its_laps(aio, spawn):
    """A task awaiting one call after another, each answered fast enough to be read without a
    lap of the loop (``_Bridge.await_socket``), still lets timers and other tasks run: every
    few calls the loop runs its selector."""
    _, port, _ = start_aio_service(spawn)

    async def main():
        conn = await aio.client(port).connect()
        echo = conn.rpc(timeout=10).ac_echo
        for i in range(200):  # let the spin estimate settle
            assert await echo(i) == i
        loop = asyncio.get_running_loop()
        fired = []
        loop.call_later(0.01, fired.append, True)
        with Ticker(interval=0.005) as ticker:
            started = loop.time()
            calls = 0
            while loop.time() - started < 0.5:
                assert await echo(calls) == calls
                calls += 1
        assert fired, "a due timer never ran while the calls went on"
        # ~100 ticks if nothing held the loop; the bound only rules out a starved loop.
        assert ticker.ticks >= 20, (ticker.ticks, calls)
        assert ticker.longest_gap < 0.25, (ticker.longest_gap, calls)

    aio.run(main())


@loops
def test_thousands_of_concurrent_calls_each_get_their_own_result(aio, loop_kind):
    async def main():
        _, conn = await service_and_conn(aio, workers=4)
        n = 5000
        proxy = conn.rpc(timeout=30)  # proxies are shared between tasks
        calls = []
        for i in range(n):
            if i % 5 == 0:
                calls.append(proxy.ax_add_sync(i, 1, scale=2))  # plain callbacks, in the pool
            elif i % 5 == 1:
                calls.append(conn.rpc(timeout=30, serde=SerdeFormat.MSGPACK).ax_add(i, 1, scale=2))
            else:
                calls.append(proxy.ax_add(i, 1, scale=2))
        results = await asyncio.gather(*calls)
        assert results == [(i + 1) * 2 for i in range(n)]
        # And payloads that differ per call, through echo.
        values = [(i, "x" * (i % 13)) for i in range(2000)]
        assert await asyncio.gather(*(proxy.ax_echo(v) for v in values)) == values

    aio.run(main(), loop_kind)


def test_many_tasks_share_one_connection_with_mixed_styles(aio, sink):
    async def main():
        _, conn = await service_and_conn(aio, workers=8)

        async def worker(tid: int) -> list:
            out = []
            for i in range(30):
                out.append(await conn.rpc(timeout=10).ax_echo((tid, i)))
                await conn.rpc_nowait().ax_note(sink, (tid, i))
                if i % 10 == 0:
                    out.append((await conn.cast(timeout=10).ax_echo((tid, "c", i))).popitem()[1])
            return out

        results = await asyncio.gather(*(worker(t) for t in range(40)))
        for tid, got in enumerate(results):
            expected = []
            for i in range(30):
                expected.append((tid, i))
                if i % 10 == 0:
                    expected.append((tid, "c", i))
            assert got == expected
        assert await eventually(lambda: len(_SINK[sink]) == 40 * 30, 5)
        assert sorted(_SINK[sink]) == sorted((t, i) for t in range(40) for i in range(30))

    aio.run(main())


# == 3. timeouts and cancellation ================================================================


@loops
def test_call_timeout_at_the_deadline_then_later_calls_get_their_own_results(aio, loop_kind):
    async def main():
        _, conn = await service_and_conn(aio, workers=1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(CallTimeout) as info:
            await conn.rpc(timeout=0.3).ax_sleep(0.8, tag="late")
        elapsed = loop.time() - started
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, DaffiError)
        assert "ax_sleep" in str(info.value)
        assert 0.28 <= elapsed < 0.9, elapsed
        # The "late" answer arrives while these wait (workers=1): it must be dropped.
        assert [await conn.rpc(timeout=10).ax_echo(i) for i in range(5)] == list(range(5))
        assert await conn.rpc(timeout=10).ax_sleep(0.01, tag="mine") == "mine"
        # Plain callbacks time out the same way.
        with pytest.raises(CallTimeout):
            await conn.rpc(timeout=0.2).ax_block(0.5, tag="late-sync")
        assert await conn.rpc(timeout=10).ax_block(0, tag="mine-sync") == "mine-sync"
        # 0 and None mean no deadline.
        assert await conn.rpc(timeout=0).ax_sleep(0.3, tag="zero") == "zero"
        assert await conn.rpc(timeout=None).ax_sleep(0.05, tag="none") == "none"

    aio.run(main(), loop_kind)


def test_many_timeouts_do_not_poison_the_connection(aio):
    async def main():
        _, conn = await service_and_conn(aio, workers=4)
        outcomes = await asyncio.gather(
            *(conn.rpc(timeout=0.1).ax_sleep(0.3, tag=f"late-{i}") for i in range(12)), return_exceptions=True
        )
        assert all(isinstance(o, CallTimeout) for o in outcomes), outcomes[:3]
        await asyncio.sleep(0.5)  # every late answer has come back by now
        assert await asyncio.gather(*(conn.rpc(timeout=5).ax_echo(i) for i in range(100))) == list(range(100))

    aio.run(main())


@loops
def test_each_call_expires_at_its_own_deadline(aio, loop_kind):
    async def main():
        _, conn = await service_and_conn(aio, workers=4)
        loop = asyncio.get_running_loop()
        # Hundreds of calls answered well within a long deadline: none of them fires later.
        for i in range(300):
            assert await conn.rpc(timeout=60).ax_echo(i) == i
        started = loop.time()

        async def expiry(timeout: float) -> float | None:
            try:
                await conn.rpc(timeout=timeout).ax_sleep(1.2, tag="late")
            except CallTimeout:
                return loop.time() - started
            return None

        # A later deadline first, then an earlier one, then a call answered in time.
        later = asyncio.ensure_future(expiry(0.7))
        await asyncio.sleep(0.05)
        earlier = asyncio.ensure_future(expiry(0.2))
        assert await conn.rpc(timeout=0.5).ax_sleep(0.05, tag="in time") == "in time"
        first, second = await earlier, await later
        assert first is not None and 0.25 <= first < 0.6, first
        assert second is not None and 0.69 <= second < 1.1, second
        assert await conn.rpc(timeout=5).ax_echo("after") == "after"

    aio.run(main(), loop_kind)


@loops
def test_cancelling_the_awaiting_task_abandons_the_call(aio, loop_kind):
    async def main():
        _, conn = await service_and_conn(aio, workers=1)
        loop = asyncio.get_running_loop()
        # task.cancel() on a call without a deadline.
        task = asyncio.create_task(conn.rpc().ax_sleep(0.5, tag="late"))
        await asyncio.sleep(0.1)
        task.cancel()
        started = loop.time()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert loop.time() - started < 0.3  # at once, not when the answer comes (0.4 s later)
        assert task.cancelled()
        # Queued behind the abandoned call (workers=1): gets its own answer, not "late".
        assert await conn.rpc(timeout=5).ax_sleep(0, tag="mine") == "mine"
        # asyncio.wait_for around a call.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(conn.rpc(timeout=30).ax_sleep(0.4, tag="late-2"), 0.1)
        assert [await conn.rpc(timeout=5).ax_echo(i) for i in range(3)] == [0, 1, 2]
        # A cancelled cast and a cancelled stream.
        task = asyncio.create_task(conn.cast(timeout=30).ax_sleep(0.3, tag="late-cast"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        gauge_keys = []

        async def endless_tracked():
            while True:
                key = unique_name("cancelled-stream")
                _GAUGE[key] = [0, 0]
                gauge_keys.append(key)
                yield [key, 0.05]

        task = asyncio.create_task(conn.stream(serde=SerdeFormat.PICKLE).ax_track_chunk(endless_tracked()))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        sent = len(gauge_keys)
        assert 0 < sent < 20
        # Hundreds cancelled at once, then hundreds that complete.
        tasks = [asyncio.create_task(conn.rpc(timeout=30).ax_echo(i)) for i in range(300)]
        await asyncio.sleep(0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        results = await asyncio.gather(*(conn.rpc(timeout=10).ax_echo(("after", i)) for i in range(300)))
        assert results == [("after", i) for i in range(300)]
        await asyncio.sleep(0.3)  # any late answer lands now and must be dropped quietly
        assert await conn.rpc(timeout=5).ax_sleep(0, tag="last") == "last"
        assert len(gauge_keys) == sent, "the cancelled stream kept sending"
        for key in gauge_keys:
            _GAUGE.pop(key, None)

    aio.run(main(), loop_kind)


# == 4. callee concurrency =======================================================================


async def _concurrent(conn: AsyncConnection, fn: str, count: int, *args: Any) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(*(getattr(conn.rpc(timeout=20), fn)(*args) for _ in range(count)))
    assert len(results) == count
    return loop.time() - started


@loops
def test_async_callbacks_overlap_up_to_workers(aio, gauge, loop_kind):
    async def main():
        _, conn = await service_and_conn(aio, workers=4)
        elapsed = await _concurrent(conn, "ax_track", 4, gauge, 0.5)
        assert elapsed < 0.95, f"4 async callbacks of 0.5 s took {elapsed:.2f} s with workers=4"
        assert peak(gauge) == 4
        # Never more than ``workers`` at once.
        _GAUGE[gauge] = [0, 0]
        elapsed = await _concurrent(conn, "ax_track", 12, gauge, 0.2)
        assert peak(gauge) == 4
        assert 0.55 <= elapsed < 1.5, elapsed

    aio.run(main(), loop_kind)


@loops
def test_workers_1_serialises_async_callbacks(aio, gauge, loop_kind):
    async def main():
        _, conn = await service_and_conn(aio, workers=1)
        elapsed = await _concurrent(conn, "ax_track", 4, gauge, 0.25)
        assert elapsed >= 0.95, f"4 async callbacks of 0.25 s took {elapsed:.2f} s with workers=1"
        assert peak(gauge) == 1

    aio.run(main(), loop_kind)


def test_plain_callbacks_run_in_the_pool_up_to_workers(aio, gauge):
    async def main():
        svc, conn = await service_and_conn(aio, workers=3)
        elapsed = await _concurrent(conn, "ax_track_sync", 6, gauge, 0.3)
        assert peak(gauge) == 3
        assert 0.55 <= elapsed < 1.2, elapsed
        # Where they run: async callbacks on the loop's thread, plain ones in the node's pool.
        assert await conn.rpc(timeout=5).ax_where() == threading.get_ident()
        name = await conn.rpc(timeout=5).ax_where_sync()
        assert name != threading.current_thread().name
        assert name.startswith(f"daffi-aio-{svc.app_name}"), name

    aio.run(main())


@loops
def test_a_blocking_plain_callback_does_not_block_the_loop(aio, loop_kind):
    async def main():
        _, conn = await service_and_conn(aio, workers=2)
        loop = asyncio.get_running_loop()
        with Ticker() as ticker:
            blocking = asyncio.create_task(conn.rpc(timeout=10).ax_block(1.0, tag="blocked"))
            await asyncio.sleep(0.1)
            # The other worker answers an async callback at once, on the same loop.
            started = loop.time()
            assert await conn.rpc(timeout=5).ax_echo("free") == "free"
            assert loop.time() - started < 0.5
            started = loop.time()
            assert await conn.rpc(timeout=5).ax_sleep(0.05, tag="async") == "async"
            assert loop.time() - started < 0.5
            assert not blocking.done()
            assert await blocking == "blocked"
        assert ticker.ticks >= 20, ticker.ticks
        assert ticker.longest_gap < 0.5, f"the loop stalled for {ticker.longest_gap:.2f} s"

    aio.run(main(), loop_kind)


def test_workers_1_a_blocking_plain_callback_delays_the_next_call_not_the_loop(aio):
    async def main():
        _, conn = await service_and_conn(aio, workers=1)
        loop = asyncio.get_running_loop()
        with Ticker() as ticker:
            started = loop.time()
            first = asyncio.create_task(conn.rpc(timeout=10).ax_block(0.8, tag="first"))
            second = asyncio.create_task(conn.rpc(timeout=10).ax_echo("second"))
            done, _ = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
            assert first in done and loop.time() - started >= 0.75
            assert await first == "first" and await second == "second"
        assert ticker.longest_gap < 0.5, f"the loop stalled for {ticker.longest_gap:.2f} s"

    aio.run(main())


# == 5. remote exceptions =======================================================================


@loops
def test_remote_exceptions_are_remote_call_errors_named_like_the_remote_type(aio, loop_kind):
    async def main():
        svc, conn = await service_and_conn(aio)
        for fn in ("ax_fail", "ax_fail_sync"):
            err = await expect_remote_error(getattr(conn.rpc(timeout=5), fn)("bad input 42"), ValueError)
            assert type(err).__name__ == "ValueError" and err.remote_type == "ValueError"
            assert "bad input 42" in str(err)
            assert fn in err.remote_traceback
            # Same error whatever the request format.
            for serde in (SerdeFormat.JSON, SerdeFormat.MSGPACK):
                await expect_remote_error(getattr(conn.rpc(timeout=5, serde=serde), fn)("j"), ValueError)
        await expect_remote_error(conn.rpc(timeout=5).ax_fail_key(), KeyError)
        err = await expect_remote_error(conn.rpc(timeout=5).ax_fail_custom())
        assert type(err).__name__ == "AxCustomError" and err.remote_type.endswith("AxCustomError")
        assert "custom failure" in str(err)
        # A remote SystemExit answers the caller; the service lives on.
        err = await expect_remote_error(conn.rpc(timeout=5).ax_exit())
        assert type(err).__name__ == "SystemExit"
        # A failing rpc_nowait hurts nobody.
        await conn.rpc_nowait().ax_fail("ignored")
        for i in range(20):
            with pytest.raises(ValueError):
                await conn.rpc(timeout=5).ax_fail(str(i))
            assert await conn.rpc(timeout=5).ax_echo(i) == i
        assert await conn.cast(timeout=5).ax_echo("ok") == {svc.app_name: "ok"}

    aio.run(main(), loop_kind)


def test_a_callback_raising_cancelled_error_answers_with_an_error(aio):
    async def main():
        # workers=1: if this ended the node's only consumer, nothing would be answered again.
        _, conn = await service_and_conn(aio, workers=1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        err = await expect_remote_error(conn.rpc(timeout=5).ax_fail_cancelled())
        assert not isinstance(err, asyncio.CancelledError)  # it must not cancel the caller
        assert "CancelledError" in type(err).__name__
        assert loop.time() - started < 2
        assert await conn.rpc(timeout=5).ax_echo("next") == "next"

    aio.run(main())


@loops
def test_unserialisable_results_are_remote_errors_and_the_service_keeps_serving(aio, loop_kind):
    async def main():
        svc, conn = await service_and_conn(aio, workers=1)
        for fn in ("ax_unpicklable", "ax_unpicklable_sync"):
            err = await expect_remote_error(getattr(conn.rpc(timeout=5), fn)())
            assert "lock" in str(err).lower()
            assert await conn.rpc(timeout=5).ax_echo("after") == "after"
        await expect_remote_error(conn.rpc(timeout=5, serde=SerdeFormat.JSON).ax_a_set())  # no set in JSON
        # An int cannot travel as OPAQUE: a remote TypeError.
        await expect_remote_error(conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE).ax_int(b"x"), TypeError)
        assert await conn.rpc(timeout=5).ax_int(b"x") == 42
        other = await aio.client(svc).connect()
        assert await other.rpc(timeout=5).ax_echo("other") == "other"
        assert await conn.rpc(timeout=5).ax_echo("same") == "same"

    aio.run(main(), loop_kind)


# == 6. membership events on an AsyncService =================================================


@loops
def test_service_handlers_async_and_sync_in_registration_order(aio, loop_kind, caplog):
    async def main():
        svc = aio.service()
        seen: list = []

        async def async_all(event):
            await asyncio.sleep(0.01)
            seen.append(("async-all", event["type"], event["member"]))

        def sync_all(event):
            seen.append(("sync-all", event["type"], event["member"]))

        def broken_sync(event):
            raise RuntimeError("sync handler bug")

        async def broken_async(event):
            await asyncio.sleep(0)
            raise RuntimeError("async handler bug")

        async def broken_cancel(event):
            raise asyncio.CancelledError()

        assert svc.add_event_handler(broken_sync) is broken_sync
        assert svc.add_event_handler(async_all) is async_all
        svc.add_event_handler(broken_async)
        svc.add_event_handler(broken_cancel)
        svc.add_event_handler(sync_all)

        @svc.on_member_added
        async def added(name):
            await asyncio.sleep(0)
            seen.append(("added", name))

        @svc.on_member_removed
        def removed(name):
            seen.append(("removed", name))

        svc.on_member_added(broken_sync)
        assert callable(added) and callable(removed)
        await svc.start()
        client = aio.client(svc)
        await client.connect()
        me = client.app_name
        connected = [("async-all", "connected", me), ("sync-all", "connected", me), ("added", me)]
        assert await eventually(lambda: len(seen) >= 3, 3), seen
        await asyncio.sleep(0.1)
        assert seen == connected
        await client.stop()
        assert await eventually(lambda: len(seen) >= 6, 3), seen
        await asyncio.sleep(0.1)
        assert seen == connected + [("async-all", "disconnected", me), ("sync-all", "disconnected", me),
                                    ("removed", me)]
        # A sync client in a thread is heard too, and the node still serves calls.
        sync_client = aio.sync_client(svc)
        sync_conn = await asyncio.to_thread(sync_client.connect)
        assert await eventually(lambda: ("added", sync_client.app_name) in seen, 3), seen
        assert await asyncio.to_thread(sync_conn.rpc(timeout=5).ax_add_sync, 1, 2) == 3
        await asyncio.to_thread(sync_client.stop)
        assert await eventually(lambda: ("removed", sync_client.app_name) in seen, 3), seen

    with caplog.at_level(logging.ERROR, logger="daffi"):
        aio.run(main(), loop_kind)
    logged = "\n".join(
        (r.getMessage() + " " + (r.exc_text or "") + " " + repr(r.exc_info and r.exc_info[1]))
        for r in caplog.records if r.name.startswith("daffi")
    )
    assert "sync handler bug" in logged and "async handler bug" in logged, "raising handlers must be logged"


def test_many_clients_are_heard_and_a_client_of_a_service_hears_nothing(aio):
    async def main():
        svc = aio.service()
        events: asyncio.Queue = asyncio.Queue()
        svc.add_event_handler(events.put)  # a bound coroutine method as the handler
        await svc.start()
        heard: list = []
        clients = [aio.client(svc) for _ in range(5)]
        for c in clients:
            c.add_event_handler(heard.append)
            c.on_member_added(heard.append)
            c.on_member_removed(heard.append)
        conns = await asyncio.gather(*(c.connect() for c in clients))
        conns[0].add_event_handler(heard.append)
        got = [await asyncio.wait_for(events.get(), 3) for _ in clients]
        assert sorted(e["member"] for e in got) == sorted(c.app_name for c in clients)
        assert {e["type"] for e in got} == {"connected"}
        assert sorted(svc.members) == sorted(c.app_name for c in clients)
        await clients[0].stop()
        gone = {"type": "disconnected", "member": clients[0].app_name}
        assert await asyncio.wait_for(events.get(), 3) == gone
        await asyncio.sleep(0.3)
        assert heard == []
        for name in ("add_event_handler", "on_member_added", "on_member_removed"):
            handler = lambda arg: None  # noqa: E731
            assert getattr(conns[1], name)(handler) is handler

    aio.run(main())


# == 7. failure behaviour with the service in another process ====================================


@loops
def test_cross_process_calls_to_an_async_service(aio, spawn, loop_kind):
    proc, port, name = start_aio_service(spawn, workers=2, loop_kind=loop_kind)

    async def main():
        conn = await aio.client(port).connect()
        assert await conn.rpc(timeout=5).ac_pid() == proc.pid
        assert await conn.cast(timeout=5).ac_echo("c") == {name: "c"}
        for serde in SerdeFormat:
            value = b"bytes" if serde == SerdeFormat.OPAQUE else {"k": [1, 2]}
            assert await conn.rpc(timeout=5, serde=serde).ac_echo(value) == value
        blob = bytes(range(256)) * (32 << 10)  # 8 MiB
        assert await conn.rpc(timeout=30, serde=SerdeFormat.OPAQUE).ac_echo(blob) == blob
        # workers=2: a blocking plain callback there leaves the other worker free.
        blocking = asyncio.create_task(conn.rpc(timeout=10).ac_block(0.8))
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await conn.rpc(timeout=5).ac_sleep(0.01, tag="x") == "x"
        assert loop.time() - started < 0.5
        assert await blocking == 0.8

    aio.run(main(), loop_kind)


@loops
@pytest.mark.parametrize("timeout", [None, 60])
def test_kill_9_fails_the_call_in_flight_and_later_calls(aio, spawn, loop_kind, timeout):
    proc, port, _ = start_aio_service(spawn, workers=2, loop_kind=loop_kind)

    async def main():
        client = aio.client(port)
        conn = await client.connect()
        loop = asyncio.get_running_loop()
        assert await conn.rpc(timeout=5).ac_echo(1) == 1
        pending = asyncio.create_task(conn.rpc(timeout=timeout).ac_sleep(30))
        await asyncio.sleep(0.3)
        killed_at = loop.time()
        proc.signal(signal.SIGKILL)
        with pytest.raises(GONE):
            await asyncio.wait_for(pending, 10)
        assert loop.time() - killed_at < 5
        started = loop.time()
        with pytest.raises(GONE):
            await conn.rpc(timeout=60).ac_echo(2)
        with pytest.raises(GONE):
            await conn.rpc_nowait().ac_echo(3)
        with pytest.raises(GONE):
            await conn.stream(timeout=60).ac_echo([b"x"])
        assert loop.time() - started < 5
        assert await eventually(lambda: not client.connected, 5)

    aio.run(main(), loop_kind)


@loops
def test_sigstop_times_out_then_sigcont_recovers(aio, spawn, loop_kind):
    proc, port, _ = start_aio_service(spawn, workers=1, loop_kind=loop_kind)

    async def main():
        client = aio.client(port)
        conn = await client.connect()
        loop = asyncio.get_running_loop()
        assert await conn.rpc(timeout=5).ac_echo(0) == 0
        proc.signal(signal.SIGSTOP)
        try:
            await asyncio.to_thread(wait_stopped, proc.pid)
            with Ticker() as ticker:
                started = loop.time()
                with pytest.raises(CallTimeout):
                    await conn.rpc(timeout=1).ac_echo("frozen")
                elapsed = loop.time() - started
                assert 0.95 <= elapsed < 3, elapsed
                # A cancelled wait during the freeze, too.
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(conn.rpc().ac_echo("frozen-2"), 0.3)
                cast = await conn.cast(timeout=0.5).ac_echo("frozen-cast")
                assert [type(v) for v in cast.values()] == [CallTimeout]
            assert ticker.longest_gap < 0.5  # waiting never blocked the loop
            assert client.connected  # frozen is not dead
        finally:
            proc.signal(signal.SIGCONT)
        # The frozen calls' late answers arrive now and must be dropped.
        assert await asyncio.gather(*(conn.rpc(timeout=10).ac_echo(i) for i in range(3))) == [0, 1, 2]
        assert await conn.rpc(timeout=10).ac_pid() == proc.pid

    aio.run(main(), loop_kind)


def test_stopping_the_service_fails_calls_in_flight(aio):
    async def main():
        svc, conn = await service_and_conn(aio, workers=2)
        loop = asyncio.get_running_loop()
        pending = asyncio.create_task(conn.rpc(timeout=30).ax_sleep(10))
        await asyncio.sleep(0.2)
        started = loop.time()
        await svc.stop()
        with pytest.raises(GONE):
            await asyncio.wait_for(pending, 5)
        assert loop.time() - started < 3
        with pytest.raises(GONE):
            await conn.rpc(timeout=5).ax_echo(1)

    aio.run(main())


def test_stopping_the_client_fails_its_calls_in_flight_with_disconnected(aio):
    async def main():
        svc, conn = await service_and_conn(aio, workers=2)
        client = aio.nodes[-1]
        calls = [asyncio.create_task(conn.rpc(timeout=30).ax_sleep(5)),
                 asyncio.create_task(conn.rpc().ax_sleep(5)),
                 asyncio.create_task(conn.cast(timeout=30).ax_sleep(5))]
        await asyncio.sleep(0.2)
        await client.stop()
        # Like a sync client's calls: Disconnected, never a CancelledError nobody asked for.
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        assert isinstance(outcomes[0], Disconnected), repr(outcomes[0])
        assert isinstance(outcomes[1], Disconnected), repr(outcomes[1])
        assert isinstance(outcomes[2], dict), repr(outcomes[2])
        assert isinstance(outcomes[2][svc.app_name], Disconnected), outcomes[2]
        assert not any(t.cancelled() for t in calls)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(GONE):
            await conn.rpc(timeout=5).ax_echo(1)
        with pytest.raises(GONE):
            await conn.rpc_nowait().ax_echo(1)
        assert loop.time() - started < 1

    aio.run(main())


# == 8. interoperation of sync and async nodes =====================================================


@loops
def test_sync_and_async_clients_call_the_same_async_service(aio, sink, loop_kind):
    async def main():
        svc = await aio.service(workers=4).start()
        aconn = await aio.client(svc).connect()
        sync_client = aio.sync_client(svc)
        sconn = await asyncio.to_thread(sync_client.connect)
        # Both at once: async calls on the loop, sync calls from threads.
        async_calls = [aconn.rpc(timeout=10).ax_add(i, 1) for i in range(200)]
        sync_calls = [asyncio.to_thread(sconn.rpc(timeout=10).ax_add, i, 2) for i in range(40)]
        results = await asyncio.gather(*async_calls, *sync_calls)
        assert results == [i + 1 for i in range(200)] + [i + 2 for i in range(40)]
        # Each style from the sync side.
        assert await asyncio.to_thread(sconn.cast(timeout=5).ax_echo, "s") == {svc.app_name: "s"}
        await asyncio.to_thread(sconn.rpc_nowait().ax_note, sink, "sync-nowait")
        await aconn.rpc_nowait().ax_note(sink, "async-nowait")
        await asyncio.to_thread(sconn.stream(timeout=5).ax_chunk, [f"{sink}:s{i}".encode() for i in range(3)])
        await aconn.stream(timeout=5).ax_chunk([f"{sink}:a{i}".encode() for i in range(3)])
        assert await eventually(lambda: len(_SINK[sink]) == 8, 5), _SINK[sink]
        assert sorted(map(repr, _SINK[sink])) == sorted(map(repr, [
            "sync-nowait", "async-nowait", b"s0", b"s1", b"s2", b"a0", b"a1", b"a2"]))
        with pytest.raises(ValueError) as info:
            await asyncio.to_thread(sconn.rpc(timeout=5).ax_fail, "to a sync caller")
        assert isinstance(info.value, RemoteCallError)
        big = os.urandom(1 << 20) * 4
        assert await asyncio.to_thread(sconn.rpc(timeout=20, serde=SerdeFormat.OPAQUE).ax_echo, big) == big
        assert sorted(svc.members) == sorted([aio.nodes[-1].app_name, sync_client.app_name])

    aio.run(main(), loop_kind)


def test_calls_made_while_the_client_stops_fail_at_once(aio):
    async def main():
        _, conn = await service_and_conn(aio)
        client = aio.nodes[-1]
        # stop() detaches from the loop at once, then waits for the engine off the loop: calls
        # made in between must fail, not wait for an answer nobody will deliver.
        stopping = asyncio.create_task(client.stop())
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(GONE):
            await conn.rpc().ax_echo(1)
        with pytest.raises(GONE):
            await conn.rpc_nowait().ax_echo(1)
        assert loop.time() - started < 1
        await stopping

    aio.run(main())


def test_a_sync_client_in_another_process_calls_an_async_service(aio, spawn):
    async def main():
        svc = await aio.service(workers=2).start()
        proc = spawn(SYNC_CALLER_PY, svc.port, name="sync_caller.py")
        prefixes = ("rpc", "opaque", "cast", "error")
        lines = [await asyncio.to_thread(proc.wait_line, prefix) for prefix in prefixes]
        assert lines == ["rpc 50", "opaque b'\\x00raw'", "cast ['c']", "error ValueError True True"]
        assert await asyncio.to_thread(proc.wait, 10) == 0, proc.stderr_text()

    aio.run(main())


@loops
def test_sync_and_async_clients_call_one_worker_through_a_router(aio, spawn, loop_kind):
    router = aio.sync_router().start()
    worker = unique_name("sync-worker")
    proc = spawn(SYNC_WORKER_PY, router.port, worker, name="sync_worker.py")
    proc.wait_line("ready")

    async def main():
        aconn = await aio.client(router).connect()
        await aconn.wait_for_members(worker, timeout=10)
        sync_client = aio.sync_client(router)
        sconn = await asyncio.to_thread(sync_client.connect)
        await asyncio.to_thread(sconn.wait_for_members, worker, timeout=10)
        key = unique_name("both")
        # Both callers at once, to the one worker.
        await asyncio.gather(
            *(aconn.rpc(timeout=10).aw_note(key, ("async", i)) for i in range(50)),
            *(asyncio.to_thread(sconn.rpc(timeout=10).aw_note, key, ("sync", i)) for i in range(20)),
        )
        notes = await aconn.rpc(timeout=5, receiver=worker).aw_notes(key)
        assert sorted(notes) == sorted([("async", i) for i in range(50)] + [("sync", i) for i in range(20)])
        assert await aconn.rpc(timeout=5).aw_pid() == proc.pid
        assert await asyncio.to_thread(sconn.rpc(timeout=5).aw_pid) == proc.pid
        assert await aconn.cast(timeout=5).aw_whoami() == {worker: worker}
        assert await asyncio.to_thread(sconn.cast(timeout=5).aw_whoami) == {worker: worker}
        # Each caller sees the worker and the other caller; never the router.
        assert sorted(aconn.members) == sorted([worker, sync_client.app_name])
        assert router.app_name not in aconn.members
        blob = os.urandom(1 << 20) * 3
        assert await aconn.rpc(timeout=20, serde=SerdeFormat.OPAQUE).aw_echo(blob) == blob
        with pytest.raises(TransmissionFailure):
            await aconn.rpc(timeout=30, receiver=unique_name("ghost")).aw_whoami()

    aio.run(main(), loop_kind)


@loops
def test_an_async_client_is_a_worker_behind_a_router_for_a_sync_caller(aio, loop_kind):
    async def main():
        router = await aio.router().start()
        worker = aio.client(router, workers=2)
        await worker.connect()
        caller = aio.sync_client(router)
        sconn = await asyncio.to_thread(caller.connect)
        await asyncio.to_thread(sconn.wait_for_members, worker.app_name, timeout=10)
        # The caller never routes to itself: the AsyncClient answers, its async callback on
        # this loop's thread, its plain one in its pool.
        assert await asyncio.to_thread(sconn.rpc(timeout=5).ax_where) == threading.get_ident()
        name = await asyncio.to_thread(sconn.rpc(timeout=5).ax_where_sync)
        assert name.startswith(f"daffi-aio-{worker.app_name}"), name
        assert await asyncio.to_thread(sconn.rpc(timeout=5).ax_add, 2, b=3, scale=2) == 10
        assert await asyncio.to_thread(sconn.cast(timeout=5).ax_echo, "c") == {worker.app_name: "c"}
        with pytest.raises(ValueError) as info:
            await asyncio.to_thread(sconn.rpc(timeout=5).ax_fail, "from the async worker")
        assert isinstance(info.value, RemoteCallError)
        # While a blocking plain callback runs in the worker's pool, its loop (and a second
        # call, workers=2) go on.
        with Ticker() as ticker:
            slow = asyncio.to_thread(sconn.rpc(timeout=10).ax_block, 0.8, "slow")
            quick = asyncio.to_thread(sconn.rpc(timeout=10).ax_sleep, 0.05, "quick")
            assert await asyncio.gather(slow, quick) == ["slow", "quick"]
        assert ticker.longest_gap < 0.5, f"the worker's loop stalled for {ticker.longest_gap:.2f} s"
        # The AsyncClient worker is a caller too (to the sync client, which exposes the same).
        assert await worker.connection.rpc(timeout=5, receiver=caller.app_name).ax_echo_sync("back") == "back"

    aio.run(main(), loop_kind)


# == 9. AsyncRouter ===============================================================================


@loops
def test_async_router_round_robin_cast_and_events(aio, spawn, loop_kind):
    async def main():
        router = aio.router()
        router_seen: list = []

        async def router_all(event):
            await asyncio.sleep(0)
            router_seen.append((event["type"], event["member"]))

        router.add_event_handler(router_all)
        router.on_member_added(lambda name: router_seen.append(("added", name)))
        router.on_member_removed(lambda name: router_seen.append(("removed", name)))
        await router.start()
        caller = aio.client(router)
        joined: list = []
        left: list = []
        conn = await caller.connect()

        async def on_added(name):
            await asyncio.sleep(0)
            joined.append(name)

        conn.on_member_added(on_added)
        conn.on_member_removed(left.append)
        names = [unique_name("aw-a"), unique_name("aw-b")]
        procs = {}
        for name, kind in zip(names, LOOP_KINDS, strict=True):  # one worker on each loop kind
            procs[name] = spawn(AIO_WORKER_PY, router.port, name, kind, name=f"aio_worker_{name}.py")
        for proc in procs.values():
            await asyncio.to_thread(proc.wait_line, "ready")
        await conn.wait_for_members(*names, timeout=10)
        a, b = names
        # Round-robin: evenly, never the same worker twice in a row.
        seq = [await conn.rpc(timeout=5).aw_whoami() for _ in range(6)]
        assert collections.Counter(seq) == {a: 3, b: 3}, seq
        assert all(x != y for x, y in zip(seq, seq[1:], strict=False)), seq
        together = await asyncio.gather(*(conn.rpc(timeout=5).aw_whoami() for _ in range(10)))
        assert collections.Counter(together) == {a: 5, b: 5}
        # Cast to both; pinned calls.
        assert await conn.cast(timeout=5).aw_whoami() == {a: a, b: b}
        assert await conn.cast(timeout=5).aw_pid() == {n: procs[n].pid for n in names}
        assert await conn.cast(timeout=5, receiver=[b]).aw_whoami() == {b: b}
        assert [await conn.rpc(timeout=5, receiver=b).aw_whoami() for _ in range(3)] == [b] * 3
        results = await conn.cast(timeout=5).aw_fail("each")
        assert set(results) == {a, b}
        assert all(isinstance(v, ValueError) and isinstance(v, RemoteCallError) for v in results.values())
        # Every other call style through the router.
        key = unique_name("rnotes")
        await conn.cast_nowait().aw_note(key, "all")
        await conn.rpc_nowait(receiver=a).aw_note(key, "a-only")
        await conn.stream(receiver=b, serde=SerdeFormat.PICKLE, timeout=5).aw_echo([1, 2, 3])
        expected = {a: ["all", "a-only"], b: ["all"]}
        for _ in range(100):
            if await conn.cast(timeout=5).aw_notes(key) == expected:
                break
            await asyncio.sleep(0.02)
        assert await conn.cast(timeout=5).aw_notes(key) == expected
        # The router's own handlers heard everyone join; the caller heard the workers.
        everyone = [caller.app_name, *names]
        heard_all = await eventually(lambda: all(("connected", n) in router_seen for n in everyone), 3)
        assert heard_all, router_seen
        assert all(("added", n) in router_seen for n in everyone)
        assert await eventually(lambda: sorted(joined) == sorted(names), 3), joined
        assert sorted(router.members) == sorted(everyone)
        assert router.app_name not in conn.members
        # A worker's own async handler heard the other worker and the caller.
        heard = await conn.rpc(timeout=5, receiver=a).aw_events()
        assert {"type": "connected", "member": b} in heard
        # A killed worker leaves: everyone hears it; round-robin and cast forget it.
        procs[b].signal(signal.SIGKILL)
        assert await eventually(lambda: left == [b], 5), left
        assert await eventually(lambda: {("disconnected", b), ("removed", b)} <= set(router_seen), 5)
        assert [await conn.rpc(timeout=5).aw_whoami() for _ in range(3)] == [a] * 3
        assert await conn.cast(timeout=5).aw_whoami() == {a: a}
        # The caller leaves: the router hears it.
        await caller.stop()
        assert await eventually(lambda: ("disconnected", caller.app_name) in router_seen, 5), router_seen
        assert ("removed", caller.app_name) in router_seen
        assert await eventually(lambda: sorted(router.members) == [a], 5), router.members

    aio.run(main(), loop_kind)


def test_async_router_forwards_between_sync_and_async_clients(aio):
    async def main():
        router = await aio.router().start()
        aworker = aio.client(router)
        await aworker.connect()
        scaller = aio.sync_client(router)
        sconn = await asyncio.to_thread(scaller.connect)
        await asyncio.to_thread(sconn.wait_for_members, aworker.app_name, timeout=10)
        assert await asyncio.to_thread(sconn.rpc(timeout=5).ax_where) == threading.get_ident()
        # The async side calls the sync client's callbacks (same registry, other node).
        aconn = aworker.connection
        assert await aconn.rpc(timeout=5, receiver=scaller.app_name).ax_add_sync(1, 2) == 3
        assert await aconn.cast(timeout=5).ax_echo_sync("both") == {scaller.app_name: "both"}
        blob = os.urandom(1 << 20) * 5
        assert await aconn.rpc(timeout=20, receiver=scaller.app_name, serde=SerdeFormat.OPAQUE).ax_echo_sync(
            blob) == blob

    aio.run(main())


# == 10. life cycle =================================================================================


@loops
def test_async_with_for_service_and_client(aio, loop_kind):
    async def main():
        port = free_port()
        async with AsyncService(host="127.0.0.1", port=port, app_name=unique_name("ctx")) as svc:
            assert isinstance(svc, AsyncService)
            async with AsyncClient(host="127.0.0.1", port=port) as client:
                assert isinstance(client, AsyncClient)
                assert client.connected is True
                assert isinstance(client.connection, AsyncConnection)
                assert await client.connection.rpc(timeout=5).ax_add(2, 3) == 5
                assert await eventually(lambda: svc.members == [client.app_name], 3)
            assert client.connected is False
            assert await eventually(lambda: svc.members == [], 3)
        # Stopped on exit: the port is free again at once, also for a sync Service.
        with Service(host="127.0.0.1", port=port):
            pass
        # Stopped on an error too.
        with pytest.raises(KeyError):
            async with AsyncService(host="127.0.0.1", port=port):
                raise KeyError("boom")
        async with AsyncService(host="127.0.0.1", port=port):
            pass

    aio.run(main(), loop_kind)


def test_stop_is_idempotent_and_the_port_rebinds_at_once(aio):
    async def main():
        port = free_port()
        svc = aio.service(port=port)
        await svc.stop()  # before start: nothing to do
        await svc.start()
        client = aio.client(port)
        conn = await client.connect()
        assert await conn.rpc(timeout=5).ax_echo(1) == 1
        await svc.stop()
        await svc.stop()
        again = await aio.service(port=port).start()  # at once, same port
        await client.stop()
        await client.stop()
        assert client.connected is False
        conn2 = await aio.client(again).connect()
        assert await conn2.rpc(timeout=5).ax_echo(2) == 2
        await again.stop()
        # A stopped AsyncService may start again.
        await svc.start()
        conn3 = await aio.client(port).connect()
        assert await conn3.rpc(timeout=5).ax_echo(3) == 3
        for _ in range(3):  # restart cycles on one port
            await svc.stop()
            await svc.start()
            c = aio.client(port)
            assert await (await c.connect()).rpc(timeout=5).ax_echo("cycle") == "cycle"
            await c.stop()

    aio.run(main())


@loops
def test_second_start_and_second_connect_raise_runtime_error(aio, loop_kind):
    async def main():
        svc = await aio.service().start()
        with pytest.raises(RuntimeError):
            await svc.start()
        router = await aio.router().start()
        with pytest.raises(RuntimeError):
            await router.start()
        client = aio.client(svc)
        conn = await client.connect()
        with pytest.raises(RuntimeError):
            await client.connect()
        assert await conn.rpc(timeout=5).ax_echo(1) == 1  # the first connection is untouched
        # A busy port.
        with pytest.raises(InitializationError, match="in use"):
            await aio.service(port=svc.port).start()

    aio.run(main(), loop_kind)


@loops
def test_connect_to_a_closed_port_fails_within_the_connect_timeout(aio, loop_kind):
    async def main():
        loop = asyncio.get_running_loop()
        client = aio.client(free_port(), connect_timeout=2)  # nothing listens there
        started = loop.time()
        with pytest.raises(InitializationError):
            await client.connect()
        assert loop.time() - started < 2.5
        assert client.connected is False
        # A listener that never answers: the handshake waits off the loop, up to the timeout.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            client = aio.client(silent.getsockname()[1], connect_timeout=1)
            with Ticker() as ticker:
                started = loop.time()
                with pytest.raises(InitializationError):
                    await client.connect()
                elapsed = loop.time() - started
            assert 0.8 <= elapsed < 3, elapsed
            assert ticker.ticks >= 10 and ticker.longest_gap < 0.5, (ticker.ticks, ticker.longest_gap)

    aio.run(main(), loop_kind)


def test_a_client_connects_again_after_stop_with_the_same_name(aio):
    async def main():
        svc = await aio.service().start()
        name = unique_name("again")
        client = aio.client(svc, app_name=name)
        conn = await client.connect()
        assert await conn.rpc(timeout=5).ax_echo("one") == "one"
        assert await eventually(lambda: svc.members == [name])
        await client.stop()
        assert await eventually(lambda: svc.members == [])
        conn2 = await client.connect()
        assert client.connected
        assert client.connection is conn2
        assert await conn2.rpc(timeout=5).ax_echo("two") == "two"
        assert await eventually(lambda: svc.members == [name])
        # The old handle belongs to the closed connection.
        with pytest.raises(GONE):
            await conn.rpc(timeout=5).ax_echo("old")
        # After the service goes away, connected turns False and the client can connect anew.
        await svc.stop()
        assert await eventually(lambda: not client.connected, 5)
        with pytest.raises(GONE):
            await conn2.rpc(timeout=5).ax_echo("gone")
        await svc.start()
        conn3 = await client.connect()
        assert await conn3.rpc(timeout=5).ax_echo("three") == "three"

    aio.run(main())


@loops
def test_join_returns_after_stop_and_cancelling_join_stops_the_node(aio, loop_kind):
    async def main():
        svc = await aio.service().start()
        joiner = asyncio.create_task(svc.join())
        await asyncio.sleep(0.2)
        assert not joiner.done(), "join() returned before stop()"
        await svc.stop()
        await asyncio.wait_for(joiner, 5)
        # A client's join likewise.
        await svc.start()
        client = aio.client(svc)
        await client.connect()
        joiner = asyncio.create_task(client.join())
        await asyncio.sleep(0.2)
        assert not joiner.done()
        await client.stop()
        await asyncio.wait_for(joiner, 5)
        # Cancelling the task in join() stops the node: its port is free, its clients see it go.
        conn = await client.connect()
        port = svc.port
        joiner = asyncio.create_task(svc.join())
        await asyncio.sleep(0.2)
        joiner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await joiner
        assert await eventually(lambda: not client.connected, 5)
        with pytest.raises(GONE):
            await conn.rpc(timeout=5).ax_echo(1)
        rebound = await aio.service(port=port).start()
        await rebound.stop()
        # And a client's join cancelled: the client disconnects.
        await svc.start()
        await client.connect()
        joiner = asyncio.create_task(client.join())
        await asyncio.sleep(0.1)
        joiner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await joiner
        assert client.connected is False
        assert await eventually(lambda: svc.members == [], 5)

    aio.run(main(), loop_kind)


def test_an_async_service_in_a_child_ends_its_join_on_stop(aio, spawn):
    # Ending the child's loop (SIGINT → KeyboardInterrupt in asyncio.run) closes its sockets.
    proc, port, _ = start_aio_service(spawn)

    async def main():
        client = aio.client(port)
        conn = await client.connect()
        assert await conn.rpc(timeout=5).ac_echo(1) == 1
        proc.signal(signal.SIGINT)
        await asyncio.to_thread(proc.wait, 5)
        assert await eventually(lambda: not client.connected, 5)
        again = await aio.service(port=port).start()  # the child's port is free
        await again.stop()

    aio.run(main())
