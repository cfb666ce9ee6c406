"""The Router topology end to end (SPEC §4, §6, §7; the seed README's "Router layout").

Workers that must behave differently (return their own name, record what they received) run
in child processes: the callback registry is process-wide, so every Client of one process
exposes the same callbacks. Callers in this process register no ``rt_*`` callbacks, so they
are never eligible receivers of those functions.

Most call-style tests share one module-wide Router with three worker children (``cluster``);
tests that kill, evict or stop something build their own.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Proc, free_port, unique_name, wait_until
from daffi import Client, Router, SerdeFormat, callback
from daffi.exceptions import (
    CallTimeout,
    Disconnected,
    Evicted,
    InitializationError,
    RemoteCallError,
    TransmissionFailure,
)

GONE = (Disconnected, TransmissionFailure)

# A worker: ``worker.py ADDRESS NAME [WORKERS]``; ADDRESS is a TCP port of 127.0.0.1 or a Unix
# socket path. Its callbacks answer with the worker's own name or record what they received.
WORKER_PY = """
import os
import sys
import threading
import time

from daffi import Client, callback

address, name = sys.argv[1], sys.argv[2]
workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
options = {"workers": workers}
if len(sys.argv) > 4:
    options["max_message_size"] = int(sys.argv[4])
if address.isdigit():
    client = Client(app_name=name, host="127.0.0.1", port=int(address), **options)
else:
    client = Client(app_name=name, unix_sock_path=address, **options)

events = []
added = []
removed = []
client.add_event_handler(events.append)
client.on_member_added(added.append)
client.on_member_removed(removed.append)
notes = {}
chunks = {}
lock = threading.Lock()


@callback
def rt_whoami():
    return name


@callback
def rt_pid():
    return os.getpid()


@callback
def rt_echo(value):
    return value


@callback
def rt_sleep(seconds, tag=None):
    if isinstance(seconds, dict):  # per-worker durations
        seconds = seconds.get(name, 0)
    print(f"sleeping {tag}", flush=True)
    time.sleep(seconds)
    return name


@callback
def rt_blob(size):
    return b"x" * size


@callback
def rt_note(key, value):
    with lock:
        notes.setdefault(key, []).append(value)


@callback
def rt_notes(key):
    with lock:
        return list(notes.get(key, []))


@callback
def rt_chunk(chunk):
    # OPAQUE stream chunk b"KEY:BODY"; BODY "explode" is refused.
    if isinstance(chunk, str):
        chunk = chunk.encode()
    key, _, body = bytes(chunk).partition(b":")
    if body == b"explode":
        raise ValueError(f"chunk refused by {name}")
    with lock:
        chunks.setdefault(key.decode(), []).append(body)


@callback
def rt_chunks(key):
    with lock:
        return list(chunks.get(key, []))


@callback
def rt_fail(message):
    raise ValueError(message)


@callback
def rt_fail_key():
    return {}["no-such-key"]


@callback
def rt_peers():
    return sorted(client.connection.members)


@callback
def rt_events():
    return {"events": list(events), "added": list(added), "removed": list(removed)}


@callback
def rt_cast_whoami():
    # A worker is a caller too: who answers its cast?
    return client.connection.cast(timeout=5).rt_whoami()


@callback
def rt_add_late(fn_name):
    def late(value):
        return f"{name} late {value}"

    late.__name__ = late.__qualname__ = fn_name
    callback(late)
    print(f"registered {fn_name}", flush=True)
    return True


client.connect()
print("ready", flush=True)
client.join()
print("joined", flush=True)
"""

# A caller that exposes no callback at all.
BARE_CALLER_PY = """
import sys

from daffi import Client

client = Client(app_name=sys.argv[2], host="127.0.0.1", port=int(sys.argv[1]))
client.connect()
print("ready", flush=True)
client.join()
"""

# A Router in its own process (so that it can be killed).
ROUTER_PY = """
import sys

from daffi import Router

router = Router(app_name=sys.argv[2], host="127.0.0.1", port=int(sys.argv[1]))
router.start()
print("ready", flush=True)
router.join()
"""

# -- the seed README's Router layout, verbatim (only the address is replaced) ---------------------

README_ROUTER_PY = """\
from daffi import Router

router = Router(host="127.0.0.1", port=6000)
router.start()
router.join()
"""

README_WORKER_PY = """\
from daffi import Client, callback

@callback
def process(task: str) -> str:
    return f"done: {task}"

client = Client(app_name="worker-1", host="127.0.0.1", port=6000)
client.connect()
client.join()   # block until Ctrl+C / SIGTERM
"""

README_CALLER_PY = """\
from daffi import Client

client = Client(app_name="caller", host="127.0.0.1", port=6000)
conn = client.connect()

# RPC — routed to one worker (round-robin)
result = conn.rpc(timeout=5).process("job-42")

# Cast — sent to *all* workers, returns {worker_name: result}
all_results = conn.cast(timeout=5).process("broadcast-job")

