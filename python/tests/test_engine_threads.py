"""Several engine threads per process (``DAFFI_ENGINE_THREADS``), in a child process: the
count is fixed when the first node of the process starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    import threading

    from daffi import Client, Router, Service, callback

    @callback
    def triple(x):
        return x * 3

    def engine_threads():
        names = []
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        return names.count("daffi-engine")

    service = Service(host="127.0.0.1", port=0)
    service.start()
    clients = [Client(host="127.0.0.1", port=service.port) for _ in range(5)]
    conns = [c.connect() for c in clients]
    errors = []

    def calls(conn, n):
        try:
            for i in range(300):
                assert conn.rpc(timeout=10).triple(i + n) == 3 * (i + n)
            data = bytes([n]) * (2 << 20)
            assert conn.rpc(timeout=20).triple(data) == data * 3
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=calls, args=(c, n)) for n, c in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("engine threads", engine_threads(), "errors", errors, flush=True)
    for c in clients:
        c.stop()
    service.stop()

    # A Router and its clients, spread over the same threads.
    router = Router(host="127.0.0.1", port=0)
    router.start()
    worker = Client(app_name="w", host="127.0.0.1", port=router.port)
    worker.connect()
    caller = Client(app_name="c", host="127.0.0.1", port=router.port)
    conn = caller.connect()
    conn.wait_for_members("w", timeout=10)
    assert conn.rpc(timeout=10).triple("ab") == "ababab"
    print("router ok", flush=True)
    for node in (caller, worker, router):
        node.stop()
    """
)


def run(threads: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAFFI_ENGINE_THREADS": threads}
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)


def test_nodes_run_on_several_engine_threads():
    done = run("3")
    assert done.returncode == 0, done.stderr
    assert "engine threads 3 errors []" in done.stdout
    assert "router ok" in done.stdout


def test_a_bad_thread_count_is_an_initialization_error():
    for bad in ("0", "lots", "1000"):
        done = run(bad)
        assert done.returncode != 0
        assert "InitializationError" in done.stderr
        assert "DAFFI_ENGINE_THREADS" in done.stderr, done.stderr
