"""The options of :func:`graceful_restart_trio.open`, validated in one place."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypedDict, final

import attrs

__all__ = ["EXIT_GRACE", "OpenOptions", "Options", "probation_seconds", "ready_seconds"]

EXIT_GRACE = 5.0
"""Seconds allowed beyond the bounds a process sets itself, for it to get there and exit:
systemd is asked to wait this long past ``drain_timeout`` for a drain, and an operator
past ``ready_timeout + probation`` for a restart's outcome."""

_UNCATCHABLE = frozenset({signal.SIGKILL, signal.SIGSTOP})


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    seconds = float(value)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{name} must be a positive, finite number of seconds, not {value!r}")
    return seconds


def _signals(name: str, value: object) -> frozenset[signal.Signals]:
    if isinstance(value, (int, str)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a set of signals, not {value!r}")
    result = set()
    for item in value:
        try:
            sig = signal.Signals(item)
        except (ValueError, TypeError):
            raise ValueError(f"{name}: {item!r} is not a signal") from None
        if sig in _UNCATCHABLE:
            raise ValueError(f"{name}: {sig.name} cannot be caught")
        result.add(sig)
    return frozenset(result)


def probation_seconds(value: object) -> float:
    """Validate a ``probation`` (also the keeper's): 0 turns it off."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"probation must be a number of seconds, not {value!r}")
    seconds = float(value)
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(
            f"probation must be 0 (off) or a positive number of seconds, not {value!r}"
        )
    return seconds


def _drain_timeout(value: object) -> float:
    return _seconds("drain_timeout", value)


def ready_seconds(value: object) -> float:
    """Validate a ``ready_timeout`` (also the keeper's)."""
    return _seconds("ready_timeout", value)


def _restart_signals(value: object) -> frozenset[signal.Signals]:
    return _signals("restart_signals", value)


def _shutdown_signals(value: object) -> frozenset[signal.Signals]:
    return _signals("shutdown_signals", value)


def _path(name: str, value: object) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path or None, not {value!r}")
    return Path(value).absolute()


def _pid_file(value: object) -> Path | None:
    return _path("pid_file", value)


def _control(value: object) -> Path | None:
    return _path("control", value)


def _command(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"command must be a sequence of strings or None, not {value!r}")
    if not value or not all(isinstance(arg, str) for arg in value):
        raise ValueError(f"command must be a non-empty sequence of strings, not {value!r}")
    return tuple(value)


def _logger(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"logger must be a non-empty logger name, not {value!r}")
    return value


class OpenOptions(TypedDict, total=False):
    """The keyword arguments of :func:`graceful_restart_trio.open`, for type checkers: a
    misspelt option (``contrl=``) is an error for mypy and editors, not only at run time.
    Each is described by :class:`Options`, which checks the values."""

    drain_timeout: float
    ready_timeout: float
    probation: float
    restart_signals: Iterable[signal.Signals | int]
    shutdown_signals: Iterable[signal.Signals | int]
    pid_file: str | os.PathLike[str] | None
    control: str | os.PathLike[str] | None
    command: Sequence[str] | None
    logger: str
    systemd: bool
    fd_store: bool | None


@final
@attrs.frozen(kw_only=True)
class Options:
    """Everything :func:`graceful_restart_trio.open` can be told.

    Args:
        drain_timeout: seconds the drain waits for leases before it cancels the work
            still under them (default 30).
        ready_timeout: seconds a successor has to say it is ready before it is killed
            and the restart reported as failed (default 60).
        probation: seconds a ready successor is watched before the handover commits
            (default 5; 0 turns it off). Meanwhile this process does not accept, but
            keeps its sockets: if the successor dies, it accepts again.
        restart_signals: signals that start a restart (default ``{SIGHUP}``).
        shutdown_signals: signals that start a graceful shutdown; a second one cuts the
            drain short (default ``{SIGTERM, SIGINT}``).
        pid_file: a file to hold the pid of the serving process, or None.
        control: the path of a unix socket (mode 0600) where the process in charge answers
            ``graceful-restart status``, ``restart`` and ``stop``; handed on to every
            successor (see :mod:`graceful_restart_trio.cli`). Under a keeper, the keeper's
            ``--control`` is used instead. Default None: no control socket.
        command: the command line of the successor, instead of this process's own.
        logger: the name of the :mod:`logging` logger to log to.
        systemd: speak the systemd notify protocol when ``NOTIFY_SOCKET`` is set.
        fd_store: keep the listening sockets in systemd's file descriptor store, so that
            they outlive a ``systemctl restart`` or a crash (the unit needs
            ``FileDescriptorStoreMax=``). None (the default): when systemd says the unit
            has a store (``$FDSTORE``, systemd 254+).

    Raises:
        TypeError: an option has the wrong type (the message names it).
        ValueError: an option has a bad value (the message names it).
    """

    drain_timeout: float = attrs.field(default=30.0, converter=_drain_timeout)
    ready_timeout: float = attrs.field(default=60.0, converter=ready_seconds)
    probation: float = attrs.field(default=5.0, converter=probation_seconds)
    restart_signals: frozenset[signal.Signals] = attrs.field(
        default=frozenset({signal.SIGHUP}), converter=_restart_signals
    )
    shutdown_signals: frozenset[signal.Signals] = attrs.field(
        default=frozenset({signal.SIGTERM, signal.SIGINT}), converter=_shutdown_signals
    )
    pid_file: Path | None = attrs.field(default=None, converter=_pid_file)
    control: Path | None = attrs.field(default=None, converter=_control)
    command: tuple[str, ...] | None = attrs.field(default=None, converter=_command)
    logger: str = attrs.field(default="graceful_restart_trio", converter=_logger)
    systemd: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    fd_store: bool | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(bool))
    )

    def __attrs_post_init__(self) -> None:
        both = self.restart_signals & self.shutdown_signals
        if both:
            names = ", ".join(sorted(sig.name for sig in both))
            raise ValueError(f"restart_signals and shutdown_signals both contain {names}")
