"""Wire encoding of call arguments, results and remote errors.

The engine carries a payload opaquely, together with the serde number and a one-bit ``text``
flag (set only for an OPAQUE ``str``). Layouts:

========  ===================================================  ===========================
serde     call payload                                         result payload
========  ===================================================  ===========================
OPAQUE    the one argument itself (see below)                  the result itself
JSON      UTF-8 JSON ``[args, kwargs]``, compact               UTF-8 JSON of the value
PICKLE    ``pickle.dumps((args, kwargs), protocol=5)``         ``pickle.dumps(value, 5)``
MSGPACK   msgpack ``[args, kwargs]`` (``daffi._native``)       msgpack of the value
========  ===================================================  ===========================

Error payloads (an exception raised by a callback) are always UTF-8 JSON
``{"type": ..., "message": ..., "traceback": ...}``, whatever the call's serde.

OPAQUE takes exactly one argument, positional or keyword, and delivers it to the callee as
its **first positional argument** (the keyword's name does not travel). ``bytes`` is passed
to the engine as-is (zero-copy: the engine holds a reference while sending); other buffers
(``bytearray``, ``memoryview``, ``array``, numpy arrays...) go as a flat byte
``memoryview`` (the engine may copy them: only ``bytes`` is guaranteed zero-copy); ``str``
goes as its UTF-8 bytes with the text flag set. Buffers arrive as ``bytes``, ``str`` as
``str``. An OPAQUE callback that returns ``None`` answers with an empty payload, which
arrives as ``b""``.

Encoders raise ``TypeError`` (with the original error chained) for values the format
cannot carry, before anything is sent. Decoders raise ``ValueError`` for payloads of the
wrong shape; PICKLE decoding raises whatever :func:`pickle.loads` raises.

PICKLE uses protocol 5 rather than ``pickle.HIGHEST_PROTOCOL`` so that peers on different
Python versions always understand each other.
"""

from __future__ import annotations

import enum
import json
import pickle
import traceback as _traceback
from typing import Any

from daffi.exceptions import RemoteCallError, remote_error, safe_str

__all__ = [
    "SerdeFormat",
    "decode_call",
    "decode_error",
    "decode_result",
    "encode_call",
    "encode_error",
    "encode_result",
]


class SerdeFormat(enum.IntEnum):
    """Wire format of a call's arguments and result."""

    OPAQUE = 0
    """One ``bytes``/buffer or ``str`` argument, passed through untouched."""
    JSON = 1
    """JSON types only; tuples arrive as lists; ``bytes`` is refused."""
    PICKLE = 2
    """Any picklable value, types preserved exactly (the default)."""
    MSGPACK = 3
    """JSON types plus ``bytes`` and non-string map keys (built into ``daffi._native``)."""


_OPAQUE = 0
_JSON = 1
_PICKLE = 2
_MSGPACK = 3

PICKLE_PROTOCOL = 5

_pickle_dumps = pickle.dumps
_pickle_loads = pickle.loads
_json_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=True
).encode
_json_loads = json.loads

# The native module is imported on first MSGPACK use and cached here.
_native: Any = None


def _native_module() -> Any:
    global _native
    if _native is None:
        from daffi import _native as module

        _native = module
    return _native


def _format_name(serde: Any) -> str:
    try:
        return SerdeFormat(serde).name
    except ValueError:
        return repr(serde)


def _unknown(serde: Any) -> ValueError:
    return ValueError(
        f"unknown serde {serde!r}; expected one of " + ", ".join(f"SerdeFormat.{f.name}" for f in SerdeFormat)
    )


def _cannot_encode(what: str, serde: int, exc: BaseException) -> TypeError:
    name = _format_name(serde)
    hint = ""
    if serde == _JSON:
        hint = " (JSON carries only dict/list/str/int/float/bool/None; use PICKLE or MSGPACK)"
    elif serde == _MSGPACK:
        hint = " (MSGPACK carries JSON types plus bytes; use PICKLE for other objects)"
    return TypeError(f"cannot encode {what} with SerdeFormat.{name}: {exc}{hint}")


# -- OPAQUE --------------------------------------------------------------------------------


