"""Helpers shared by the side-by-side benchmark scripts in this folder.

Every script here (daffi_bench.py, zmq_bench.py, socket_bench.py) has the same shape:

* ``python SCRIPT run [options]`` measures a list of named workloads and prints ONE JSON
  object on stdout: ``{"contender": ..., "workloads": {name: result}}``. Progress goes to
  stderr. A result is ``{"value": float, "unit": str, ...details}`` or, when the workload
  cannot run on this contender, ``{"value": None, "error": "..."}`` — never a crash.
* ``python SCRIPT serve ...`` is the peer process. It is started by the ``run`` side through
  ``Peer`` (same interpreter, same environment), prints ``ready`` once it accepts work, and
  exits when its stdin closes, so it cannot outlive the measuring process even if that one
  is killed.

Only loopback (127.0.0.1) is ever used. Workloads are small functions registered with
``Workloads.add``; adding a row to the comparison means adding one such function (and, if
its name is new, a label in report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self

HOST = "127.0.0.1"
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

SMALL_SIZE = 1536  # the "1.5 KB" of the small-call rows
LARGE_ECHO_SIZES = {"echo_1MiB": 1 * MiB, "echo_8MiB": 8 * MiB, "echo_28MiB": 28 * MiB}
HUGE_ECHO_SIZES = {"echo_1GiB": 1 * GiB}
MEM_SIZE = 2 * GiB  # payload of the peak-RSS rows
MEM_ROWS = ("mem_2GiB_client", "mem_2GiB_server")

READY = "ready"
PEER_START_TIMEOUT = 30.0


# --- payloads ---------------------------------------------------------------------------


def small_dict() -> dict:
    """A dict of mixed types whose pickle is about 1.5 KB (the PICKLE small-call payload)."""
    return {
        "id": 123456789,
        "name": "daffi-benchmark-record",
        "active": True,
        "score": 0.125,
        "tags": [f"tag-{i}" for i in range(20)],
        "values": list(range(0, 2000, 10)),
        "blob": "x" * 600,
    }


def small_bytes() -> bytes:
    return bytes(range(256)) * (SMALL_SIZE // 256)


def big_bytes(size: int) -> bytes:
    """A payload of ``size`` bytes whose pages are all touched (no lazy zero pages)."""
    return b"\xa5" * size


# --- ports and peer processes -----------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the peer binds it right after)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Peer:
    """A ``serve`` process of the calling script, run with the same interpreter and env.

    Stops it on exit: close its stdin (it exits by itself), then SIGTERM, then SIGKILL.
    """

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(sys.argv[0]), "serve", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self._wait_ready()

    def _wait_ready(self) -> None:
        # readline() may block forever if the peer hangs before printing: read in a thread.
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()))
        reader.daemon = True
        reader.start()
        reader.join(PEER_START_TIMEOUT)
        got = line[0].strip() if line else ""
        if got != READY:
            self.stop()
            if got.startswith("error "):
                raise RuntimeError(f"peer process: {got[6:]}")
            raise RuntimeError(f"peer process did not start (exit code {self.proc.returncode})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f and not f.closed:
                f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def detach_stdout() -> int:
    """Point fd 1 at stderr and return a private duplicate of the real stdout.

    Libraries (native ones included) may print; only our JSON or ``ready`` line may reach
    the real stdout, and a peer must never block on a stdout pipe that nobody reads.
    """
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    return fd


def run_peer(serve: Callable[..., None], args: list[str]) -> None:
    """Run ``serve(ready, *args)``, the body of a ``serve`` process.

    ``serve`` calls ``ready()`` once it accepts work. If it fails before that, the ``Peer``
    on the other end gets the error's text instead, to report it as the workload's result.
    """
    fd = detach_stdout()

    def ready() -> None:
        os.write(fd, f"{READY}\n".encode())
        os.close(fd)

    try:
        serve(ready, *args)
    except Exception as exc:
        try:
            os.write(fd, f"error {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass  # was ready already: the traceback on stderr is all we can do
        raise


def wait_for_stdin_eof() -> None:
    """Block until the measuring process closes our stdin (or dies)."""
    try:
        sys.stdin.buffer.read()
    except (OSError, ValueError):
        pass


def hard_exit_after(seconds: float) -> None:
    """Exit the process after ``seconds`` whatever the main thread is doing."""
    timer = threading.Timer(seconds, os._exit, (0,))
    timer.daemon = True
    timer.start()


def exit_now() -> None:
    """End a peer at once (a normal exit could wait for a thread blocked on stdin)."""
    sys.stderr.flush()
    os._exit(0)


def exit_when_stdin_closes() -> None:
    """For peers whose main thread blocks in a library call: hard-exit on stdin EOF."""

    def watch() -> None:
        wait_for_stdin_eof()
        exit_now()

    threading.Thread(target=watch, daemon=True).start()


# --- measuring --------------------------------------------------------------------------


def calls_per_second(call: Callable[[], object], seconds: float, warmup: int = 50) -> dict:
    """Run ``call`` back to back for ``seconds`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        call()
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        call()
        n += 1
        if n % 16 == 0 and time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    return {"value": n / elapsed, "unit": "calls/s", "calls": n, "seconds": round(elapsed, 3)}


def echo_gib_per_s(
    echo: Callable[[bytes], object],
    size: int,
    seconds: float,
    max_runs: int = 50,
    min_runs: int = 3,
) -> dict:
    """(2 × size) / median round trip of ``echo(payload)``, after one checked warmup call."""
    payload = big_bytes(size)
    reply = echo(payload)
    if len(reply) != size or bytes(memoryview(reply)[-16:]) != payload[-16:]:
        raise AssertionError(f"echo returned {len(reply)} bytes, expected {size}")
    del reply
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        reply = echo(payload)
        times.append(time.perf_counter() - t0)
        del reply
    rtt = statistics.median(times)
    return {
        "value": 2 * size / rtt / GiB,
        "unit": "GiB/s",
        "median_rtt_ms": round(rtt * 1e3, 3),
        "runs": len(times),
    }


def threaded_calls_per_second(workers: list[Callable[[], object]], seconds: float, warmup: int = 20) -> dict:
    """Run each of ``workers`` (one call each) in its own thread, back to back, for ``seconds``.

    All threads start together (after their warmup) and count the calls that completed
    within one shared window of ``seconds``; calls still in flight at its end are not counted
    (``tail_s`` says how long the last of them took to come back). A thread's error is raised.
    """
    counts = [0] * len(workers)
    errors: list[BaseException] = []
    window = [0.0, 0.0]  # start, end: set by the barrier's action once every thread is warm

    def open_window() -> None:
        window[0] = time.perf_counter()
        window[1] = window[0] + seconds

    barrier = threading.Barrier(len(workers), action=open_window)

    def loop(i: int) -> None:
        call = workers[i]
        try:
            for _ in range(warmup):
                call()
            barrier.wait()
            n = 0
            while True:
                call()
                if time.perf_counter() > window[1]:
                    break
                n += 1
            counts[i] = n
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise TimeoutError("a caller thread did not finish in time")
    total = sum(counts)
    return {
        "value": total / seconds,
        "unit": "calls/s",
        "calls": total,
        "per_thread": counts,
        "tail_s": round(time.perf_counter() - window[1], 3),
    }


# --- memory (peak RSS) ------------------------------------------------------------------


def _status_kib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM (peak RSS) of ``pid`` to its current RSS; False where the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss(pid: int | str = "self") -> int:
    """Peak resident set size in bytes since start or the last ``reset_peak_rss``."""
    return _status_kib(pid, "VmHWM") * KiB


def current_rss(pid: int | str = "self") -> int:
    return _status_kib(pid, "VmRSS") * KiB


def pickle_echo_rate(send: Callable[[bytes], object], recv: Callable[[], bytes], seconds: float) -> dict:
    """Sequential PICKLE calls over a bare transport: the call is pickled like daffi's
    ``(args, kwargs)`` and the echo unpickled, so the row compares with daffi's PICKLE row."""
    payload = small_dict()

    def call():
        send(pickle.dumps(((payload,), {})))
        return pickle.loads(recv())

    if call() != payload:
        raise AssertionError("echo mismatch")
    return calls_per_second(call, seconds)


def add_echo_workloads(workloads: Workloads, open_echo: Callable[[bool], Any]) -> None:
    """Registers the large-echo rows and the 2 GiB peak-RSS rows of one contender.

    ``open_echo(big)`` is a context manager yielding ``(echo, peer)``: ``echo(payload)`` returns
    the echoed payload and ``peer`` is the peer process. ``big`` is true for the GiB-sized rows
    (a contender may need a larger message limit or longer timeouts for them).
    """

    def large_echo(size: int, big: bool):
        def workload(opts: argparse.Namespace) -> dict:
            with open_echo(big) as (echo, _):
                return echo_gib_per_s(echo, size, opts.seconds)

        return workload

    for name, size in LARGE_ECHO_SIZES.items():
        workloads.add(name)(large_echo(size, False))
    for name, size in HUGE_ECHO_SIZES.items():
        workloads.add(name, group="huge")(large_echo(size, True))

    @workloads.add("mem_2GiB", group="mem", rows=MEM_ROWS)
    def mem_2gib(opts: argparse.Namespace) -> dict:
        with open_echo(True) as (echo, peer):
            return echo_peak_rss(echo, MEM_SIZE, peer.pid)


def echo_peak_rss(echo: Callable[[bytes], object], size: int, server_pid: int) -> dict:
    """Echo one ``size``-byte payload; peak RSS of both processes as multiples of ``size``.

    Both peaks are reset right before the call, after the payload was built, so the caller's
    figure includes the payload it holds (a perfect client shows ~2: payload + reply; a
    perfect server ~1: the request it returns), plus each process's baseline (reported).
    """
    payload = big_bytes(size)
    client_base, server_base = current_rss(), current_rss(server_pid)
    reset = reset_peak_rss() and reset_peak_rss(server_pid)
    t0 = time.perf_counter()
    reply = echo(payload)
    rtt = time.perf_counter() - t0
    ok = len(reply) == size
    del reply
    client_peak, server_peak = peak_rss(), peak_rss(server_pid)
    if not ok:
        raise AssertionError("echo returned a payload of the wrong size")
    shared = {
        "unit": "× payload",
        "payload_MiB": size // MiB,
        "rtt_s": round(rtt, 3),
        "peak_reset": reset,  # False: peaks include everything since process start
    }
    client_row, server_row = MEM_ROWS
    return {
        client_row: {
            "value": client_peak / size,
            "peak_MiB": client_peak // MiB,
            "base_MiB": (client_base - size) // MiB,
            **shared,
        },
        server_row: {
            "value": server_peak / size,
            "peak_MiB": server_peak // MiB,
            "base_MiB": server_base // MiB,
            **shared,
        },
    }


# --- workload registry and the command line ---------------------------------------------


class Workloads:
    """The named workloads of one script, run in registration order.

    A workload is ``fn(opts) -> result``. One that yields several table rows at once is
    registered with ``rows=(...)`` and returns ``{row_name: result}``. ``group`` picks when
    it runs: "default" always, "huge" with --huge, "mem" with --mem (or any by --only).
    """

    def __init__(self) -> None:
        self.entries: list[tuple[str, Callable, str, tuple[str, ...]]] = []

    def add(self, name: str, group: str = "default", rows: tuple[str, ...] = ()):
        def register(fn: Callable) -> Callable:
            self.entries.append((name, fn, group, rows))
            return fn

        return register

    def run(self, opts: argparse.Namespace) -> dict:
        wanted = set(opts.only.split(",")) if opts.only else None
        groups = {"default"} | {g for g in ("huge", "mem") if getattr(opts, g, False)}
        results: dict = {}
        for name, fn, group, rows in self.entries:
            if (name not in wanted) if wanted is not None else (group not in groups):
                continue
            log(f"{name} ...")
            t0 = time.perf_counter()
            try:
                out = fn(opts)
                results.update(out if rows else {name: out})
            except Exception as exc:  # noqa: BLE001 - any failure is a result, not a crash
                if opts.verbose:
                    traceback.print_exc()
                error = {"value": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
                results.update({row: dict(error) for row in rows or (name,)})
            shown = "; ".join(f"{row}: {brief(results.get(row))}" for row in rows or (name,))
            log(f"{shown} ({time.perf_counter() - t0:.1f} s)")
        return results


def brief(result: dict | None) -> str:
    if not result:
        return "no result"
    return result.get("error") or f"{result['value']:.4g} {result['unit']}"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="measure and print one JSON object")
    run.add_argument("--seconds", type=float, default=2.0, help="time budget per workload")
    run.add_argument("--only", default="", help="comma-separated workload names")
    run.add_argument("--huge", action="store_true", help="also echo 1 GiB")
    run.add_argument("--mem", action="store_true", help="also measure peak RSS echoing 2 GiB")
    run.add_argument("--list", action="store_true", help="list the workloads and exit")
    run.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    run.add_argument("--label", default="", help="name of this contender in the output")
    sub.add_parser("serve", help="internal: the peer process").add_argument("args", nargs="*")
    return p


def main_run(opts: argparse.Namespace, workloads: Workloads, meta: dict) -> None:
    if opts.list:
        for name, _, group, rows in workloads.entries:
            print(f"{name}\t{group}\t{' '.join(rows)}")
        return
    stdout = detach_stdout()
    start = time.perf_counter()
    results = workloads.run(opts)
    out = {
        **meta,
        "python": sys.version.split()[0],
        "seconds_per_workload": opts.seconds,
        "total_seconds": round(time.perf_counter() - start, 1),
        "workloads": results,
    }
    if opts.label:
        out["contender"] = opts.label
    with os.fdopen(stdout, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


def log(msg: str) -> None:
    print(f"[{os.path.basename(sys.argv[0])}] {msg}", file=sys.stderr, flush=True)
