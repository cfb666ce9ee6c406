"""daffi side of the side-by-side benchmark: whichever ``daffi`` this interpreter imports.

Works unchanged with the reference (daffi==3.0.1 from PyPI) and with ours; both expose
``Service``, ``Router``, ``Client``, ``callback``, ``SerdeFormat`` and ``daffi.aio``. Our build
also reads ``DAFFI_BACKEND=uring|poll``; the peer processes inherit the environment, so one
run measures one backend on both sides.

    python daffi_bench.py run [--seconds 2] [--huge] [--mem] [--only a,b] [--list]

Every workload starts its own peer process(es) (a Service, or a Router plus a worker
Client) on a fresh 127.0.0.1 port, so a failure in one cannot spoil the next.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import common
import daffi
from common import HOST, Peer, Workloads
from daffi import SerdeFormat

# Timeouts are whole seconds: the reference truncates a float timeout with int() (0.5 means
# "no deadline") and checks deadlines against a coarse clock, so small ones misfire.
CALL_TIMEOUT = 30
HUGE_TIMEOUT = 600
BIG_MESSAGE_LIMIT = 4 * common.GiB  # for the 1 GiB and 2 GiB rows only
WORKER_NAME = "bench-worker"
THREADS = 8
CONCURRENT_SERVICE_WORKERS = 4

W = Workloads()


def echo(payload):
    """The callback of every call row: returns its argument (OPAQUE: the same bytes object)."""
    return payload


class Sink:
    """The stream row's callbacks: ``sink`` counts the bytes of each chunk, ``received``
    reports the count so far."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total = 0

    def sink(self, chunk) -> None:
        with self.lock:
            self.total += len(chunk)

    def received(self) -> int:
        with self.lock:
            return self.total


# --- peer processes ---------------------------------------------------------------------


def node(cls, big: bool, **kwargs):
    """``cls(**kwargs)``; with ``big``, raise the message size limit where there is one.

    Ours takes ``max_message_size`` (default 1 GiB, which a 1 GiB payload plus its framing
    exceeds); the reference has a fixed 32 MiB cap and no such option (TypeError).
    """
    if big:
        try:
            return cls(**kwargs, max_message_size=BIG_MESSAGE_LIMIT)
        except TypeError:
            pass
    return cls(**kwargs)


def serve_async(ready, port: int, workers: int) -> None:
    """An AsyncService whose ``echo`` is a coroutine, on the default event loop."""
    from daffi.aio import AsyncService

    async def echo(payload):
        return payload

    daffi.callback(echo)

    async def main() -> None:
        service = AsyncService(host=HOST, port=port, workers=workers)
        await service.start()
        ready()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, common.wait_for_stdin_eof)
        common.hard_exit_after(1.0)  # like the reference's sync stop, its async one may hang
        await service.stop()

    asyncio.run(main())


def serve(ready, kind: str, port: str, arg: str = "", big: str = "", workers: str = "1") -> None:
    """``serve service PORT WORKERS [big]`` | ``serve aservice PORT WORKERS`` |
    ``serve router PORT`` | ``serve worker PORT NAME [big] [WORKERS]``."""
    if kind == "aservice":
        serve_async(ready, int(port), int(arg))
        return
    if kind == "router":
        server = daffi.Router(host=HOST, port=int(port))
        server.start()
    else:
        daffi.callback(echo)  # registered only here: callers must not expose echo
        if kind == "service":
            counter = Sink()
            daffi.callback(counter.sink)
            daffi.callback(counter.received)
            server = node(daffi.Service, bool(big), host=HOST, port=int(port), workers=int(arg))
            server.start()
        else:
            server = node(daffi.Client, bool(big), app_name=arg, host=HOST, port=int(port),
                          workers=int(workers))
            server.connect()
    ready()
    common.wait_for_stdin_eof()
    common.hard_exit_after(1.0)  # the reference's Service.stop() never returns
    server.stop()


@contextmanager
def service(workers: int = 1, big: bool = False) -> Iterator[tuple[int, Peer]]:
    port = common.free_port()
    with Peer("service", str(port), str(workers), "big" if big else "") as peer:
        yield port, peer


@contextmanager
def connected(port: int, big: bool = False) -> Iterator[object]:
    client = node(daffi.Client, big, host=HOST, port=port)
    conn = client.connect()
    try:
        yield conn
    finally:
        client.stop()


def checked(call, payload):
    """``call`` bound to ``payload``, after checking once that the echo is exact."""
    reply = call(payload)
    if reply != payload:
        raise AssertionError(f"echo mismatch: sent {type(payload)}, got {type(reply)}")
    return lambda: call(payload)


def pickled_size(payload) -> int:
    return len(pickle.dumps(((payload,), {})))


