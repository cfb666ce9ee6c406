"""daffi for asyncio: ``AsyncService``, ``AsyncRouter``, ``AsyncClient``.

They take the same options as the synchronous nodes and speak the same protocol, so sync and
async nodes mix freely on one network. Every call style returns an awaitable::

    client = AsyncClient(app_name="caller", host="127.0.0.1", port=5000)
    conn = await client.connect()
    print(await conn.rpc(timeout=5).add(1, 2))
    await conn.rpc_nowait().notify("x")      # handed over when awaited

How it waits: the engine makes one descriptor per node readable whenever answers, calls or
membership events are ready, and the event loop watches it with ``loop.add_reader``; the
callback takes everything that is ready without blocking. While a client's connection (or a
Service's only one) has nothing that needs the engine, the engine lends it to the loop, which
then watches the socket itself and reads small answers and requests on its own thread, so a
round trip does not wait for the engine thread to wake up; large payloads, membership frames
and the like go back to the engine. There is no thread hop per call and
no thread per waiting call: thousands of concurrent calls on one connection each get their own
future. Cancelling a task that awaits a call abandons the call (a late answer is dropped).
The frames a node sends during one turn of the loop are written together when the turn ends
(or as soon as 256 KiB of them wait), in the order they were made; a call or answer made while
nothing else is held or in flight (sequential calls) is written at once. Deadlines of calls
are kept in one heap served by a single timer.

Callbacks on an async node: ``async def`` callbacks run on the node's event loop, plain ``def``
callbacks in a thread pool of ``workers`` threads, so they never block the loop; at most
``workers`` run at once (``workers=1``: one at a time, in arrival order). Event handlers may be
``async def``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import heapq
import itertools
import logging
import math
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from daffi._node import (
    Client,
    Router,
    Service,
    _chunks,
    _Node,
    _outcome,
    _PeerView,
    _Proxy,
    _stream_source,
    _targets,
)
from daffi._serialization import (
    SerdeFormat,
    decode_call,
    encode_call,
    encode_error,
    encode_result,
)
from daffi.exceptions import CallTimeout, Disconnected
from daffi.registry import REGISTRY

__all__ = ["AsyncClient", "AsyncConnection", "AsyncRouter", "AsyncService"]

logger = logging.getLogger("daffi.aio")

_NO_REPLY = 0x01
_TEXT = 0x02
# Calls (and events) taken per turn of the event loop.
_BATCH = 256
_PICKLE = SerdeFormat.PICKLE
_OPAQUE = SerdeFormat.OPAQUE


# Replies read inline in a row (see _Bridge.await_socket) before the loop must run a lap.
_INLINE_MAX = 16
# Back-pressure: an async node takes no more calls from the engine while those waiting for its
# consumers weigh more than this (payload bytes plus _CALL_WEIGHT each), until they are down to
# half. The engine's own inbox then fills, and past its limit the engine stops reading.
_INTAKE_HIGH = 16 << 20
# More than the engine's 256 bytes a call: here each call is also a tuple of Python objects.
_CALL_WEIGHT = 1024


def _weight(call: tuple) -> int:
    """What a queued call counts towards _INTAKE_HIGH: its payload and _CALL_WEIGHT."""
    return len(call[5]) + _CALL_WEIGHT


def _deadline(timeout: float | None) -> float | None:
    """asyncio's form of a daffi timeout: None or 0 mean no deadline."""
    if timeout is None or timeout == 0:
        return None
    if timeout < 0:
        raise ValueError("timeout must be a non-negative number")
    return float(timeout)


_EXPIRED = object()


