"""The signal task: turns signals into calls, and keeps SIGHUP from killing us.

``SIGHUP``'s default action kills a process. A restart signal that arrives before
:func:`graceful_restart_trio.open` installs its handler must not do that, so importing
this library ignores ``SIGHUP`` at once (if nobody else has claimed it), and successors
are started with it ignored (see ``_successor``). The signal task then handles it; when the
task ends trio puts the ignore back.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Mapping

import trio

from ._exceptions import UsageError

__all__ = ["ignore_sighup", "receive_signals"]


def ignore_sighup() -> None:
    """Ignore SIGHUP unless someone installed a handler for it (main thread only)."""
    if threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def check_main_thread() -> None:
    """Raises:
    UsageError: called outside the main thread, where signals cannot be received.
    """
    if threading.current_thread() is not threading.main_thread():
        raise UsageError(
            "graceful_restart_trio.open() must run in the main thread "
            "(it handles signals, and only the main thread can)"
        )


async def receive_signals(
    handlers: Mapping[signal.Signals, Callable[[signal.Signals], None]],
    log: logging.LoggerAdapter,  # type: ignore[type-arg]
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``handlers[sig](sig)`` for each signal that arrives, until cancelled.

    Signals are handled from the moment the task has started. trio coalesces a signal
    that arrives again before the first was handled: a burst counts once. A handler
    that raises is logged, and the task goes on: a signal must never kill a server.
    """
    signals: Iterable[signal.Signals] = handlers
    with trio.open_signal_receiver(*signals) as received:
        task_status.started()
        async for signum in received:
            sig = signal.Signals(signum)
            try:
                handlers[sig](sig)
            except Exception:
                log.exception("handling %s failed; still serving", sig.name)
