"""pyzmq side of the side-by-side benchmark: REQ/REP over TCP on 127.0.0.1.

The same rows as daffi_bench.py where pyzmq has an equivalent: sequential small calls
(PICKLE: both sides pickle and unpickle, as an RPC framework does; OPAQUE: raw bytes) and
the large echo with ``copy=False`` on both sides (zero-copy frames, the reply is the very
frame that arrived).

    python zmq_bench.py run [--seconds 2] [--huge] [--mem] [--only a,b]
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import common
import zmq
from common import HOST, Peer, Workloads

RECV_TIMEOUT_MS = 120_000  # a lost reply fails the workload instead of hanging the run

W = Workloads()


def serve(ready, mode: str, port: str) -> None:
    """``serve pickle|opaque|zerocopy PORT``: a REP socket answering every request.

    pyzmq copies messages below its copy_threshold (64 KiB) even with copy=False, so the
    small rows use the plain (copying) API and only the large ones the zero-copy one.
    """
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.bind(f"tcp://{HOST}:{port}")
    common.exit_when_stdin_closes()  # recv() blocks without the GIL: a thread can exit us
    ready()
    while True:
        if mode == "pickle":
            args, _kwargs = pickle.loads(rep.recv())
            rep.send(pickle.dumps(args[0]))
        elif mode == "opaque":
            rep.send(rep.recv())
        else:
            rep.send(rep.recv(copy=False), copy=False)


@contextmanager
def req_socket(mode: str) -> Iterator[tuple[zmq.Socket, Peer]]:
    port = common.free_port()
    with Peer(mode, str(port)) as peer, zmq.Context() as ctx:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(f"tcp://{HOST}:{port}")
        try:
            yield req, peer
        finally:
            req.close()


@W.add("seq_pickle_1k5")
def seq_pickle(opts) -> dict:
    with req_socket("pickle") as (req, _):
        return common.pickle_echo_rate(req.send, req.recv, opts.seconds)


@W.add("seq_opaque_1k5")
def seq_opaque(opts) -> dict:
    payload = common.small_bytes()
    with req_socket("opaque") as (req, _):

        def call():
            req.send(payload)
            return req.recv()

        if call() != payload:
            raise AssertionError("echo mismatch")
        return common.calls_per_second(call, opts.seconds)


def zero_copy_echo(req: zmq.Socket):
    def echo(payload: bytes) -> memoryview:
        req.send(payload, copy=False)
        return req.recv(copy=False).buffer  # no copy: a view of the received frame

    return echo


@contextmanager
def opaque_echo(big: bool):
    with req_socket("zerocopy") as (req, peer):
        yield zero_copy_echo(req), peer


common.add_echo_workloads(W, opaque_echo)


def main() -> None:
    opts = common.parser(__doc__.splitlines()[0]).parse_args()
    if opts.cmd == "serve":
        common.run_peer(serve, opts.args)
        return
    meta = {"impl": "pyzmq", "pyzmq_version": zmq.__version__, "libzmq": zmq.zmq_version()}
    common.main_run(opts, W, meta)


if __name__ == "__main__":
    sys.exit(main())