client.stop()
"""


# -- helpers ----------------------------------------------------------------------------------------


def spawn_in(directory: Path, source: str, *args, name: str) -> Proc:
    """Like the ``spawn`` fixture, for module-scoped fixtures: ``source`` in a child process."""
    script = directory / name
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    stderr_path = directory / f"{name}.stderr"
    with open(stderr_path, "w") as err:
        popen = subprocess.Popen(
            [sys.executable, str(script), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            cwd=str(directory),
        )
    return Proc(popen, script, stderr_path)


def start_workers(spawn, address, names, workers: int = 1) -> dict[str, Proc]:
    """Worker children named ``names`` connected to ``address``, started in parallel; returns
    once each printed "ready"."""
    procs = {n: spawn(WORKER_PY, address, n, workers, name=f"worker_{n}.py") for n in names}
    for proc in procs.values():
        proc.wait_line("ready")
    return procs


def call_in_thread(fn, *args, **kwargs) -> queue.Queue:
    """Runs ``fn`` in a thread; the queue receives ``(ok, value, finished_at)``."""
    out: queue.Queue = queue.Queue()

    def run():
        try:
            out.put((True, fn(*args, **kwargs), time.monotonic()))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.put((False, e, time.monotonic()))

    threading.Thread(target=run, daemon=True).start()
    return out


def timed(fn, *args, **kwargs):
    """``(result or exception, seconds)``."""
    started = time.monotonic()
    try:
        value = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - handed to the test
        value = e
    return value, time.monotonic() - started


def events_of(events: list, member: str) -> list[str]:
    """The event types about ``member``, in order."""
    return [e["type"] for e in list(events) if e["member"] == member]


@pytest.fixture
def make_router():
    """``make_router(**kwargs)`` → a started Router (port 0 unless told), stopped at the end."""
    routers: list[Router] = []

    def make(handlers=(), **kwargs):
        if "unix_sock_path" not in kwargs:
            kwargs.setdefault("host", "127.0.0.1")
            kwargs.setdefault("port", 0)
        kwargs.setdefault("app_name", unique_name("router"))
        router = Router(**kwargs)
        for handler in handlers:
            router.add_event_handler(handler)
        routers.append(router)
        return router.start()

    yield make
    for router in reversed(routers):
        router.stop()


@dataclass
class Cluster:
    router: Router
    workers: list[str]
    procs: dict[str, Proc]
    caller: Client
    conn: object
    router_events: list = field(default_factory=list)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One Router, three worker children (``workers=1`` each) and a caller in this process,
    shared by the call-style tests. Tests must leave every worker alive and idle."""
    directory = tmp_path_factory.mktemp("cluster")
    with contextlib.ExitStack() as stack:
        router_events: list = []
        router = Router(app_name=unique_name("rt-router"), host="127.0.0.1", port=0)
        router.add_event_handler(router_events.append)
        router.start()
        stack.callback(router.stop)
        names = [unique_name(f"rt-{x}") for x in "abc"]
        procs = {}
        for n in names:
            procs[n] = spawn_in(directory, WORKER_PY, router.port, n, 1, name=f"{n}.py")
            stack.callback(procs[n].kill)
        for proc in procs.values():
            proc.wait_line("ready")
        caller = Client(app_name=unique_name("rt-caller"), host="127.0.0.1", port=router.port)
        conn = caller.connect()
        stack.callback(caller.stop)
        conn.wait_for_members(*names, timeout=10)
        yield Cluster(router, names, procs, caller, conn, router_events)


# -- 1. the seed README's example ------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_readme_router_example(spawn, tmp_path, transport):
    if transport == "tcp":
        port = free_port()
        address = f'host="127.0.0.1", port={port}'
        observer = Client(app_name=unique_name("observer"), host="127.0.0.1", port=port)
    else:
        path = tmp_path / "router.sock"
        address = f"unix_sock_path={str(path)!r}"
        observer = Client(app_name=unique_name("observer"), unix_sock_path=path)

    def adapt(source: str) -> str:
        assert 'host="127.0.0.1", port=6000' in source
        return source.replace('host="127.0.0.1", port=6000', address)

    router = spawn(adapt(README_ROUTER_PY), name="router.py")
    # Neither script prints anything: readiness is found by connecting (the router) and
    # waiting for worker-1. The worker does not retry, so it starts once the router is up.
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                conn = observer.connect()
                break
            except InitializationError:
                assert router.popen.poll() is None, router.stderr_text()
                assert time.monotonic() < deadline, "the README router never accepted a connection"
                time.sleep(0.05)
        worker = spawn(adapt(README_WORKER_PY), name="worker.py")
        conn.wait_for_members("worker-1", timeout=15)
        assert worker.popen.poll() is None, worker.stderr_text()
        assert "worker-1" in conn.members
        caller = spawn(adapt(README_CALLER_PY) + "print(repr(result))\nprint(repr(all_results))\n",
                       name="caller.py")
        assert caller.wait_line("'done") == "'done: job-42'"
        assert caller.wait_line("{") == "{'worker-1': 'done: broadcast-job'}"
        assert caller.wait(10) == 0, caller.stderr_text()
        # The caller came and went; the worker stays.
        assert wait_until(lambda: conn.members == ["worker-1"], 3), conn.members
    finally:
        observer.stop()
    if transport == "unix":
        router.signal(signal.SIGTERM)
        assert router.wait(5) == 0, router.stderr_text()
        assert not path.exists(), "the router left its socket file behind"


# -- 2. fan-out, round-robin, pinning --------------------------------------------------------------


def test_cast_reaches_every_worker_once(cluster):
    conn, names = cluster.conn, cluster.workers
    assert conn.cast(timeout=5).rt_whoami() == {n: n for n in names}
    pids = conn.cast(timeout=5).rt_pid()
    assert pids == {n: cluster.procs[n].pid for n in names}
    assert cluster.caller.app_name not in pids


def test_round_robin_spreads_rpc_evenly(cluster):
    conn, names = cluster.conn, cluster.workers
    hits = collections.Counter(conn.rpc(timeout=5).rt_whoami() for _ in range(6))
    assert hits == {n: 2 for n in names}
    # Consecutive calls never hit the same worker twice in a row.
    seq = [conn.rpc(timeout=5).rt_whoami() for _ in range(7)]
    assert all(a != b for a, b in zip(seq, seq[1:], strict=False)), seq
    assert set(seq) == set(names)


def test_receiver_pins_the_worker(cluster):
    conn, (a, b, c) = cluster.conn, cluster.workers
    assert [conn.rpc(timeout=5, receiver=b).rt_whoami() for _ in range(5)] == [b] * 5
    assert conn.cast(timeout=5, receiver=[a, c]).rt_whoami() == {a: a, c: c}
    assert conn.cast(timeout=5, receiver=b).rt_whoami() == {b: b}
    assert conn.cast(timeout=5, receiver=(n for n in [c])).rt_whoami() == {c: c}
    # Pinned calls leave round-robin working.
    hits = collections.Counter(conn.rpc(timeout=5).rt_whoami() for _ in range(3))
    assert hits == {a: 1, b: 1, c: 1}


