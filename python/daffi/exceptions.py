"""Exceptions raised by daffi.

Every exception daffi raises on purpose derives from :class:`DaffiError`. Some also derive
from the builtin a user would naturally catch:

==========================  ==========================================================
``InitializationError``     a node is misconfigured or cannot start / connect
``Disconnected``            the peer went away (also a builtin ``ConnectionError``)
``Evicted``                 a newer node with the same ``app_name`` took our place
                            (a ``Disconnected``)
``TransmissionFailure``     a call could not be delivered (no eligible receiver...)
``RemoteCallError``         the remote callback raised; see :func:`remote_error`
``CallTimeout``             no answer before the deadline (also a builtin
                            ``TimeoutError``)
==========================  ==========================================================

A remote exception arrives as an instance of a subclass of :class:`RemoteCallError` named
after the remote type. When that name is a builtin exception (``ValueError``, ``KeyError``,
``OSError``...) the subclass also derives from the builtin, so both
``except ValueError`` and ``except RemoteCallError`` catch a remote ``ValueError``.
"""

from __future__ import annotations

import builtins
import threading
from typing import Any

__all__ = [
    "CallTimeout",
    "DaffiError",
    "Disconnected",
    "Evicted",
    "InitializationError",
    "RemoteCallError",
    "TransmissionFailure",
    "remote_error",
    "remote_error_type",
]


class DaffiError(Exception):
    """Base class of every daffi exception."""

    def __init__(self, message: str = "", *args: Any) -> None:
        self.message = message
        # Not ``super().__init__``: the builtin mixed into a subclass (OSError, the
        # UnicodeError family...) may not accept a single message argument.
        Exception.__init__(self, message, *args)

    def fire(self):
        """Raise this exception (kept from daffi 3 for old code)."""
        raise self


class InitializationError(DaffiError):
    """A node is misconfigured, cannot bind or cannot connect, or a callback cannot be
    registered."""


class Disconnected(DaffiError, ConnectionError):
    """The connection to the peer (router or service) was lost."""


class Evicted(Disconnected):
    """A newer connection with the same ``app_name`` replaced this one. The node does not
    reconnect by itself."""


class TransmissionFailure(DaffiError):
    """A call could not be delivered: no connected peer exposes the function, the chosen
    receiver is gone, or the connection failed while sending."""