def _cancel_requested() -> bool:
    """Whether the running task itself is being cancelled (rather than some code it awaited
    raising ``CancelledError`` on its own). Python 3.10 cannot tell: it answers True."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


class _Bridge:
    """Joins one native node to one event loop.

    The node's ready descriptor is watched with ``loop.add_reader``; when it turns readable,
    the answers of async calls go to their futures, incoming calls to the node's queue and
    membership events to its handlers. While the engine lends the node's connection to the
    loop (``lent_fd``), the loop also watches that socket and reads it itself (``read_socket``);
    it stops watching before it gives the socket back.
    """

    def __init__(self, node: _AsyncNode, native: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.node = node
        self.native = native
        self.loop = loop
        self.futures: dict[int, asyncio.Future] = {}
        self.is_client = hasattr(native, "take_done")
        self.fd = native.watch()
        loop.add_reader(self.fd, self.ready)
        self.closed = False
        self.flush_pending = False
        # The node's socket while its connection is lent to this loop, else -1.
        self.sock_fd = -1
        # Call deadlines: a heap of (loop time, sequence, future) served by one timer, much
        # lighter per call than a call_later each. Entries of calls done are dropped lazily.
        self.deadlines: list[tuple[float, int, asyncio.Future]] = []
        self.sequence = itertools.count()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf
        # Replies read inline (await_socket) since the loop last ran its selector.
        self.inline = 0
        # Senders waiting for room, by connection (see wait_room).
        self.room_waiters: dict[int, list[asyncio.Future]] = {}
        # Anything that became ready before the reader was installed.
        loop.call_soon(self.ready)

    def ready(self) -> None:
        self.inline = 0
        if self.closed:
            return
        native = self.native
        native.clear_ready()
        fd = native.lent_fd()
        if fd != self.sock_fd:
            self._follow_socket()
        elif fd < 0:
            # Lent and wanted back before this loop ever watched it: give it back all the same.
            native.give_back()
        self._collect()

    def _follow_socket(self) -> None:
        """Watch the socket the engine lends this loop, if any (see read_socket); stop watching
        one it wants back (first stop, then give back: the engine may close it right after)."""
        if self.sock_fd >= 0:
            self.loop.remove_reader(self.sock_fd)
            self.sock_fd = -1
            self.native.give_back()
        fd = self.native.lent_fd()
        if fd >= 0:
            try:
                self.loop.add_reader(fd, self._socket_readable)
            except Exception:
                # This loop cannot watch it (it does not go back to this loop again).
                logger.exception("cannot watch a lent socket; the engine keeps receiving")
                self.native.end_loop_reading()
                return
            self.sock_fd = fd

    def _socket_readable(self) -> None:
        # Called by the loop's selector: a lap went by, inline reads may go on.
        self.inline = 0
        self.read_socket()

    def read_socket(self) -> None:
        """The lent socket is readable: this thread reads it, rather than the engine's thread
        reading it and then waking the loop (one thread hop less per message)."""
        if self.closed:
            return
        if not self.native.read_lent():
            self._follow_socket()
        self._collect()

    def _collect(self) -> None:
        native = self.native
        if self.is_client:
            for call_id, status, serde, text, value in native.take_done():
                future = self.futures.pop(call_id, None)
                if future is not None and not future.done():
                    future.set_result((status, serde, text, value))
        more = False
        # Calls the node's consumers are far behind on stay in the engine's inbox, which
        # holds the sender back once full (see _AsyncNode._intake_full).
        calls = None if self.node._intake_full() else native.take_calls(_BATCH)
        if calls:
            more = len(calls) == _BATCH
            for call in calls:
                self.node._queue_call(call)
        events = native.take_events(_BATCH)
        if events:
            more = more or len(events) == _BATCH
            for connected, member in events:
                self.node._queue_event(connected, member)
        # Room for waiting senders: checked on every collection, since the engine's signal
        # for it is swallowed while the loop reads its socket (the notifier is kept quiet).
        if self.room_waiters:
            for conn in [c for c in self.room_waiters if native.room_for(c)]:
                self._room_made(conn)
        if more:
            # A full batch: the rest comes on the next turn of the loop (no new signal will).
            self.loop.call_soon(self.ready)

    def expire_at(self, when: float, future: asyncio.Future) -> None:
        """Resolve ``future`` with ``_EXPIRED`` at loop time ``when`` unless it is done by then."""
        heap = self.deadlines
        heapq.heappush(heap, (when, next(self.sequence), future))
        if len(heap) > 64 and len(heap) > 2 * len(self.futures):
            # Mostly calls answered long ago: keep the live ones only.
            heap[:] = [entry for entry in heap if not entry[2].done()]
            heapq.heapify(heap)
        if when < self.timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = when
        self.timer = self.loop.call_at(when, self._expire_due)

    def _expire_due(self) -> None:
        self.timer = None
        self.timer_at = math.inf
        heap = self.deadlines
        now = self.loop.time()
        while heap and (heap[0][0] <= now or heap[0][2].done()):
            future = heapq.heappop(heap)[2]
            if not future.done():
                future.set_result(_EXPIRED)
        if heap:
            self._arm(heap[0][0])

    def send_now(self) -> bool:
        """Whether a frame made now should be written at once rather than held until the end
        of the loop's turn: when nothing else is held or waited for (sequential calls), the
        turn's flush would only add a lap of the loop to the round trip."""
        return not self.futures and not self.flush_pending

    def await_socket(self) -> None:
        """Called right after a lone call or answer went out: if the loop has nothing else to
        do, wait a little for the reply on the lent socket without sleeping (the engine spins,
        see DAFFI_SPIN_US) and read it at once, sparing the loop a sleep, a wake-up and a lap.

        Only on loops whose queues can be seen (asyncio's own), only when no callback is ready
        and no timer due, and at most ``_INLINE_MAX`` times in a row: then the task waits for
        its reply through the loop, whose selector sees the other descriptors and timers.
        Failures here are logged, never raised: the call or answer is already out."""
        if self.sock_fd < 0 or self.flush_pending or self.inline >= _INLINE_MAX:
            return
        loop = self.loop
        ready = getattr(loop, "_ready", None)
        timers = getattr(loop, "_scheduled", None)
        if ready is None or ready or timers is None:
            return
        if timers and timers[0].when() <= loop.time():
            return
        try:
            if self.native.spin_lent():
                self.inline += 1
                self.read_socket()
        except Exception:
            logger.exception("reading the lent socket inline failed")

    async def wait_room(self, conn: int = 0) -> None:
        """Back-pressure for no-reply senders (``rpc_nowait``, ``cast_nowait``,
        ``stream_nowait``) and for the node's answers: while more than 16 MiB wait to be
        written on connection ``conn`` (a client's only one, whatever ``conn``) because the
        peer reads slower than this side sends, wait until they are down to 8 MiB or the
        connection closed. The engine raises the node's notifier then (see ready)."""
        if self.closed or self.native.room_for(conn):
            return
        future = self.loop.create_future()
        self.room_waiters.setdefault(conn, []).append(future)
        await future

    def _room_made(self, conn: int | None = None) -> None:
        """Wake the senders waiting for room on ``conn`` (None: on every connection)."""
        if conn is None:
            waiting = [f for fs in self.room_waiters.values() for f in fs]
            self.room_waiters = {}
        else:
            waiting = self.room_waiters.pop(conn, [])
        for future in waiting:
            if not future.done():
                future.set_result(None)

    def schedule_flush(self) -> None:
        """The node holds frames (calls, answers) until flushed: once per turn of the loop, so
        that the frames of one turn leave in one system call."""
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_pending = False
        self.native.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.native.flush()
        if self.sock_fd >= 0:
            try:
                self.loop.remove_reader(self.sock_fd)
            except (ValueError, OSError, RuntimeError):  # the loop is closed
                pass
            self.sock_fd = -1
        self.native.end_loop_reading()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.deadlines.clear()
        self._room_made()
        try:
            self.loop.remove_reader(self.fd)
        except (ValueError, OSError, RuntimeError):  # the loop is closed or the fd gone
            pass
        # Calls still waiting fail like those of a stopped sync client (their tasks were not
        # cancelled: a CancelledError would look like one to the code awaiting them).
        for future in self.futures.values():
            if not future.done():
                future.set_exception(Disconnected("disconnected: client stopped"))
        self.futures.clear()