# -- 3. every call style through the router -----------------------------------------------------------


def test_rpc_keyword_arguments_and_values(cluster):
    conn, (a, _, _) = cluster.conn, cluster.workers
    value = {"t": (1, 2.5, None), "s": {1, 2}, "b": b"\x00\xff"}
    assert conn.rpc(timeout=5).rt_echo(value=value) == value
    assert conn.rpc(timeout=5, receiver=a).rt_sleep(0, tag="x") == a


def test_rpc_nowait_is_delivered(cluster):
    conn, (a, b, c) = cluster.conn, cluster.workers
    key = unique_name("nowait")
    assert conn.rpc_nowait(receiver=a).rt_note(key, 1) is None
    assert conn.rpc_nowait(receiver=a).rt_note(key, 2) is None
    # One worker thread, one connection: the later rpc runs after both notes.
    assert conn.rpc(timeout=5, receiver=a).rt_notes(key) == [1, 2]
    assert conn.rpc(timeout=5, receiver=b).rt_notes(key) == []
    # Without a receiver: exactly one worker gets it.
    key2 = unique_name("nowait-rr")
    conn.rpc_nowait().rt_note(key2, "x")
    assert wait_until(lambda: sum(conn.cast(timeout=5).rt_notes(key2).values(), []) == ["x"], 3)
    got = conn.cast(timeout=5).rt_notes(key2)
    assert sorted(len(v) for v in got.values()) == [0, 0, 1], got
    assert set(got) == {a, b, c}


def test_cast_nowait_reaches_every_worker_or_the_listed_ones(cluster):
    conn, (a, b, c) = cluster.conn, cluster.workers
    key = unique_name("castnw")
    assert conn.cast_nowait().rt_note(key, "all") is None
    assert conn.cast_nowait(receiver=[a, c]).rt_note(key, "ac") is None
    expected = {a: ["all", "ac"], b: ["all"], c: ["all", "ac"]}
    assert wait_until(lambda: conn.cast(timeout=5).rt_notes(key) == expected, 3), \
        conn.cast(timeout=5).rt_notes(key)


def test_stream_sends_every_chunk_in_order_to_one_worker(cluster):
    conn, names = cluster.conn, cluster.workers
    key = unique_name("stream")
    chunks = [f"{key}:{i}".encode() for i in range(20)]
    assert conn.stream(timeout=5).rt_chunk(iter(chunks)) is None
    # stream() returns after the last acknowledgement: everything is there already.
    got = conn.cast(timeout=5).rt_chunks(key)
    holders = [n for n, v in got.items() if v]
    assert len(holders) == 1, got
    assert got[holders[0]] == [str(i).encode() for i in range(20)]
    # Pinned, str and single-chunk sources.
    last = names[-1]
    conn.stream(receiver=last).rt_chunk(f"{key}-p:whole".encode())
    conn.stream(receiver=last).rt_chunk(f"{key}-p:text")
    conn.stream(receiver=last, timeout=5).rt_chunk([f"{key}-p:{i}".encode() for i in range(3)])
    assert conn.cast(timeout=5).rt_chunks(f"{key}-p") == {
        n: ([b"whole", b"text", b"0", b"1", b"2"] if n == last else []) for n in names
    }


def test_stream_raises_the_remote_error_and_stops(cluster):
    conn, (_, b, _) = cluster.conn, cluster.workers
    key = unique_name("stream-err")
    chunks = [f"{key}:1".encode(), f"{key}:explode".encode(), f"{key}:3".encode()]
    with pytest.raises(ValueError, match="chunk refused") as info:
        conn.stream(receiver=b, timeout=5).rt_chunk(chunks)
    assert isinstance(info.value, RemoteCallError)
    assert conn.rpc(timeout=5, receiver=b).rt_chunks(key) == [b"1"]  # nothing after the error


def test_stream_nowait_delivers_in_order_to_one_worker(cluster):
    conn = cluster.conn
    key = unique_name("stream-nw")
    n = 200
    assert conn.stream_nowait().rt_chunk(f"{key}:{i}".encode() for i in range(n)) is None

    def counts():
        return {w: len(v) for w, v in conn.cast(timeout=5).rt_chunks(key).items()}

    assert wait_until(lambda: n in counts().values(), 5), counts()
    got = conn.cast(timeout=5).rt_chunks(key)
    assert sorted(len(v) for v in got.values()) == [0, 0, n], {w: len(v) for w, v in got.items()}
    holder = next(w for w, v in got.items() if v)
    assert got[holder] == [str(i).encode() for i in range(n)]


def test_wait_for_members(cluster):
    conn, names = cluster.conn, cluster.workers
    _, took = timed(conn.wait_for_members, *names, timeout=5)
    assert took < 1
    assert conn.wait_for_members() is None
    ghost = unique_name("ghost")
    with pytest.raises(TimeoutError) as info:
        conn.wait_for_members(names[0], ghost, timeout=0.5)
    assert ghost in str(info.value)
    assert names[0] not in str(info.value)
    # A connected node is present to itself.
    conn.wait_for_members(cluster.caller.app_name, timeout=1)
    # The router itself is not a member a client can wait for or call.
    assert cluster.router.app_name not in conn.members
    assert sorted(conn.members) == sorted(names)


