"""Back-pressure: a Client that sends faster than a Service runs its callbacks is held back,
so neither process holds more than a bounded amount of what is in transit; nothing is lost."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from daffi import Client, SerdeFormat

CHUNKS = 400
CHUNK = 1 << 20

SLOW_SERVICE = textwrap.dedent(
    """
    import sys
    import time
    from daffi import Service, callback

    got = []

    @callback
    def sink(chunk):
        got.append(chunk[:8])
        time.sleep(0.001)

    @callback
    def summary():
        return len(got), got[0], got[-1], open("/proc/self/status").read()

    service = Service(host="127.0.0.1", port=0)
    service.start()
    print(service.port, flush=True)
    sys.stdin.read()
    """
)


def peak_rss_mib(status: str) -> float:
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def own_peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return peak_rss_mib(f.read())


@contextmanager
def slow_peer(script: str) -> Iterator[int]:
    """``script`` (SLOW_SERVICE or SLOW_ASYNC_SERVICE) in a child process: yields its port."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.stdin.close()
        proc.wait(10)


def distinct_chunks(n: int = CHUNKS, size: int = CHUNK) -> Iterator[bytes]:
    """``n`` chunks of ``size`` bytes, chunk ``i`` made of ``i``'s 8 bytes: a fresh object each
    time (queued chunks would all stay alive), and the receiver can tell which one it got."""
    for i in range(n):
        yield i.to_bytes(8, "little") * (size // 8)


def all_of(n: int) -> tuple:
    """What a summary says when chunks 0 to n - 1 all arrived, in order."""
    return n, (0).to_bytes(8, "little"), (n - 1).to_bytes(8, "little")


def test_stream_nowait_of_a_large_source_keeps_both_sides_bounded():
    with slow_peer(SLOW_SERVICE) as port:
        client = Client(host="127.0.0.1", port=port)
        conn = client.connect()
        before = own_peak_rss_mib()
        conn.stream_nowait(serde=SerdeFormat.OPAQUE).sink(distinct_chunks())
        grown = own_peak_rss_mib() - before
        count, first, last, status = conn.rpc(timeout=60).summary()
        client.stop()
    assert (count, first, last) == all_of(CHUNKS)
    # Without back-pressure each side would hold most of the 400 MiB at some point.
    assert grown < 120, f"the sender grew by {grown:.0f} MiB"
    assert peak_rss_mib(status) < 250, f"the Service peaked at {peak_rss_mib(status):.0f} MiB"


def test_back_pressure_waits_without_the_gil():
    # A sender held back must not stop the other threads of its process: here the Service's
    # own workers run in the same process as the flooding client.
    script = textwrap.dedent(
        """
        import time
        from daffi import Client, SerdeFormat, Service, callback

        seen = []

        @callback
        def sink(chunk):
            seen.append(len(chunk))
            time.sleep(0.001)

        service = Service(host="127.0.0.1", port=0)
        service.start()
        client = Client(host="127.0.0.1", port=service.port)
        conn = client.connect()
        data = (i.to_bytes(8, "little") * (1 << 17) for i in range(300))
        conn.stream_nowait(serde=SerdeFormat.OPAQUE).sink(data)
        conn.rpc(timeout=60).sink(b"12345678")
        print("ran", len(seen), flush=True)
        client.stop()
        service.stop()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    assert "ran 301" in done.stdout


def test_a_sender_held_back_by_a_frozen_peer_can_be_interrupted():
    service = subprocess.Popen([sys.executable, "-c", SLOW_SERVICE], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    sender = None
    try:
        port = int(service.stdout.readline())
        sender = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import sys
                from daffi import Client, SerdeFormat
                conn = Client(host="127.0.0.1", port={port}).connect()
                print("connected", flush=True)
                sys.stdin.readline()
                chunk = b"x" * (1 << 20)
                send = conn.rpc_nowait(serde=SerdeFormat.OPAQUE).sink
                print("sending", flush=True)
                try:
                    for i in range(10_000):
                        send(chunk)
                except KeyboardInterrupt:
                    print("interrupted", flush=True)
                    sys.exit(0)
                print("never held back", flush=True)
            """)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert sender.stdout.readline().strip() == "connected"
        service.send_signal(signal.SIGSTOP)  # alive, connected, reading nothing
        sender.stdin.write("go\n")
        sender.stdin.flush()
        assert sender.stdout.readline().strip() == "sending"
        # Past the kernel's socket buffers and the 16 MiB the client may queue, it waits (else
        # it would be done at once and say so).
        time.sleep(1.5)
        sender.send_signal(signal.SIGINT)
        out, _ = sender.communicate(timeout=10)
        assert out.strip() == "interrupted"
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
        service.send_signal(signal.SIGCONT)
        service.stdin.close()
        service.kill()
        service.wait(10)


SLOW_ASYNC_SERVICE = textwrap.dedent(
    """
    import asyncio
    import sys
    import time

    from daffi import callback
    from daffi.aio import AsyncService

    got = []

    @callback
    async def asink(chunk):
        got.append(chunk[:8])
        await asyncio.sleep(0.001)

    @callback
    async def asink_small(chunk):
        got.append(chunk[:8])
        await asyncio.sleep(0)  # a lap of the loop, in which it reads more calls
        time.sleep(0.0001)

    @callback
    async def asummary():
        return len(got), got[0], got[-1], open("/proc/self/status").read()

    async def main():
        async with AsyncService(host="127.0.0.1", port=0) as service:
            print(service.port, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
    """
)


def test_an_async_service_behind_on_its_calls_holds_its_sender_back():
    """The AsyncService counterpart of the test above: its event loop reads its socket itself,
    and stops (handing the reading back to the engine, which throttles) while its callbacks
    are behind; the sender waits."""
    with slow_peer(SLOW_ASYNC_SERVICE) as port:
        client = Client(host="127.0.0.1", port=port)
        conn = client.connect()
        conn.stream_nowait(serde=SerdeFormat.OPAQUE).asink(distinct_chunks())
        count, first, last, status = conn.rpc(timeout=60).asummary()
        client.stop()
    assert (count, first, last) == all_of(CHUNKS)
    assert peak_rss_mib(status) < 250, f"the AsyncService peaked at {peak_rss_mib(status):.0f} MiB"


def test_an_async_service_flooded_with_small_calls_stays_bounded():
    """Small calls are read by the AsyncService's loop itself: while its consumers are behind,
    it stops taking them, its socket goes back to the engine, which stops reading, and the
    sender waits. 26000 calls of 12 KiB (305 MiB) to a callback slower than the reading."""
    n = 26000
    with slow_peer(SLOW_ASYNC_SERVICE) as port:
        client = Client(host="127.0.0.1", port=port)
        conn = client.connect()
        send = conn.rpc_nowait(serde=SerdeFormat.OPAQUE).asink_small
        for chunk in distinct_chunks(n, 12288):
            send(chunk)
        count, first, last, status = conn.rpc(timeout=120).asummary()
        client.stop()
    assert (count, first, last) == all_of(n)
    # Without back-pressure the Service held most of the 312 MiB (measured: 842 MiB peak for
    # 100000 such calls before it existed).
    assert peak_rss_mib(status) < 200, f"the AsyncService peaked at {peak_rss_mib(status):.0f} MiB"


def test_an_async_sender_waits_for_a_slow_peer_without_blocking_its_loop():
    """An AsyncClient's stream_nowait of 400 distinct 1 MiB chunks to a Service that sleeps 1 ms
    per chunk: the sender holds a bounded part of them at a time, awaiting room rather than
    blocking its event loop, which keeps turning; nothing is lost."""
    import asyncio

    from daffi.aio import AsyncClient

    with slow_peer(SLOW_SERVICE) as port:

        async def main():
            async with AsyncClient(host="127.0.0.1", port=port) as client:
                conn = client.connection
                before = own_peak_rss_mib()
                ticks = 0

                async def ticker():
                    nonlocal ticks
                    while True:
                        await asyncio.sleep(0.01)
                        ticks += 1

                tick_task = asyncio.get_running_loop().create_task(ticker())
                streamed = asyncio.Event()

                async def asker():
                    # Answers arriving while the sender waits: the loop reads them itself,
                    # and must still hear that there is room again.
                    while not streamed.is_set():
                        await conn.rpc(timeout=60).summary()

                ask_task = asyncio.get_running_loop().create_task(asker())
                await conn.stream_nowait(serde=SerdeFormat.OPAQUE).sink(distinct_chunks())
                streamed.set()
                await ask_task
                grown = own_peak_rss_mib() - before
                summary = await conn.rpc(timeout=60).summary()
                tick_task.cancel()
                return grown, ticks, summary

        grown, ticks, (count, first, last, status) = asyncio.run(main())
    assert (count, first, last) == all_of(CHUNKS)
    # Without back-pressure the sender held most of the 400 MiB at once.
    assert grown < 120, f"the sender grew by {grown:.0f} MiB"
    assert ticks > 5, "the event loop did not turn while the sender waited"


ROUTER = textwrap.dedent(
    """
    import sys
    from daffi import Router

    router = Router(host="127.0.0.1", port=0)
    router.start()
    print(router.port, flush=True)
    sys.stdin.read()
    """
)

ROUTED_SINK = textwrap.dedent(
    """
    import sys
    from daffi import Client, callback

    got = []

    @callback
    def rsink(chunk):
        got.append(chunk[:8])

    @callback
    def rsummary():
        return len(got), got[0], got[-1]

    Client(app_name="rsink-worker", host="127.0.0.1", port=int(sys.argv[1])).connect()
    print("connected", flush=True)
    sys.stdin.read()
    """
)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@contextmanager
def routed(*workers: tuple[str, ...]) -> Iterator[tuple[int, list[subprocess.Popen]]]:
    """A Router, then each ``(script, *args)`` of ``workers`` (a worker Client printing
    ``connected``, run with the Router's port and ``args``), in child processes: yields the
    port and the processes, the Router first."""
    procs = [subprocess.Popen([sys.executable, "-c", ROUTER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)]
    try:
        port = int(procs[0].stdout.readline())
        for script, *args in workers:
            proc = subprocess.Popen([sys.executable, "-c", script, str(port), *args],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout.readline().strip() == "connected"
        yield port, procs
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGCONT)
            proc.stdin.close()
            proc.kill()
            proc.wait(10)


@contextmanager
def connected(port: int, name: str, *members: str) -> Iterator[object]:
    """A Client named ``name`` connected to the Router on ``port``, once ``members`` are."""
    client = Client(app_name=name, host="127.0.0.1", port=port)
    try:
        conn = client.connect()
        conn.wait_for_members(*members, timeout=10)
        yield conn
    finally:
        client.stop()


def test_a_router_holds_back_a_sender_whose_receiver_is_frozen():
    # The Router queues at most about 16 MiB for a peer that reads nothing; then it stops
    # reading the sender, whose own sends wait in turn. Nothing is lost once the peer reads.
    with routed((ROUTED_SINK,)) as (port, (router, worker)), \
            connected(port, "rsink-sender", "rsink-worker") as conn:
        before = rss_mib(router.pid)
        worker.send_signal(signal.SIGSTOP)
        chunks = 200
        sending = threading.Thread(
            target=lambda: conn.stream_nowait(receiver="rsink-worker", serde=SerdeFormat.OPAQUE)
            .rsink(distinct_chunks(chunks)),
            daemon=True)
        sending.start()
        time.sleep(3)
        held = rss_mib(router.pid) - before
        # The sender waits: without the Router holding it back, it would be done by now and
        # the Router would hold nearly all 200 MiB.
        assert sending.is_alive(), "the sender was never held back"
        assert held < 90, f"the Router holds {held:.0f} MiB for a frozen peer"
        worker.send_signal(signal.SIGCONT)
        sending.join(60)
        assert not sending.is_alive()
        summary = conn.rpc(timeout=60, receiver="rsink-worker").rsummary()
        assert tuple(summary) == all_of(chunks)


SLOW_ROUTED_WORKER = textwrap.dedent(
    """
    import sys
    import time
    from daffi import Client, callback

    got = []
    answers = []

    @callback
    def slow_rsink(chunk):
        got.append(chunk[:8])
        time.sleep(0.003)
        if len(got) % 50 == 0:
            # A callback waiting for an answer on the connection its worker reads: the
            # worker must read on for it, however far behind its callbacks are.
            answers.append(conn.rpc(timeout=30, receiver="pong-worker").rpong(len(got)))

    @callback
    def slow_rsummary():
        return len(got), got[0], got[-1], answers, open("/proc/self/status").read()

    conn = Client(app_name="slow-rsink", host="127.0.0.1", port=int(sys.argv[1])).connect()
    print("connected", flush=True)
    sys.stdin.read()
    """
)

PONG_WORKER = textwrap.dedent(
    """
    import sys
    from daffi import Client, callback

    @callback
    def rpong(n):
        return -n

    Client(app_name="pong-worker", host="127.0.0.1", port=int(sys.argv[1])).connect()
    print("connected", flush=True)
    sys.stdin.read()
    """
)


def test_a_slow_worker_behind_a_router_holds_its_senders_back():
    # The worker's callbacks fall behind: it stops reading (its callbacks' own calls still get
    # their answers), the Router then stops reading the sender, whose sends wait. Every
    # process stays bounded; nothing is lost.
    with routed((SLOW_ROUTED_WORKER,), (PONG_WORKER,)) as (port, procs), \
            connected(port, "slow-rsink-sender", "slow-rsink", "pong-worker") as conn:
        conn.stream_nowait(receiver="slow-rsink", serde=SerdeFormat.OPAQUE).slow_rsink(
            distinct_chunks())
        count, first, last, answers, status = conn.rpc(timeout=60, receiver="slow-rsink") \
            .slow_rsummary()
        with open(f"/proc/{procs[0].pid}/status") as f:
            router_peak = peak_rss_mib(f.read())
    assert (count, first, last) == all_of(CHUNKS)
    assert answers == [-n for n in range(50, CHUNKS + 1, 50)]
    # Without back-pressure the worker would hold most of the 400 MiB at some point.
    assert peak_rss_mib(status) < 200, f"the worker peaked at {peak_rss_mib(status):.0f} MiB"
    assert router_peak < 150, f"the Router peaked at {router_peak:.0f} MiB"


BLOB_ASYNC_SERVICE = textwrap.dedent(
    """
    import asyncio
    import sys

    from daffi import callback
    from daffi.aio import AsyncService

    gate = None

    @callback
    async def ablob(i):
        await gate.wait()  # opened by the test once the caller reads nothing any more
        return i.to_bytes(8, "little") * (1 << 17)  # 1 MiB, distinct per call

    async def main():
        global gate
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()
        async with AsyncService(host="127.0.0.1", port=0, workers=4) as service:
            print(service.port, flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)
            gate.set()
            await loop.run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
    """
)

BLOB_CALLER = textwrap.dedent(
    """
    import asyncio
    import sys

    from daffi.aio import AsyncClient

    async def main():
        client = AsyncClient(host="127.0.0.1", port=int(sys.argv[1]))
        conn = await client.connect()
        calls = [conn.rpc(timeout=60).ablob(i) for i in range(200)]
        print("sending", flush=True)
        blobs = await asyncio.gather(*calls)
        right = all(b == i.to_bytes(8, "little") * (1 << 17) for i, b in enumerate(blobs))
        print("got", len(blobs), right, flush=True)
        await client.stop()

    asyncio.run(main())
    """
)


def test_an_async_service_answering_a_frozen_caller_stays_bounded():
    # 200 calls for 1 MiB answers each, and the caller then reads nothing: the AsyncService's
    # callbacks wait for room instead of piling up answers. Every answer arrives later.
    service = subprocess.Popen([sys.executable, "-c", BLOB_ASYNC_SERVICE], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    caller = None
    try:
        port = int(service.stdout.readline())
        before = rss_mib(service.pid)
        caller = subprocess.Popen([sys.executable, "-c", BLOB_CALLER, str(port)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert caller.stdout.readline().strip() == "sending"
        time.sleep(0.5)  # the requests leave together, in the loop's next turn
        caller.send_signal(signal.SIGSTOP)
        service.stdin.write("go\n")  # the callbacks answer from now on
        service.stdin.flush()
        time.sleep(2)
        held = rss_mib(service.pid) - before
        caller.send_signal(signal.SIGCONT)
        out, _ = caller.communicate(timeout=60)
    finally:
        for proc in (caller, service):
            if proc is not None:
                proc.send_signal(signal.SIGCONT)
                proc.stdin.close()
                proc.kill()
                proc.wait(10)
    assert out.split() == ["got", "200", "True"]
    # Without the wait it would hold most of the 200 MiB of answers; with it, about the
    # 16 MiB allowed (less would mean the answers were not made while the caller was stopped).
    assert 8 < held < 90, f"the AsyncService holds {held:.0f} MiB of answers"


PING_PONG_WORKER = textwrap.dedent(
    """
    import sys
    import time
    from daffi import Client, SerdeFormat, callback

    me, other = sys.argv[2], sys.argv[3]
    back = []

    @callback
    def relay_on(chunk, hops):
        # Slow, and passes every chunk on to the other worker, which passes it back: each
        # worker's callbacks wait for room to send to the other.
        time.sleep(0.002)
        if hops:
            conn.rpc_nowait(receiver=other, serde=SerdeFormat.PICKLE).relay_on(chunk, hops - 1)
        else:
            back.append(chunk[:8])

    @callback
    def relayed():
        return len(back)

    conn = Client(app_name=me, host="127.0.0.1", port=int(sys.argv[1])).connect()
    print("connected", flush=True)
    sys.stdin.read()
    """
)


def test_workers_flooding_each_other_through_a_router_never_wait_for_ever():
    # Two workers whose callbacks fall behind while each sends to the other: a worker that
    # stopped reading (its callbacks behind) reads again as soon as one of its senders waits
    # for room, else each would wait for the other for ever.
    workers = ((PING_PONG_WORKER, "ping-w", "pong-w"), (PING_PONG_WORKER, "pong-w", "ping-w"))
    with routed(*workers) as (port, _), \
            connected(port, "ping-pong-sender", "ping-w", "pong-w") as conn:
        send = conn.rpc_nowait(receiver="ping-w", serde=SerdeFormat.PICKLE).relay_on
        # ping -> pong -> ping -> pong -> ping; the sends themselves wait while ping is behind.
        sending = threading.Thread(
            target=lambda: [send(chunk, 4) for chunk in distinct_chunks(400)], daemon=True)
        sending.start()
        sending.join(45)
        assert not sending.is_alive(), "the workers wait for each other"
        deadline = time.monotonic() + 45
        relayed = 0
        while relayed < 400 and time.monotonic() < deadline:
            try:
                # Behind the calls ping has not run yet.
                relayed = conn.rpc(timeout=10, receiver="ping-w").relayed()
            except TimeoutError:
                continue
            time.sleep(0.2)
    assert relayed == 400


ASYNC_WAITING_WORKER = textwrap.dedent(
    """
    import asyncio
    import sys

    from daffi import callback
    from daffi.aio import AsyncClient

    conn = None
    got = []

    @callback
    async def await_member(name):
        # Runs first, while the chunks pile up behind it: the worker stops reading, yet must
        # hear of the member joining.
        await conn.wait_for_members(name, timeout=30)
        return "joined"

    @callback
    async def wm_sink(chunk):
        got.append(chunk[:8])

    @callback
    async def wm_count():
        return len(got)

    async def main():
        global conn
        client = AsyncClient(app_name="member-waiter", host="127.0.0.1", port=int(sys.argv[1]),
                             workers=1)
        conn = await client.connect()
        print("connected", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
    """
)


def test_a_worker_behind_still_hears_of_a_member_it_waits_for():
    with routed((ASYNC_WAITING_WORKER,)) as (port, _), \
            connected(port, "member-flood", "member-waiter") as conn:
        waiting = call_in_thread(conn.rpc(timeout=40, receiver="member-waiter").await_member,
                                 "late-member")
        conn.stream_nowait(receiver="member-waiter", serde=SerdeFormat.OPAQUE).wm_sink(
            distinct_chunks(150))
        time.sleep(0.5)
        late = Client(app_name="late-member", host="127.0.0.1", port=port)
        late.connect()
        try:
            assert waiting.get(timeout=40) == "joined"
        finally:
            late.stop()
        assert conn.rpc(timeout=60, receiver="member-waiter").wm_count() == 150


def call_in_thread(fn, *args) -> queue.Queue:
    """``fn(*args)`` in a thread: its result (or exception) lands in the returned queue."""
    out: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            out.put(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.put(exc)

    threading.Thread(target=run, daemon=True).start()
    return out


LATE_CALLING_WORKER = textwrap.dedent(
    """
    import sys
    import time

    from daffi import Client, callback

    conn = None
    got = []

    @callback
    def call_late(name, style):
        # Runs first, while the chunks pile up behind it (one worker thread): the worker stops
        # reading before `name` joins, then calls it, the first call in the given style.
        time.sleep(4)
        if style == "rpc":
            return conn.rpc(timeout=20, receiver=name).late_ping()
        if style == "short_timeout":
            # Waiting for news of a receiver never outlasts the call's own timeout.
            started = time.monotonic()
            try:
                conn.cast(timeout=0.3, receiver=["nobody-at-all"]).late_ping()
            except Exception as exc:
                return type(exc).__name__, time.monotonic() - started < 0.9
            return "no error", None
        if style == "cast":
            return conn.cast(timeout=20).late_ping()
        if style == "cast_nowait":
            conn.cast_nowait(receiver=[name]).late_note("n1")
        elif style == "stream":
            conn.stream(timeout=20, receiver=name).late_note([b"s1", b"s2"])
        return conn.rpc(timeout=20, receiver=name).late_notes()

    @callback
    def lc_sink(chunk):
        got.append(chunk[:8])

    @callback
    def lc_count():
        return len(got)

    client = Client(app_name="late-caller", host="127.0.0.1", port=int(sys.argv[1]), workers=1)
    conn = client.connect()
    print("connected", flush=True)
    sys.stdin.read()
    """
)

LATE_MEMBER = textwrap.dedent(
    """
    import sys

    from daffi import Client, callback

    notes = []

    @callback
    def late_ping():
        return "pong"

    @callback
    def late_note(note):
        notes.append(note if isinstance(note, str) else bytes(note).decode())

    @callback
    def late_notes():
        return notes

    client = Client(app_name="late-member", host="127.0.0.1", port=int(sys.argv[1]))
    client.connect()
    print("connected", flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize(("style", "expected"), [
    ("rpc", "pong"),
    ("cast", {"late-member": "pong"}),
    ("cast_nowait", ["n1"]),
    ("stream", ["s1", "s2"]),
    ("short_timeout", ("TransmissionFailure", True)),
])
def test_a_worker_behind_can_call_a_peer_that_joined_meanwhile(style, expected):
    with routed((LATE_CALLING_WORKER,)) as (port, _), \
            connected(port, "late-flood", "late-caller") as conn:
        calling = call_in_thread(conn.rpc(timeout=40, receiver="late-caller").call_late,
                                 "late-member", style)
        # More than the worker takes before it stops reading (64 MiB): the sender blocks until
        # the callback is done, so it streams from a thread of its own.
        streaming = call_in_thread(
            conn.stream_nowait(receiver="late-caller", serde=SerdeFormat.OPAQUE).lc_sink,
            distinct_chunks(150))
        time.sleep(1)
        # Joins while the worker does not read, well before the callback calls it.
        late = subprocess.Popen([sys.executable, "-c", LATE_MEMBER, str(port)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert late.stdout.readline().strip() == "connected"
            assert calling.get(timeout=40) == expected
            assert streaming.get(timeout=40) is None
        finally:
            late.stdin.close()
            late.kill()
            late.wait(10)
        assert conn.rpc(timeout=60, receiver="late-caller").lc_count() == 150
