"""Wire encoding of arguments and results for the four serde formats (SPEC §5)."""

from __future__ import annotations

import array
import dataclasses
import datetime
import decimal
import pickle
import threading

import pytest
from daffi._serialization import (
    SerdeFormat,
    decode_call,
    decode_result,
    encode_call,
    encode_result,
)

OPAQUE, JSON, PICKLE, MSGPACK = (
    SerdeFormat.OPAQUE,
    SerdeFormat.JSON,
    SerdeFormat.PICKLE,
    SerdeFormat.MSGPACK,
)


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


def call_round_trip(serde, *args, **kwargs):
    payload, is_text = encode_call(serde, args, kwargs)
    return decode_call(serde, payload, is_text)


def result_round_trip(serde, value):
    payload, is_text = encode_result(serde, value)
    return decode_result(serde, payload, is_text)


# -- SerdeFormat --------------------------------------------------------------------------------


def test_serde_numbers_are_the_wire_values():
    assert [(f.name, int(f)) for f in SerdeFormat] == [
        ("OPAQUE", 0),
        ("JSON", 1),
        ("PICKLE", 2),
        ("MSGPACK", 3),
    ]
    assert SerdeFormat(2) is SerdeFormat.PICKLE
    assert SerdeFormat.PICKLE == 2


def test_plain_ints_work_as_serde():
    payload, is_text = encode_call(2, (1,), {})
    assert decode_call(2, payload, is_text) == ((1,), {})
    assert result_round_trip(1, [1]) == [1]


@pytest.mark.parametrize("serde", [4, -1, 255, "PICKLE", None])
def test_unknown_serde_is_a_value_error(serde):
    with pytest.raises(ValueError, match="serde"):
        encode_call(serde, (1,), {})
    with pytest.raises(ValueError, match="serde"):
        decode_call(serde, b"", False)
    with pytest.raises(ValueError, match="serde"):
        encode_result(serde, 1)
    with pytest.raises(ValueError, match="serde"):
        decode_result(serde, b"", False)


# -- PICKLE -------------------------------------------------------------------------------------


def test_pickle_call_payload_is_one_protocol_5_pickle():
    args, kwargs = (1, "two"), {"three": 3.0}
    payload, is_text = encode_call(PICKLE, args, kwargs)
    assert payload == pickle.dumps((args, kwargs), protocol=5)
    assert is_text is False


def test_pickle_preserves_types_exactly():
    args = (
        (1, 2),
        {1, 2},
        frozenset({"a"}),
        b"\x00raw\xff",
        bytearray(b"ba"),
        Point(3, 4),
        decimal.Decimal("1.10"),
        datetime.date(2026, 11, 24),
        None,
        {("tuple", "key"): [1.5, complex(1, 2)]},
    )
    got_args, got_kwargs = call_round_trip(PICKLE, *args, flag=True, point=Point(0, 1))
    assert got_args == args
    assert [type(a) for a in got_args] == [type(a) for a in args]
    assert got_kwargs == {"flag": True, "point": Point(0, 1)}


def test_pickle_result_round_trip():
    value = {"nested": [(1, 2), {3}], "p": Point(5, 6), "b": b"\x00" * 10}
    payload, is_text = encode_result(PICKLE, value)
    assert payload == pickle.dumps(value, protocol=5)
    assert is_text is False
    assert decode_result(PICKLE, payload, False) == value
    assert result_round_trip(PICKLE, None) is None


def test_pickle_decodes_from_any_buffer():
    payload, _ = encode_call(PICKLE, ("x",), {"k": 1})
    assert decode_call(PICKLE, memoryview(payload), False) == (("x",), {"k": 1})
    assert decode_call(PICKLE, bytearray(payload), False) == (("x",), {"k": 1})


def test_unpicklable_argument_is_a_type_error_before_sending():
    with pytest.raises(TypeError, match="PICKLE"):
        encode_call(PICKLE, (threading.Lock(),), {})


def test_unpicklable_result_is_a_clear_type_error():
    def local_function():
        return 1

    with pytest.raises(TypeError, match="result of type function.*PICKLE"):
        encode_result(PICKLE, local_function)
    with pytest.raises(TypeError, match="lock"):
        encode_result(PICKLE, threading.Lock())


# -- JSON ---------------------------------------------------------------------------------------


