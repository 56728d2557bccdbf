"""The parts of hypercorn this library serves with, behind a version check.

hypercorn has no public API for serving listeners someone else opened, so
:mod:`graceful_restart_trio.asgi` uses its trio connection internals (the protocol
wrapper, the lifespan, the worker context). They are the same in every version of
:data:`SUPPORTED`; importing this module with another version fails at once, naming
the range, rather than serving wrongly.
"""

from __future__ import annotations

from importlib.metadata import version

SUPPORTED = ((0, 17), (0, 19))
"""hypercorn versions whose internals this library uses: from 0.17 up to, not including, 0.19."""


def check_version(installed: str) -> None:
    """Raise ImportError unless hypercorn ``installed`` is in :data:`SUPPORTED`."""
    (low, high), found = SUPPORTED, tuple(int(part) for part in installed.split(".")[:2])
    if not low <= found < high:
        raise ImportError(
            f"graceful_restart_trio.asgi supports hypercorn >={'.'.join(map(str, low))},"
            f"<{'.'.join(map(str, high))} (it uses hypercorn's connection internals); "
            f"hypercorn {installed} is installed"
        )


check_version(version("hypercorn"))

# Only now: these are internals, checked above.
from hypercorn.app_wrappers import WSGIWrapper  # noqa: E402
from hypercorn.config import Config  # noqa: E402
from hypercorn.events import Closed, Event, RawData, Updated  # noqa: E402
from hypercorn.protocol import ProtocolWrapper  # noqa: E402
from hypercorn.protocol.h2 import H2Protocol  # noqa: E402
from hypercorn.trio.lifespan import Lifespan  # noqa: E402
from hypercorn.trio.task_group import TaskGroup  # noqa: E402
from hypercorn.trio.worker_context import WorkerContext  # noqa: E402
from hypercorn.typing import ConnectionState  # noqa: E402
from hypercorn.utils import LifespanFailureError, parse_socket_addr, wrap_app  # noqa: E402

__all__ = [
    "SUPPORTED",
    "Closed",
    "Config",
    "ConnectionState",
    "Event",
    "H2Protocol",
    "Lifespan",
    "LifespanFailureError",
    "ProtocolWrapper",
    "RawData",
    "TaskGroup",
    "Updated",
    "WSGIWrapper",
    "WorkerContext",
    "check_version",
    "parse_socket_addr",
    "wrap_app",
]