# --- sequential small calls -------------------------------------------------------------


@W.add("seq_pickle_1k5")
def seq_pickle(opts) -> dict:
    payload = common.small_dict()
    with service() as (port, _), connected(port) as conn:
        call = checked(conn.rpc(timeout=CALL_TIMEOUT).echo, payload)
        result = common.calls_per_second(call, opts.seconds)
    return {**result, "payload_bytes": pickled_size(payload)}


@W.add("seq_opaque_1k5")
def seq_opaque(opts) -> dict:
    payload = common.small_bytes()
    with service() as (port, _), connected(port) as conn:
        call = checked(conn.rpc(timeout=CALL_TIMEOUT, serde=SerdeFormat.OPAQUE).echo, payload)
        result = common.calls_per_second(call, opts.seconds)
    return {**result, "payload_bytes": len(payload)}


# --- large OPAQUE echo ------------------------------------------------------------------


@contextmanager
def opaque_echo(big: bool):
    with service(big=big) as (port, peer), connected(port, big) as conn:
        yield conn.rpc(timeout=HUGE_TIMEOUT if big else CALL_TIMEOUT, serde=SerdeFormat.OPAQUE).echo, peer


common.add_echo_workloads(W, opaque_echo)


# --- one-way stream ---------------------------------------------------------------------

STREAM_CHUNK = common.MiB
STREAM_WINDOW = 64  # chunks sent but not yet counted by the Service, at most