def _opaque_value(value: Any, what: str) -> tuple[Any, bool]:
    cls = type(value)
    if cls is bytes:
        return value, False
    if cls is str:
        return value.encode("utf-8", "surrogatepass"), True
    if isinstance(value, bytes):
        return value, False
    if isinstance(value, str):
        return str.encode(value, "utf-8", "surrogatepass"), True
    try:
        view = memoryview(value)
    except TypeError:
        raise TypeError(
            f"SerdeFormat.OPAQUE carries bytes, a buffer or str; the {what} is {cls.__name__}"
        ) from None
    if view.ndim == 1 and view.format == "B" and view.contiguous:
        return view, False
    if view.c_contiguous:
        return view.cast("B"), False
    return view.tobytes(), False


def _opaque_decode(payload: Any, is_text: bool) -> Any:
    if is_text:
        if type(payload) is str:
            return payload
        return str(payload, "utf-8", "surrogatepass")
    if type(payload) is bytes:
        return payload
    return bytes(payload)


# -- calls ---------------------------------------------------------------------------------


def encode_call(serde: int, args: tuple, kwargs: dict) -> tuple[Any, bool]:
    """Encode a call's arguments: ``(payload, is_text)``. Raises ``TypeError`` for
    arguments the format cannot carry and ``ValueError`` for an unknown ``serde``."""
    if serde == _PICKLE:
        try:
            return _pickle_dumps((args, kwargs), PICKLE_PROTOCOL), False
        except Exception as exc:
            raise _cannot_encode("the call arguments", serde, exc) from exc
    if serde == _OPAQUE:
        count = len(args) + len(kwargs)
        if count != 1:
            raise TypeError(
                f"SerdeFormat.OPAQUE takes exactly one argument, got {count} "
                f"({len(args)} positional, {len(kwargs)} keyword); use PICKLE, JSON or "
                "MSGPACK for several"
            )
        return _opaque_value(args[0] if args else next(iter(kwargs.values())), "argument")
    if serde == _JSON:
        try:
            return _json_encoder([args, kwargs]).encode("utf-8"), False
        except (TypeError, ValueError, RecursionError) as exc:
            raise _cannot_encode("the call arguments", serde, exc) from exc
    if serde == _MSGPACK:
        native = _native or _native_module()
        try:
            return native.msgpack_dumps([args, kwargs]), False
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise _cannot_encode("the call arguments", serde, exc) from exc
    raise _unknown(serde)


def _split_call(decoded: Any, serde: int) -> tuple[tuple, dict]:
    if type(decoded) is list and len(decoded) == 2:
        args, kwargs = decoded
    elif type(decoded) is dict and "args" in decoded:  # daffi 3's JSON envelope
        args, kwargs = decoded["args"], decoded.get("kwargs") or {}
    else:
        raise ValueError(f"malformed SerdeFormat.{_format_name(serde)} call payload: expected [args, kwargs]")
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        # A malformed payload, hence ValueError (what json.loads raises too).
        raise ValueError(f"malformed SerdeFormat.{_format_name(serde)} call payload: expected [list, map]")
    return tuple(args), kwargs


def decode_call(serde: int, payload: Any, is_text: bool) -> tuple[tuple, dict]:
    """Decode a call's arguments into ``(args, kwargs)``. ``payload`` may be ``bytes``,
    any buffer, or ``str``."""
    if serde == _PICKLE:
        return _pickle_loads(payload)
    if serde == _OPAQUE:
        return (_opaque_decode(payload, is_text),), {}
    if serde == _JSON:
        if type(payload) is not bytes and not isinstance(payload, (str, bytearray)):
            payload = bytes(payload)
        return _split_call(_json_loads(payload), serde)
    if serde == _MSGPACK:
        native = _native or _native_module()
        return _split_call(native.msgpack_loads(payload), serde)
    raise _unknown(serde)


# -- results -------------------------------------------------------------------------------


def encode_result(serde: int, value: Any) -> tuple[Any, bool]:
    """Encode a callback's return value: ``(payload, is_text)``. Raises ``TypeError`` when
    the format cannot carry it (the node reports that as a remote error)."""
    if serde == _PICKLE:
        try:
            return _pickle_dumps(value, PICKLE_PROTOCOL), False
        except Exception as exc:
            raise _cannot_encode(f"a result of type {type(value).__name__}", serde, exc) from exc
    if serde == _OPAQUE:
        if value is None:
            return b"", False
        return _opaque_value(value, "result")
    if serde == _JSON:
        try:
            return _json_encoder(value).encode("utf-8"), False
        except (TypeError, ValueError, RecursionError) as exc:
            raise _cannot_encode(f"a result of type {type(value).__name__}", serde, exc) from exc
    if serde == _MSGPACK:
        native = _native or _native_module()
        try:
            return native.msgpack_dumps(value), False
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise _cannot_encode(f"a result of type {type(value).__name__}", serde, exc) from exc
    raise _unknown(serde)


