"""The life of one process, as a table-driven state machine.

Theory of operation
-------------------

A process starts in ``STARTING``: it opens (or inherits) its listeners. It becomes
``SERVING`` when the application calls :meth:`GracefulRestart.ready`. From there a
restart moves it to ``RESTARTING`` while a successor starts. If the successor fails, the
process goes back to ``SERVING`` as if nothing happened. If the successor says it is
ready, the process stops accepting (keeping its sockets) and watches it through its
``PROBATION``: if the successor dies then, this process accepts again (``SERVING``); if
it survives, the handover commits and the process goes to ``DRAINING``. A shutdown also
leads to ``DRAINING``. When the drain is over (every lease released, or the deadline
passed) the process is ``STOPPED``.

::

    STARTING ─ready─▶ SERVING ─restart─▶ RESTARTING ─ready─▶ PROBATION ─commit─▶ DRAINING ─▶ STOPPED
       │               ▲ ▲ │                 │                   │                  ▲
       │               │ └─┼──rollback───────┘                   │                  │
       │               └───┼──────────rollback───────────────────┘                  │
       │                   └─────────────────shutdown───────────────────────────────┤
       └─────────────────────────────────────shutdown───────────────────────────────┘

A shutdown from ``RESTARTING`` or ``PROBATION`` abandons the restart. Under a keeper the
keeper restarts: a generation goes from ``SERVING`` to ``PROBATION`` when the keeper says
so. A process accepts connections in ``STARTING`` (once its helpers run), ``SERVING`` and
``RESTARTING``: :data:`ACCEPTING`.

Every transition not in :data:`TRANSITIONS` raises :class:`UsageError` at once: a bug in
the story must not go unnoticed.
"""

from __future__ import annotations

import enum
from typing import final

import attrs
from trio_util import AsyncValue

from ._exceptions import UsageError

__all__ = ["ACCEPTING", "TRANSITIONS", "State", "StateMachine"]


class State(enum.Enum):
    """Where a process is in its life. See the module docstring for the transitions."""

    STARTING = "starting"
    SERVING = "serving"
    RESTARTING = "restarting"
    PROBATION = "probation"
    DRAINING = "draining"
    STOPPED = "stopped"

    def __repr__(self) -> str:
        return f"State.{self.name}"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.SERVING, State.DRAINING}),  # (the keeper, too)
    State.SERVING: frozenset({State.RESTARTING, State.PROBATION, State.DRAINING}),
    State.RESTARTING: frozenset({State.SERVING, State.PROBATION, State.DRAINING}),
    State.PROBATION: frozenset({State.SERVING, State.DRAINING}),
    State.DRAINING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
}

ACCEPTING = frozenset({State.STARTING, State.SERVING, State.RESTARTING})
"""The states in which a process accepts new connections."""


def _async_value(state: State) -> AsyncValue:
    return AsyncValue(state)


@final
@attrs.define(eq=False)
class StateMachine:
    """Holds the current :class:`State` and refuses transitions not in the table.

    ``value`` is a :class:`trio_util.AsyncValue`, so that anyone may wait for a state.
    """

    value: AsyncValue = attrs.field(default=State.STARTING, converter=_async_value)

    @property
    def state(self) -> State:
        state: State = self.value.value
        return state

    def advance(self, new: State) -> State:
        """Move to ``new`` and return the state we left.

        Raises:
            UsageError: ``new`` cannot follow the current state.
        """
        old = self.state
        if new not in TRANSITIONS[old]:
            raise UsageError(f"illegal state transition {old.value} -> {new.value}")
        self.value.value = new
        return old

    async def wait_leaving(self, state: State) -> State:
        """Return the new state once the machine is no longer in ``state``."""
        new: State = await self.value.wait_value(lambda current: current is not state)
        return new
