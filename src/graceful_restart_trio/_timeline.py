"""The record of one restart: its phases as they happen, its outcome, and who follows it.

A :class:`Timeline` is made when a restart is asked for (by a signal, a call or the
control socket). The story marks each phase (``spawned``, ``ready``, ``stopped
accepting``, ``committed``) with the milliseconds since the request, and ends it with
an outcome: ``committed`` or ``failed`` (with the reason, and the last lines the
successor wrote to stderr when stderr is a file). Whoever watches it (an operator's
``graceful-restart restart``) gets each phase as an event the moment it happens.
"""

from __future__ import annotations

import math
import os
import stat
import time
from typing import Any, final

import attrs
import trio

__all__ = ["Timeline"]

STDERR_LINES = 10
"""How many of the successor's last stderr lines a failure reports."""


def _stderr_size() -> int | None:
    """Where stderr ends now, if it is a regular file (a log file), else None."""
    try:
        info = os.fstat(2)
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


@final
@attrs.define(eq=False)
class Timeline:
    trigger: str
    """What asked for the restart: ``SIGHUP``, ``call`` or ``control``."""
    requested_at: float = attrs.field(factory=time.time)
    phases: dict[str, int] = attrs.field(factory=dict)
    """Milliseconds from the request to each phase, in order."""
    outcome: str | None = None
    reason: str | None = None
    stderr_tail: list[str] = attrs.field(factory=list)
    details: dict[str, Any] = attrs.field(factory=dict)
    _started: float = attrs.field(factory=time.monotonic)
    _stderr_from: int | None = attrs.field(factory=_stderr_size)
    _watchers: list[trio.MemorySendChannel[dict[str, Any]]] = attrs.field(factory=list)
    _parent: Timeline | None = None
    """The restart this is one step of (one worker of a keeper's roll)."""
    _prefix: str = ""

    def step(self, name: str) -> Timeline:
        """The timeline of one step of this restart: its phases are marked here too, as
        ``"<name>: <phase>"``; its outcome is its own."""
        return Timeline(self.trigger, parent=self, prefix=f"{name}: ")

    def watch(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """The events from now on: ``{"event": phase, "ms": ..., ...}``, then the outcome."""
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._watchers.append(send)
        return receive

    def mark(self, phase: str, **details: Any) -> None:  # noqa: ANN401 - JSON values
        ms = round((time.monotonic() - self._started) * 1000)
        self.phases[phase] = ms
        self.details.update(details)
        self._emit({"event": phase, "ms": ms, **details})
        if self._parent is not None:
            self._parent.mark(self._prefix + phase, **details)

    def finish(self, outcome: str, reason: str | None = None) -> None:
        """The restart is over: ``committed`` or ``failed`` (``reason`` says why)."""
        if self.outcome is not None:
            return
        self.outcome, self.reason = outcome, reason
        if outcome == "failed":
            self.stderr_tail = _stderr_since(self._stderr_from)
        self._emit({"event": "finished", **self.as_dict()})
        for watcher in self._watchers:
            watcher.close()
        self._watchers.clear()

    def as_dict(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger,
            "requested_at": self.requested_at,
            "phases": dict(self.phases),
            "outcome": self.outcome,
            "reason": self.reason,
            "stderr_tail": list(self.stderr_tail),
            **self.details,
        }

    def _emit(self, event: dict[str, Any]) -> None:
        for watcher in self._watchers:
            watcher.send_nowait(event)


def _stderr_since(offset: int | None) -> list[str]:
    """The last lines written to the stderr file since ``offset`` (by anyone)."""
    if offset is None:
        return []
    try:
        with open("/proc/self/fd/2", "rb") as log:
            log.seek(max(offset, os.fstat(log.fileno()).st_size - 16384))
            text = log.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-STDERR_LINES:]
