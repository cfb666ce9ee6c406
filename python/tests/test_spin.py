"""How long a waiting thread or event loop spins before it sleeps (``DAFFI_SPIN_US``): the
default spins, ``0`` never does, anything else that is not a number falls back to the
default. Whichever it is, every call gets its own answer; each setting runs in a child
process (the setting is read once per process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import asyncio
    import threading

    from daffi import Client, Service, callback
    from daffi.aio import AsyncClient, AsyncService

    @callback
    def spin_echo(x):
        return x

    @callback
    async def spin_aecho(x):
        return x

    # Sequential sync calls, then calls from several threads at once.
    service = Service(host="127.0.0.1", port=0)
    service.start()
    client = Client(host="127.0.0.1", port=service.port)
    conn = client.connect()
    for i in range(300):
        assert conn.rpc(timeout=10).spin_echo(i) == i
    errors = []

    def many(n):
        try:
            for i in range(100):
                assert conn.rpc(timeout=10).spin_echo((n, i)) == (n, i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=many, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    client.stop()
    service.stop()

    # Sequential awaited calls between an AsyncClient and an AsyncService, then a burst.
    async def main():
        async with AsyncService(host="127.0.0.1", port=0) as aservice:
            async with AsyncClient(host="127.0.0.1", port=aservice.port) as aclient:
                aconn = aclient.connection
                for i in range(300):
                    assert await aconn.rpc(timeout=10).spin_aecho(i) == i
                got = await asyncio.gather(
                    *(aconn.rpc(timeout=10).spin_aecho(i) for i in range(200))
                )
                assert got == list(range(200))

    asyncio.run(main())
    print("ok", flush=True)
    """
)


@pytest.mark.parametrize("setting", [None, "0", "2000", "not-a-number"])
def test_every_spin_setting_answers_every_call(setting):
    env = dict(os.environ)
    env.pop("DAFFI_SPIN_US", None)
    if setting is not None:
        env["DAFFI_SPIN_US"] = setting
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
