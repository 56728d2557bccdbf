"""What ``graceful-restart status`` shows: one typed record, for both modes.

The process in charge (direct mode) and the keeper each build a :class:`Status`; the
control socket sends it as JSON (:meth:`Status.as_json`); ``graceful-restart`` reads it
back (:meth:`Status.from_json`) and prints it as JSON, as text (:meth:`Status.text`) or
as Prometheus metrics (``_metrics``). A field one mode does not know is None (the
keeper counts no leases) or empty (a process has no workers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import attrs

__all__ = ["Draining", "Listener", "Roll", "Status", "WorkerSlot"]


@final
@attrs.frozen
class Draining:
    """An older copy still draining: the predecessor, or an older generation."""

    pid: int
    role: str


@final
@attrs.frozen
class Listener:
    name: str
    address: str


@final
@attrs.frozen
class WorkerSlot:
    """One of the keeper's workers (``--workers``)."""

    worker: int
    pid: int | None
    """The serving process, or None while the slot has none."""
    generation: int | None
    state: str
    successor: int | None = None
    """The process replacing it, once ready."""
    uptime_s: float | None = None


@final
@attrs.frozen
class Roll:
    """The keeper's roll under way: how many workers it replaced so far, of how many."""

    replaced: int
    of: int


@final
@attrs.frozen
class Status:
    """A snapshot of the service, as the process in charge or the keeper sees it."""

    pid: int | None
    """The serving process (under the keeper: worker 0's)."""
    main_pid: int
    """The process a stop waits for: this one, or the keeper."""
    state: str
    generation: int
    in_charge: bool
    uptime_s: float
    leases: int | None
    keeper: int | None
    successor: int | None
    draining: tuple[Draining, ...] = ()
    listeners: tuple[Listener, ...] = ()
    restarts: Mapping[str, int] = attrs.field(factory=dict)
    """Restarts by outcome (``committed``, ``failed``)."""
    last_restart: Mapping[str, Any] | None = None
    """The last restart's timeline (see ``_timeline``)."""
    pid_file_error: str | None = None
    workers: tuple[WorkerSlot, ...] = ()
    roll: Roll | None = None

    def as_json(self) -> dict[str, Any]:
        """JSON values only."""
        return attrs.asdict(self)  # tuples: JSON arrays

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Status:
        """Read back what :meth:`as_json` wrote.

        Raises:
            ValueError: ``data`` is not a status (the message says what is wrong).
        """
        try:
            fields = {f.name: data[f.name] for f in attrs.fields(cls) if f.name in data}
            fields["draining"] = tuple(Draining(**p) for p in data.get("draining", ()))
            fields["listeners"] = tuple(Listener(**x) for x in data.get("listeners", ()))
            fields["workers"] = tuple(WorkerSlot(**w) for w in data.get("workers", ()))
            fields["roll"] = Roll(**data["roll"]) if data.get("roll") else None
            return cls(**fields)
        except (TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"not a status: {error}") from None

    def text(self) -> str:
        """The status for a person: one line, then one line per detail."""
        keeper = f", under keeper {self.keeper}" if self.keeper else ""
        leases = "" if self.leases is None else f", {self.leases} lease(s) in flight"
        if self.workers:  # the keeper speaks for them
            head = f"keeper {self.keeper}: {self.state}, {len(self.workers)} workers"
        else:
            head = f"pid {self.pid}: {self.state}, generation {self.generation}{keeper}"
        lines = [f"{head}, up {self.uptime_s:.0f}s{leases}"]
        if self.pid_file_error:
            lines.append(f"  pid file: {self.pid_file_error}")
        lines += [f"  listener {x.name}: {x.address}" for x in self.listeners]
        for worker in self.workers:
            serving = f"pid {worker.pid}, generation {worker.generation}" if worker.pid else ""
            successor = f", successor {worker.successor}" if worker.successor else ""
            lines.append(
                f"  worker {worker.worker}: {serving or 'none'} ({worker.state}{successor})"
            )
        if self.roll:
            lines.append(f"  rolling: {self.roll.replaced} of {self.roll.of} replaced")
        lines += [f"  draining: pid {p.pid} ({p.role})" for p in self.draining]
        if self.restarts:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(self.restarts.items()))
            lines.append(f"  restarts: {counts}")
        last = self.last_restart
        if last:
            reason = f": {last['reason']}" if last.get("reason") else ""
            phases = " -> ".join(f"{k} {v} ms" for k, v in last.get("phases", {}).items())
            lines.append(f"  last restart ({last['trigger']}): {last['outcome']}{reason}")
            lines.append(f"    {phases or 'no phase reached'}")
        return "\n".join(lines) + "\n"