def test_all_serde_formats(cluster):
    conn, (a, _, _) = cluster.conn, cluster.workers
    opaque = conn.rpc(timeout=5, receiver=a, serde=SerdeFormat.OPAQUE)
    assert opaque.rt_echo(b"\x00raw\xff") == b"\x00raw\xff"
    assert type(opaque.rt_echo(bytearray(b"ba"))) is bytes
    assert opaque.rt_echo(memoryview(b"mv")) == b"mv"
    text = opaque.rt_echo("grüße")
    assert text == "grüße" and type(text) is str
    assert conn.rpc(timeout=5, serde=SerdeFormat.JSON).rt_echo({"a": [1, 2.5, None, "x"], "t": (1, 2)}) == {
        "a": [1, 2.5, None, "x"], "t": [1, 2]
    }
    pickled = {"set": {1, 2}, "tuple": (1, "2"), "bytes": b"b", "complex": 1 + 2j}
    assert conn.rpc(timeout=5, serde=SerdeFormat.PICKLE).rt_echo(pickled) == pickled
    packed = conn.rpc(timeout=5, serde=SerdeFormat.MSGPACK).rt_echo({1: b"\x00bin", "k": [1, "s"]})
    assert packed == {1: b"\x00bin", "k": [1, "s"]}
    # Every format through cast too.
    for serde, value in [(SerdeFormat.OPAQUE, b"o"), (SerdeFormat.JSON, [1]), (SerdeFormat.MSGPACK, b"m")]:
        assert conn.cast(timeout=5, serde=serde).rt_echo(value) == {n: value for n in cluster.workers}


def test_large_opaque_round_trip(cluster):
    conn, (_, b, _) = cluster.conn, cluster.workers
    blob = os.urandom(1 << 20) * 28  # 28 MiB
    blob = blob[:-3] + b"end"
    got = conn.rpc(timeout=60, receiver=b, serde=SerdeFormat.OPAQUE).rt_echo(blob)
    assert type(got) is bytes and len(got) == len(blob)
    assert got == blob
    assert conn.rpc(timeout=5, receiver=b).rt_whoami() == b  # the connection is still healthy


# -- 4. remote exceptions ------------------------------------------------------------------------------


def test_remote_exceptions_pass_through(cluster):
    conn, (a, b, c) = cluster.conn, cluster.workers
    with pytest.raises(ValueError, match="boom through the router") as info:
        conn.rpc(timeout=5, receiver=a).rt_fail("boom through the router")
    err = info.value
    assert isinstance(err, RemoteCallError)
    assert type(err).__name__ == "ValueError"
    assert "rt_fail" in err.remote_traceback
    with pytest.raises(KeyError) as info:
        conn.rpc(timeout=5).rt_fail_key()
    assert isinstance(info.value, RemoteCallError)
    # cast: every worker's failure is its entry, the cast itself does not raise.
    results = conn.cast(timeout=5).rt_fail("each")
    assert set(results) == {a, b, c}
    for value in results.values():
        assert isinstance(value, RemoteCallError) and isinstance(value, ValueError)
        assert "each" in str(value)
    assert conn.cast(timeout=5).rt_whoami() == {a: a, b: b, c: c}  # nothing broke


# -- 5. fail fast ---------------------------------------------------------------------------------------


def test_undeliverable_calls_fail_fast(cluster):
    conn, names = cluster.conn, cluster.workers
    me = cluster.caller.app_name
    ghost = unique_name("ghost")
    attempts = {
        "unknown receiver": lambda: conn.rpc(timeout=30, receiver=ghost).rt_whoami(),
        "nobody exposes": lambda: conn.rpc(timeout=30).rt_nobody_has_this(),
        "calling itself": lambda: conn.rpc(timeout=30, receiver=me).rt_whoami(),
        "pinned worker lacks it": lambda: conn.rpc(timeout=30, receiver=names[0]).rt_nobody_has_this(),
        "nowait unknown receiver": lambda: conn.rpc_nowait(receiver=ghost).rt_whoami(),
        "nowait nobody exposes": lambda: conn.rpc_nowait().rt_nobody_has_this(),
        "cast unknown receiver": lambda: conn.cast(timeout=30, receiver=[ghost]).rt_whoami(),
        "cast nobody exposes": lambda: conn.cast(timeout=30).rt_nobody_has_this(),
        "cast_nowait nobody exposes": lambda: conn.cast_nowait().rt_nobody_has_this(),
        "stream unknown receiver": lambda: conn.stream(timeout=30, receiver=ghost).rt_chunk(b"k:x"),
        "stream_nowait nobody exposes": lambda: conn.stream_nowait().rt_nobody_has_this(b"x"),
    }
    for what, attempt in attempts.items():
        err, took = timed(attempt)
        assert isinstance(err, TransmissionFailure), f"{what}: {err!r}"
        assert took < 1, f"{what}: took {took:.2f} s"
    err, _ = timed(attempts["nobody exposes"])
    assert "rt_nobody_has_this" in str(err)
    assert all(n in str(err) for n in names), str(err)
    err, _ = timed(attempts["unknown receiver"])
    assert ghost in str(err) and "rt_whoami" in str(err)
    assert cluster.caller.connected
    assert conn.rpc(timeout=5).rt_echo("still fine") == "still fine"


def test_a_call_times_out_through_the_router(make_router, spawn, make_client):
    router = make_router()
    a, b = unique_name("slow-a"), unique_name("slow-b")
    start_workers(spawn, router.port, [a, b])
    client, conn = make_client(router.port)
    conn.wait_for_members(a, b, timeout=10)
    with pytest.raises(CallTimeout) as info:
        started = time.monotonic()
        conn.rpc(timeout=0.5, receiver=a).rt_sleep(1.0, tag="late")
    took = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert 0.4 <= took < 1.4, took
    # One deadline for the whole cast: b answers, a (still busy, then sleeping) times out.
    started = time.monotonic()
    results = conn.cast(timeout=1.0).rt_sleep({a: 1.0, b: 0})
    took = time.monotonic() - started
    assert 0.9 <= took < 2.5, took
    assert results[b] == b
    assert isinstance(results[a], CallTimeout), results
    # b is unaffected by a's backlog; a's late answers are dropped and never mistaken for the
    # answers of later calls.
    assert conn.rpc(timeout=5, receiver=b).rt_whoami() == b
    assert [conn.rpc(timeout=5, receiver=a).rt_echo(i) for i in range(3)] == [0, 1, 2]
    assert client.connected


