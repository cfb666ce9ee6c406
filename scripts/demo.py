"""daffi's demo: a Service in one process, a Client in this one, on loopback.

Prints the round trips per second of small rpc calls and the throughput of a large OPAQUE echo.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from daffi import Client, SerdeFormat

SERVICE = r"""
import sys
from daffi import Service, callback

@callback
def add(a, b):
    return a + b

@callback
def echo(payload):
    return payload

svc = Service(app_name="demo-service", host="127.0.0.1", port=0)
svc.start()
print(svc.port, flush=True)
svc.join()
"""


def main() -> None:
    service = subprocess.Popen([sys.executable, "-c", SERVICE], stdout=subprocess.PIPE, text=True)
    try:
        port = int(service.stdout.readline())
        client = Client(app_name="demo-client", host="127.0.0.1", port=port)
        conn = client.connect()
        print(f"connected to {conn.members[0]!r} on 127.0.0.1:{port} (backend: {client.backend})")

        assert conn.rpc(timeout=5).add(1, 2) == 3
        calls = 20_000
        start = time.perf_counter()
        for i in range(calls):
            conn.rpc(timeout=5).add(i, 1)
        elapsed = time.perf_counter() - start
        print(f"rpc add(i, 1), PICKLE:      {calls / elapsed:10,.0f} calls/s")

        size = 28 << 20
        payload = os.urandom(1 << 20) * (size >> 20)
        conn.rpc(timeout=30, serde=SerdeFormat.OPAQUE).echo(payload)  # warm-up
        rounds = 20
        start = time.perf_counter()
        for _ in range(rounds):
            back = conn.rpc(timeout=30, serde=SerdeFormat.OPAQUE).echo(payload)
        elapsed = time.perf_counter() - start
        assert back == payload, "echoed payload differs"
        gib = 2 * size * rounds / elapsed / 2**30
        print(f"OPAQUE echo of {size >> 20} MiB:       {gib:10.2f} GiB/s (both directions, payload intact)")
        client.stop()
    finally:
        service.terminate()
        service.wait(timeout=10)


if __name__ == "__main__":
    main()
