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
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading

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
