"""Writes the golden frames of this directory from the byte layout in docs/protocol.md.

The frames are built here with ``struct``, byte by byte, and not with the Rust encoder, so that
the Rust decoder (``engine/proto/tests/golden.rs``), the Python test
(``python/tests/test_golden.py``) and the document can be checked against one another.

Run ``python engine/proto/testdata/make_golden.py`` after a deliberate change of the format; the
output is deterministic (the PICKLE payloads are literal bytes, not ``pickle.dumps`` output,
which could differ between Python versions).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The 32-byte header: magic, version, kind, serde, flags, 2 reserved bytes, call id, meta length,
# 4 reserved bytes, payload length. Little-endian throughout.
HEADER = struct.Struct("<2sBBBB2sQI4sQ")
assert HEADER.size == 32

MAGIC = b"DF"
VERSION = 1

# Frame kinds.
HELLO, WELCOME, REQUEST, RESPONSE, ERROR, ANNOUNCE, GOODBYE, JOINED, LEFT = range(1, 10)

# Serde numbers.
OPAQUE, JSON, PICKLE, MSGPACK = range(4)

# Flags.
NO_REPLY = 0x01
TEXT = 0x02
ROUTER = 0x04
TRAILER = 0x08


def frame(kind: int, call_id: int, serde: int, flags: int, meta: str, payload: bytes) -> bytes:
    meta_bytes = meta.encode("utf-8")
    header = HEADER.pack(
        MAGIC, VERSION, kind, serde, flags, b"\0\0", call_id, len(meta_bytes), b"\0\0\0\0", len(payload)
    )
    return header + meta_bytes + payload


def names(items: list[str]) -> bytes:
    """A name list: count (u32), then per name its length (u16) and its UTF-8 bytes."""
    out = struct.pack("<I", len(items))
    for name in items:
        raw = name.encode("utf-8")
        out += struct.pack("<H", len(raw)) + raw
    return out


def hello_payload(max_message_size: int, functions: list[str]) -> bytes:
    return struct.pack("<Q", max_message_size) + names(functions)


def peers(items: list[tuple[str, int, list[str]]]) -> bytes:
    """A peer list: count (u32), then per peer its name (u16 length, UTF-8), its
    max_message_size (u64) and its functions (a name list)."""
    out = struct.pack("<I", len(items))
    for name, max_message_size, functions in items:
        raw = name.encode("utf-8")
        out += struct.pack("<H", len(raw)) + raw + struct.pack("<Q", max_message_size) + names(functions)
    return out


# pickle.dumps(((1, 2), {}), protocol=5): the arguments of add(1, 2).
PICKLE_ADD_ARGS = b"\x80\x05\x95\x0b\x00\x00\x00\x00\x00\x00\x00K\x01K\x02\x86\x94}\x94\x86\x94."
# pickle.dumps(3, protocol=5): its result.
PICKLE_THREE = b"\x80\x05K\x03."

REMOTE_ERROR = json.dumps(
    {
        "type": "ValueError",
        "message": "n must be positive",
        "traceback": 'Traceback (most recent call last):\n  File "svc.py", line 9, in sqrt\n'
        "ValueError: n must be positive\n",
    },
    separators=(",", ":"),
).encode("ascii")

GOLDEN = {
    # Client "cli" opens: it accepts 1 GiB messages and exports add and echo.
    "hello.bin": frame(HELLO, 0, 0, 0, "cli", hello_payload(1 << 30, ["add", "echo"])),
    # Server "svc" answers: it accepts 5 GiB messages and exports add, echo and grüß.
    "welcome.bin": frame(WELCOME, 0, 0, 0, "svc", hello_payload(5 << 30, ["add", "echo", "grüß"])),
    # Call 258 (0x0102): add(1, 2) in PICKLE.
    "request_pickle.bin": frame(REQUEST, 258, PICKLE, 0, "add", PICKLE_ADD_ARGS),
    # Its answer: 3, in PICKLE.
    "response_pickle.bin": frame(RESPONSE, 258, PICKLE, 0, "", PICKLE_THREE),
    # The answer to an OPAQUE call 259 that returned the str "héllo": UTF-8 with the TEXT flag.
    "response_text.bin": frame(RESPONSE, 259, OPAQUE, TEXT, "", "héllo".encode()),
    # Call 260 raised ValueError in the callee.
    "error_remote.bin": frame(ERROR, 260, 0, 0, "remote", REMOTE_ERROR),
    # Functions registered after the handshake.
    "announce.bin": frame(ANNOUNCE, 0, 0, 0, "", names(["late", "grüß"])),
    # What a daffi server says to a peer whose first bytes were "GE" (an HTTP GET) before it closes.
    "goodbye.bin": frame(GOODBYE, 0, 0, 0, "protocol error: bad magic [47, 45]: not a daffi peer", b""),
    # Router "rt" answers a hello: the ROUTER flag, 1 GiB, no functions of its own.
    "welcome_router.bin": frame(WELCOME, 0, 0, ROUTER, "rt", hello_payload(1 << 30, [])),
    # The router's first Joined: two peers present, a worker and a caller exporting nothing.
    "joined.bin": frame(JOINED, 0, 0, 0, "", peers([("worker-1", 1 << 30, ["process"]),
                                                     ("caller", 1 << 20, [])])),
    # A peer left.
    "left.bin": frame(LEFT, 0, 0, 0, "worker-1", b""),
    # Through a router, call 7: process("job") in JSON, to worker-1 (meta: target NUL function).
    "request_routed.bin": frame(REQUEST, 7, JSON, 0, "worker-1\0process", b'[["job"],{}]'),
    # A router relays the answer to call 7 with a status byte after the payload: 00, complete.
    "response_trailer.bin": frame(RESPONSE, 7, JSON, TRAILER, "", b'"done: job"') + b"\x00",
}


def main() -> None:
    for name, data in GOLDEN.items():
        (HERE / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
