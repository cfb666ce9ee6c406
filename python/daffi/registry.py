"""The process-wide callback registry and the ``callback`` / ``local`` / ``alias`` decorators.

Every node of the process (Service, Client, their ``daffi.aio`` twins) exposes every callback
in :data:`REGISTRY`. Nodes :meth:`Registry.subscribe` to it so that a callback registered
after ``connect()`` is announced on the live connections.

Rules (SPEC §3):

- ``@callback`` on a function registers it under its ``__name__`` and returns the function
  itself, unchanged (so it still calls the original, keeps its metadata and pickles by
  reference).
- ``callback(obj.method)`` registers a bound method under the method's name.
- ``@callback`` on a class creates one instance with no arguments and registers its public
  methods (plain, static and class methods, inherited ones too) under their names; names
  starting with ``_`` and methods marked ``@local`` are skipped. Properties and other
  attributes are never evaluated. The class itself is returned.
- ``alias("name")`` records an alternative name: the function is reachable under its own
  name *and* under every alias (``alias`` may be stacked). It works above or below
  ``@callback``, and on methods of a ``@callback`` class. On a bound method the alias is
  recorded on the underlying function.
- Lambdas, generator and async generator functions, objects without a ``__name__`` and a
  name registered twice raise :class:`~daffi.exceptions.InitializationError`. A failed
  registration registers nothing (a class registers all of its methods or none).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from daffi.exceptions import InitializationError

__all__ = ["REGISTRY", "Registry", "alias", "callback", "local"]

logger = logging.getLogger("daffi.registry")

F = TypeVar("F")

_LOCAL_ATTR = "__daffi_local__"
_ALIASES_ATTR = "__daffi_aliases__"
_NAMES_ATTR = "__daffi_callback_names__"


class Registry:
    """Name → callable map shared by every node of the process.

    Reads (:meth:`get`, :meth:`lookup`, :meth:`is_async`) take no lock: they are single
    dict look-ups, atomic in CPython and thread-safe on free-threaded builds. Writers
    serialise on a lock and publish a new immutable snapshot of names.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        # name -> (callable, is_async)
        self._entries: dict[str, tuple[Callable[..., Any], bool]] = {}
        self._subscribers: list[Callable[[list[str]], None]] = []

    # -- reading (hot path) -------------------------------------------------------------

    def get(self, name: str) -> Callable[..., Any] | None:
        """The callable registered under ``name``, or ``None``."""
        entry = self._entries.get(name)
        return None if entry is None else entry[0]

    def lookup(self, name: str) -> tuple[Callable[..., Any], bool] | None:
        """``(callable, is_async)`` for ``name`` in one look-up, or ``None``."""
        return self._entries.get(name)

    def is_async(self, name: str) -> bool:
        """Whether ``name`` is an ``async def`` callback (``False`` when unknown)."""
        entry = self._entries.get(name)
        return entry is not None and entry[1]

    def names(self) -> list[str]:
        """Every exported name, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # -- writing ------------------------------------------------------------------------

    def register(self, items: Iterable[tuple[str, Callable[..., Any]]]) -> list[str]:
        """Register ``(name, callable)`` pairs all at once, or none of them.

        Raises :class:`InitializationError` when a name is already taken (or repeated in
        ``items``). Subscribers hear the new names after the lock is released. Returns the
        new names.
        """
        items = list(items)
        with self._lock:
            seen: dict[str, Callable[..., Any]] = {}
            for name, fn in items:
                _check_name(name)
                holder = self._entries.get(name)
                if holder is not None or name in seen:
                    other = holder[0] if holder is not None else seen[name]
                    raise InitializationError(
                        f"a callback named {name!r} is already registered "
                        f"({_describe(other)}); rename it or give it an alias"
                    )
                seen[name] = fn
            entries = dict(self._entries)
            for name, fn in items:
                entries[name] = (fn, _is_coroutine_function(fn))
            self._entries = entries  # atomic publish: readers never see a half update
            subscribers = list(self._subscribers)
        new_names = [name for name, _ in items]
        if new_names:
            for subscriber in subscribers:
                try:
                    subscriber(list(new_names))
                except Exception:
                    logger.exception("registry subscriber %r failed", subscriber)
        return new_names

    def subscribe(self, fn: Callable[[list[str]], None]) -> Callable[[], None]:
        """Call ``fn(new_names)`` after each successful registration.

        Returns a function that unsubscribes (idempotent). ``fn`` runs in the registering
        thread, outside the registry lock; exceptions are logged. To miss nothing, subscribe
        first and read :meth:`names` afterwards (a name may then be reported twice).
        """
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                try:
                    self._subscribers.remove(fn)
                except ValueError:
                    pass

        return unsubscribe

    # -- test support -------------------------------------------------------------------

    def _unregister_for_tests(self, name: str) -> None:
        """Forget ``name`` (no-op when absent). For tests only: peers are not told."""
        with self._lock:
            if name in self._entries:
                entries = dict(self._entries)
                del entries[name]
                self._entries = entries

    def _snapshot(self) -> dict[str, tuple[Callable[..., Any], bool]]:
        """The current entries, for :meth:`_restore`. For tests only."""
        return self._entries

    def _restore(self, snapshot: dict[str, tuple[Callable[..., Any], bool]]) -> None:
        """Put back the entries of :meth:`_snapshot` (subscribers are not told)."""
        with self._lock:
            self._entries = dict(snapshot)


#: The process-wide registry.
REGISTRY = Registry()


# -- decorators ----------------------------------------------------------------------------


def local(fn: Any = None) -> Any:
    """Mark a method of a ``@callback`` class as not exported. ``@local`` and ``@local()``
    both work."""

    def mark(target: F) -> F:
        _set_marker(target, _LOCAL_ATTR, True)
        return target

    if fn is None:
        return mark
    if not callable(fn) and not isinstance(fn, (staticmethod, classmethod)):
        raise TypeError(f"@local expects a function or method, got {type(fn).__name__}")
    return mark(fn)


def alias(name: str) -> Callable[[F], F]:
    """Record ``name`` as an alternative name of the decorated function.

    The callback is then reachable under its own name and under ``name``. ``name`` must be
    a non-empty ``str`` (``ValueError`` otherwise).
    """
    if not isinstance(name, str):
        # ValueError, not TypeError: SPEC §3 (and daffi 3) say so.
        raise ValueError(f"alias must be a str, got {type(name).__name__}")
    _check_name(name, error=ValueError)

    def decorate(target: F) -> F:
        if isinstance(target, type):
            raise InitializationError(
                f"alias({name!r}) applies to functions and methods, not to class {target.__qualname__}"
            )
        holder = _marker_holder(target)
        # Applied above ``@callback``: the function is already registered, register the
        # alias now. (``functools.wraps`` copies the mark onto wrappers, hence the identity
        # check.)
        registered = getattr(target, _NAMES_ATTR, None) if target is holder else None
        if registered and REGISTRY.get(registered[0]) is target and name not in registered:
            REGISTRY.register([(name, target)])
            setattr(target, _NAMES_ATTR, (*registered, name))
        previous = getattr(holder, _ALIASES_ATTR, ())
        if name not in previous:
            setattr(holder, _ALIASES_ATTR, (*previous, name))
        return target

    return decorate


def callback(target: F) -> F:
    """Register a function, a bound method or every public method of a class as a remote
    callback in :data:`REGISTRY`. Returns ``target`` unchanged."""
    if isinstance(target, type):
        items = _class_items(target)
        REGISTRY.register(items)
        return target
    if isinstance(target, (staticmethod, classmethod)):
        raise InitializationError(
            "@callback cannot register a bare staticmethod/classmethod object; "
            "decorate the class instead, or register the method after the class is built"
        )
    if not callable(target):
        raise InitializationError(
            f"@callback expects a function, a bound method or a class, got {type(target).__name__}"
        )
    name = getattr(target, "__name__", None)
    if not isinstance(name, str):
        raise InitializationError(
            f"@callback cannot register {target!r}: it has no __name__ (wrap it in a named function)"
        )
    _check_callable(name, target)
    names = list(dict.fromkeys((name, *_aliases_of(target))))
    REGISTRY.register([(n, target) for n in names])
    if not inspect.ismethod(target):
        # Lets a later ``alias()`` (written above ``@callback``) register its name too.
        # Not on bound methods: the mark would land on the function shared by all instances.
        try:
            setattr(target, _NAMES_ATTR, tuple(names))
        except (AttributeError, TypeError):
            pass  # builtins and the like: registered, just not marked
    return target


# -- helpers -------------------------------------------------------------------------------


def _class_items(cls: type) -> list[tuple[str, Callable[..., Any]]]:
    if getattr(cls, _ALIASES_ATTR, None) and _ALIASES_ATTR in vars(cls):
        raise InitializationError(
            f"alias() applies to functions and methods, not to class {cls.__qualname__}"
        )
    try:
        instance = cls()
    except TypeError as exc:
        raise InitializationError(
            f"@callback on class {cls.__qualname__} needs a constructor that takes no "
            f"arguments ({exc}); register bound methods with callback(obj.method) instead"
        ) from exc
    items: list[tuple[str, Callable[..., Any]]] = []
    for name in dir(cls):
        if name.startswith("_"):
            continue
        raw = inspect.getattr_static(cls, name)
        if isinstance(raw, (staticmethod, classmethod)):
            marker_source: Any = raw.__func__
        elif inspect.isfunction(raw):
            marker_source = raw
        else:
            continue  # properties, nested classes, data attributes: not callbacks
        if getattr(marker_source, _LOCAL_ATTR, False):
            continue
        method = getattr(instance, name)
        _check_callable(f"{cls.__qualname__}.{name}", method)
        for exported in dict.fromkeys((name, *getattr(marker_source, _ALIASES_ATTR, ()))):
            items.append((exported, method))
    return items


def _check_callable(label: str, fn: Any) -> None:
    if getattr(fn, "__name__", None) == "<lambda>":
        raise InitializationError(f"@callback cannot register a lambda ({label}); use a named function")
    if inspect.isgeneratorfunction(fn):
        raise InitializationError(
            f"@callback cannot register {label!r}: it is a generator function; "
            "return a list, or use stream() to send chunks"
        )
    if inspect.isasyncgenfunction(fn):
        raise InitializationError(f"@callback cannot register {label!r}: it is an async generator function")


def _check_name(name: Any, error: type = InitializationError) -> None:
    if not isinstance(name, str) or not name:
        raise error(f"a callback name must be a non-empty str, got {name!r}")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise error(f"callback name {name[:40]!r}... is longer than 255 bytes of UTF-8")
    if any(ch < " " or ch == "\x7f" for ch in name):
        raise error(f"callback name {name!r} contains control characters")


def _is_coroutine_function(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn)


def _aliases_of(fn: Any) -> tuple[str, ...]:
    return tuple(getattr(fn, _ALIASES_ATTR, ()))


def _marker_holder(target: Any) -> Any:
    """The object that carries markers: the function under a bound method or a
    staticmethod/classmethod wrapper, else the target itself."""
    if inspect.ismethod(target) or isinstance(target, (staticmethod, classmethod)):
        return target.__func__
    return target


def _set_marker(target: Any, attr: str, value: Any) -> None:
    setattr(_marker_holder(target), attr, value)


def _describe(fn: Any) -> str:
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    module = getattr(fn, "__module__", None)
    return f"{module}.{qual}" if module else str(qual)
