"""The drain: once a process has stopped accepting for good, the wait for its work.

Theory of operation
-------------------

The drain waits, all under ``drain_timeout``:

1. for the leases (the work in flight);
2. if this process is in charge, for a predecessor still draining: its exit must come
   first (see :meth:`Upstream.outlive`);
3. if the process served, for the ``open()`` body to return: its cleanup after serving
   (an ASGI lifespan shutdown, say) completes. After :data:`BODY_NOTICE` seconds of
   waiting for it alone, the log says which tasks the body still runs.

Then, or at the deadline, it cancels the library's nursery: what is left (the body, the
work under leases) is cancelled, and :func:`open` returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

import attrs
import trio

from ._leases import LeaseCounter
from ._logging import PrefixLog

if TYPE_CHECKING:
    from ._charge import Charge
    from ._upstream import Upstream

__all__ = ["BODY_NOTICE", "Drain"]

BODY_NOTICE = 1.0
"""Seconds the drain waits for the ``open()`` body in silence, once the leases are done."""


@final
@attrs.define(eq=False)
class Drain:
    """The drain of one process: whether it began, and the wait itself (:meth:`run`)."""

    log: PrefixLog
    leases: LeaseCounter
    timeout: float
    nursery: trio.Nursery
    """The library's nursery, where the ``open()`` body runs: cancelled at the end."""
    charge: Charge
    upstream: Upstream
    served: bool = False
    """Set once the process said ready. A shutdown before it does not wait for the body
    (still starting: nothing was served), which is cancelled as soon as the leases are."""
    _began: trio.Event = attrs.field(factory=trio.Event)
    _body_done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def began(self) -> bool:
        return self._began.is_set()

    async def wait_began(self) -> None:
        await self._began.wait()

    def begin(self) -> None:
        """This process stopped accepting for good; :meth:`run` follows."""
        self._began.set()

    def body_ended(self) -> None:
        """The ``open()`` body returned or raised."""
        self._body_done.set()

    async def run(self) -> None:
        """Wait for the work (see the module docstring), then cancel what is left."""
        await trio.lowlevel.checkpoint()  # an error that ends the body cancels it: no drain
        self.log.info(
            "stopped accepting; draining %d lease(s) for at most %gs",
            self.leases.count,
            self.timeout,
        )
        leases_released = None
        with trio.move_on_after(self.timeout) as deadline:
            await self.leases.wait_idle()
            leases_released = trio.current_time()
            if self.charge.taken:
                await self.upstream.outlive()
            if self.served:  # its cleanup (a lifespan shutdown, say) completes
                with trio.move_on_after(BODY_NOTICE):
                    await self._body_done.wait()
                if not self._body_done.is_set():
                    self.log.info(
                        "the leases are released; waiting for the open() body to return "
                        "(still running in it: %s), at most until the drain deadline",
                        ", ".join(self._body_tasks()) or "the body itself",
                    )
                    await self._body_done.wait()
        if deadline.cancelled_caught:
            self.log.warning(
                "drain deadline passed: cancelling %d lease(s)%s",
                self.leases.count,
                " and the open() body" if self.served and not self._body_done.is_set() else "",
            )
        else:
            assert leases_released is not None
            after = (trio.current_time() - leases_released) * 1000
            self.log.info("drained (%.0f ms after the last lease was released)", after)
        self.nursery.cancel_scope.cancel()

    def _body_tasks(self) -> list[str]:
        """The names of the innermost tasks still running in the ``open()`` body."""
        names: list[str] = []
        tasks = [
            task
            for nursery in self.nursery.parent_task.child_nurseries
            if nursery is not self.nursery
            for task in nursery.child_tasks
        ]
        while tasks:
            task = tasks.pop()
            children = [child for n in task.child_nurseries for child in n.child_tasks]
            if children:
                tasks += children
            else:
                names.append(task.name)
        return sorted(names)
