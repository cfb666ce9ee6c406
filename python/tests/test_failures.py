"""Failure behaviour with the peer in a separate process (SPEC §2 signals, §4 failure
detection, §9): kill -9, SIGSTOP/SIGCONT, SIGTERM/SIGINT, callers that die mid-call.

Children run with this interpreter and inherit ``DAFFI_BACKEND``; the ``spawn`` fixture kills
whatever is left when a test ends.
"""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import free_port, unique_name, wait_until
from daffi import SerdeFormat, Service, callback
from daffi.exceptions import CallTimeout, Disconnected, InitializationError, TransmissionFailure

SERVICE_SCRIPT = """
import os
import sys
import time

from daffi import Service, callback


@callback
def fx_echo(value):
    return value


@callback
def fx_sleep(seconds, tag=None):
    time.sleep(seconds)
    return tag if tag is not None else seconds


@callback
def fx_pid():
    return os.getpid()


svc = Service(app_name=sys.argv[2], host="127.0.0.1", port=int(sys.argv[1]), workers=int(sys.argv[3]))
svc.start()
print("READY", flush=True)
svc.join()
print("JOINED", flush=True)
"""

GONE = (Disconnected, TransmissionFailure)


@pytest.fixture
def remote_service(spawn):
    """``remote_service(workers=1)`` → ``(proc, port, name)``: a Service in a child process."""

    def start(workers: int = 1, port: int | None = None):
        port = port or free_port()
        name = unique_name("remote")
        proc = spawn(SERVICE_SCRIPT, port, name, workers, name=f"service_child_{name}.py")
        proc.wait_line("READY")
        return proc, port, name

    return start