def test_message_size_limits_through_the_router(make_router, spawn, make_client):
    limit = 1 << 20
    router = make_router()
    small = unique_name("small")
    spawn(WORKER_PY, router.port, small, 1, limit, name="small.py").wait_line("ready")
    client, conn = make_client(router.port, max_message_size=limit)
    conn.wait_for_members(small, timeout=10)
    big = b"x" * (2 * limit)
    # A request larger than the worker accepts, a result larger than the caller accepts:
    # both fail fast, nothing is disconnected.
    err, took = timed(lambda: conn.rpc(timeout=30, serde=SerdeFormat.OPAQUE).rt_echo(big))
    assert isinstance(err, TransmissionFailure) and took < 1, (err, took)
    assert f"limit of {limit} bytes of {small!r}".replace("'", '"') in str(err)
    err, took = timed(lambda: conn.rpc(timeout=30).rt_blob(2 * limit))
    assert isinstance(err, TransmissionFailure) and took < 2, (err, took)
    results, took = timed(lambda: conn.cast(timeout=30).rt_blob(2 * limit))
    assert isinstance(results[small], TransmissionFailure) and took < 2, (results, took)
    assert conn.rpc(timeout=5).rt_blob(1000) == b"x" * 1000
    assert client.connected
    # The router's own limit bounds what it forwards.
    tight = make_router(max_message_size=limit)
    wide = unique_name("wide")
    start_workers(spawn, tight.port, [wide])
    _, conn2 = make_client(tight.port)
    conn2.wait_for_members(wide, timeout=10)
    err, took = timed(lambda: conn2.rpc(timeout=30, serde=SerdeFormat.OPAQUE).rt_echo(big))
    assert isinstance(err, TransmissionFailure) and took < 1, (err, took)
    assert f'of router "{tight.app_name}"' in str(err), err
    assert conn2.rpc(timeout=5, serde=SerdeFormat.OPAQUE).rt_echo(b"ok") == b"ok"


def test_a_tight_message_limit_still_lets_peers_meet(make_router, spawn, make_client):
    # The limit bounds calls: the hellos, peer lists and announces, which grow with the number
    # of functions and peers, are not held to it (they have a bound of their own).
    limit = 64
    router = make_router(max_message_size=limit)
    names = [unique_name("tight") for _ in range(2)]
    for n in names:
        spawn(WORKER_PY, router.port, n, 1, limit, name=f"{n}.py").wait_line("ready")
    client, conn = make_client(router.port, max_message_size=limit)
    conn.wait_for_members(*names, timeout=10)
    assert set(names) <= set(conn.members)
    results = conn.cast(timeout=10, serde=SerdeFormat.OPAQUE).rt_echo(b"small")
    assert results == {n: b"small" for n in names}
    err, took = timed(lambda: conn.rpc(timeout=10, serde=SerdeFormat.OPAQUE).rt_echo(b"x" * 65))
    assert isinstance(err, TransmissionFailure) and took < 1, (err, took)
    assert client.connected


# -- 6. who sees whom ---------------------------------------------------------------------------------


def test_callers_without_callbacks_are_visible_and_never_receivers(make_router, make_client, spawn):
    router = make_router()
    observer, oconn = make_client(router.port, app_name=unique_name("observer"))
    w1, bare, w2 = unique_name("w1"), unique_name("bare"), unique_name("w2")
    p1 = start_workers(spawn, router.port, [w1])[w1]
    pbare = spawn(BARE_CALLER_PY, router.port, bare, name="bare.py")
    pbare.wait_line("ready")
    start_workers(spawn, router.port, [w2])
    everyone = {observer.app_name, w1, bare, w2}
    assert wait_until(lambda: set(router.members) == everyone, 3), router.members
    assert sorted(router.members) == sorted(everyone)  # each name once
    assert wait_until(lambda: set(oconn.members) == everyone - {observer.app_name}, 3), oconn.members
    # A worker sees the peers that were there before it and the ones that came after, callers
    # without callbacks included, never itself, and never the router.
    assert wait_until(lambda: set(oconn.rpc(timeout=5, receiver=w1).rt_peers()) == everyone - {w1}, 3)
    assert wait_until(lambda: set(oconn.rpc(timeout=5, receiver=w2).rt_peers()) == everyone - {w2}, 3)
    seen1 = oconn.rpc(timeout=5, receiver=w1).rt_events()
    seen2 = oconn.rpc(timeout=5, receiver=w2).rt_events()
    assert sorted(seen1["added"]) == sorted(everyone - {w1})
    assert sorted(seen2["added"]) == sorted(everyone - {w2})
    assert seen1["removed"] == seen2["removed"] == []
    # A worker's cast reaches the other worker only: not the bare caller, not itself.
    assert oconn.rpc(timeout=10, receiver=w1).rt_cast_whoami() == {w2: w2}
    assert oconn.rpc(timeout=10, receiver=w2).rt_cast_whoami() == {w1: w1}
    # Nobody exposes rt_whoami on the bare caller: pinning it fails fast.
    err, took = timed(lambda: oconn.rpc(timeout=30, receiver=bare).rt_whoami())
    assert isinstance(err, TransmissionFailure) and took < 1, (err, took)
    # The bare caller leaves: everyone hears it.
    pbare.kill()
    assert wait_until(lambda: bare not in oconn.members, 5)
    assert wait_until(lambda: oconn.rpc(timeout=5, receiver=w1).rt_events()["removed"] == [bare], 3)
    assert bare not in router.members
    assert p1.popen.poll() is None


# -- 7. membership events -------------------------------------------------------------------------------