def decode_result(serde: int, payload: Any, is_text: bool) -> Any:
    """Decode a result payload. ``payload`` may be ``bytes``, any buffer, or ``str``."""
    if serde == _PICKLE:
        return _pickle_loads(payload)
    if serde == _OPAQUE:
        return _opaque_decode(payload, is_text)
    if serde == _JSON:
        if type(payload) is not bytes and not isinstance(payload, (str, bytearray)):
            payload = bytes(payload)
        return _json_loads(payload)
    if serde == _MSGPACK:
        native = _native or _native_module()
        return native.msgpack_loads(payload)
    raise _unknown(serde)


# -- errors --------------------------------------------------------------------------------

# A field longer than this is cut (a pathological message must not become a huge frame).
_MAX_ERROR_FIELD = 1 << 20


def _clip(text: str) -> str:
    if len(text) <= _MAX_ERROR_FIELD:
        return text
    cut = len(text) - _MAX_ERROR_FIELD
    return text[:_MAX_ERROR_FIELD] + f"... [{cut} more characters]"


def _type_name(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", None) or cls.__name__
    if not module or module == "builtins":
        return qualname
    return f"{module}.{qualname}"


def encode_error(exc: BaseException, tb_text: str | None = None) -> bytes:
    """Encode an exception raised by a callback: UTF-8 JSON ``{"type", "message",
    "traceback"}``.

    ``type`` is the bare name for builtins (``"ValueError"``) and ``"module.QualName"``
    otherwise; a re-raised :class:`RemoteCallError` keeps its original remote type, so
    errors pass transparently through nested calls. ``tb_text`` defaults to the formatted
    traceback of ``exc``. Never raises.
    """
    try:
        if isinstance(exc, RemoteCallError):
            type_name = exc.remote_type or "RemoteCallError"
            message = exc.remote_message
        else:
            type_name = _type_name(type(exc))
            message = safe_str(exc)
        if tb_text is None:
            tb_text = "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__))
            remote_tb = getattr(exc, "remote_traceback", "")
            # On 3.11+ the remote traceback is already there, as a note.
            if isinstance(exc, RemoteCallError) and remote_tb and remote_tb not in tb_text:
                tb_text += f"Remote traceback:\n{remote_tb}"
        doc = {
            "type": safe_str(type_name),
            "message": _clip(safe_str(message)),
            "traceback": _clip(safe_str(tb_text)),
        }
        # ensure_ascii: lone surrogates become escapes, so the encode below cannot fail.
        return json.dumps(doc, separators=(",", ":")).encode("ascii")
    except Exception:  # documented never to raise
        return b'{"type":"RemoteCallError","message":"unencodable error","traceback":""}'


_BUFFERS = (bytes, bytearray, memoryview)


def _error_doc(payload: Any) -> dict[str, Any] | None:
    if not isinstance(payload, (*_BUFFERS, str)):
        return None
    try:
        doc = json.loads(payload if isinstance(payload, (bytes, str)) else bytes(payload))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if isinstance(doc, dict) and isinstance(doc.get("type"), str) and doc["type"]:
        return doc
    return None


def decode_error(payload: Any) -> RemoteCallError:
    """Decode an error payload into a :class:`RemoteCallError` (see
    :func:`daffi.exceptions.remote_error`). Never raises: a payload that is not the
    expected JSON object gives a plain ``RemoteCallError`` quoting its start."""
    doc = _error_doc(payload)
    if doc is not None:
        return remote_error(doc["type"], doc.get("message", ""), doc.get("traceback", ""))
    if isinstance(payload, _BUFFERS):
        preview: Any = bytes(memoryview(payload)[:200])
    elif isinstance(payload, str):
        preview = payload[:200]
    else:
        preview = f"<{type(payload).__name__} object>"
    return remote_error("RemoteCallError", f"malformed error payload from the peer: {preview!r}", "")
