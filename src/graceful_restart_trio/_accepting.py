"""The accepting gate, and accept loops that leave their listeners open when they stop.

Theory of operation
-------------------

Every accept loop runs inside a cancel scope of the gate's (:meth:`Gate.accepting`). The
gate closes (cancels every scope) when this process stops accepting: for a successor's
probation, or for good. A loop entered while the gate is closed is cancelled at once.
After a probation the state says whether to accept again (:meth:`Gate.wait_resumed`).

:func:`trio.serve_listeners` closes its listeners when it is cancelled. A process on
probation stops accepting but must be able to accept again on the very same sockets if
its successor dies, so the library runs its own loop, which only stops
(:func:`accept_forever`).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, final

import attrs
import trio

from ._leases import LeaseCounter
from ._logging import PrefixLog
from ._state import ACCEPTING, State, StateMachine

__all__ = ["Gate", "accept_forever"]

ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""Out of file descriptors or memory: wait a moment and try again, as trio does."""
CAPACITY_PAUSE = 0.1

_logger = logging.getLogger("graceful_restart_trio")

Handler = Callable[[Any], Awaitable[object]]


@final
@attrs.define(eq=False)
class Gate:
    """The cancel scopes of the accept loops: the bodies of :meth:`GracefulRestart.accepting`,
    :meth:`~GracefulRestart.accept_connections` and :meth:`~GracefulRestart.serve_listeners`.
    """

    machine: StateMachine
    leases: LeaseCounter
    log: PrefixLog
    ready: Callable[[], None]
    """Says the process serves (:meth:`GracefulRestart.ready`) once the accept loops run."""
    _scopes: set[trio.CancelScope] = attrs.field(factory=set)

    @contextmanager
    def accepting(self) -> Iterator[trio.CancelScope]:
        """A scope for one accept loop, cancelled when the gate closes (at once if it is)."""
        scope = trio.CancelScope()
        if self.machine.state not in ACCEPTING:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def close(self) -> None:
        """Stop every accept loop (the listeners stay open)."""
        for scope in self._scopes:
            scope.cancel()

    async def wait_resumed(self) -> bool:
        """True once a probation ends with this process accepting again."""
        return await self.machine.wait_leaving(State.PROBATION) in ACCEPTING

    async def accept_connections(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        handler: Handler,
        *,
        handler_nursery: trio.Nursery,
    ) -> None:
        """Accept while the gate is open, pause while it is closed for a probation, then
        close ``listeners``."""
        try:
            while True:
                with self.accepting():
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(accept_forever, listener, handler, handler_nursery)
                        self.ready()
                if not await self.wait_resumed():
                    return
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)  # close() only, never shutdown()

    async def serve_listeners(
        self,
        handler: Callable[[trio.SocketStream], Awaitable[object]],
        listeners: list[trio.SocketListener],
        *,
        handler_errors: Literal["log", "raise"] = "log",
    ) -> None:
        """:meth:`accept_connections`, the server and each connection under a lease."""

        async def leased(stream: trio.SocketStream) -> None:
            async with self.leases:
                try:
                    await handler(stream)
                except Exception:
                    if handler_errors == "raise":
                        self.log.exception("a connection's handler failed: the server ends")
                        raise
                    self.log.exception(
                        "a connection's handler failed: that connection is closed, "
                        "the others are served on"
                    )

        async with self.leases, trio.open_nursery() as handlers:
            await self.accept_connections(listeners, leased, handler_nursery=handlers)


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
