"""The exception hierarchy, remote errors and their wire encoding (SPEC §1, §5)."""

from __future__ import annotations

import builtins
import json
import pickle
import sys

import daffi.exceptions as exc_mod
import pytest
from daffi._serialization import decode_error, encode_error
from daffi.exceptions import (
    CallTimeout,
    DaffiError,
    Disconnected,
    Evicted,
    InitializationError,
    RemoteCallError,
    TransmissionFailure,
    remote_error,
    remote_error_type,
)


class QuotaExceeded(Exception):
    """A user-defined exception (not a builtin)."""


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


def raise_and_encode(exc: BaseException) -> bytes:
    try:
        raise exc
    except BaseException as caught:  # encoding is what is tested
        return encode_error(caught)


# -- hierarchy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        InitializationError,
        Disconnected,
        Evicted,
        TransmissionFailure,
        RemoteCallError,
        CallTimeout,
    ],
)
def test_every_daffi_exception_is_a_daffi_error(cls):
    assert issubclass(cls, DaffiError)
    assert issubclass(cls, Exception)


def test_builtin_mixins():
    assert issubclass(Disconnected, ConnectionError)
    assert issubclass(Evicted, Disconnected)
    assert issubclass(Evicted, ConnectionError)
    assert issubclass(CallTimeout, TimeoutError)
    assert not issubclass(TransmissionFailure, ConnectionError)


def test_legacy_base_exception_alias_does_not_shadow_the_builtin():
    from daffi.exceptions import BaseException as LegacyBase

    assert LegacyBase is DaffiError
    assert builtins.BaseException is not DaffiError
    assert "BaseException" not in exc_mod.__all__
    namespace: dict = {}
    exec("from daffi.exceptions import *", namespace)  # star-import check
    assert "BaseException" not in namespace
    assert namespace["DaffiError"] is DaffiError


def test_message_and_str():
    err = Disconnected("router went away")
    assert str(err) == "router went away"  # no "[Errno ...]" from the OSError side
    assert err.message == "router went away"
    assert err.errno is None
    assert str(InitializationError("bad name")) == "bad name"
    with pytest.raises(TransmissionFailure, match="no peer"):
        TransmissionFailure("no peer").fire()


def test_call_timeout_message_and_attributes():
    err = CallTimeout(call="slow", timeout=2.5, elapsed=2.51, receivers=["w1"])
    assert err.call == "slow"
    assert err.timeout == 2.5
    assert err.elapsed == 2.51
    assert err.receivers == ["w1"]
    assert str(err) == "call 'slow' to ['w1'] timed out after 2.5 s"
    assert str(CallTimeout("custom text")) == "custom text"
    with pytest.raises(TimeoutError):
        raise err