def test_membership_events(make_router, make_client):
    router_events: list = []
    router_added: list = []
    router_removed: list = []
    router = make_router(handlers=[router_events.append])
    router.on_member_added(router_added.append)
    router.on_member_removed(router_removed.append)

    a_name, b_name, c_name = unique_name("ev-a"), unique_name("ev-b"), unique_name("ev-c")
    a_events: list = []
    a_order: list = []
    a_added: list = []
    a_removed: list = []
    a, _ = make_client(router.port, app_name=a_name, connect=False)

    def boom(event):
        a_order.append("boom")
        raise RuntimeError("a handler that raises")

    a.add_event_handler(boom)  # logged, never stops the others
    a.add_event_handler(a_events.append)
    a.add_event_handler(lambda e: a_order.append("second"))

    @a.on_member_added
    def on_added(name):
        a_added.append((name, time.monotonic()))

    a.on_member_removed(a_removed.append)
    aconn = a.connect()
    assert wait_until(lambda: router_added == [a_name], 2), router_events

    b, bconn = make_client(router.port, app_name=b_name, connect=False)
    b_events: list = []
    b.add_event_handler(b_events.append)
    joined_at = time.monotonic()
    bconn = b.connect()
    # The new peer hears the one already present, and the old one hears the newcomer.
    assert wait_until(lambda: b_events == [{"type": "connected", "member": a_name}], 2), b_events
    assert wait_until(lambda: a_events == [{"type": "connected", "member": b_name}], 2), a_events
    assert a_added[0][0] == b_name and a_added[0][1] - joined_at < 2
    assert a_order[:2] == ["boom", "second"]
    # Handlers also attach through the connection handle.
    c_seen: list = []
    bconn.on_member_added(c_seen.append)
    bconn.add_event_handler(lambda e: c_seen.append(e["type"]))
    c, _ = make_client(router.port, app_name=c_name)
    assert wait_until(lambda: c_seen == [c_name, "connected"], 2), c_seen
    c.stop()
    assert wait_until(lambda: c_seen == [c_name, "connected", "disconnected"], 2), c_seen
    b.stop()
    assert wait_until(lambda: events_of(a_events, b_name) == ["connected", "disconnected"], 2), a_events
    assert wait_until(lambda: a_removed == [c_name, b_name], 2), a_removed
    assert events_of(a_events, c_name) == ["connected", "disconnected"]
    # Never about itself.
    assert events_of(a_events, a_name) == []
    assert events_of(b_events, b_name) == []
    # The router hears every peer.
    assert wait_until(lambda: router_removed == [c_name, b_name], 2), router_events
    assert router_added == [a_name, b_name, c_name]
    assert events_of(router_events, b_name) == ["connected", "disconnected"]
    assert events_of(router_events, a_name) == ["connected"]
    assert aconn.members == []
    a.stop()
    assert wait_until(lambda: router_removed == [c_name, b_name, a_name], 2), router_events
    assert router.members == []


# -- 8. a callback registered after connect() ---------------------------------------------------------


def test_callback_registered_after_connect_is_callable(cluster):
    conn, (a, b, c) = cluster.conn, cluster.workers
    fn = f"rt_late_{unique_name('fn').replace('-', '_')}"
    err, took = timed(lambda: getattr(conn.rpc(timeout=5), fn)(1))
    assert isinstance(err, TransmissionFailure) and took < 1, err
    router_events_before = len(cluster.router_events)
    assert conn.rpc(timeout=5, receiver=a).rt_add_late(fn) is True
    cluster.procs[a].wait_line(f"registered {fn}")

    def callable_now():
        try:
            return getattr(conn.rpc(timeout=5), fn)(1) == f"{a} late 1"
        except TransmissionFailure:
            return False

    assert wait_until(callable_now, 3), f"{fn} never became callable"
    # Only a exposes it: round-robin and cast find a alone; b cannot be pinned for it.
    assert [getattr(conn.rpc(timeout=5), fn)(i) for i in range(3)] == [f"{a} late {i}" for i in range(3)]
    assert getattr(conn.cast(timeout=5), fn)(7) == {a: f"{a} late 7"}
    err, _ = timed(lambda: getattr(conn.rpc(timeout=5, receiver=b), fn)(1))
    assert isinstance(err, TransmissionFailure)
    # No reconnect, no membership churn.
    assert cluster.caller.connected
    assert [e for e in cluster.router_events[router_events_before:]] == []
    assert conn.cast(timeout=5).rt_whoami() == {a: a, b: b, c: c}


def test_callback_registered_after_connect_in_this_process(make_router, make_client):
    # The worker side in this process: other peers call it without reconnecting.
    router = make_router()
    worker, _ = make_client(router.port, app_name=unique_name("late-worker"))
    caller, conn = make_client(router.port, app_name=unique_name("late-caller"))
    fn = f"rt_inproc_{unique_name('fn').replace('-', '_')}"

    def late(x):
        return ("late", x)

    late.__name__ = late.__qualname__ = fn
    callback(late)
    # Both clients of this process expose it now; a caller never routes to itself, so conn's
    # call lands on `worker`.
    assert wait_until(lambda: _try(lambda: getattr(conn.rpc(timeout=5), fn)(2)) == ("late", 2), 3)
    assert getattr(conn.cast(timeout=5), fn)(3) == {worker.app_name: ("late", 3)}
    assert worker.connected and caller.connected


def _try(fn):
    try:
        return fn()
    except TransmissionFailure:
        return None


# -- 9. duplicate app_name --------------------------------------------------------------------------


def test_duplicate_name_newest_wins(make_router, make_client, spawn):
    router_events: list = []
    router = make_router(handlers=[router_events.append])
    observer, oconn = make_client(router.port, app_name=unique_name("observer"))
    seen: list = []
    observer.add_event_handler(seen.append)
    dup = unique_name("dup")
    old, old_conn = make_client(router.port, app_name=dup)
    assert wait_until(lambda: events_of(seen, dup) == ["connected"], 2), seen
    new = start_workers(spawn, router.port, [dup])[dup]
    # The old holder is told; the observers see it leave and the newcomer join.
    assert wait_until(lambda: not old.connected, 5), "the old client was not evicted"
    assert wait_until(lambda: events_of(seen, dup) == ["connected", "disconnected", "connected"], 2), seen
    assert events_of(router_events, dup) == ["connected", "disconnected", "connected"]
    for attempt in (
        lambda: old_conn.rpc(timeout=5).rt_whoami(),
        lambda: old_conn.rpc(timeout=5, receiver=observer.app_name).anything(),
        lambda: old_conn.rpc_nowait().rt_whoami(),
        lambda: old_conn.cast(timeout=5).rt_whoami(),
    ):
        err, took = timed(attempt)
        assert isinstance(err, Evicted), repr(err)
        assert took < 1
    assert old_conn.members == []
    # Calls to that name reach the newcomer.
    assert oconn.rpc(timeout=5, receiver=dup).rt_pid() == new.pid
    # No ping-pong: a second later nothing changed.
    time.sleep(1.0)
    assert not old.connected
    assert router.members.count(dup) == 1
    assert oconn.members.count(dup) == 1
    assert events_of(seen, dup) == ["connected", "disconnected", "connected"]
    assert new.popen.poll() is None
    assert oconn.rpc(timeout=5, receiver=dup).rt_pid() == new.pid