class _AsyncNode(_Node):
    """What the async nodes share: the bridge, callback workers on the loop, event handlers."""

    _bridge: _Bridge | None = None

    def _init_async(self) -> None:
        self._bridge = None
        self._calls: asyncio.Queue | None = None
        self._queued = 0  # the weight of the calls in _calls
        self._intake_paused = False
        self._active = 0  # calls being run
        self._consumers: list[asyncio.Task] = []
        self._event_queue: asyncio.Queue | None = None
        self._event_task: asyncio.Task | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._done: asyncio.Event | None = None

    # The sync base starts worker threads here; an async node attaches to the loop instead (see
    # _attach), which must run on the loop's thread.
    def _start_threads(self, native: Any) -> None:
        self._pending_native = native

    def _stop_threads(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _release_loop(self, native: Any) -> None:
        # A node stopped natively (the sync way) after its event loop was closed without
        # stopping it: nothing watches the lent socket any more, so the engine may have it.
        bridge = self._bridge
        if bridge is not None and bridge.loop.is_closed():
            bridge.closed = True
            native.end_loop_reading()

    def _attach(self, native: Any, serve_calls: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._event_queue = asyncio.Queue()
        self._event_task = loop.create_task(self._events_main())
        if serve_calls:
            def announce(names: list[str]) -> None:
                native.announce(names)

            self._unsubscribe = REGISTRY.subscribe(announce)
            native.announce(REGISTRY.names())
            self._calls = asyncio.Queue()
            self._queued = 0
            self._intake_paused = False
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.workers, thread_name_prefix=f"daffi-aio-{self.app_name}"
            )
            self._consumers = [loop.create_task(self._serve_main(native)) for _ in range(self.workers)]
        self._bridge = _Bridge(self, native, loop)

    def _detach(self) -> None:
        """Stops watching the node (on the loop's thread)."""
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        for task in self._consumers:
            task.cancel()
        self._consumers = []
        if self._event_task is not None:
            self._event_task.cancel()
            self._event_task = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _queue_call(self, call: tuple) -> None:
        if self._calls is not None:
            self._queued += _weight(call)
            self._calls.put_nowait(call)

    def _intake_full(self) -> bool:
        """Whether the calls waiting for consumers weigh too much to take more (see
        _INTAKE_HIGH); once so, until they are down to half."""
        if self._intake_paused:
            return True
        if self._queued > _INTAKE_HIGH:
            self._intake_paused = True
        return self._intake_paused

    def _took_call(self, call: tuple) -> None:
        self._queued -= _weight(call)
        if self._intake_paused and self._queued <= _INTAKE_HIGH // 2:
            self._intake_paused = False
            bridge = self._bridge
            if bridge is not None:
                # What waited in the engine's inbox meanwhile raised no new signal.
                bridge.loop.call_soon(bridge.ready)

    def _queue_event(self, connected: bool, member: str) -> None:
        if self._event_queue is not None:
            self._event_queue.put_nowait((connected, member))

    # -- callbacks ----------------------------------------------------------------------------

    async def _serve_main(self, native: Any) -> None:
        """One of ``workers`` consumers: runs calls one after the other, in arrival order."""
        assert self._calls is not None
        while True:
            call = await self._calls.get()
            self._took_call(call)
            await self._run_call(native, call)
            # Answers the caller reads slower than they come hold this consumer back, as a
            # sync worker's answers hold its thread (back-pressure).
            if not call[4] & _NO_REPLY and not native.room_for(call[0]):
                bridge = self._bridge
                if bridge is not None:
                    await bridge.wait_room(call[0])

    async def _run_call(self, native: Any, call: tuple) -> None:
        conn, call_id, name, serde, flags, payload = call
        reply = not flags & _NO_REPLY
        waits_next: _Bridge | None = None
        self._active += 1
        try:
            entry = REGISTRY.lookup(name)
            if entry is None:
                raise LookupError(f"no callback named {name!r} is registered")
            fn, is_async = entry
            args, kwargs = decode_call(serde, payload, bool(flags & _TEXT))
            del payload
            if is_async:
                result = await fn(*args, **kwargs)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
                if asyncio.iscoroutine(result):
                    result = await result
            if reply:
                out, text = encode_result(serde, result)
                native.respond(conn, call_id, serde, text, out, True)
                bridge = self._bridge
                if bridge is not None:
                    # The only call running, none queued, nothing else held: there is no
                    # turn to wait for.
                    calls = self._calls
                    if self._active == 1 and bridge.send_now() and (calls is None or calls.empty()):
                        native.flush()
                        waits_next = bridge
                    else:
                        bridge.schedule_flush()
        except asyncio.CancelledError as exc:
            if _cancel_requested():  # the node is stopping
                raise
            # The callback itself raised CancelledError: an error for its caller, not the end
            # of this consumer (with workers=1 the node would never answer again).
            if reply:
                native.respond_error(conn, call_id, encode_error(exc, traceback.format_exc()))
        except BaseException as exc:  # even SystemExit: it answers the caller
            if reply:
                native.respond_error(conn, call_id, encode_error(exc, traceback.format_exc()))
            else:
                logger.warning("callback %r (no reply wanted) raised: %r", name, exc)
        finally:
            self._active -= 1
        if waits_next is not None:
            # Answered: the next call, read at once, is run by this consumer without a lap.
            waits_next.await_socket()

    # -- membership events ------------------------------------------------------------------

    async def _events_main(self) -> None:
        assert self._event_queue is not None
        while True:
            connected, member = await self._event_queue.get()
            event = {"type": "connected" if connected else "disconnected", "member": member}
            mine = "added" if connected else "removed"
            for kind, fn in list(self._handlers):
                if kind == "all":
                    await self._run_async_handler(fn, event)
                elif kind == mine:
                    await self._run_async_handler(fn, member)

    async def _run_async_handler(self, fn: Callable[[Any], Any], arg: Any) -> None:
        try:
            result = fn(arg)
            if asyncio.iscoroutine(result):
                await result
        except asyncio.CancelledError:
            if _cancel_requested():  # the node is stopping
                raise
            logger.exception("event handler %r raised", fn)
        except BaseException:  # a handler never stops the node's events
            logger.exception("event handler %r raised", fn)

    # -- life cycle ---------------------------------------------------------------------------

    async def join(self) -> None:  # type: ignore[override]
        """Wait until :meth:`stop`; cancelling the waiting task stops the node."""
        done = self._done
        if done is None:
            return
        try:
            await done.wait()
        except asyncio.CancelledError:
            await self.stop()
            raise

    async def _stop_native(self, stop: Callable[[], None]) -> None:
        self._detach()
        # Closing waits (bounded) for connections to flush: not on the loop's thread.
        await asyncio.get_running_loop().run_in_executor(None, stop)
        if self._done is not None:
            self._done.set()


class _AsyncListener(_AsyncNode):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_async()

    _serves_calls = True

    async def start(self) -> Any:  # type: ignore[override]
        """Bind and start serving; returns once connections are accepted."""
        super().start()  # binding is quick: done on the loop's thread
        self._attach(self._pending_native, serve_calls=self._serves_calls)
        return self

    async def stop(self) -> None:  # type: ignore[override]
        """Close the listener and every connection; idempotent and bounded in time."""
        await self._stop_native(super().stop)

    async def __aenter__(self) -> Any:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


class AsyncService(_AsyncListener, Service):
    """The asyncio twin of :class:`daffi.Service`."""


class AsyncRouter(_AsyncListener, Router):
    """The asyncio twin of :class:`daffi.Router`: it forwards in the engine; only its event
    handlers run on the loop."""

    _serves_calls = False


class AsyncClient(_AsyncNode, Client):
    """The asyncio twin of :class:`daffi.Client`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_async()
        self._aconn: AsyncConnection | None = None

    async def connect(self) -> AsyncConnection:  # type: ignore[override]
        """Connect (the handshake runs off the loop) and return the connection handle."""
        if self._bridge is not None and self.connected:
            raise RuntimeError(f"client {self.app_name!r} is already connected")
        self._detach()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, Client.connect, self)
        native = self._native
        self._attach(native)
        assert self._bridge is not None
        self._aconn = AsyncConnection(self, native, self._bridge)
        return self._aconn

    @property
    def connection(self) -> AsyncConnection | None:  # type: ignore[override]
        return self._aconn

    async def stop(self) -> None:  # type: ignore[override]
        """Disconnect (sending what is queued first); idempotent."""
        await self._stop_native(super().stop)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


class AsyncConnection(_PeerView):
    """The handle returned by :meth:`AsyncClient.connect`; every call style is awaitable."""

    __slots__ = ("_client", "_native", "_bridge", "__weakref__")

    def __init__(self, client: AsyncClient, native: Any, bridge: _Bridge) -> None:
        self._client = client
        self._native = native
        self._bridge = bridge

    # -- call styles ------------------------------------------------------------------------

    def rpc(self, timeout: float | None = None, receiver: str | None = None,
            serde: SerdeFormat = _PICKLE) -> _Proxy:
        return _Proxy(self._call_one, timeout, receiver, serde)

    def rpc_nowait(self, receiver: str | None = None, serde: SerdeFormat = _PICKLE) -> _Proxy:
        return _Proxy(self._send_one, None, receiver, serde)

    def cast(self, timeout: float | None = None, receiver: str | Iterable[str] | None = None,
             serde: SerdeFormat = _PICKLE) -> _Proxy:
        return _Proxy(self._cast, timeout, receiver, serde)

    def cast_nowait(self, receiver: str | Iterable[str] | None = None,
                    serde: SerdeFormat = _PICKLE) -> _Proxy:
        return _Proxy(self._cast_nowait, None, receiver, serde)

    def stream(self, receiver: str | None = None, serde: SerdeFormat = _OPAQUE,
               timeout: float | None = None) -> _Proxy:
        return _Proxy(functools.partial(self._stream, wait=True), timeout, receiver, serde)

    def stream_nowait(self, receiver: str | None = None, serde: SerdeFormat = _OPAQUE) -> _Proxy:
        return _Proxy(functools.partial(self._stream, wait=False), None, receiver, serde)

    async def wait_for_members(self, *names: str, timeout: float | None = None,
                               interval: float = 1.0) -> None:
        """Return once every named peer is connected; TimeoutError names the missing ones."""
        loop = asyncio.get_running_loop()
        limit = _deadline(timeout)
        end = None if limit is None else loop.time() + limit
        me = self._client.app_name
        native = self._native
        wanted = False
        try:
            while True:
                present = set(self.members) | {me}
                missing = [n for n in names if n not in present]
                if not missing:
                    return
                if end is not None and loop.time() >= end:
                    raise TimeoutError(
                        f"members not connected after {timeout} s: {', '.join(missing)}")
                if not wanted:
                    # Members are heard of by reading: read even while callbacks are behind.
                    native.want_members()
                    wanted = True
                await asyncio.sleep(0.02 if end is None else max(0.0, min(0.02, end - loop.time())))
        finally:
            if wanted:
                native.unwant_members()

    # -- the calls themselves ---------------------------------------------------------------

    def _start(self, name: str, serde: int, payload: Any, text: bool,
               receiver: str | None, alone: bool = True) -> tuple[asyncio.Future, int, str]:
        """Starts a call; ``alone``: no other call of the same task follows at once (a cast's
        calls do), so its answer may be awaited inline (see _Bridge.await_socket)."""
        bridge = self._check_open()
        now = bridge.send_now()
        call_id, target = self._native.start_async(name, serde, text, payload, receiver)
        future = bridge.loop.create_future()
        bridge.futures[call_id] = future
        if now and alone:
            self._native.flush()
            bridge.await_socket()
        else:
            bridge.schedule_flush()
        return future, call_id, target

    def _check_open(self) -> _Bridge:
        """The bridge, unless the client is stopping or stopped (no call may start then: its
        answer would have nobody to go to)."""
        bridge = self._bridge
        if bridge.closed:
            raise Disconnected("disconnected: client stopped")
        return bridge

    def _forget(self, call_id: int) -> None:
        self._bridge.futures.pop(call_id, None)
        self._native.abandon(call_id)

    async def _await(self, name: str, timeout: float | None, future: asyncio.Future,
                     call_id: int, target: str) -> Any:
        # The deadline resolves the future itself: lighter than asyncio.wait_for, which wraps
        # every call in one more future and callback.
        limit = _deadline(timeout)
        if limit is not None and not future.done():
            bridge = self._bridge
            bridge.expire_at(bridge.loop.time() + limit, future)
        try:
            # Often already answered (see _Bridge.await_socket): then no lap of the loop.
            outcome = future.result() if future.done() else await future
        except asyncio.CancelledError:
            self._forget(call_id)
            raise
        if outcome is _EXPIRED:
            self._forget(call_id)
            raise CallTimeout(call=name, timeout=timeout, receivers=[target])
        return _outcome(*outcome)

    async def _call_one(self, name: str, timeout: float | None, receiver: str | None, serde: int,
                        args: tuple, kwargs: dict) -> Any:
        payload, text = encode_call(serde, args, kwargs)
        future, call_id, target = self._start(name, serde, payload, text, receiver)
        return await self._await(name, timeout, future, call_id, target)

    async def _send_one(self, name: str, timeout: float | None, receiver: str | None, serde: int,
                        args: tuple, kwargs: dict) -> None:
        payload, text = encode_call(serde, args, kwargs)
        await self._send_nowait(name, serde, text, payload, receiver)

    async def _send_nowait(self, name: str, serde: int, text: bool, payload: Any,
                           receiver: str | None) -> None:
        """Sends a no-reply call with this turn's frames, then waits while too much is unsent."""
        bridge = self._check_open()
        self._native.send(name, serde, text, payload, receiver, True)
        bridge.schedule_flush()
        await bridge.wait_room()

    async def _cast(self, name: str, timeout: float | None, receiver: Any, serde: int,
                    args: tuple, kwargs: dict) -> dict[str, Any]:
        native = self._native
        targets = native.cast_targets(name, _targets(receiver))
        payload, text = encode_call(serde, args, kwargs)
        started: dict[str, Any] = {}
        for target in targets:
            try:
                started[target] = self._start(name, serde, payload, text, target, alone=False)
            except Exception as exc:  # a peer that cannot be called is an entry, not a failure
                started[target] = exc
        futures = [s[0] for s in started.values() if isinstance(s, tuple)]
        if futures:
            try:
                await asyncio.wait(futures, timeout=_deadline(timeout))
            except asyncio.CancelledError:
                for s in started.values():
                    if isinstance(s, tuple):
                        self._forget(s[1])
                raise
        results: dict[str, Any] = {}
        for target, s in started.items():
            if not isinstance(s, tuple):
                results[target] = s
                continue
            future, call_id, _ = s
            if not future.done():
                self._forget(call_id)
                results[target] = CallTimeout(call=name, timeout=timeout, receivers=[target])
                continue
            try:
                results[target] = _outcome(*future.result())
            except Exception as exc:
                results[target] = exc
        return results

    async def _cast_nowait(self, name: str, timeout: float | None, receiver: Any, serde: int,
                           args: tuple, kwargs: dict) -> None:
        native = self._native
        targets = native.cast_targets(name, _targets(receiver))
        payload, text = encode_call(serde, args, kwargs)
        bridge = self._check_open()
        try:
            for target in targets:
                native.send(name, serde, text, payload, target, True)
        finally:
            # Whatever was held goes out, even when a later target refused the call.
            bridge.schedule_flush()
        await bridge.wait_room()

    async def _stream(self, name: str, timeout: float | None, receiver: str | None, serde: int,
                      args: tuple, kwargs: dict, *, wait: bool) -> None:
        source = _stream_source(args, kwargs)
        native = self._native
        target = native.resolve(name, receiver)
        if hasattr(source, "__aiter__"):
            async for chunk in source:
                await self._chunk(name, timeout, target, serde, chunk, wait)
            return
        for chunk in _chunks(source):
            await self._chunk(name, timeout, target, serde, chunk, wait)

    async def _chunk(self, name: str, timeout: float | None, target: str, serde: int, chunk: Any,
                     wait: bool) -> None:
        payload, text = encode_call(serde, (chunk,), {})
        if wait:
            future, call_id, _ = self._start(name, serde, payload, text, target)
            await self._await(name, timeout, future, call_id, target)
        else:
            await self._send_nowait(name, serde, text, payload, target)

