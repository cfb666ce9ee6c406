"""The golden frames of engine/proto/testdata, parsed with ``struct`` as docs/protocol.md says.

The Rust decoder reads the same files in engine/proto/tests/golden.rs, so the document, the
Rust code and this independent reading agree. Nothing here needs the native module.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest

TESTDATA = Path(__file__).resolve().parents[2] / "engine" / "proto" / "testdata"

# docs/protocol.md, "The frame header".
HEADER = struct.Struct("<2sBBBB2sQI4sQ")
KINDS = {
    1: "hello", 2: "welcome", 3: "request", 4: "response", 5: "error", 6: "announce", 7: "goodbye",
    8: "joined", 9: "left",
}
NO_REPLY = 0x01
TEXT = 0x02
ROUTER = 0x04
TRAILER = 0x08
OPAQUE, JSON, PICKLE, MSGPACK = range(4)


def parse(data: bytes) -> dict[str, Any]:
    """One whole frame: the header fields, the meta (decoded) and the payload."""
    assert len(data) >= HEADER.size == 32
    magic, version, kind, serde, flags, reserved1, call_id, meta_len, reserved2, payload_len = (
        HEADER.unpack_from(data)
    )
    assert magic == b"DF"
    assert version == 1
    assert kind in KINDS
    assert flags & ~(NO_REPLY | TEXT | ROUTER | TRAILER) == 0
    assert reserved1 == b"\0\0" and reserved2 == b"\0\0\0\0"
    assert meta_len <= 16 * 1024
    trailer = 1 if flags & TRAILER else 0
    assert len(data) == 32 + meta_len + payload_len + trailer, "the file is exactly one frame"
    meta = data[32 : 32 + meta_len].decode("utf-8")
    return {
        "kind": KINDS[kind],
        "serde": serde,
        "flags": flags,
        "call_id": call_id,
        "meta": meta,
        "payload": data[32 + meta_len : 32 + meta_len + payload_len],
        "status": data[-1] if trailer else None,
    }


def names_at(payload: bytes, at: int) -> tuple[list[str], int]:
    """A name list starting at ``at``: u32 count, then per name a u16 length and that many
    UTF-8 bytes. Returns the names and the offset after the list."""
    (count,) = struct.unpack_from("<I", payload, at)
    at += 4
    names = []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", payload, at)
        at += 2
        raw = payload[at : at + length]
        assert len(raw) == length
        names.append(raw.decode("utf-8"))
        at += length
    return names, at


def parse_names(payload: bytes) -> list[str]:
    """A whole payload that is one name list."""
    names, at = names_at(payload, 0)
    assert at == len(payload), "no trailing bytes after a name list"
    return names


def parse_hello(payload: bytes) -> tuple[int, list[str]]:
    (max_message_size,) = struct.unpack_from("<Q", payload)
    return max_message_size, parse_names(payload[8:])


def frame(name: str) -> dict[str, Any]:
    return parse((TESTDATA / name).read_bytes())


def test_hello() -> None:
    f = frame("hello.bin")
    assert (f["kind"], f["serde"], f["flags"], f["call_id"], f["meta"]) == ("hello", 0, 0, 0, "cli")
    assert parse_hello(f["payload"]) == (1 << 30, ["add", "echo"])


def test_welcome() -> None:
    f = frame("welcome.bin")
    assert (f["kind"], f["serde"], f["flags"], f["call_id"], f["meta"]) == ("welcome", 0, 0, 0, "svc")
    assert parse_hello(f["payload"]) == (5 << 30, ["add", "echo", "grüß"])


def test_request_pickle() -> None:
    f = frame("request_pickle.bin")
    assert (f["kind"], f["serde"], f["flags"], f["call_id"], f["meta"]) == ("request", PICKLE, 0, 258, "add")
    assert pickle.loads(f["payload"]) == ((1, 2), {})


def test_response_pickle() -> None:
    f = frame("response_pickle.bin")
    assert (f["kind"], f["serde"], f["flags"], f["call_id"], f["meta"]) == ("response", PICKLE, 0, 258, "")
    assert pickle.loads(f["payload"]) == 3


def test_response_text() -> None:
    f = frame("response_text.bin")
    assert (f["kind"], f["serde"], f["flags"], f["call_id"], f["meta"]) == ("response", OPAQUE, TEXT, 259, "")
    assert f["payload"].decode("utf-8") == "héllo"


def test_error_remote() -> None:
    f = frame("error_remote.bin")
    assert (f["kind"], f["serde"], f["flags"], f["call_id"], f["meta"]) == ("error", 0, 0, 260, "remote")
    doc = json.loads(f["payload"])
    assert list(doc) == ["type", "message", "traceback"]
    assert doc["type"] == "ValueError"
    assert doc["message"] == "n must be positive"
    assert doc["traceback"].endswith("ValueError: n must be positive\n")
    f["payload"].decode("ascii")  # non-ASCII characters travel as \u escapes


def test_announce() -> None:
    f = frame("announce.bin")
    assert (f["kind"], f["serde"], f["flags"], f["call_id"], f["meta"]) == ("announce", 0, 0, 0, "")
    assert parse_names(f["payload"]) == ["late", "grüß"]


def test_goodbye() -> None:
    f = frame("goodbye.bin")
    assert (f["kind"], f["serde"], f["flags"], f["call_id"]) == ("goodbye", 0, 0, 0)
    assert f["meta"] == "protocol error: bad magic [47, 45]: not a daffi peer"
    assert f["payload"] == b""


def test_router_welcome() -> None:
    f = frame("welcome_router.bin")
    assert (f["kind"], f["flags"], f["call_id"], f["meta"]) == ("welcome", ROUTER, 0, "rt")
    (limit,) = struct.unpack_from("<Q", f["payload"])
    assert limit == 1 << 30
    assert parse_names(f["payload"][8:]) == []


def test_joined_peer_list() -> None:
    f = frame("joined.bin")
    assert (f["kind"], f["flags"], f["call_id"], f["meta"]) == ("joined", 0, 0, "")
    payload = f["payload"]
    (count,) = struct.unpack_from("<I", payload)
    at, found = 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", payload, at)
        name = payload[at + 2 : at + 2 + length].decode("utf-8")
        at += 2 + length
        (limit,) = struct.unpack_from("<Q", payload, at)
        at += 8
        functions, at = names_at(payload, at)
        found.append((name, limit, functions))
    assert at == len(payload)
    assert found == [("worker-1", 1 << 30, ["process"]), ("caller", 1 << 20, [])]


def test_left_and_routed_request() -> None:
    f = frame("left.bin")
    assert (f["kind"], f["meta"], f["payload"]) == ("left", "worker-1", b"")
    f = frame("request_routed.bin")
    assert (f["kind"], f["serde"], f["call_id"]) == ("request", JSON, 7)
    target, function = f["meta"].split("\0", 1)
    assert (target, function) == ("worker-1", "process")
    assert json.loads(f["payload"]) == [["job"], {}]


def test_response_with_trailer() -> None:
    f = frame("response_trailer.bin")
    assert (f["kind"], f["serde"], f["flags"], f["call_id"]) == ("response", JSON, TRAILER, 7)
    assert json.loads(f["payload"]) == "done: job"
    assert f["status"] == 0


def test_files_match_their_generator() -> None:
    """The checked-in files are what make_golden.py writes (nobody edited one by hand)."""
    spec = importlib.util.spec_from_file_location("make_golden", TESTDATA / "make_golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.GOLDEN) == {p.name for p in TESTDATA.glob("*.bin")}
    for name, data in module.GOLDEN.items():
        assert (TESTDATA / name).read_bytes() == data, name


def test_payloads_decode_with_daffi_serialization() -> None:
    """daffi's own decoders read the golden payloads as the document says."""
    serialization = pytest.importorskip("daffi._serialization")
    request = frame("request_pickle.bin")
    assert serialization.decode_call(request["serde"], request["payload"], False) == ((1, 2), {})
    response = frame("response_pickle.bin")
    assert serialization.decode_result(response["serde"], response["payload"], False) == 3
    text = frame("response_text.bin")
    assert serialization.decode_result(text["serde"], text["payload"], bool(text["flags"] & TEXT)) == "héllo"
    error = serialization.decode_error(frame("error_remote.bin")["payload"])
    assert isinstance(error, ValueError)
    assert error.remote_message == "n must be positive"