def call_in_thread(fn, *args, **kwargs):
    """Runs ``fn`` in a thread; returns a queue that receives ``(ok, value, finished_at)``."""
    out: queue.Queue = queue.Queue()

    def run():
        try:
            value = fn(*args, **kwargs)
            out.put((True, value, time.monotonic()))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.put((False, e, time.monotonic()))

    threading.Thread(target=run, daemon=True).start()
    return out


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Waits until the kernel shows ``pid`` as stopped (SIGSTOP is delivered asynchronously)."""

    def state() -> str:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]

    assert wait_until(lambda: state() in ("T", "t"), timeout), f"process {pid} did not stop"


def settle_into_join() -> None:
    """The child printed its line just before calling join(); give it a moment to be inside
    join() (a signal that lands before it is not what these tests are about)."""
    time.sleep(0.5)


def port_is_free(port: int) -> bool:
    svc = Service(port=port)
    try:
        svc.start()
    except Exception:
        return False
    svc.stop()
    return True


# -- the service process dies -----------------------------------------------------------------------


def test_cross_process_calls(remote_service, make_client):
    proc, port, name = remote_service()
    _, conn = make_client(port)
    assert conn.rpc(timeout=5).fx_pid() == proc.pid
    assert conn.cast(timeout=5).fx_echo("c") == {name: "c"}
    for serde in SerdeFormat:
        value = b"bytes" if serde == SerdeFormat.OPAQUE else {"k": [1, 2]}
        assert conn.rpc(timeout=5, serde=serde).fx_echo(value) == value
    blob = bytes(range(256)) * (32 << 10)  # 8 MiB
    assert conn.rpc(timeout=30, serde=SerdeFormat.OPAQUE).fx_echo(blob) == blob


@pytest.mark.parametrize("timeout", [None, 60])
def test_kill_9_fails_the_call_in_flight_and_later_calls(remote_service, make_client, timeout):
    proc, port, _ = remote_service(workers=2)
    client, conn = make_client(port)
    assert conn.rpc(timeout=5).fx_echo(1) == 1
    pending = call_in_thread(conn.rpc(timeout=timeout).fx_sleep, 30)
    time.sleep(0.3)
    killed_at = time.monotonic()
    proc.signal(signal.SIGKILL)
    ok, value, finished_at = pending.get(timeout=10)
    assert not ok and isinstance(value, GONE), value
    assert finished_at - killed_at < 5
    started = time.monotonic()
    with pytest.raises(GONE):
        conn.rpc(timeout=60).fx_echo(2)
    with pytest.raises(GONE):
        conn.rpc_nowait().fx_echo(3)
    assert time.monotonic() - started < 5
    assert wait_until(lambda: not client.connected, 5)


def test_kill_9_then_reconnect_to_a_new_service(remote_service, make_client):
    proc, port, _ = remote_service()
    client, conn = make_client(port)
    proc.signal(signal.SIGKILL)
    proc.wait(10)
    assert wait_until(lambda: not client.connected, 5)
    with Service(port=port):  # the dead process's port is free for a new service
        conn = client.connect()
        assert conn.rpc(timeout=5).fx_local_echo("back") == "back"


@callback
def fx_local_echo(value):
    return value


def test_sigstop_times_out_then_sigcont_recovers(remote_service, make_client):
    proc, port, _ = remote_service()
    client, conn = make_client(port)
    assert conn.rpc(timeout=5).fx_echo(0) == 0
    proc.signal(signal.SIGSTOP)
    try:
        wait_stopped(proc.pid)
        started = time.monotonic()
        with pytest.raises(CallTimeout) as info:
            conn.rpc(timeout=1).fx_echo("frozen")
        elapsed = time.monotonic() - started
        assert isinstance(info.value, TimeoutError)
        assert 0.9 <= elapsed < 3, elapsed
        assert client.connected  # frozen is not dead
    finally:
        proc.signal(signal.SIGCONT)
    # The frozen call's late answer arrives now and must be dropped.
    assert [conn.rpc(timeout=10).fx_echo(i) for i in range(3)] == [0, 1, 2]
    assert conn.rpc(timeout=10).fx_pid() == proc.pid


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_a_process_in_join_promptly(remote_service, make_client, signum):
    proc, port, _ = remote_service()
    client, conn = make_client(port)
    assert conn.rpc(timeout=5).fx_echo(1) == 1
    settle_into_join()
    sent_at = time.monotonic()
    proc.signal(signum)
    code = proc.wait(5)
    took = time.monotonic() - sent_at
    assert took < 2, f"{signal.Signals(signum).name} took {took:.2f} s to end the process"
    assert code == 0, f"exit code {code}; stderr: {proc.stderr_text()}"
    proc.wait_line("JOINED", timeout=2)  # join() returned normally
    assert "Traceback" not in proc.stderr_text()
    assert port_is_free(port)
    assert wait_until(lambda: not client.connected, 5)
    with pytest.raises(GONE):
        conn.rpc(timeout=5).fx_echo(2)


def test_sigterm_with_callbacks_in_flight_is_still_prompt(remote_service, make_client):
    proc, port, _ = remote_service(workers=2)
    _, conn = make_client(port)
    pending = [call_in_thread(conn.rpc(timeout=20).fx_sleep, 8) for _ in range(2)]
    settle_into_join()
    sent_at = time.monotonic()
    proc.signal(signal.SIGTERM)
    for q in pending:
        ok, value, _ = q.get(timeout=25)
        assert not ok and isinstance(value, GONE), value
    try:
        proc.wait(2.5)
    except subprocess.TimeoutExpired:
        pass
    took = time.monotonic() - sent_at
    assert proc.popen.poll() is not None and took < 2.5, (
        f"SIGTERM took {took:.1f} s with two callbacks still running (SPEC §2: well under a second)"
    )
    assert port_is_free(port)


# -- a client process dies or is signalled ------------------------------------------------------------

CLIENT_SCRIPT = """
import sys

from daffi import Client

client = Client(app_name=sys.argv[2], host="127.0.0.1", port=int(sys.argv[1]))
conn = client.connect()
print("CONNECTED", flush=True)
if sys.argv[3] == "call":
    print("CALLING", flush=True)
    conn.rpc(timeout=60).fx_local_sleep(2)
else:
    client.join()
    print("JOINED", flush=True)