class CallTimeout(DaffiError, TimeoutError):
    """A call got no answer before its deadline.

    The optional keyword attributes describe the call: ``call`` (the function name),
    ``timeout`` (the limit, in seconds), ``elapsed`` (seconds waited) and ``receivers``.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        call: str | None = None,
        timeout: float | None = None,
        elapsed: float | None = None,
        receivers: Any = None,
    ) -> None:
        self.call = call
        self.timeout = timeout
        self.elapsed = elapsed
        self.receivers = receivers
        if message is None:
            message = "call"
            if call is not None:
                message += f" {call!r}"
            if receivers:
                message += f" to {receivers!r}"
            message += " timed out"
            if timeout is not None:
                message += f" after {timeout:g} s"
        super().__init__(message)


class RemoteCallError(DaffiError):
    """The remote callback raised an exception.

    Attributes:
        remote_type: name of the remote exception type: ``"ValueError"`` for a builtin,
            ``"module.QualName"`` otherwise.
        remote_message: ``str()`` of the remote exception.
        remote_traceback: the remote traceback, formatted (may be empty).

    ``str(e)`` reads ``"<remote_type>: <remote_message>"``. On Python 3.11+ the remote
    traceback is attached as a note, so an uncaught remote error prints it.
    """

    #: True on the classes made by :func:`remote_error_type`.
    _daffi_dynamic = False

    def __init__(
        self,
        message: str = "",
        *,
        remote_type: str = "",
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback
        if remote_traceback and hasattr(self, "add_note"):
            self.add_note(f"Remote traceback:\n{remote_traceback.rstrip()}")

    def __str__(self) -> str:
        if not self.remote_type:
            return self.remote_message
        if not self.remote_message:
            return self.remote_type
        return f"{self.remote_type}: {self.remote_message}"

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({self.remote_message!r}, remote_type={self.remote_type!r})"

    def __reduce__(self):
        # The dynamic classes cannot be found by name, so rebuild them through
        # ``remote_error``; extra attributes travel in the state dict.
        state = {k: v for k, v in self.__dict__.items() if k != "__notes__"}
        if type(self)._daffi_dynamic:
            return (
                remote_error,
                (self.remote_type, self.remote_message, self.remote_traceback),
                state,
            )
        return (
            _rebuild_remote_call_error,
            (type(self), self.remote_message, self.remote_type, self.remote_traceback),
            state,
        )


def _rebuild_remote_call_error(cls, message, remote_type, remote_traceback):
    return cls(message, remote_type=remote_type, remote_traceback=remote_traceback)


# Builtins that must not be mixed into a remote error: raising a StopIteration out of a
# call would silently end the caller's loop (or become a RuntimeError in a generator).
_NO_MIXIN = frozenset({"StopIteration", "StopAsyncIteration"})

# Bounded, so that a peer sending ever-new type names cannot grow memory without limit.
_CACHE_MAX = 512
_cache: dict[str, type[RemoteCallError]] = {}
_cache_lock = threading.Lock()


def _builtin_mixin(name: str) -> type | None:
    obj = builtins.__dict__.get(name)
    if (
        isinstance(obj, type)
        and issubclass(obj, Exception)
        and not issubclass(RemoteCallError, obj)
        and name not in _NO_MIXIN
    ):
        return obj
    return None


def _make_type(type_name: str) -> type[RemoteCallError]:
    short = type_name.rpartition(".")[2]
    if not short.isidentifier():
        return RemoteCallError
    if short == "RemoteCallError" and type_name in (
        "RemoteCallError",
        __name__ + ".RemoteCallError",
    ):
        return RemoteCallError
    namespace = {"__module__": __name__, "__qualname__": short, "_daffi_dynamic": True}
    # Only a bare name (or ``builtins.X``) denotes a builtin; ``mylib.ValueError`` does not.
    builtin = None
    if type_name == short or type_name == "builtins." + short:
        builtin = _builtin_mixin(short)
    if builtin is not None:
        mixed = _mixed_type(short, builtin, namespace, type_name)
        if mixed is not None:
            return mixed
    return type(short, (RemoteCallError,), namespace)


def _mixed_type(
    short: str, builtin: type, namespace: dict[str, Any], type_name: str
) -> type[RemoteCallError] | None:
    """A subclass of both RemoteCallError and ``builtin``, or None when the builtin's
    constructor or layout does not allow it (e.g. ``ExceptionGroup``)."""
    try:
        cls = type(short, (RemoteCallError, builtin), namespace)
        # Prove that the combination constructs, prints, reprs and pickles.
        probe = cls("probe", remote_type=type_name, remote_traceback="tb")
        str(probe)
        repr(probe)
        probe.__reduce__()
    except Exception:  # whatever goes wrong, fall back to no mixin
        return None
    return cls


def remote_error_type(type_name: str) -> type[RemoteCallError]:
    """Return the (cached) :class:`RemoteCallError` subclass for a remote type name.

    ``remote_error_type("ValueError")`` also derives from the builtin ``ValueError``. Names
    that are not identifiers give :class:`RemoteCallError` itself. Never raises.
    """
    try:
        cls = _cache.get(type_name)
        if cls is not None:
            return cls
        with _cache_lock:
            cls = _cache.get(type_name)
            if cls is None:
                cls = _make_type(type_name)
                if len(_cache) < _CACHE_MAX:
                    _cache[type_name] = cls
        return cls
    except Exception:  # documented never to raise
        return RemoteCallError


def remote_error(type_name: Any, message: Any, traceback: Any = "") -> RemoteCallError:
    """Build the exception that represents an error raised by a remote callback.

    Returns an instance of ``remote_error_type(type_name)`` carrying ``message`` and the
    remote ``traceback`` text. Non-``str`` arguments are converted; this function never
    raises.
    """
    try:
        type_name = type_name if isinstance(type_name, str) else safe_str(type_name)
        message = message if isinstance(message, str) else safe_str(message)
        traceback = traceback if isinstance(traceback, str) else safe_str(traceback)
        if not type_name:
            type_name = "RemoteCallError"
        cls = remote_error_type(type_name)
        return cls(message, remote_type=type_name, remote_traceback=traceback)
    except Exception:  # documented never to raise
        try:
            return RemoteCallError(safe_str(message), remote_type=safe_str(type_name) or "RemoteCallError")
        except Exception:  # documented never to raise
            return RemoteCallError("remote error")


def safe_str(obj: Any) -> str:
    """``str(obj)`` that never raises (``""`` for ``None``)."""
    if obj is None:
        return ""
    try:
        return str(obj)
    except Exception:  # a user's __str__ may raise anything
        return f"<unprintable {type(obj).__name__} object>"


# daffi 3 named its base class ``BaseException``; old code imports it from here. It is kept
# importable by name only: it is left out of ``__all__`` so that ``from daffi.exceptions
# import *`` never shadows the builtin, and nothing else in daffi uses the name. It must stay
# the last statement of this module: below it, ``BaseException`` would mean ``DaffiError``.
BaseException = DaffiError
