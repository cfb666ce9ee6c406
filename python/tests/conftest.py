"""Shared fixtures for the Python test suite.

- Every test runs with the process-wide callback registry restored afterwards, so tests
  may register callbacks freely. Callbacks registered at import time of a test module
  stay for the whole session: give them names unique across the suite.
- ``free_port()`` hands out a TCP port of 127.0.0.1 that was free a moment ago and was not
  handed out before in this session; the ``port`` fixture is one such port.
- ``backend`` is the engine backend under test, from ``DAFFI_BACKEND`` (``"uring"``,
  ``"poll"``, or ``None`` when unset: the engine picks). A test marked
  ``@pytest.mark.backend("uring")`` runs only when ``DAFFI_BACKEND=uring``.
- ``requires_native`` skips a test while the extension module is not built.
- End-to-end helpers: ``make_service(**kw)`` (a started Service on a free port),
  ``make_client(target, **kw)`` (``(client, conn)``), ``spawn(source, *args)`` (a Python
  script in a child process, ``DAFFI_BACKEND`` passed through), ``unique_name(prefix)`` and
  ``wait_until(predicate, timeout)``. Nodes and children are always stopped / killed at the
  end of the test.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import secrets
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daffi.registry import REGISTRY

_BACKENDS = ("uring", "poll")

_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and new to this session."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with _ports_lock:
            if port not in _ports_given:
                _ports_given.add(port)
                return port
    raise RuntimeError("no free TCP port found")


def native_available() -> bool:
    """Whether ``daffi._native`` (the Rust extension) is importable."""
    try:
        return importlib.util.find_spec("daffi._native") is not None
    except ImportError:
        return False


requires_native = pytest.mark.skipif(not native_available(), reason="daffi._native is not built")


def _backend_from_env() -> str | None:
    value = os.environ.get("DAFFI_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in _BACKENDS:
        raise pytest.UsageError(f"DAFFI_BACKEND={value!r}: expected one of {', '.join(_BACKENDS)} or unset")
    return value


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "backend(name): run only when DAFFI_BACKEND equals name ('uring' or 'poll')",
    )
    _backend_from_env()  # fail early on a typo


def pytest_report_header(config: pytest.Config) -> str:
    return f"daffi backend: {_backend_from_env() or 'auto (DAFFI_BACKEND unset)'}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    current = _backend_from_env()
    for item in items:
        marker = item.get_closest_marker("backend")
        if marker is None:
            continue
        wanted = marker.args[0] if marker.args else None
        if wanted not in _BACKENDS:
            raise pytest.UsageError(f"{item.nodeid}: backend marker needs 'uring' or 'poll'")
        if wanted != current:
            item.add_marker(pytest.mark.skip(reason=f"needs DAFFI_BACKEND={wanted} (now {current})"))


@pytest.fixture(scope="session")
def backend() -> str | None:
    """The backend under test: ``"uring"``, ``"poll"`` or ``None`` (engine's choice)."""
    return _backend_from_env()


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()


@pytest.fixture(autouse=True)
def _isolated_registry():
    """Undo every callback registration a test makes."""
    snapshot = REGISTRY._snapshot()
    try:
        yield
    finally:
        REGISTRY._restore(snapshot)


@pytest.fixture
def registry():
    """The process-wide registry (restored after the test, like every test)."""
    return REGISTRY


# -- nodes and processes for the end-to-end tests -----------------------------------------
#
# Every node made through these fixtures is stopped when the test ends, pass or fail, so a
# failing test never leaves a listener or a worker thread behind to hang the run.


def unique_name(prefix: str) -> str:
    """A node name unique in this session (two tests never share one)."""
    return f"{prefix}-{secrets.token_hex(4)}"


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)


@pytest.fixture
def make_service():
    """``make_service(**kwargs)`` → a started ``daffi.Service`` on a free 127.0.0.1 port
    (or on ``unix_sock_path=``), stopped when the test ends."""
    from daffi import Service

    nodes = []

    def make(**kwargs):
        if "unix_sock_path" not in kwargs:
            kwargs.setdefault("host", "127.0.0.1")
            kwargs.setdefault("port", free_port())
        kwargs.setdefault("app_name", unique_name("svc"))
        svc = Service(**kwargs)
        nodes.append(svc)
        svc.start()
        return svc

    yield make
    for node in reversed(nodes):
        node.stop()


