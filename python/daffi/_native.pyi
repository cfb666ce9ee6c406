"""Type stubs for daffi's native engine module (built from ffi/ with maturin)."""

import array
import mmap

# Any object with the buffer protocol is accepted (collections.abc.Buffer on 3.12+).
Buffer = bytes | bytearray | memoryview | array.array | mmap.mmap

DEFAULT_MAX_MESSAGE_SIZE: int

_Call = tuple[int, int, str, int, int, bytes]

class Node:
    """What servers and clients share: running the calls they receive."""

    @property
    def backend(self) -> str: ...
    @property
    def name(self) -> str: ...
    def next_call(self, timeout: float | None = None) -> _Call | None: ...
    def next_event(self, timeout: float | None = None) -> tuple[bool, str] | None: ...
    def respond(
        self, conn: int, call_id: int, serde: int, text: bool, payload: Buffer, defer: bool = False
    ) -> None: ...
    def flush(self) -> None: ...
    def watch(self) -> int: ...
    def clear_ready(self) -> None: ...
    def take_calls(self, max: int = 256) -> list[_Call] | None: ...
    def take_events(self, max: int = 256) -> list[tuple[bool, str]] | None: ...
    def respond_error(self, conn: int, call_id: int, payload: Buffer) -> None: ...
    def announce(self, names: list[str]) -> None: ...

class Listener(Node):
    """What servers and routers share."""

    @property
    def port(self) -> int | None: ...
    @property
    def address(self) -> str: ...
    def members(self) -> list[str]: ...
    def stop(self) -> None: ...

class Server(Listener):
    def __init__(
        self,
        name: str,
        host: str | None = None,
        port: int | None = None,
        unix_path: str | None = None,
        max_message_size: int = ...,
        functions: list[str] = ...,
        backend: str | None = None,
        token: bytes | None = None,
        serde_formats: list[int] | None = None,
    ) -> None: ...

class Client(Node):
    def __init__(
        self,
        name: str,
        host: str | None = None,
        port: int | None = None,
        unix_path: str | None = None,
        max_message_size: int = ...,
        functions: list[str] = ...,
        connect_timeout: float = 10.0,
        backend: str | None = None,
        token: bytes | None = None,
    ) -> None: ...
    @property
    def connected(self) -> bool: ...
    @property
    def peer_name(self) -> str | None: ...
    @property
    def close_reason(self) -> str: ...
    @property
    def routed(self) -> bool: ...
    def peer_functions(self, name: str | None = None) -> list[str]: ...
    def peers(self) -> list[str]: ...
    def call(
        self,
        name: str,
        serde: int,
        text: bool,
        payload: Buffer,
        timeout: float | None = None,
        receiver: str | None = None,
    ) -> tuple[bool, int, bool, bytes]: ...
    def cast(
        self,
        name: str,
        serde: int,
        text: bool,
        payload: Buffer,
        timeout: float | None = None,
        receivers: list[str] | None = None,
    ) -> list[tuple[str, int, int, bool, object]]: ...
    def cast_targets(self, name: str, receivers: list[str] | None = None) -> list[str]: ...
    def resolve(self, name: str, receiver: str | None = None) -> str: ...
    def send(
        self,
        name: str,
        serde: int,
        text: bool,
        payload: Buffer,
        receiver: str | None = None,
        defer: bool = False,
    ) -> str: ...
    def start_async(
        self, name: str, serde: int, text: bool, payload: Buffer, receiver: str | None = None
    ) -> tuple[int, str]: ...
    def take_done(self) -> list[tuple[int, int, int, bool, object]]: ...
    def abandon(self, call_id: int) -> None: ...
    def wait_for_members(self, names: list[str], timeout: float | None = None) -> list[str]: ...
    def close(self) -> None: ...

class Router(Listener):
    def __init__(
        self,
        name: str,
        host: str | None = None,
        port: int | None = None,
        unix_path: str | None = None,
        max_message_size: int = ...,
        backend: str | None = None,
        token: bytes | None = None,
    ) -> None: ...

def resolve_backend(backend: str | None = None) -> str: ...
def msgpack_dumps(obj: object) -> bytes: ...
def msgpack_loads(data: Buffer) -> object: ...
