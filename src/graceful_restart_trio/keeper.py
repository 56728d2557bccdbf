"""The keeper: run an application under a supervising process whose pid never changes.

For process managers that follow one pid (docker or Kubernetes PID 1, supervisord,
runit, systemd ``Type=simple``)::

    graceful-restart-keeper --pid-file /run/app.pid -- python -m myapp --port 8000
    python -m graceful_restart_trio.keeper -- python -m myapp --port 8000

``kill -HUP <keeper pid>`` starts a new generation of the application with the listening
sockets, waits until it is ready, and drains the old one; ``kill -TERM`` drains and
exits with the application's status. ``--workers N`` runs N copies on the same sockets
(one per core) and rolls them one after another. The application is the same program as without a
keeper (it uses :func:`graceful_restart_trio.open`); the library notices the keeper.
See :class:`Keeper` for the details.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from ._exceptions import GracefulRestartError
from ._keeper import LOGGER, Keeper, KeeperStatistics
from ._options import probation_seconds

__all__ = ["Keeper", "KeeperStatistics", "main"]


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return seconds


def _probation(text: str) -> float:
    try:
        return probation_seconds(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 0 or a positive number of seconds: {text!r}"
        ) from None


def _workers(text: str) -> int:
    """``N`` (at least 1), or ``auto``: the CPUs this process may run on."""
    if text == "auto":
        return len(os.sched_getaffinity(0))
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, or auto: {text!r}")
    return workers


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [--pid-file F] [--ready-timeout S] [--probation S] [--fd-store] "
        "[--control PATH] [--workers N] [--roll-batch K] [--log-level L] -- command args...",
        description="Run an application built on graceful_restart_trio under a process "
        "with a stable pid: SIGHUP restarts the application without losing a connection, "
        "SIGTERM/SIGINT drain it and exit with its status.",
    )
    parser.add_argument("--pid-file", type=Path, help="write the keeper's pid here")
    parser.add_argument(
        "--ready-timeout",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="seconds a new generation gets to say ready (default: %(default)g)",
    )
    parser.add_argument(
        "--probation",
        type=_probation,
        default=5.0,
        metavar="S",
        help="seconds a ready new generation is watched before the old one drains; "
        "0 turns it off (default: %(default)g)",
    )
    parser.add_argument(
        "--fd-store",
        action="store_true",
        help="keep the listeners in systemd's file descriptor store (the unit needs "
        "FileDescriptorStoreMax=; automatic when systemd sets $FDSTORE)",
    )
    parser.add_argument(
        "--control",
        type=Path,
        metavar="PATH",
        help="serve graceful-restart status/restart/stop on this unix socket (mode 0600)",
    )
    parser.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="run N copies of the application on the same sockets, one per core: a "
        "restart replaces them one after another, a crashed one is replaced; auto: one "
        "per usable CPU (default: %(default)s)",
    )
    parser.add_argument(
        "--roll-batch",
        type=int,
        default=1,
        metavar="K",
        help="with --workers: replace K workers at a time on a restart (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="the keeper's log level (default: %(default)s)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "graceful-restart-keeper") -> int:
    """Run the keeper from the command line; return its exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        prog: the command's name in ``--help`` and in errors (``graceful-restart keeper``
            when run through ``graceful-restart``).
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(prog)
    if "--" in arguments:  # everything after the first "--" belongs to the application
        split = arguments.index("--")
        options = parser.parse_args(arguments[:split])
        command = arguments[split + 1 :]
    else:
        options = parser.parse_args(arguments)
        command = options.command
    if not command:
        parser.error("no command to run: give it after '--'")
    if not 1 <= options.roll_batch <= options.workers:
        parser.error(f"--roll-batch must be from 1 to --workers ({options.workers})")
    logging.basicConfig(
        level=options.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    keeper = Keeper(
        command,
        ready_timeout=options.ready_timeout,
        probation=options.probation,
        pid_file=options.pid_file,
        fd_store=options.fd_store,
        control=options.control,
        workers=options.workers,
        roll_batch=options.roll_batch,
    )
    try:
        return trio.run(keeper.run)
    except GracefulRestartError as error:
        logging.getLogger(LOGGER).critical("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
