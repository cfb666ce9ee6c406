"""daffi: fast inter-process RPC for Python.

``Service`` exposes ``@callback`` functions; ``Client`` connects and calls them with
``rpc``, ``rpc_nowait``, ``cast``, ``cast_nowait``, ``stream`` and ``stream_nowait``. A
``Router`` lets many Clients call each other's callbacks through one address.
"""

import logging as _logging

from daffi._node import Client, Connection, Router, Service
from daffi._serialization import SerdeFormat
from daffi.registry import alias, callback, local

try:
    from importlib.metadata import version as _version

    __version__ = _version("daffi")
except Exception:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

_logging.getLogger("daffi").addHandler(_logging.NullHandler())

__all__ = [
    "Client", "Connection", "Router", "SerdeFormat", "Service", "alias", "callback", "local", "__version__",
]