def test_json_call_payload_is_compact_utf8():
    payload, is_text = encode_call(JSON, (1, "é", [True, None]), {"k": 1.5})
    assert payload == '[[1,"é",[true,null]],{"k":1.5}]'.encode()
    assert is_text is False


def test_json_round_trip_of_json_types():
    args = (1, -2.5, "text ✓", True, None, [1, [2]], {"a": {"b": []}})
    assert call_round_trip(JSON, *args, key="v") == (args, {"key": "v"})
    assert result_round_trip(JSON, {"list": [1, 2], "n": None}) == {
        "list": [1, 2],
        "n": None,
    }


def test_json_tuples_come_back_as_lists():
    got_args, got_kwargs = call_round_trip(JSON, (1, 2), nested=((3,),))
    assert got_args == ([1, 2],)
    assert type(got_args) is tuple  # the argument list itself is a tuple
    assert got_kwargs == {"nested": [[3]]}
    assert result_round_trip(JSON, (1, (2, 3))) == [1, [2, 3]]


def test_json_int_keys_come_back_as_strings():
    assert result_round_trip(JSON, {1: "a"}) == {"1": "a"}


@pytest.mark.parametrize(
    "bad",
    [b"bytes", bytearray(b"x"), {1, 2}, Point(1, 2), float("nan"), float("inf")],
    ids=["bytes", "bytearray", "set", "object", "nan", "inf"],
)
def test_json_refuses_non_json_values_before_sending(bad):
    with pytest.raises(TypeError, match="JSON"):
        encode_call(JSON, (bad,), {})
    with pytest.raises(TypeError, match="JSON"):
        encode_call(JSON, (), {"k": [bad]})
    with pytest.raises(TypeError, match="JSON"):
        encode_result(JSON, {"v": bad})


def test_json_refuses_circular_structures():
    loop: list = []
    loop.append(loop)
    with pytest.raises(TypeError, match="JSON"):
        encode_result(JSON, loop)


def test_json_decodes_from_str_bytearray_and_memoryview():
    payload = b'[[1,"a"],{"k":[2]}]'
    expected = ((1, "a"), {"k": [2]})
    assert decode_call(JSON, payload, False) == expected
    assert decode_call(JSON, payload.decode(), True) == expected
    assert decode_call(JSON, bytearray(payload), False) == expected
    assert decode_call(JSON, memoryview(payload), False) == expected
    assert decode_result(JSON, memoryview(b'{"r":1}'), False) == {"r": 1}


def test_json_accepts_the_daffi3_envelope():
    payload = b'{"args":[1,2],"kwargs":{"x":3}}'
    assert decode_call(JSON, payload, False) == ((1, 2), {"x": 3})


@pytest.mark.parametrize(
    "payload",
    [b"[1]", b"[1,2,3]", b'{"x":1}', b'[{"a":1},{}]', b"[[],[]]", b"5", b"null"],
)
def test_json_malformed_call_payload_is_a_value_error(payload):
    with pytest.raises(ValueError, match="malformed"):
        decode_call(JSON, payload, False)


def test_json_invalid_text_is_a_value_error():
    with pytest.raises(ValueError):
        decode_call(JSON, b"[[1],{", False)


# -- OPAQUE -------------------------------------------------------------------------------------


def test_opaque_bytes_travel_without_a_copy():
    data = b"\x00\x01binary\x00" * 1000
    payload, is_text = encode_call(OPAQUE, (data,), {})
    assert payload is data
    assert is_text is False
    got_args, got_kwargs = decode_call(OPAQUE, payload, False)
    assert got_args[0] is data
    assert got_kwargs == {}


def test_opaque_str_travels_as_utf8_text():
    payload, is_text = encode_call(OPAQUE, ("héllo ✓",), {})
    assert payload == "héllo ✓".encode()
    assert is_text is True
    assert decode_call(OPAQUE, payload, True) == (("héllo ✓",), {})
    assert decode_call(OPAQUE, memoryview(payload), True) == (("héllo ✓",), {})
    assert decode_call(OPAQUE, "already text", True) == (("already text",), {})


