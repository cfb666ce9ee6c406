"""The seed README's direct-layout examples, run unchanged as separate processes.

Only the port number (5000 in the README) is replaced, by a free port. The scripts are
copied verbatim from the seed README's "Quick start — direct layout" and "Concurrent callback
execution" sections.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import free_port, wait_until
from daffi import Client
from daffi.exceptions import InitializationError

SERVICE_PY = '''\
from daffi import Service, callback

@callback
def add(a: float, b: float) -> float:
    return a + b

@callback
def greet(name: str) -> str:
    return f"Hello, {name}!"

svc = Service(app_name="my-service", host="127.0.0.1", port=5000)
svc.start()
svc.join()          # block until svc.stop() is called
'''

CLIENT_PY = '''\
from daffi import Client

client = Client(app_name="my-client", host="127.0.0.1", port=5000)
conn = client.connect()

result = conn.rpc(timeout=5).add(1, 2)     # → 3.0
greeting = conn.rpc(timeout=5).greet("Alice")  # → "Hello, Alice!"

client.stop()
'''

WORKERS_PY = '''\
import time
from daffi import Service, callback

@callback
def slow_task(n: int) -> int:
    time.sleep(1)        # simulates I/O-bound work
    return n * n

# workers=1 (default) — three concurrent callers would each wait ~1 s
svc = Service(host="127.0.0.1", port=5000, workers=1)

# workers=4 — three concurrent callers all finish in ~1 s
svc = Service(host="127.0.0.1", port=5000, workers=4)

svc.start()
svc.join()
'''


def with_port(source: str, port: int) -> str:
    assert source.count("port=5000") >= 1
    return source.replace("port=5000", f"port={port}")


def connect_when_up(port: int, timeout: float = 15.0, **kwargs) -> Client:
    """A client connected to ``port`` once something serves there (the README's service prints
    nothing, so readiness is found by trying)."""
    deadline = time.monotonic() + timeout
    while True:
        client = Client(host="127.0.0.1", port=port, **kwargs)
        try:
            client.connect()
            return client
        except InitializationError:
            client.stop()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_direct_layout_example_runs_unchanged(spawn, tmp_path):
    port = free_port()
    service = spawn(with_port(SERVICE_PY, port), name="service.py")
    checker = connect_when_up(port, app_name="readme-checker")
    try:
        conn = checker.connection
        assert conn.rpc(timeout=5).add(1, 2) == 3
        assert conn.rpc(timeout=5).greet("Alice") == "Hello, Alice!"
        assert conn.cast(timeout=5).greet("Bob") == {"my-service": "Hello, Bob!"}

        script = tmp_path / "client.py"
        script.write_text(with_port(CLIENT_PY, port))
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=30, cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", "a clean run prints nothing (logging below WARNING is silent)"
        assert done.stdout == ""
        # client.py may run any number of times (same name, one after the other).
        again = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=30, cwd=tmp_path
        )
        assert again.returncode == 0, again.stderr
        assert conn.rpc(timeout=5).add(2.5, 0.5) == 3.0
    finally:
        checker.stop()

    # Ctrl+C in the service's terminal ends it cleanly.
    time.sleep(0.3)  # (it is in join() by now; a signal before join() is another story)
    service.signal(signal.SIGINT)
    assert service.wait(5) == 0, service.stderr_text()
    assert service.stderr_text() == ""


def test_workers_example_runs_three_callers_in_about_a_second(spawn):
    port = free_port()
    service = spawn(with_port(WORKERS_PY, port), name="workers_service.py")
    client = connect_when_up(port)
    try:
        conn = client.connection
        results: list = []

        def call(n):
            results.append(conn.rpc(timeout=10).slow_task(n))

        threads = [threading.Thread(target=call, args=(n,)) for n in (2, 3, 4)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        elapsed = time.monotonic() - started
        assert sorted(results) == [4, 9, 16]
        assert elapsed < 2.5, f"three 1 s calls took {elapsed:.2f} s with workers=4"
    finally:
        client.stop()
    service.signal(signal.SIGTERM)
    assert service.wait(5) == 0, service.stderr_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_readme_service_stops_on_signal_and_frees_the_port(spawn, signum):
    port = free_port()
    service = spawn(with_port(SERVICE_PY, port), name="service.py")
    client = connect_when_up(port)
    time.sleep(0.3)  # connected once start() returned; now let it reach join()
    try:
        sent = time.monotonic()
        service.signal(signum)
        assert service.wait(5) == 0, service.stderr_text()
        assert time.monotonic() - sent < 2
        assert wait_until(lambda: not client.connected, 5)
    finally:
        client.stop()
    # The port is free at once: the same script starts again on it.
    again = spawn(with_port(SERVICE_PY, port), name="service_again.py")
    client = connect_when_up(port)
    try:
        assert client.connection.rpc(timeout=5).add(1, 1) == 2
    finally:
        client.stop()
    time.sleep(0.2)
    again.signal(signal.SIGTERM)
    assert again.wait(5) == 0
