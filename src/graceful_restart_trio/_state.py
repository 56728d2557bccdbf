"""The life of one process, as a table-driven state machine.

Theory of operation
-------------------

A process starts in ``STARTING``: it opens (or inherits) its listeners. It becomes
``SERVING`` when the application calls :meth:`GracefulRestart.ready`. From there a
restart moves it to ``RESTARTING`` while a successor starts; if the successor fails the
process goes back to ``SERVING`` as if nothing happened, and if it succeeds the process
stops accepting and goes to ``DRAINING``. A shutdown also leads to ``DRAINING``. When the
drain is over (every lease released, or the deadline passed) the process is ``STOPPED``.

::

    STARTING ──ready──▶ SERVING ──restart──▶ RESTARTING ──handover──▶ DRAINING ──▶ STOPPED
        │                 ▲  │                   │                        ▲
        │                 │  └────shutdown───────┼────────────────────────┤
        │                 └──────rollback────────┘                        │
        └───────────────────────────shutdown──────────────────────────────┘

Every transition not in :data:`TRANSITIONS` raises :class:`UsageError` at once: a bug in
the story must not go unnoticed.
"""

from __future__ import annotations

import enum
from typing import final

import attrs

from ._exceptions import UsageError

__all__ = ["TRANSITIONS", "State", "StateMachine"]


class State(enum.Enum):
    """Where a process is in its life. See the module docstring for the transitions."""

    STARTING = "starting"
    SERVING = "serving"
    RESTARTING = "restarting"
    DRAINING = "draining"
    STOPPED = "stopped"

    def __repr__(self) -> str:
        return f"State.{self.name}"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.SERVING, State.DRAINING}),
    State.SERVING: frozenset({State.RESTARTING, State.DRAINING}),
    State.RESTARTING: frozenset({State.SERVING, State.DRAINING}),
    State.DRAINING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
}


@final
@attrs.define(eq=False)
class StateMachine:
    """Holds the current :class:`State` and refuses transitions not in the table."""

    state: State = State.STARTING

    def advance(self, new: State) -> State:
        """Move to ``new`` and return the state we left.

        Raises:
            UsageError: ``new`` cannot follow the current state.
        """
        old = self.state
        if new not in TRANSITIONS[old]:
            raise UsageError(f"illegal state transition {old.value} -> {new.value}")
        self.state = new
        return old