def test_opaque_bytearray_and_memoryview_arrive_as_bytes():
    for value in (bytearray(b"abc\x00"), memoryview(b"abc\x00")):
        payload, is_text = encode_call(OPAQUE, (value,), {})
        assert is_text is False
        assert bytes(payload) == b"abc\x00"
        (arg,), kwargs = decode_call(OPAQUE, payload, False)
        assert type(arg) is bytes
        assert arg == b"abc\x00"
        assert kwargs == {}


def test_opaque_other_buffers_are_flattened_to_raw_bytes():
    ints = array.array("i", [1, 2, 3])
    payload, is_text = encode_call(OPAQUE, (ints,), {})
    assert is_text is False
    assert bytes(payload) == ints.tobytes()
    assert len(memoryview(payload)) == 3 * ints.itemsize

    strided = memoryview(b"a-b-c-")[::2]  # not contiguous
    payload, _ = encode_call(OPAQUE, (strided,), {})
    assert bytes(payload) == b"abc"


def test_opaque_keyword_argument_arrives_as_first_positional():
    payload, is_text = encode_call(OPAQUE, (), {"data": b"kw"})
    assert payload == b"kw"
    assert decode_call(OPAQUE, payload, is_text) == ((b"kw",), {})


def test_opaque_empty_values_round_trip():
    assert call_round_trip(OPAQUE, b"") == ((b"",), {})
    assert call_round_trip(OPAQUE, "") == (("",), {})


@pytest.mark.parametrize(
    ("args", "kwargs", "count"),
    [
        ((), {}, 0),
        ((b"a", b"b"), {}, 2),
        ((b"a",), {"b": b"b"}, 2),
        ((), {"a": "", "b": ""}, 2),
    ],
)
def test_opaque_needs_exactly_one_argument(args, kwargs, count):
    with pytest.raises(TypeError, match=f"exactly one argument, got {count}"):
        encode_call(OPAQUE, args, kwargs)


@pytest.mark.parametrize("bad", [None, 1, 1.5, [b"x"], {"k": b"v"}, Point(1, 2)])
def test_opaque_refuses_non_buffers(bad):
    with pytest.raises(TypeError, match="OPAQUE"):
        encode_call(OPAQUE, (bad,), {})


def test_opaque_results():
    assert result_round_trip(OPAQUE, b"\x00res") == b"\x00res"
    assert result_round_trip(OPAQUE, "text result") == "text result"
    assert result_round_trip(OPAQUE, bytearray(b"ba")) == b"ba"
    # A callback that returns nothing (a stream sink) answers with an empty payload.
    assert encode_result(OPAQUE, None) == (b"", False)
    assert result_round_trip(OPAQUE, None) == b""
    with pytest.raises(TypeError, match="OPAQUE"):
        encode_result(OPAQUE, 42)


def test_opaque_result_bytes_are_not_copied():
    data = b"x" * 100_000
    payload, is_text = encode_result(OPAQUE, data)
    assert payload is data
    assert is_text is False
    assert decode_result(OPAQUE, payload, False) is data


# -- MSGPACK (needs the native module) ------------------------------------------------------


@pytest.fixture
def native():
    return pytest.importorskip("daffi._native")


def test_msgpack_round_trip_keeps_bytes_and_int_keys(native):
    args = (b"\x00\xffraw", {1: "one", 2: [b"x"]}, "text", 7, -1.5, None, True)
    assert call_round_trip(MSGPACK, *args, k=b"v") == (args, {"k": b"v"})
    assert result_round_trip(MSGPACK, {3: b"three"}) == {3: b"three"}


def test_msgpack_tuples_come_back_as_lists(native):
    assert call_round_trip(MSGPACK, (1, 2)) == (([1, 2],), {})
    assert result_round_trip(MSGPACK, (1, (2,))) == [1, [2]]


def test_msgpack_payload_matches_the_native_codec(native):
    payload, is_text = encode_call(MSGPACK, (1, b"a"), {"k": 2})
    assert is_text is False
    assert payload == native.msgpack_dumps([[1, b"a"], {"k": 2}])
    assert native.msgpack_loads(payload) == [[1, b"a"], {"k": 2}]


def test_msgpack_refuses_arbitrary_objects(native):
    with pytest.raises(TypeError, match="MSGPACK"):
        encode_call(MSGPACK, (Point(1, 2),), {})
    with pytest.raises(TypeError, match="MSGPACK"):
        encode_result(MSGPACK, threading.Lock())
