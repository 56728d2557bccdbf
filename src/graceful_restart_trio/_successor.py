"""A successor: a new copy of this program, started through the launcher, followed until
it is on its own.

Nothing here knows about restarts: it starts a command with exactly the file descriptors
it is given (see ``_launcher`` for why a launcher stands between us), and tells what
became of it: ready, exited (with its status), released, or killed with everything it
started.

Why ``os.posix_spawn`` and not :mod:`subprocess` (in the launcher too): a successor must
start with every signal at its default action and an empty signal mask (``SIG_IGN`` and
the mask survive ``exec``, and a copy that ignores ``SIGTERM`` cannot be stopped), which
only ``posix_spawn`` can ask for; and ``os.fork`` is unsafe in a process with threads.
The one exception is ``SIGHUP``: the successor starts with it *ignored* (the launcher
sees to it), so that a ``SIGHUP`` arriving before its handler is installed cannot kill it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import final

import attrs
import trio
import trio.lowlevel

from ._exceptions import InheritanceError, SuccessorExitedError, SuccessorStartError
from ._handover import LineReader

__all__ = ["Successor", "default_command", "describe_status", "startup_directory"]

FIRST_FD = 3
"""Where the passed file descriptors land in the child, in order, as systemd does it."""

LAUNCHER_SOURCE = Path(__file__).with_name("_launcher.py").read_text(encoding="utf-8")
"""Read now: a deploy may replace or remove this file before the next restart."""

LAUNCHER_GRACE = 10.0
"""Seconds the launcher gets to kill and reap what a successor left, or to exit."""

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


def describe_status(status: int) -> str:
    """An exit status as people say it: ``status 3``, or ``signal SIGKILL``."""
    if status >= 0:
        return f"status {status}"
    try:
        return f"signal {signal.Signals(-status).name}"
    except ValueError:
        return f"signal {-status}"


@final
@attrs.define(eq=False)
class Successor:
    """A successor process and the launcher above it, until it is released or killed.

    Its pid is also its process group and session id (it was started with ``setsid``).
    It is named by a pidfd, so a signal sent through :meth:`send_signal` can never reach
    another process that got the same pid later.
    """

    pid: int
    channel: trio.socket.SocketType
    """Our end of the handover channel (see ``_handover``)."""
    reader: LineReader
    """Reads that channel, with the file descriptors that come along."""
    _pidfd: int
    _launcher_pid: int
    _launcher_pidfd: int
    _control: LineReader
    returncode: int | None = None
    """Its exit status once known (negative: the signal that killed it)."""

    @classmethod
    async def start(
        cls, command: Sequence[str], *, env: Mapping[str, str], cwd: str, fds: Sequence[int]
    ) -> Successor:
        """Start ``command`` with a channel at fd 3 and ``fds`` at 4, 5, ...

        Raises:
            SuccessorStartError: the launcher or the command could not be started.
        """
        # The launcher's text goes through a memfd, its last fd (see _launcher), so that
        # its command line is short: python -I -S /proc/self/fd/N graceful-restart-launcher
        launcher = [
            *(sys.executable, "-I", "-S", f"/proc/self/fd/{FIRST_FD + 2 + len(fds)}"),
            *("graceful-restart-launcher", cwd, str(1 + len(fds)), *command),
        ]
        opened: list[socket.socket] = []
        text = -1
        try:
            text = _launcher_text()
            control, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            opened += [control, control_theirs]
            channel, channel_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            opened += [channel, channel_theirs]
            theirs = [control_theirs.fileno(), channel_theirs.fileno(), *fds, text]
            pid = _spawn(launcher, env, theirs)
        except OSError as error:
            for sock in opened:
                sock.close()
            raise SuccessorStartError(f"cannot start {sys.executable!r}: {error}") from error
        finally:
            if text >= 0:
                os.close(text)
        try:
            launcher_pidfd = os.pidfd_open(pid)  # our unreaped child: it cannot be another
        except OSError as error:  # out of fds: have it kill what it started, and reap it
            with contextlib.suppress(OSError):
                control.send(b"kill\n")
            os.waitpid(pid, 0)  # noqa: ASYNC222 - it exits at once, with whatever it started
            for sock in opened:
                sock.close()
            raise SuccessorStartError(f"cannot follow the launcher: {error}") from error
        control_theirs.close()
        channel_theirs.close()
        control_reader = LineReader(trio.socket.from_stdlib_socket(control))
        line, pidfds = b"", list[int]()
        try:
            line, pidfds = await control_reader.receive()
        finally:
            word, _, argument = line.decode(errors="replace").partition(" ")
            if word != "started" or len(pidfds) != 1:  # failed, or we were cancelled
                for fd in pidfds:
                    os.close(fd)
                with trio.CancelScope(shield=True):
                    await _abort(pid, launcher_pidfd, control)
                channel.close()
        if word == "failed":  # failed <errno> <message>
            number, _, why = argument.partition(" ")
            errno = int(number) if number.isdigit() else None
            raise SuccessorStartError(f"cannot start {command[0]!r}: {why}", errno)
        if word != "started" or len(pidfds) != 1:
            raise SuccessorStartError(
                f"cannot start {command[0]!r}: the launcher said {line[:200]!r}"
            )
        reader = LineReader(trio.socket.from_stdlib_socket(channel))
        return cls(
            int(argument), reader.socket, reader, pidfds[0], pid, launcher_pidfd, control_reader
        )

    async def wait_exit(self) -> int | None:
        """Wait until it exits; return its status (None if it was released before)."""
        await trio.lowlevel.wait_readable(self._pidfd)
        while self.returncode is None and self._control.socket.fileno() >= 0:
            line = await self._control.receive_line()
            word, _, argument = line.decode(errors="replace").partition(" ")
            if word == "exited":
                self.returncode = int(argument)
            elif not line:
                break
        return self.returncode

    async def wait_ready(self) -> tuple[bytes, list[int]]:
        """The first line it writes on the channel, with the fds that came with it.

        Raises:
            SuccessorExitedError: it exited, or closed the channel, first.
            InheritanceError: it wrote a line longer than ``MAX_LINE``, or sent more fds
                than one message can carry (see :meth:`LineReader.receive`).
        """
        line, fds = b"", list[int]()
        wrong: InheritanceError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_readable, self._pidfd, nursery.cancel_scope)
            try:
                line, fds = await self.reader.receive()
            except InheritanceError as error:  # raised here, not wrapped by the nursery
                wrong = error
            nursery.cancel_scope.cancel()
        if wrong is not None:
            raise wrong
        if line:
            return line, fds
        with trio.move_on_after(LAUNCHER_GRACE):  # it closed the channel: on its way out?
            status = await self.wait_exit()
            how = describe_status(status) if status is not None else "an unknown status"
            raise SuccessorExitedError(
                f"successor {self.pid} exited with {how} before it was ready", status or 0
            )
        raise SuccessorExitedError(
            f"successor {self.pid} closed its channel before it was ready", 0
        )

    async def wait_stopped(self) -> int | None:
        """After ready: wait until it exits (return its status) or closes its channel
        because it stopped serving (return None: it is finishing its work).

        Whatever it still writes on the channel is dropped, and any fds sent closed.
        """
        stopped: list[int | None] = []
        async with trio.open_nursery() as nursery:

            async def exited() -> None:
                stopped.append(await self.wait_exit())
                nursery.cancel_scope.cancel()

            nursery.start_soon(exited)
            await self.reader.drop_until_closed()  # nothing more is said after "ready"
            await trio.lowlevel.checkpoint()  # let an exit that closed the channel be seen first
            if not self.has_exited():
                nursery.cancel_scope.cancel()
        return stopped[0] if stopped else None

    async def wait_retired(self) -> int | None:
        """A retired successor's end: wait until it exits, then kill whatever it left and
        close it (also if cancelled); its status if known."""
        try:
            return await self.wait_exit()
        finally:
            with trio.CancelScope(shield=True):
                await self.kill()
            self.close()

    def has_exited(self) -> bool:
        """Whether the successor has exited (it may not be reaped yet)."""
        return _readable(self._pidfd)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the successor itself, through its pidfd; nothing if it is gone."""
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self._pidfd, sig)

    async def release(self) -> bool:
        """Let the launcher go, so that the successor is re-parented above us.

        Returns:
            True once the launcher is gone and the successor lives on its own; False if it
            exited first (then :attr:`returncode` says how, and everything it left is gone).
        """
        with contextlib.suppress(OSError):
            await self._control.socket.send(b"release\n")
        await self._wait_launcher()
        if self.returncode is None:  # it may have said "exited" just before it left
            while line := await self._control.receive_line():
                word, _, argument = line.decode(errors="replace").partition(" ")
                if word == "exited":
                    self.returncode = int(argument)
        return self.returncode is None

    async def kill(self) -> None:
        """Kill the successor's session and everything it started, and reap it all."""
        if self._launcher_pidfd < 0:  # released: the pidfd is all we have
            self.send_signal(signal.SIGKILL)
            return
        with contextlib.suppress(OSError):
            await self._control.socket.send(b"kill\n")
        with trio.move_on_after(LAUNCHER_GRACE) as late:
            await self._wait_launcher()
        if late.cancelled_caught or not self.has_exited():  # the launcher failed us
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
            self.send_signal(signal.SIGKILL)

    async def _wait_launcher(self) -> None:
        if self._launcher_pidfd >= 0:
            await trio.lowlevel.wait_readable(self._launcher_pidfd)
            _reap(self._launcher_pid, self._launcher_pidfd)
            self._launcher_pidfd = -1

    def close(self) -> None:
        """Stop following it (it keeps running), and close the channel. Idempotent."""
        if self._launcher_pidfd >= 0:  # dropped mid-way: the launcher must not outlive us
            with contextlib.suppress(OSError):
                # By its pidfd: under the keeper, which reaps every child, the pid may be free.
                signal.pidfd_send_signal(self._launcher_pidfd, signal.SIGKILL)
            _reap(self._launcher_pid, self._launcher_pidfd)
            self._launcher_pidfd = -1
        self._control.socket.close()
        self.channel.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


