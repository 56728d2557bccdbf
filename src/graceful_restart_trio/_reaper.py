"""What a PID 1 or a child subreaper owes the processes under it, whatever they are.

A process that supervises others with a stable pid (PID 1 of a container, or a child
subreaper under systemd or supervisord) has four duties, as tini and dumb-init do:

- **adopt** the processes its children orphan (:func:`become_subreaper`): the kernel
  re-parents them to it rather than to init;
- **reap** every child that exits, its own and those it adopted (:func:`reap`), so that
  none stays a zombie;
- **forward** the signals it has no use for (:data:`FORWARDED`), so that none of them
  kills it and orphans its children;
- **exit** with a child's status as a shell reports it (:func:`exit_code`).

It knows nothing of what the children do: the keeper (``_keeper``) says which of them
matter and what their exit means.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

__all__ = ["FORWARDED", "become_subreaper", "exit_code", "reap"]

_PR_SET_CHILD_SUBREAPER = 36

FORWARDED: frozenset[signal.Signals] = frozenset(
    sig
    for sig in signal.valid_signals()
    if isinstance(sig, signal.Signals)
    and sig
    not in {
        signal.SIGKILL,  # cannot be caught
        signal.SIGSTOP,
        signal.SIGCHLD,  # the reaper's own: see reap()
        signal.SIGTSTP,  # job control: the terminal's, for the supervisor itself
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGPIPE,  # about the supervisor's own writes
        signal.SIGURG,
        signal.SIGSEGV,  # a fault of the supervisor's own
        signal.SIGBUS,
        signal.SIGFPE,
        signal.SIGILL,
        signal.SIGABRT,
        signal.SIGTRAP,
        signal.SIGSYS,
    }
)
"""The signals a supervisor passes on to its children: every one a process manager or an
operator may send (``SIGTERM``, ``SIGUSR1``, ``SIGWINCH``, ``SIGQUIT``, ...). It may act
on some of them itself instead (the keeper restarts on ``SIGHUP``)."""


def become_subreaper() -> None:
    """Adopt the processes our children orphan, as PID 1 would (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def reap(exited: Callable[[int, int], None]) -> None:
    """Reap every child that has exited, without waiting: call ``exited(pid, status)`` for
    each, ``status`` as :func:`os.waitstatus_to_exitcode` gives it (-N: killed by signal N).

    Call it on each ``SIGCHLD`` (several exits may come as one signal), and once after
    the ``SIGCHLD`` handler is in place (for those that exited before).
    """
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # no child left
            return
        if pid == 0:  # none has exited
            return
        exited(pid, os.waitstatus_to_exitcode(wait_status))


def exit_code(status: int) -> int:
    """A status as a shell reports it: 128 + N for death by signal N."""
    return status if status >= 0 else 128 - status