def test_evicted_client_may_connect_again_explicitly(make_router, make_client):
    router = make_router()
    name = unique_name("dup2")
    first, first_conn = make_client(router.port, app_name=name)
    second, second_conn = make_client(router.port, app_name=name)
    assert wait_until(lambda: not first.connected, 5)
    assert second.connected
    with pytest.raises(Evicted):
        first_conn.rpc(timeout=5).rt_whoami()
    # Taking the name back is a deliberate act: now the second one is evicted.
    first.connect()
    assert wait_until(lambda: not second.connected, 5)
    assert first.connected
    with pytest.raises(Evicted):
        second_conn.rpc(timeout=5).rt_whoami()
    assert router.members == [name]


# -- 10. a worker is SIGKILLed -------------------------------------------------------------------------


def test_killed_worker_leaves_cast_and_round_robin(make_router, make_client, spawn):
    router = make_router()
    k1, k2, k3 = names = [unique_name(f"k{i}") for i in (1, 2, 3)]
    procs = start_workers(spawn, router.port, names)
    client, conn = make_client(router.port)
    conn.wait_for_members(*names, timeout=10)
    # A call in flight to the worker that dies fails at once with Disconnected.
    pending = call_in_thread(conn.rpc(timeout=60, receiver=k2).rt_sleep, 30, tag="doomed")
    procs[k2].wait_line("sleeping doomed", timeout=5)
    killed_at = time.monotonic()
    procs[k2].signal(signal.SIGKILL)
    ok, value, finished_at = pending.get(timeout=10)
    assert not ok and isinstance(value, Disconnected), repr(value)
    assert finished_at - killed_at < 5
    procs[k2].wait(5)
    # The next cast does not wait for the dead worker.
    results, took = timed(lambda: conn.cast(timeout=10).rt_whoami())
    assert took < 3, took
    assert {k: v for k, v in results.items() if k != k2} == {k1: k1, k3: k3}
    if k2 in results:  # only while the router's "left" is still on its way
        assert isinstance(results[k2], GONE), results
    assert wait_until(lambda: k2 not in conn.members, 5), conn.members
    results, took = timed(lambda: conn.cast(timeout=10).rt_whoami())
    assert results == {k1: k1, k3: k3} and took < 1, (results, took)
    hits = collections.Counter(conn.rpc(timeout=10).rt_whoami() for _ in range(4))
    assert hits == {k1: 2, k3: 2}
    err, took = timed(lambda: conn.rpc(timeout=30, receiver=k2).rt_whoami())
    assert isinstance(err, TransmissionFailure) and took < 1
    assert client.connected
    assert k2 not in router.members


def test_worker_leaving_cleanly_fails_its_call_in_flight(make_router, make_client, spawn):
    router = make_router()
    name = unique_name("term")
    proc = start_workers(spawn, router.port, [name])[name]
    _, conn = make_client(router.port)
    conn.wait_for_members(name, timeout=10)
    pending = call_in_thread(conn.rpc(timeout=60).rt_sleep, 30, tag="cut")
    proc.wait_line("sleeping cut", timeout=5)
    time.sleep(0.2)  # let the child settle back into join()
    sent_at = time.monotonic()
    proc.signal(signal.SIGTERM)
    ok, value, finished_at = pending.get(timeout=10)
    assert not ok and isinstance(value, Disconnected), repr(value)
    assert finished_at - sent_at < 3
    assert proc.wait(5) == 0, proc.stderr_text()
    assert wait_until(lambda: name not in conn.members, 5)
    err, took = timed(lambda: conn.rpc(timeout=30).rt_sleep(0))
    assert isinstance(err, TransmissionFailure) and took < 1, (err, took)


def test_killed_worker_without_calls_in_flight(make_router, make_client, spawn):
    router = make_router()
    names = [unique_name(f"q{i}") for i in (1, 2)]
    procs = start_workers(spawn, router.port, names)
    _, conn = make_client(router.port)
    conn.wait_for_members(*names, timeout=10)
    procs[names[0]].signal(signal.SIGKILL)
    procs[names[0]].wait(5)
    # Until the router's "left" arrives, round-robin may still pick the dead worker: such a
    # call fails at once (never waits for its timeout); the others reach the survivor.
    for _ in range(4):
        answer, took = timed(lambda: conn.rpc(timeout=10).rt_whoami())
        assert took < 3, (answer, took)
        assert answer == names[1] or isinstance(answer, GONE), repr(answer)
    assert wait_until(lambda: conn.members == [names[1]], 5), conn.members
    assert [conn.rpc(timeout=10).rt_whoami() for _ in range(3)] == [names[1]] * 3


# -- 11. the Router process is killed --------------------------------------------------------------