"""


@callback
def fx_local_sleep(seconds):
    time.sleep(seconds)
    return seconds


def test_caller_killed_mid_call_does_not_hurt_the_service(spawn, make_service, make_client):
    svc = make_service(workers=2)
    events: queue.Queue = queue.Queue()
    svc.add_event_handler(events.put)
    name = unique_name("doomed")
    proc = spawn(CLIENT_SCRIPT, svc.port, name, "call", name="client_child.py")
    proc.wait_line("CALLING")
    time.sleep(0.3)  # the call is running in the service now
    proc.signal(signal.SIGKILL)
    proc.wait(10)
    assert events.get(timeout=5) == {"type": "connected", "member": name}
    assert events.get(timeout=5) == {"type": "disconnected", "member": name}
    _, conn = make_client(svc)
    assert conn.rpc(timeout=5).fx_local_echo("alive") == "alive"
    time.sleep(2)  # the dead caller's callback finishes and answers into the void
    assert conn.rpc(timeout=5).fx_local_echo("still alive") == "still alive"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_a_client_process_in_join(spawn, make_service, signum):
    svc = make_service()
    name = unique_name("joiner")
    proc = spawn(CLIENT_SCRIPT, svc.port, name, "join", name="client_child.py")
    proc.wait_line("CONNECTED")
    assert wait_until(lambda: svc.members == [name], 5)
    settle_into_join()
    sent_at = time.monotonic()
    proc.signal(signum)
    code = proc.wait(5)
    assert time.monotonic() - sent_at < 2
    assert code == 0, proc.stderr_text()
    assert wait_until(lambda: svc.members == [], 5)


def test_service_restart_in_another_process_and_reconnect(remote_service, make_client):
    proc, port, name = remote_service()
    client, conn = make_client(port)
    assert conn.rpc(timeout=5).fx_pid() == proc.pid
    settle_into_join()
    proc.signal(signal.SIGTERM)
    proc.wait(5)
    assert wait_until(lambda: not client.connected, 5)
    proc2, _, _ = remote_service(port=port)  # same port, at once
    conn = client.connect()  # same Client object, same name
    assert conn.rpc(timeout=5).fx_pid() == proc2.pid


FD_LIMITED_SERVICE = """
import resource
import sys

from daffi import Service, callback


@callback
def fx_limited_echo(value):
    return value


resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
svc = Service(app_name="fd-limited", host="127.0.0.1", port=int(sys.argv[1]))
svc.start()
print("READY", flush=True)
svc.join()
"""


def test_running_out_of_descriptors_only_pauses_accepting(spawn, make_client):
    port = free_port()
    proc = spawn(FD_LIMITED_SERVICE, port, name="fd_limited_service.py")
    proc.wait_line("READY")
    hogs = []
    for _ in range(100):  # more connections than the service may have descriptors
        hogs.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    time.sleep(0.5)
    for s in hogs:
        s.close()
    # Once descriptors are free again, the service accepts new clients without a restart.
    deadline = time.monotonic() + 15
    while True:
        try:
            client, conn = make_client(port, connect_timeout=2)
            break
        except InitializationError:
            assert time.monotonic() < deadline, "the service never accepted again"
            time.sleep(0.2)
    assert conn.rpc(timeout=5).fx_limited_echo("back") == "back"


BLOCKED_CALLER = """
import sys
import time

from daffi import Client

client = Client(app_name=sys.argv[2], host="127.0.0.1", port=int(sys.argv[1]))
conn = client.connect()
print("CALLING", flush=True)
try:
    conn.rpc().fx_sleep(60)  # no deadline: only a signal can end this wait
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    assert conn.rpc(timeout=5).fx_echo("after") == "after"
    print("USABLE", flush=True)
client.stop()
"""


def test_ctrl_c_interrupts_a_call_without_a_deadline(spawn, remote_service):
    _, port, _ = remote_service(workers=2)
    caller = spawn(BLOCKED_CALLER, port, unique_name("blocked"), name="blocked_caller.py")
    caller.wait_line("CALLING")
    time.sleep(0.5)
    sent_at = time.monotonic()
    caller.signal(signal.SIGINT)
    caller.wait_line("INTERRUPTED")
    assert time.monotonic() - sent_at < 1.5
    caller.wait_line("USABLE")
    assert caller.wait(10) == 0