async def _abort(pid: int, pidfd: int, control: socket.socket) -> None:
    """Make the launcher kill whatever it started, wait for it (bounded), reap it."""
    with contextlib.suppress(OSError):
        control.send(b"kill\n")  # read once it has started the successor, or failed to
    with trio.move_on_after(LAUNCHER_GRACE):
        await trio.lowlevel.wait_readable(pidfd)
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    _reap(pid, pidfd)
    control.close()


async def _cancel_when_readable(fd: int, scope: trio.CancelScope) -> None:
    await trio.lowlevel.wait_readable(fd)
    scope.cancel()


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _reap(pid: int, pidfd: int) -> None:
    """Reap our child ``pid`` (blocking only if it has not exited) and close its pidfd."""
    with contextlib.suppress(ChildProcessError):  # the keeper reaps every child it has
        os.waitpid(pid, 0)
    os.close(pidfd)


_MFD_NOEXEC_SEAL = 0x0008
"""Linux 6.3+: a memfd that can never be executed (``vm.memfd_noexec=2`` demands it)."""


def _launcher_text() -> int:
    """A memfd holding the launcher's text, for the launcher's interpreter to read.

    Raises:
        OSError: it cannot be made.
    """
    for flags in (os.MFD_CLOEXEC | _MFD_NOEXEC_SEAL, os.MFD_CLOEXEC):
        try:
            fd = os.memfd_create("graceful-restart-launcher", flags)
        except OSError as error:
            if error.errno != errno.EINVAL:  # EINVAL: a kernel before 6.3
                raise
            continue
        try:
            os.write(fd, LAUNCHER_SOURCE.encode())  # a tmpfs file: all of it, or an error
        except OSError:
            os.close(fd)
            raise
        return fd
    raise OSError(errno.EINVAL, "memfd_create refused every flag")


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


def _spawn(command: Sequence[str], env: Mapping[str, str], fds: Sequence[int]) -> int:
    """Start ``command`` in a new session with ``fds`` at 3, 4, ... and no other fd above 2.

    Signals start at their default actions with an empty mask.

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
        # Every signal at its default action, SIGHUP too: this process's dispositions are
        # never touched (a signal arriving meanwhile would be lost); the launcher, which
        # has no other thread, ignores SIGHUP for the successor.
        return os.posix_spawn(
            command[0],
            list(command),
            env,
            file_actions=actions,
            setsid=True,
            setsigmask=(),
            setsigdef=_RESET_SIGNALS,
        )
    finally:
        for copy in copies:
            os.close(copy)
