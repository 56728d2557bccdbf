"""Starting the successor: a new copy of this program, in a session of its own.

Nothing here knows about restarts: it starts a command with exactly the file
descriptors it is given, and watches the process it started.

Why ``os.posix_spawn`` and not :mod:`subprocess`: a successor must start with every
signal at its default action and an empty signal mask (``SIG_IGN`` and the mask survive
``exec``, and a copy that ignores ``SIGTERM`` cannot be stopped), which only
``posix_spawn`` can ask for; and ``os.fork`` is unsafe in a process with threads. The one
exception is ``SIGHUP``: the successor starts with it *ignored*, so that a ``SIGHUP``
arriving before its handler is installed cannot kill it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import final

import attrs
import trio

__all__ = ["Child", "default_command", "spawn", "startup_directory"]

FIRST_FD = 3
"""Where the passed file descriptors land in the child, in order, as systemd does it."""

_KEEP_IGNORED = frozenset({signal.SIGHUP})
_RESET_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def _logical_cwd() -> str:
    """The working directory as the user named it, through symlinks if they did.

    A deploy that swaps a ``current -> releases/N`` symlink must start the successor in
    the new release: ``$PWD`` keeps the path through the link, ``getcwd()`` does not.
    """
    physical = os.getcwd()
    logical = os.environ.get("PWD", "")
    try:
        if logical and os.path.isabs(logical) and os.path.samefile(logical, physical):
            return logical
    except OSError:
        pass
    return physical


_STARTUP_DIRECTORY = _logical_cwd()


def startup_directory() -> str:
    """The working directory this program was started in (read when it was imported)."""
    return _STARTUP_DIRECTORY


def default_command() -> list[str]:
    """This program's own command line, to start a new copy of it.

    ``sys.orig_argv`` keeps what ``sys.argv`` loses (``-m pkg``, ``-X`` options, ``-c``);
    the interpreter is ``sys.executable``, the path it was started by, so a deploy that
    replaced the interpreter or the virtualenv at that path is picked up.
    """
    return [sys.executable, *sys.orig_argv[1:]]


@final
@attrs.define(eq=False)
class Child:
    """A process we started, watched through a pidfd so its pid can never be mistaken.

    Its pid is also its process group and session id (it was started with ``setsid``),
    so :meth:`kill_session` reaches everything it started too.
    """

    pid: int
    _pidfd: int
    returncode: int | None = None

    async def wait(self) -> int:
        """Wait for the child to exit, reap it, and return its status as subprocess does."""
        if self.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            _, status = os.waitpid(self.pid, 0)  # noqa: ASYNC222 - it has exited: no wait
            self.returncode = os.waitstatus_to_exitcode(status)
            self.close()
        return self.returncode

    def kill_session(self) -> None:
        """SIGKILL every process of the child's session (it is the session leader)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop watching (the child keeps running). Idempotent."""
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def _inheritable_fds() -> list[int]:
    """Every open fd from 3 up that an exec would pass on."""
    fds = []
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd < FIRST_FD:
            continue
        try:
            if os.get_inheritable(fd):
                fds.append(fd)
        except OSError:  # the fd of the listdir itself, closed by now
            continue
    return fds


def spawn(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    fds: Sequence[int],
) -> Child:
    """Start ``command`` in a new session with ``fds`` at 3, 4, ... and no other fd above 2.

    Signals start at their default actions (``SIGHUP`` ignored, see the module docstring)
    with an empty mask. Must be called from the main thread.

    Raises:
        OSError: the command could not be started.
    """
    # Temporary copies above the target range, so that no dup2 clobbers a source.
    copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FIRST_FD + len(fds)) for fd in fds]
    try:
        targets = range(FIRST_FD, FIRST_FD + len(fds))
        actions: list[tuple[int, ...]] = [
            (os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd not in targets
        ]
        actions += [
            (os.POSIX_SPAWN_DUP2, copy, target)
            for copy, target in zip(copies, targets, strict=True)
        ]
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            pid = _posix_spawn_in(cwd, list(command), env, actions)
        finally:
            signal.signal(signal.SIGHUP, previous)
    finally:
        for copy in copies:
            os.close(copy)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # pragma: no cover - pidfd_open only fails on kernels older than 5.3
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return Child(pid, pidfd)


def _posix_spawn_in(
    cwd: str, argv: list[str], env: Mapping[str, str], actions: list[tuple[int, ...]]
) -> int:
    """``posix_spawnp`` with a working directory.

    ``os.posix_spawn`` cannot change directory, and a ``chdir`` around it would move
    every other thread too. In the common case the directory is already ours; otherwise
    a shell changes into it and execs the command (it keeps our signal setup).
    """
    if not os.path.samefile(cwd, os.getcwd()):
        argv = ["/bin/sh", "-c", 'cd -- "$0" && exec "$@"', cwd, *argv]
    elif os.sep in argv[0] and not os.path.isabs(argv[0]):
        argv = [os.path.join(cwd, argv[0]), *argv[1:]]
    return os.posix_spawnp(
        argv[0],
        argv,
        env,
        file_actions=actions,
        setsid=True,
        setsigmask=(),
        setsigdef=_RESET_SIGNALS - _KEEP_IGNORED,
    )
