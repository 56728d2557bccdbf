"""Accept loops that leave their listeners open when they stop.

:func:`trio.serve_listeners` closes its listeners when it is cancelled. A process on
probation stops accepting but must be able to accept again on the very same sockets if
its successor dies, so the library runs its own loop, which only stops.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

__all__ = ["accept_forever"]

ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""Out of file descriptors or memory: wait a moment and try again, as trio does."""
CAPACITY_PAUSE = 0.1

_logger = logging.getLogger("graceful_restart_trio")

Handler = Callable[[Any], Awaitable[object]]


async def accept_forever(
    listener: trio.abc.Listener[Any], handler: Handler, handler_nursery: trio.Nursery
) -> None:
    """Accept connections on ``listener`` and start ``handler`` for each, until cancelled.

    Each stream is closed when its handler returns. The listener stays open.
    """
    while True:
        try:
            stream = await listener.accept()
        except OSError as error:
            if error.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            _logger.error("accept: %s; retrying in %gs", error, CAPACITY_PAUSE)  # noqa: TRY400 - the errno says it all
            await trio.sleep(CAPACITY_PAUSE)
        else:
            handler_nursery.start_soon(_run_handler, handler, stream)


async def _run_handler(handler: Handler, stream: trio.abc.AsyncResource) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)
