"""Zero-copy sends (``DAFFI_SEND_ZC=always``; by default only towards other hosts), in a child
process since the mode is read once per process: large payloads arrive intact, directly and
through a Router, in both directions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    from daffi import Client, Router, SerdeFormat, Service, callback

    @callback
    def echo(data):
        return data

    payloads = [bytes(range(256)) * (n // 256) for n in (64 << 10, 1 << 20, 20 << 20)]

    service = Service(host="127.0.0.1", port=0)
    service.start()
    client = Client(host="127.0.0.1", port=service.port)
    conn = client.connect()
    for p in payloads:
        assert conn.rpc(timeout=30, serde=SerdeFormat.OPAQUE).echo(p) == p
    conn.stream_nowait(serde=SerdeFormat.OPAQUE).echo(payloads[:2] * 5)
    assert conn.rpc(timeout=30, serde=SerdeFormat.OPAQUE).echo(b"last") == b"last"
    client.stop()
    service.stop()

    router = Router(host="127.0.0.1", port=0)
    router.start()
    worker = Client(app_name="w", host="127.0.0.1", port=router.port)
    worker.connect()
    caller = Client(app_name="c", host="127.0.0.1", port=router.port)
    conn = caller.connect()
    conn.wait_for_members("w", timeout=10)
    for p in payloads:
        assert conn.rpc(timeout=30, serde=SerdeFormat.OPAQUE).echo(p) == p
    for node in (caller, worker, router):
        node.stop()
    print("ok", flush=True)
    """
)


def test_large_payloads_sent_zero_copy_arrive_intact():
    env = {**os.environ, "DAFFI_SEND_ZC": "always"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