@W.add("stream_1MiB")
def stream_1mib(opts) -> dict:
    """``stream_nowait`` of 1 MiB OPAQUE chunks to a Service that counts them: bytes counted
    by the Service per second, from the first chunk sent to the last one counted."""
    chunk = common.big_bytes(STREAM_CHUNK)
    with service() as (port, _), connected(port) as conn:
        send = conn.stream_nowait(serde=SerdeFormat.OPAQUE).sink
        received = conn.rpc(timeout=CALL_TIMEOUT).received

        def counted_at_least(total: int) -> int:
            while (got := received()) < total:
                pass
            return got

        for _ in range(8):  # warmup
            send(chunk)
        sent = base = counted_at_least(8 * STREAM_CHUNK)
        start = time.perf_counter()
        deadline = start + opts.seconds
        while time.perf_counter() < deadline:
            for _ in range(STREAM_WINDOW // 2):
                send(chunk)
            sent += STREAM_WINDOW // 2 * STREAM_CHUNK
            # Keep at most STREAM_WINDOW chunks in flight: neither side may buffer the run.
            counted_at_least(sent - STREAM_WINDOW // 2 * STREAM_CHUNK)
        got = counted_at_least(sent)
        elapsed = time.perf_counter() - start
    if got != sent:
        raise AssertionError(f"the Service counted {got} bytes, {sent} were sent")
    moved = sent - base
    return {"value": moved / elapsed / common.GiB, "unit": "GiB/s", "bytes": moved,
            "seconds": round(elapsed, 3)}


# --- concurrent callers (threads) -------------------------------------------------------


@W.add("conc8_shared")
def conc8_shared(opts) -> dict:
    """8 threads calling through ONE connection; Service(workers=4)."""
    payload = common.small_dict()
    with service(CONCURRENT_SERVICE_WORKERS) as (port, _), connected(port) as conn:
        call = checked(conn.rpc(timeout=CALL_TIMEOUT).echo, payload)
        return common.threaded_calls_per_second([call] * THREADS, opts.seconds)


@W.add("conc8_per_client")
def conc8_per_client(opts) -> dict:
    """8 threads, each with its own Client and connection; Service(workers=4)."""
    payload = common.small_dict()
    with service(CONCURRENT_SERVICE_WORKERS) as (port, _), ExitStack() as stack:
        conns = [stack.enter_context(connected(port)) for _ in range(THREADS)]
        calls = [checked(c.rpc(timeout=CALL_TIMEOUT).echo, payload) for c in conns]
        return common.threaded_calls_per_second(calls, opts.seconds)


# --- Router topology --------------------------------------------------------------------


@W.add("router_seq_pickle")
def router_seq_pickle(opts) -> dict:
    """Caller → Router → worker Client, each in its own process."""
    payload = common.small_dict()
    with routed() as port, connected(port) as conn:
        wait_workers(conn, 1)
        call = checked(conn.rpc(timeout=CALL_TIMEOUT).echo, payload)
        result = common.calls_per_second(call, opts.seconds)
    return {**result, "payload_bytes": pickled_size(payload)}


@contextmanager
def routed(workers: int = 1, worker_threads: int = 1) -> Iterator[int]:
    """A Router and ``workers`` worker Clients (each its own process); yields the port."""
    port = common.free_port()
    with Peer("router", str(port)), ExitStack() as stack:
        for i in range(workers):
            stack.enter_context(Peer("worker", str(port), f"{WORKER_NAME}-{i}", "", str(worker_threads)))
        yield port


def wait_workers(conn, workers: int) -> None:
    conn.wait_for_members(*(f"{WORKER_NAME}-{i}" for i in range(workers)), timeout=CALL_TIMEOUT)


@W.add("router_seq_opaque")
def router_seq_opaque(opts) -> dict:
    """Caller → Router → worker Client, OPAQUE 1.5 KB."""
    payload = common.small_bytes()
    with routed() as port, connected(port) as conn:
        wait_workers(conn, 1)
        call = checked(conn.rpc(timeout=CALL_TIMEOUT, serde=SerdeFormat.OPAQUE).echo, payload)
        result = common.calls_per_second(call, opts.seconds)
    return {**result, "payload_bytes": len(payload)}


@W.add("router_echo_28MiB")
def router_echo_28mib(opts) -> dict:
    """28 MiB OPAQUE echo through a Router: (2 x size) / round trip."""
    with routed() as port, connected(port) as conn:
        wait_workers(conn, 1)
        echo = conn.rpc(timeout=CALL_TIMEOUT, serde=SerdeFormat.OPAQUE).echo
        return common.echo_gib_per_s(echo, common.LARGE_ECHO_SIZES["echo_28MiB"], opts.seconds)


@W.add("router_conc8")
def router_conc8(opts) -> dict:
    """8 threads, one Client each, through a Router to 2 workers (workers=4 each)."""
    payload = common.small_dict()
    with routed(2, CONCURRENT_SERVICE_WORKERS) as port, ExitStack() as stack:
        conns = [stack.enter_context(connected(port)) for _ in range(THREADS)]
        for c in conns:
            wait_workers(c, 2)
        calls = [checked(c.rpc(timeout=CALL_TIMEOUT).echo, payload) for c in conns]
        return common.threaded_calls_per_second(calls, opts.seconds)


# --- asyncio ----------------------------------------------------------------------------


async def async_rate(calls, seconds: float, warmup: int = 20) -> dict:
    """The asyncio twin of common.threaded_calls_per_second: one task per coroutine factory."""
    loop = asyncio.get_running_loop()
    for call in calls:
        for _ in range(warmup):
            await call()
    end = loop.time() + seconds

    async def task(call) -> int:
        n = 0
        while True:
            await call()
            if loop.time() > end:
                return n
            n += 1

    total = sum(await asyncio.gather(*(task(c) for c in calls)))
    return {
        "value": total / seconds,
        "unit": "calls/s",
        "calls": total,
        "tail_s": round(loop.time() - end, 3),
    }


def aio_workload(tasks: int, service_workers: int):
    """``tasks`` asyncio tasks calling through one AsyncClient connection, against an
    AsyncService with ``service_workers`` (its peer process)."""

    def workload(opts) -> dict:
        from daffi.aio import AsyncClient

        payload = common.small_dict()

        async def measure(port: int) -> dict:
            client = AsyncClient(host=HOST, port=port)
            conn = await client.connect()
            try:
                proxy = conn.rpc(timeout=CALL_TIMEOUT)
                if await proxy.echo(payload) != payload:
                    raise AssertionError("echo mismatch")
                return await async_rate([lambda: proxy.echo(payload)] * tasks, opts.seconds)
            finally:
                await client.stop()

        port = common.free_port()
        with Peer("aservice", str(port), str(service_workers)):
            return asyncio.run(measure(port))

    return workload


W.add("aio_seq_pickle")(aio_workload(tasks=1, service_workers=1))
W.add("aio_conc8")(aio_workload(tasks=THREADS, service_workers=CONCURRENT_SERVICE_WORKERS))
W.add("aio_conc200")(aio_workload(tasks=200, service_workers=10))


def main() -> None:
    opts = common.parser(__doc__.splitlines()[0]).parse_args()
    if opts.cmd == "serve":
        common.run_peer(serve, opts.args)
        return
    meta = {
        "impl": "daffi",
        "daffi_version": getattr(daffi, "__version__", "?"),
        "daffi_path": os.path.dirname(daffi.__file__),
        "backend": os.environ.get("DAFFI_BACKEND", ""),
    }
    try:  # ours says which I/O backend it actually uses; the reference has no such thing
        from daffi import _native

        meta["backend_resolved"] = _native.resolve_backend()
    except Exception:  # noqa: BLE001 - optional information
        pass
    common.main_run(opts, W, meta)


if __name__ == "__main__":
    sys.exit(main())