@pytest.fixture
def make_client():
    """``make_client(target, **kwargs)`` → ``(client, conn)``: a ``daffi.Client`` connected to
    ``target`` (a Service, or a TCP port), stopped when the test ends. ``connect=False``
    returns ``(client, None)`` without connecting."""
    from daffi import Client

    nodes = []

    def make(target=None, connect=True, **kwargs):
        if isinstance(target, int):
            kwargs.setdefault("host", "127.0.0.1")
            kwargs.setdefault("port", target)
        elif target is not None:
            if target.unix_sock_path is not None:
                kwargs.setdefault("unix_sock_path", target.unix_sock_path)
            else:
                kwargs.setdefault("host", "127.0.0.1")
                kwargs.setdefault("port", target.port)
        kwargs.setdefault("app_name", unique_name("cli"))
        client = Client(**kwargs)
        nodes.append(client)
        conn = client.connect() if connect else None
        return client, conn

    yield make
    for node in reversed(nodes):
        node.stop()


class Proc:
    """A Python script running in a child process (see the ``spawn`` fixture)."""

    def __init__(self, popen: subprocess.Popen, script: Path, stderr_path: Path) -> None:
        self.popen = popen
        self.script = script
        self.stderr_path = stderr_path
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.popen.stdout:
            self.output.append(line)
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_line(self, startswith: str, timeout: float = 15.0) -> str:
        """The next stdout line starting with ``startswith``; fails on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.script.name}: no {startswith!r} line in {timeout} s; "
                                     f"output so far: {''.join(self.output)!r}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.popen.wait(5)
                raise AssertionError(f"{self.script.name} exited ({self.popen.returncode}) before "
                                     f"printing {startswith!r}; output: {''.join(self.output)!r}; "
                                     f"stderr: {self.stderr_text()!r}")
            if line.startswith(startswith):
                return line

    def stderr_text(self) -> str:
        """What the child wrote to stderr so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        os.kill(self.popen.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGCONT)
                self.popen.kill()
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL always ends it
            pass


@pytest.fixture
def spawn(tmp_path):
    """``spawn(source, *args, name="child.py")`` → :class:`Proc`: runs ``source`` (Python code)
    with this interpreter, ``DAFFI_BACKEND`` passed through, stdout as lines. Killed at the end
    of the test."""
    procs: list[Proc] = []

    def run(source: str, *args: Any, name: str = "child.py", cwd: Path | None = None) -> Proc:
        script = tmp_path / name
        script.write_text(textwrap.dedent(source))
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        stderr_path = tmp_path / f"{name}.stderr"
        with open(stderr_path, "w") as err:  # a file: a chatty child never blocks on a pipe
            popen = subprocess.Popen(
                [sys.executable, str(script), *map(str, args)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                cwd=str(cwd or tmp_path),
            )
        proc = Proc(popen, script, stderr_path)
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        proc.kill()


def raw_frame(
    kind: int, call_id: int, meta: bytes, payload: bytes = b"", serde: int = 0, flags: int = 0
) -> bytes:
    """One frame as docs/protocol.md lays it out: a 32-byte header, the meta, the payload."""
    head = struct.pack(
        "<2sBBBBHQI4sQ", b"DF", 1, kind, serde, flags, 0, call_id, len(meta), bytes(4), len(payload)
    )
    return head + meta + payload


def call_without_handshake(port: int, function: str, args: tuple) -> socket.socket:
    """A peer that skips the handshake (a goodbye instead of its Hello), then calls
    ``function(*args)`` (PICKLE); returns its socket, for the caller to close."""
    from daffi import SerdeFormat
    from daffi._serialization import encode_call

    payload, text = encode_call(SerdeFormat.PICKLE, args, {})
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(raw_frame(7, 0, b"leaving"))
    time.sleep(0.1)
    flags = 0x02 if text else 0
    serde = int(SerdeFormat.PICKLE)
    sock.sendall(raw_frame(3, 1, function.encode(), bytes(payload), serde=serde, flags=flags))
    return sock