@pytest.mark.parametrize(
    "err",
    [
        InitializationError("init"),
        Disconnected("gone"),
        Evicted("replaced"),
        TransmissionFailure("undeliverable"),
        CallTimeout(call="f", timeout=1.0, elapsed=1.0, receivers=None),
        RemoteCallError("plain", remote_type="X", remote_traceback="tb"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_daffi_exceptions_pickle(err):
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert str(copy) == str(err)
    assert copy.__dict__.keys() >= {"message"}
    if isinstance(err, CallTimeout):
        assert (copy.call, copy.timeout, copy.receivers) == ("f", 1.0, None)


# -- remote_error -------------------------------------------------------------------------------


def test_remote_value_error_is_both_kinds():
    err = remote_error("ValueError", "bad value", "Traceback...\nValueError: bad value\n")
    assert isinstance(err, RemoteCallError)
    assert isinstance(err, ValueError)
    assert isinstance(err, DaffiError)
    assert type(err).__name__ == "ValueError"
    assert err.remote_type == "ValueError"
    assert err.remote_message == "bad value"
    assert err.remote_traceback == "Traceback...\nValueError: bad value\n"
    assert str(err) == "ValueError: bad value"
    with pytest.raises(ValueError, match="bad value"):
        raise err


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are 3.11+")
def test_remote_traceback_is_attached_as_a_note():
    err = remote_error("ValueError", "m", "remote frames here")
    assert err.__notes__ == ["Remote traceback:\nremote frames here"]
    assert remote_error("ValueError", "m", "").__dict__.get("__notes__") is None


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("KeyError", KeyError),
        ("ZeroDivisionError", ArithmeticError),
        ("OSError", OSError),
        ("FileNotFoundError", OSError),
        ("ConnectionRefusedError", ConnectionError),
        ("UnicodeDecodeError", ValueError),
        ("TimeoutError", TimeoutError),
        ("AttributeError", AttributeError),
        ("ImportError", ImportError),
        ("NotImplementedError", RuntimeError),
    ],
)
def test_builtins_with_special_constructors_still_mix_in(name, builtin):
    err = remote_error(name, "the message", "tb")
    assert isinstance(err, getattr(builtins, name))
    assert isinstance(err, builtin)
    assert isinstance(err, RemoteCallError)
    assert str(err) == f"{name}: the message"
    assert err.remote_message == "the message"
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert copy.remote_traceback == "tb"


def test_remote_key_error_str_is_not_requoted():
    err = remote_error("KeyError", "'missing'", "")
    assert str(err) == "KeyError: 'missing'"


def test_exception_group_falls_back_to_plain_remote_error():
    err = remote_error("ExceptionGroup", "several", "")
    assert isinstance(err, RemoteCallError)
    assert type(err).__name__ == "ExceptionGroup"
    group = getattr(builtins, "ExceptionGroup", None)  # 3.11+
    if group is not None:
        assert not isinstance(err, group)
    assert str(err) == "ExceptionGroup: several"


@pytest.mark.parametrize("name", ["StopIteration", "StopAsyncIteration", "KeyboardInterrupt", "SystemExit"])
def test_dangerous_builtins_are_not_mixed_in(name):
    err = remote_error(name, "m", "")
    assert not isinstance(err, getattr(builtins, name))
    assert isinstance(err, RemoteCallError)
    assert type(err).__name__ == name


def test_user_defined_remote_type():
    err = remote_error("myapp.errors.QuotaExceeded", "over quota", "")
    assert type(err).__name__ == "QuotaExceeded"
    assert err.remote_type == "myapp.errors.QuotaExceeded"
    assert str(err) == "myapp.errors.QuotaExceeded: over quota"
    assert type(err).__bases__ == (RemoteCallError,)


def test_dotted_name_is_not_taken_for_a_builtin():
    err = remote_error("mylib.ValueError", "m", "")
    assert not isinstance(err, ValueError)
    assert isinstance(remote_error("builtins.ValueError", "m", ""), ValueError)


def test_remote_error_classes_are_cached():
    assert type(remote_error("LookupError", "a", "")) is type(remote_error("LookupError", "b", ""))
    assert remote_error_type("LookupError") is type(remote_error("LookupError", "c", ""))
    assert remote_error_type("RemoteCallError") is RemoteCallError
    assert type(remote_error("RemoteCallError", "m", "")) is RemoteCallError


@pytest.mark.parametrize(
    ("type_name", "message", "traceback"),
    [
        ("", "m", ""),
        ("not an identifier!", "m", ""),
        ("trailing.", "m", ""),
        (None, None, None),
        (123, b"bytes message", 4.5),
        ("X" * 100_000, "m" * 100_000, ""),
        ("\x00\udcff", "\udcff", "\x00"),
        ("Unprintable", Unprintable(), ""),
    ],
)
def test_remote_error_never_raises(type_name, message, traceback):
    err = remote_error(type_name, message, traceback)
    assert isinstance(err, RemoteCallError)
    assert isinstance(str(err), str)
    assert isinstance(repr(err), str)
    assert isinstance(err.remote_message, str)


def test_remote_error_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(exc_mod, "_cache", {})
    for i in range(exc_mod._CACHE_MAX + 50):
        remote_error(f"Flood{i}Error", "m", "")
    assert len(exc_mod._cache) <= exc_mod._CACHE_MAX
    err = remote_error("FloodBeyondTheCacheError", "m", "")
    assert type(err).__name__ == "FloodBeyondTheCacheError"


# -- encode_error / decode_error ------------------------------------------------------------------


def test_error_payload_is_utf8_json_with_three_fields():
    payload = raise_and_encode(ValueError("bad ✓"))
    assert isinstance(payload, bytes)
    doc = json.loads(payload.decode("utf-8"))
    assert set(doc) == {"type", "message", "traceback"}
    assert doc["type"] == "ValueError"
    assert doc["message"] == "bad ✓"
    assert doc["traceback"].startswith("Traceback (most recent call last):")
    assert "raise_and_encode" in doc["traceback"]
    assert doc["traceback"].rstrip().endswith("ValueError: bad ✓")


def test_error_round_trip_keeps_type_message_and_traceback():
    def divide():
        return 1 / 0

    try:
        divide()
    except ZeroDivisionError as caught:
        payload = encode_error(caught)

    err = decode_error(payload)
    assert isinstance(err, ZeroDivisionError)
    assert isinstance(err, ArithmeticError)
    assert isinstance(err, RemoteCallError)
    assert err.remote_type == "ZeroDivisionError"
    assert err.remote_message == "division by zero"
    assert "in divide" in err.remote_traceback
    assert str(err) == "ZeroDivisionError: division by zero"


def test_user_exception_type_is_qualified():
    err = decode_error(raise_and_encode(QuotaExceeded("limit 10")))
    assert err.remote_type.endswith(".QuotaExceeded")
    assert err.remote_type != "QuotaExceeded"
    assert type(err).__name__ == "QuotaExceeded"
    assert err.remote_message == "limit 10"
    assert not isinstance(err, QuotaExceeded)  # the remote class is not imported


def test_key_error_round_trip():
    err = decode_error(raise_and_encode(KeyError("missing")))
    assert isinstance(err, KeyError)
    assert str(err) == "KeyError: 'missing'"


def test_explicit_traceback_text_is_used_verbatim():
    payload = encode_error(RuntimeError("x"), "my traceback text")
    assert json.loads(payload)["traceback"] == "my traceback text"
    assert json.loads(encode_error(RuntimeError("x")))["traceback"] == "RuntimeError: x\n"


def test_unprintable_exception_is_encoded():
    doc = json.loads(raise_and_encode(Unprintable()))
    assert doc["type"].endswith(".Unprintable")
    assert doc["message"] == "<unprintable Unprintable object>"


def test_lone_surrogates_survive_encoding():
    payload = encode_error(ValueError("bad \udcff byte"))
    payload.decode("ascii")  # pure ASCII on the wire
    assert decode_error(payload).remote_message == "bad \udcff byte"


def test_huge_message_is_clipped():
    doc = json.loads(encode_error(ValueError("x" * (3 << 20))))
    assert len(doc["message"]) < (1 << 20) + 100
    assert doc["message"].endswith("more characters]")


def test_reraised_remote_error_keeps_the_original_type():
    original = decode_error(raise_and_encode(ValueError("deep problem")))
    # A callback that called another node and let its error escape.
    relayed = decode_error(raise_and_encode(original))
    assert isinstance(relayed, ValueError)
    assert relayed.remote_type == "ValueError"
    assert relayed.remote_message == "deep problem"
    assert original.remote_traceback.strip() in relayed.remote_traceback


def test_decode_error_accepts_buffers_and_str():
    payload = raise_and_encode(TypeError("t"))
    for variant in (bytearray(payload), memoryview(payload), payload.decode()):
        err = decode_error(variant)
        assert isinstance(err, TypeError)
        assert err.remote_message == "t"


def test_decode_error_tolerates_missing_fields():
    err = decode_error(b'{"type":"IndexError"}')
    assert isinstance(err, IndexError)
    assert err.remote_message == ""
    assert err.remote_traceback == ""
    assert str(err) == "IndexError"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe\x00",
        b"null",
        b"[1, 2]",
        b'{"type": ""}',
        b'{"type": 5, "message": "m"}',
        b"plain text error from somewhere",
        b"[" * 100_000,
        "not json",
        None,
        42,
        object(),
    ],
)
def test_decode_error_never_raises_on_garbage(payload):
    err = decode_error(payload)
    assert type(err) is RemoteCallError
    assert "malformed error payload" in err.remote_message
    assert isinstance(str(err), str)


def test_garbage_payload_is_quoted_briefly():
    err = decode_error(b"oops: " + b"z" * 10_000)
    assert "oops: " in err.remote_message
    assert len(err.remote_message) < 400