def test_killed_router_then_restart(spawn, make_client):
    port = free_port()
    router_name = unique_name("router")
    router = spawn(ROUTER_PY, port, router_name, name="router.py")
    router.wait_line("ready")
    started = threading.Event()
    release = threading.Event()

    def rt_local_wait(tag):
        started.set()
        release.wait(30)
        return tag

    callback(rt_local_wait)
    try:
        worker, wconn = make_client(port, app_name=unique_name("inproc-worker"))
        caller, conn = make_client(port, app_name=unique_name("inproc-caller"))
        conn.wait_for_members(worker.app_name, timeout=5)
        pending = call_in_thread(conn.rpc(timeout=60, receiver=worker.app_name).rt_local_wait, "x")
        assert started.wait(5), "the call never reached the worker"
        killed_at = time.monotonic()
        router.signal(signal.SIGKILL)
        ok, value, finished_at = pending.get(timeout=10)
        assert not ok and isinstance(value, GONE), repr(value)
        assert finished_at - killed_at < 5
        assert wait_until(lambda: not caller.connected and not worker.connected, 5)
        err, took = timed(lambda: conn.rpc(timeout=30).rt_local_wait("y"))
        assert isinstance(err, GONE) and took < 5, (err, took)
        assert conn.members == []
    finally:
        release.set()
    router.wait(5)
    again = spawn(ROUTER_PY, port, router_name, name="router2.py")
    again.wait_line("ready")
    wconn = worker.connect()
    conn = caller.connect()
    conn.wait_for_members(worker.app_name, timeout=5)
    wconn.wait_for_members(caller.app_name, timeout=5)
    assert conn.rpc(timeout=5).rt_local_wait("back") == "back"
    assert caller.connected and worker.connected


# -- 12. Router lifecycle ---------------------------------------------------------------------------


def test_router_stop_is_idempotent_and_frees_the_port(make_client):
    port = free_port()
    router = Router(port=port)
    router.stop()  # before start: nothing to do
    assert router.start() is router
    assert router.port == port
    client, conn = make_client(port)
    assert wait_until(lambda: router.members == [client.app_name], 2)
    stopped_at = time.monotonic()
    router.stop()
    router.stop()
    assert time.monotonic() - stopped_at < 2
    assert router.members == []
    assert wait_until(lambda: not client.connected, 5)
    err, took = timed(lambda: conn.rpc(timeout=30).rt_whoami())
    assert isinstance(err, GONE) and took < 1, (err, took)
    # The port can be bound again at once, by a new router or by the same object.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    router.start()
    try:
        client.connect()
        assert wait_until(lambda: router.members == [client.app_name], 2)
    finally:
        router.stop()
        client.stop()
    with Router(port=port):
        pass


def test_router_context_manager_and_port_zero(make_client):
    with Router(host="127.0.0.1", port=0) as router:
        assert isinstance(router, Router)
        assert isinstance(router.port, int) and router.port > 0
        port = router.port
        client, conn = make_client(port)
        assert wait_until(lambda: client.app_name in router.members, 2)
        with pytest.raises(RuntimeError):
            router.start()
    assert router.members == []
    assert wait_until(lambda: not client.connected, 5)
    with Router(port=port):  # stopped on exit: the port is free again
        pass
    with pytest.raises(KeyError):
        with Router(port=port):
            raise KeyError("boom")
    with Router(port=port):
        pass


def test_router_busy_port_and_second_start():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = Router(port=holder.getsockname()[1])
        with pytest.raises(InitializationError, match="in use"):
            busy.start()
        busy.stop()
    with Router(port=0) as first:
        second = Router(port=first.port)
        with pytest.raises(InitializationError, match="in use"):
            second.start()
        second.stop()
        with pytest.raises(RuntimeError):
            first.start()


def test_router_join_returns_after_stop():
    router = Router(port=0).start()
    done = threading.Event()
    t = threading.Thread(target=lambda: (router.join(), done.set()), daemon=True)
    t.start()
    assert not done.wait(0.2), "join() returned before stop()"
    router.stop()
    assert done.wait(5), "join() still blocked after stop()"


def test_router_over_unix_socket(tmp_path, spawn, make_client):
    path = tmp_path / "r.sock"
    router = Router(unix_sock_path=path).start()
    try:
        assert path.exists()
        name = unique_name("unix-w")
        start_workers(spawn, str(path), [name])
        _, conn = make_client(None, unix_sock_path=path)
        conn.wait_for_members(name, timeout=5)
        assert conn.rpc(timeout=5).rt_whoami() == name
        assert conn.cast(timeout=5, serde=SerdeFormat.OPAQUE).rt_echo(b"u") == {name: b"u"}
    finally:
        router.stop()
    assert not path.exists()


def test_router_token(make_router, make_client):
    router = make_router(token="s3cret")
    for token in (None, "s3creT"):
        started = time.monotonic()
        with pytest.raises(InitializationError, match="authentication failed"):
            make_client(router.port, token=token)
        assert time.monotonic() - started < 3
    assert router.members == []
    client, _ = make_client(router.port, token="s3cret")
    assert wait_until(lambda: router.members == [client.app_name], 2)


# -- 13. workers=N on a worker behind the router ----------------------------------------------------


def test_worker_concurrency_through_the_router(make_router, make_client, spawn):
    router = make_router()
    many, one = unique_name("w4"), unique_name("w1")
    spawn_list = {many: 4, one: 1}
    procs = {n: spawn(WORKER_PY, router.port, n, w, name=f"worker_{n}.py") for n, w in spawn_list.items()}
    for proc in procs.values():
        proc.wait_line("ready")
    _, conn = make_client(router.port)
    conn.wait_for_members(many, one, timeout=10)

    def run_parallel(receiver, count, seconds):
        started = time.monotonic()
        pending = [call_in_thread(conn.rpc(timeout=10, receiver=receiver).rt_sleep, seconds)
                   for _ in range(count)]
        outcomes = [q.get(timeout=15) for q in pending]
        assert all(ok and value == receiver for ok, value, _ in outcomes), outcomes
        return time.monotonic() - started

    took = run_parallel(many, 4, 0.5)
    assert took < 1.5, f"4 calls of 0.5 s on workers=4 took {took:.2f} s"
    took = run_parallel(one, 3, 0.3)
    assert took >= 0.85, f"workers=1 ran calls at once ({took:.2f} s)"
