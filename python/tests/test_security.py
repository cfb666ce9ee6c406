"""SPEC §9: a shared token checked in the handshake, and servers that refuse serde formats."""

import time

import pytest
from conftest import call_without_handshake
from daffi import SerdeFormat, callback
from daffi.exceptions import InitializationError, TransmissionFailure


@pytest.fixture
def counted():
    calls = []

    @callback
    def sec_record(value):
        calls.append(value)
        return value

    return calls


def test_token_is_required_and_checked(make_service, make_client, counted):
    svc = make_service(token="open sesame")
    for token in (None, "open sesamE", b"open"):
        started = time.monotonic()
        with pytest.raises(InitializationError, match="authentication failed"):
            make_client(svc, token=token)
        assert time.monotonic() - started < 3
    assert svc.members == []
    client, conn = make_client(svc, token=b"open sesame")
    assert conn.rpc(timeout=5).sec_record(1) == 1
    assert counted == [1]


def test_no_call_runs_before_the_handshake(make_service, make_client, counted):
    # Its idle worker would like to read the only connection itself: not before the
    # handshake has checked the token.
    svc = make_service(token="open sesame")
    sock = call_without_handshake(svc.port, "sec_record", ("intruder",))
    time.sleep(0.5)
    assert counted == []
    sock.close()
    _, conn = make_client(svc, token="open sesame")
    assert conn.rpc(timeout=5).sec_record("member") == "member"
    assert counted == ["member"]


def test_a_client_token_is_harmless_without_a_server_token(make_service, make_client, counted):
    svc = make_service()
    _, conn = make_client(svc, token="spare")
    assert conn.rpc(timeout=5).sec_record("x") == "x"


@pytest.mark.parametrize("token", ["", b"", 5, "x" * 70000])
def test_bad_tokens_are_refused_at_construction(make_service, token):
    with pytest.raises(InitializationError, match="token"):
        make_service(token=token)


def test_refused_formats_are_never_decoded(make_service, make_client, counted):
    svc = make_service(serde_formats=[SerdeFormat.JSON, SerdeFormat.OPAQUE])
    _, conn = make_client(svc)
    with pytest.raises(TransmissionFailure, match="serde format 2"):
        conn.rpc(timeout=5).sec_record({"a": 1})
    conn.rpc_nowait().sec_record("dropped")
    with pytest.raises(TransmissionFailure, match="serde format 3"):
        conn.rpc(timeout=5, serde=SerdeFormat.MSGPACK).sec_record(1)
    assert conn.rpc(timeout=5, serde=SerdeFormat.JSON).sec_record([1, 2]) == [1, 2]
    assert conn.rpc(timeout=5, serde=SerdeFormat.OPAQUE).sec_record(b"raw") == b"raw"
    assert counted == [[1, 2], b"raw"]


def test_serde_formats_must_name_something(make_service):
    with pytest.raises(InitializationError):
        make_service(serde_formats=[])
    with pytest.raises(ValueError):
        make_service(serde_formats=[9])
