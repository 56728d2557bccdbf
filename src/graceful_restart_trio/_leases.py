"""Leases: a count of the work in flight, cheap enough to sit on every request."""

from __future__ import annotations

from types import TracebackType
from typing import final

import attrs
import trio

__all__ = ["LeaseCounter"]


@final
@attrs.define(eq=False)
class LeaseCounter:
    """Counts units of in-flight work. :meth:`GracefulRestart.lease` returns it.

    Entering takes a lease and leaving gives it back; both ``async with`` and plain
    ``with`` work, and one counter serves any number of tasks at once. Taking a lease is
    a counter increment: no lock, no allocation, no checkpoint, no cancel scope. The
    drain waits until the count reaches zero; work still under a lease at the drain
    deadline is cancelled through the cancel scope that :func:`graceful_restart_trio.open`
    already runs its body in.

    Synopsis::

        async def handler(stream):
            async with gr.lease():
                await serve_one_request(stream)
    """

    _count: int = 0
    _idle: trio.Event | None = None

    @property
    def count(self) -> int:
        """How many leases are held right now."""
        return self._count

    def __enter__(self) -> None:
        self._count += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._count -= 1
        if not self._count and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def __aenter__(self) -> None:
        self._count += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._count -= 1
        if not self._count and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        """Return once no lease is held. Any number of tasks may wait at once.

        A checkpoint even when no lease is held, like trio's own functions: a task that
        awaits it in a loop still lets the others (the drain among them) run, and sees
        its cancellation.
        """
        if not self._count:
            await trio.lowlevel.checkpoint()
        while self._count:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
