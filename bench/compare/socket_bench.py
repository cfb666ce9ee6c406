"""Raw Python socket side of the side-by-side benchmark: the floor for small calls.

Blocking TCP sockets on 127.0.0.1 with TCP_NODELAY and the least framing that works (an
8-byte length, then the body). Sequential ping-pong of a 1.5 KB message (OPAQUE row), the
same with pickle on both sides (PICKLE row), and the large echo received with recv_into
into a preallocated buffer: what plain Python achieves with no RPC layer at all.

    python socket_bench.py run [--seconds 2] [--huge] [--mem] [--only a,b]
"""

from __future__ import annotations

import pickle
import socket
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import common
from common import HOST, Peer, Workloads

HEADER = struct.Struct("!Q")
RECV_TIMEOUT_S = 120

W = Workloads()


class Conn:
    """One framed, blocking TCP connection carrying one message at a time (ping-pong).

    Receives into a reused buffer: a small message (header and body) usually takes a
    single recv; a large one is received straight into a buffer of its full size.
    """

    def __init__(self, sock: socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.buf = bytearray(64 * common.KiB)

    def send(self, body) -> None:
        if len(body) <= 64 * common.KiB:
            self.sock.sendall(HEADER.pack(len(body)) + body)  # one segment
        else:
            self.sock.sendall(HEADER.pack(len(body)))
            self.sock.sendall(body)

    def recv(self) -> memoryview:
        have = self._fill(0, HEADER.size)
        (size,) = HEADER.unpack_from(self.buf)
        end = HEADER.size + size
        if len(self.buf) < end:
            grown = bytearray(end)
            grown[:have] = self.buf[:have]
            self.buf = grown
        if self._fill(have, end) != end:
            raise ConnectionError("more than one message in flight")
        return memoryview(self.buf)[HEADER.size : end]

    def recv_exact(self, size: int) -> memoryview:
        """An unframed message of a size both sides know (``size`` <= 64 KiB)."""
        if self._fill(0, size) != size:
            raise ConnectionError("more than one message in flight")
        return memoryview(self.buf)[:size]

    def _fill(self, have: int, want: int) -> int:
        """Receive until the buffer holds at least ``want`` bytes; return how many it holds."""
        view = memoryview(self.buf)
        while have < want:
            n = self.sock.recv_into(view[have:])
            if n == 0:
                raise ConnectionError("peer closed the connection")
            have += n
        return have


def serve(ready, mode: str, port: str, size: str = "0") -> None:
    """``serve pickle|opaque PORT`` or ``serve pingpong PORT SIZE``: answer every message.

    pickle: unpickle the request and pickle the reply, as an RPC server would; opaque:
    send the body back; pingpong: unframed messages of SIZE bytes sent straight back.
    """
    listener = socket.create_server((HOST, int(port)))
    common.exit_when_stdin_closes()
    ready()
    conn = Conn(listener.accept()[0])
    try:
        while True:
            if mode == "pingpong":
                conn.sock.sendall(conn.recv_exact(int(size)))
                continue
            body = conn.recv()
            if mode == "pickle":
                args, _kwargs = pickle.loads(body)
                conn.send(pickle.dumps(args[0]))
            else:
                conn.send(body)
    except ConnectionError:  # the measuring side is done
        common.exit_now()


@contextmanager
def connected(*mode: str) -> Iterator[tuple[Conn, Peer]]:
    port = common.free_port()
    with Peer(mode[0], str(port), *mode[1:]) as peer, socket.create_connection((HOST, port)) as sock:
        # A kernel-side timeout: sock.settimeout() would add a poll() before every recv.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", RECV_TIMEOUT_S, 0))
        yield Conn(sock), peer


@W.add("seq_pickle_1k5")
def seq_pickle(opts) -> dict:
    with connected("pickle") as (conn, _):
        return common.pickle_echo_rate(conn.send, conn.recv, opts.seconds)


@W.add("seq_opaque_1k5")
def seq_opaque(opts) -> dict:
    """The floor: unframed ping-pong of a 1.5 KB message."""
    payload = common.small_bytes()
    size = len(payload)
    with connected("pingpong", str(size)) as (conn, _):

        def call():
            conn.sock.sendall(payload)
            return bytes(conn.recv_exact(size))  # what an RPC caller gets: its own bytes

        if call() != payload:
            raise AssertionError("echo mismatch")
        return common.calls_per_second(call, opts.seconds)


def echo_over(conn: Conn):
    def echo(payload: bytes) -> memoryview:
        conn.send(payload)
        return conn.recv()  # a view of the reused buffer: no copy

    return echo


@contextmanager
def opaque_echo(big: bool):
    with connected("opaque") as (conn, peer):
        yield echo_over(conn), peer


common.add_echo_workloads(W, opaque_echo)


def main() -> None:
    opts = common.parser(__doc__.splitlines()[0]).parse_args()
    if opts.cmd == "serve":
        common.run_peer(serve, opts.args)
        return
    common.main_run(opts, W, {"impl": "socket"})


if __name__ == "__main__":
    sys.exit(main())
