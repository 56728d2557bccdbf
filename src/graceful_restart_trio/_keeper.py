"""The keeper: a supervising process with a stable pid, restarting the application under it.

Theory of operation
-------------------

Some process managers follow exactly one pid: PID 1 of a docker or Kubernetes container,
supervisord, runit, systemd ``Type=simple``. An in-place restart changes the pid that
serves, which they take for a crash. The keeper is the process they follow instead. It
never serves and never restarts itself; it plays the predecessor's part of the handover
protocol (``_handover``) for every *generation* of the application, which it starts as
its children:

1. **start**: generation 1 gets a channel (fd 3) and no listeners; it binds its own, and
   says ``ready ["name", ...]\\n`` with the listening sockets attached (``SCM_RIGHTS``).
   The keeper keeps those sockets, and tells systemd ``READY=1``.
2. **restart** (``SIGHUP``, sent to the keeper or passed on by the application): start
   generation n+1 with the kept sockets at fd 4, 5, ... and wait for its ``ready``, at
   most ``ready_timeout``. If it exits or times out first, kill its session: the serving
   generation serves on. Otherwise keep the sockets it sent, write ``drain <new pid>\\n``
   to the old generation, which stops accepting and drains, and the new one serves.
3. **stop** (``SIGTERM`` or ``SIGINT``): pass the signal on to every live generation; the
   serving one drains, a second signal cuts the drains short. Once every generation has
   exited, the keeper exits with the serving generation's status.
4. **reap** (``SIGCHLD``): ``waitpid(-1)`` until nothing is left, remembering the status of
   each generation. The keeper is a child subreaper (and may be PID 1), so processes the
   application orphans become its children too: they are reaped silently. If the serving
   generation exits by itself, the keeper stops: it passes ``SIGTERM`` to the draining
   generations, gives them :data:`EXIT_GRACE` seconds, and exits with that status.

The keeper goes through the same :class:`State` table as an application process
(``_state``): ``STARTING``, ``SERVING`` once generation 1 is ready, ``RESTARTING`` while a
new generation starts, ``DRAINING`` once it stops (a stop signal, or the serving
generation exited by itself, or generation 1 never became ready) until every generation
has exited, then ``STOPPED``.

The application is unchanged under a keeper: the library notices ``"keeper"`` in what it
inherits, says ready with its sockets, drains on ``drain``, and passes ``SIGHUP`` on.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import final

import attrs
import trio

from ._exceptions import InheritanceError, UsageError
from ._handover import ENV_VAR, encode, parse_ready
from ._logging import PrefixLog
from ._options import ready_seconds
from ._pidfile import remove_pid_file, write_pid_file
from ._signals import receive_signals
from ._spawn import Child, spawn, startup_directory
from ._state import State, StateMachine
from ._systemd import Notifier, monotonic_usec, run_watchdog, watchdog_interval

__all__ = ["EXIT_GRACE", "Generation", "Keeper", "KeeperStatistics"]

LOGGER = "graceful_restart_trio.keeper"

EXIT_GRACE = 10.0
"""Seconds a generation gets to exit by itself before its session is killed: after it
closed its channel without saying ready, or once the serving generation exited by itself."""

_PR_SET_CHILD_SUBREAPER = 36
_MAX_FDS = 253
"""``SCM_MAX_FD``: the most file descriptors one message can carry."""
_NOT_INHERITED = ("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_")
"""The keeper is systemd's main process: these are its own, never a generation's."""


class _NotReadyError(Exception):
    """A generation exited, or said something other than ``ready [...]``."""


class _ChannelClosedError(_NotReadyError):
    """A generation closed its channel before it said ready: it is on its way out."""


Listeners = list[tuple[str, socket.socket]]


@final
@attrs.define(eq=False)
class Generation:
    """One copy of the application the keeper started, and its end of the channel.

    Its pid stays valid until the keeper reaps it (``status`` is set then), so signals
    sent while ``status`` is None cannot reach another process.
    """

    number: int
    child: Child
    channel: trio.socket.SocketType
    _raw_channel: socket.socket  # the same socket, for socket.recv_fds
    status: int | None = None
    ready: bool = False
    exited: trio.Event = attrs.field(factory=trio.Event)
    _alive: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    @property
    def pid(self) -> int:
        """The process id (also its process group and session id)."""
        return self.child.pid

    def __str__(self) -> str:
        return f"generation {self.number} pid {self.pid}"

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` unless it has exited and been reaped."""
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def receive_ready(self) -> Listeners:
        """Wait for ``ready [names]\\n``; return the listening sockets it came with.

        Cancelled if the generation exits meanwhile (see :meth:`reaped`).

        Raises:
            _NotReadyError: it exited, or said something else.
            _ChannelClosedError: it closed the channel first.
        """
        with self._alive:
            return await _receive_ready(self.channel, self._raw_channel)
        raise _NotReadyError("exited")

    async def send_drain(self, successor: int) -> None:
        """Tell it that ``successor`` took over: it stops accepting and drains.

        Raises:
            OSError: it is gone.
        """
        data = f"drain {successor}\n".encode()
        while data:
            data = data[await self.channel.send(data) :]

    def reaped(self, status: int) -> None:
        """Record its exit status and wake whoever waits for it."""
        self.status = status
        self.child.close()
        self._alive.cancel()
        if self.ready:  # nobody reads the channel any more; otherwise its reader closes it
            self.channel.close()
        self.exited.set()


async def _receive_ready(channel: trio.socket.SocketType, raw: socket.socket) -> Listeners:
    """Read one ``ready [names]`` line and the listening sockets that came with it."""
    socks: list[socket.socket] = []
    try:
        names = parse_ready(await _read_line(channel, raw, socks), len(socks))
    except BaseException:
        _close_listeners([("", sock) for sock in socks])
        raise
    return list(zip(names, socks, strict=True))


async def _read_line(
    channel: trio.socket.SocketType, raw: socket.socket, socks: list[socket.socket]
) -> bytes:
    """One line, which may come in pieces; the fds come with its first byte, into ``socks``."""
    data = b""
    while b"\n" not in data:
        await trio.lowlevel.wait_readable(channel)
        try:
            chunk, fds, flags, _ = socket.recv_fds(raw, 4096, _MAX_FDS, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            continue
        # socket(fileno=) leaves O_NONBLOCK alone: the application shares that flag.
        socks += [socket.socket(fileno=fd) for fd in fds]
        if flags & socket.MSG_CTRUNC:
            raise _NotReadyError("sent more sockets than one message can carry")
        if not chunk:
            raise _ChannelClosedError("closed its channel")
        data += chunk
    return data.partition(b"\n")[0]


@final
@attrs.frozen
class KeeperStatistics:
    """A snapshot of a :class:`Keeper`, from :meth:`Keeper.statistics`.

    Attributes:
        state: where the keeper is in its life (the same :class:`State` table as a process).
        pid: the keeper's own pid, which never changes.
        serving: the pid of the serving generation, or None.
        starting: the pid of a generation starting (first start or restart), or None.
        draining: the pids of older generations still running.
        generations: how many generations were started so far.
        listeners: the names of the listening sockets the keeper holds.
    """

    state: State
    pid: int
    serving: int | None
    starting: int | None
    draining: tuple[int, ...]
    generations: int
    listeners: tuple[str, ...]


def _command_list(command: Sequence[str]) -> list[str]:
    if isinstance(command, str) or not command or not all(isinstance(a, str) for a in command):
        raise ValueError(f"command must be a non-empty list of strings, not {command!r}")
    return list(command)


@final
@attrs.define(eq=False)
class Keeper:
    """Run ``command`` as generations of the application under a process whose pid stays.

    Synopsis::

        keeper = Keeper(["python", "-m", "myapp"], ready_timeout=60, pid_file=None)
        status = trio.run(keeper.run)  # returns once the application has stopped

    ``SIGHUP`` restarts the application, ``SIGTERM`` and ``SIGINT`` stop it; see the
    module docstring. Command-line use: ``python -m graceful_restart_trio.keeper``.

    Args:
        command: the application's command line; it must use this library.
        ready_timeout: seconds a new generation gets to say ready.
        pid_file: where to write the keeper's own pid (removed at exit), or None.
    """

    command: list[str] = attrs.field(converter=_command_list)
    ready_timeout: float = attrs.field(default=60.0, converter=ready_seconds)
    pid_file: Path | None = None
    _log: PrefixLog = attrs.field(
        init=False, factory=lambda: PrefixLog(logging.getLogger(LOGGER), f"[keeper {os.getpid()}]")
    )
    _machine: StateMachine = attrs.field(init=False, factory=StateMachine)
    _pid: int = attrs.field(init=False, factory=os.getpid)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _notifier: Notifier | None = attrs.field(init=False, default=None)
    _live: dict[int, Generation] = attrs.field(init=False, factory=dict)
    _serving: Generation | None = attrs.field(init=False, default=None)
    _starting: Generation | None = attrs.field(init=False, default=None)
    _listeners: Listeners = attrs.field(init=False, factory=list)
    _generations: int = attrs.field(init=False, default=0)
    _stop_requests: int = attrs.field(init=False, default=0)
    _start_failure: int | None = attrs.field(init=False, default=None)
    _stopped: trio.Event = attrs.field(init=False, factory=trio.Event)

    @property
    def state(self) -> State:
        """Where the keeper is in its life (see :class:`State`)."""
        return self._machine.state

    def statistics(self) -> KeeperStatistics:
        """A snapshot of the state, the generations and the listeners held."""
        serving = self._serving if self._machine.state is not State.STARTING else None
        starting = self._starting or (
            self._serving if self._machine.state is State.STARTING else None
        )
        return KeeperStatistics(
            state=self._machine.state,
            pid=self._pid,
            serving=serving.pid if serving is not None and serving.status is None else None,
            starting=starting.pid if starting is not None and starting.status is None else None,
            draining=tuple(pid for pid, g in self._live.items() if g not in (serving, starting)),
            generations=self._generations,
            listeners=tuple(name for name, _ in self._listeners),
        )

    # -- the story -----------------------------------------------------------------------

    async def run(self) -> int:
        """Run the application until it has stopped; return the keeper's exit status.

        That is the serving generation's status (128 + N if signal N killed it); 127 if
        the command cannot be found, 126 if it cannot be run.

        Raises:
            PidFileError: the pid file cannot be written.
            UsageError: the keeper was run before.
        """
        if self._nursery is not None or self._machine.state is not State.STARTING:
            raise UsageError("a Keeper runs once")
        _become_subreaper()
        if self.pid_file is not None:
            write_pid_file(self.pid_file, self._pid)
        self._notifier = Notifier.from_environ(os.environ)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                handlers: dict[signal.Signals, Callable[[signal.Signals], None]] = {
                    signal.SIGHUP: self._on_restart_signal,
                    signal.SIGTERM: self._on_stop_signal,
                    signal.SIGINT: self._on_stop_signal,
                    signal.SIGCHLD: self._on_child_signal,
                }
                await nursery.start(receive_signals, handlers)
                self._reap()
                interval = watchdog_interval(os.environ, self._pid)
                if self._notifier is not None and interval is not None:
                    nursery.start_soon(run_watchdog, self._notifier, interval)
                nursery.start_soon(self._start_first)
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._close()
        if self._serving is not None and self._serving.status is not None:
            status = _exit_code(self._serving.status)
        else:  # nothing ran: the command cannot be started, or a stop came first
            status = self._start_failure or 0
        self._log.info("exiting with status %d", status)
        return status

    async def _start_first(self) -> None:
        try:
            first = self._spawn(predecessor=None)
        except OSError as error:
            self._start_failure = 127 if isinstance(error, FileNotFoundError) else 126
            self._begin_stop("the command cannot be started")
            return
        self._serving = first
        listeners = await self._wait_ready(first)
        if listeners is None:
            self._begin_stop(f"{first} never became ready")
        elif self._machine.state is State.STARTING:
            self._listeners = listeners
            self._machine.advance(State.SERVING)
            self._notify(READY=1, STATUS=f"serving: {first}")
            self._log.info("%s serving", first)
        else:
            _close_listeners(listeners)  # stopping: it was told so too

    def _on_restart_signal(self, sig: signal.Signals) -> None:
        if self._machine.state is not State.SERVING:
            self._log.info("%s ignored: %s", sig.name, self._machine.state.value)
            return
        self._machine.advance(State.RESTARTING)  # now, so that a burst of signals restarts once
        self._tasks().start_soon(self._restart)

    async def _restart(self) -> None:
        old = self._serving
        if self._machine.state is not State.RESTARTING or old is None:  # a stop came first
            return
        self._log.info("restart requested: %s serves, starting its successor", old)
        self._notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS="restarting")
        new: Generation | None = None
        listeners = None
        try:
            new = self._spawn(predecessor=old.pid)
        except OSError:
            pass  # logged
        else:
            self._starting = new
            try:
                listeners = await self._wait_ready(new)
            finally:
                self._starting = None
        if self._machine.state in (
            State.DRAINING,
            State.STOPPED,
        ):  # the new one was told to stop too
            if listeners is not None:
                self._log.info("%s is ready, but the keeper is stopping: no handover", new)
                _close_listeners(listeners)
            return
        if new is None or listeners is None:
            if old.status is not None:
                self._stop_by_itself(old)
                return
            self._machine.advance(State.SERVING)
            self._notify(READY=1, STATUS=f"serving: {old}; restart failed")
            self._log.error("restart failed: %s serves on", old)
            return
        _close_listeners(self._listeners)
        self._listeners = listeners
        self._serving = new
        self._machine.advance(State.SERVING)
        self._notify(READY=1, STATUS=f"serving: {new}")
        if old.status is not None:
            self._log.info("%s serving; %s had already exited", new, old)
            return
        try:
            await old.send_drain(new.pid)
        except OSError as error:
            self._log.warning("cannot tell %s to drain: %s", old, error)
        else:
            self._log.info("handed over from %s to %s: it is draining", old, new)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._stop_requests += 1
        again = self._stop_requests > 1
        self._log.info("%s received%s: stopping", sig.name, " again" if again else "")
        self._begin_stop(f"{sig.name} received")
        for generation in list(self._live.values()):
            self._log.info("passing %s on to %s", sig.name, generation)
            generation.send_signal(sig)

    def _begin_stop(self, reason: str) -> None:
        """Enter STOPPING (once); the keeper ends when no generation is left."""
        if self._machine.state not in (State.DRAINING, State.STOPPED):
            self._machine.advance(State.DRAINING)
            self._notify(STOPPING=1, STATUS=f"stopping: {reason}")
            self._log.info("stopping: %s", reason)
        self._check_stopped()

    def _check_stopped(self) -> None:
        if self._machine.state is State.DRAINING and not self._live:
            self._machine.advance(State.STOPPED)
            self._stopped.set()

    def _on_child_signal(self, _sig: signal.Signals) -> None:
        self._reap()

    def _reap(self) -> None:
        """Reap every child that has exited: generations, and orphans we adopted."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            status = os.waitstatus_to_exitcode(wait_status)
            generation = self._live.pop(pid, None)
            if generation is None:
                self._log.debug("reaped orphan %d (status %d)", pid, status)
                continue
            generation.reaped(status)
            self._log.info("%s exited with status %d", generation, status)
            self._on_generation_exit(generation)

    def _on_generation_exit(self, generation: Generation) -> None:
        if self._machine.state is State.DRAINING:
            self._check_stopped()
        elif generation is self._serving and self._machine.state is State.SERVING:
            self._stop_by_itself(generation)
        elif generation is self._serving and self._machine.state is State.RESTARTING:
            self._log.warning("the serving %s exited during a restart", generation)

    def _stop_by_itself(self, serving: Generation) -> None:
        """The serving generation is gone: stop the rest, briefly, and exit with its status."""
        self._begin_stop(f"the serving {serving} exited by itself")
        for other in list(self._live.values()):
            self._log.info("passing SIGTERM on to %s", other)
            other.send_signal(signal.SIGTERM)
        if self._live:
            self._tasks().start_soon(self._kill_after_grace)

    async def _kill_after_grace(self) -> None:
        await trio.sleep(EXIT_GRACE)
        for generation in list(self._live.values()):
            self._log.warning("%s still runs after %gs: killing it", generation, EXIT_GRACE)
            generation.child.kill_session()

    # -- the steps -----------------------------------------------------------------------

    def _spawn(self, predecessor: int | None) -> Generation:
        """Start the next generation with the listeners held.

        Raises:
            OSError: the command cannot be started.
        """
        number = self._generations + 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)}
        names = [name for name, _ in self._listeners]
        env[ENV_VAR] = encode(number, predecessor, names, keeper=self._pid)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = trio.socket.from_stdlib_socket(ours)
        with theirs:
            try:
                child = spawn(
                    self.command,
                    env=env,
                    cwd=startup_directory(),
                    fds=[theirs.fileno(), *(sock.fileno() for _, sock in self._listeners)],
                )
            except OSError as error:
                channel.close()
                self._log.error("cannot start %r: %s", self.command[0], error)
                raise
        self._generations = number
        generation = Generation(number, child, channel, ours)
        self._live[child.pid] = generation
        self._log.info("%s started: %s", generation, " ".join(self.command))
        return generation

    async def _wait_ready(self, generation: Generation) -> Listeners | None:
        """Its listeners once it is ready; None if it exits or times out (then it is gone)."""
        why = f"was not ready within {self.ready_timeout:g}s"
        grace = 0.0
        try:
            with trio.move_on_after(self.ready_timeout):
                listeners = await generation.receive_ready()
                generation.ready = True
                self._log.info("%s is ready with %d listener(s)", generation, len(listeners))
                return listeners
        except _ChannelClosedError as error:
            why, grace = str(error), EXIT_GRACE
        except (_NotReadyError, InheritanceError) as error:  # the latter: a bad ready line
            why = str(error)
        finally:
            if not generation.ready:
                generation.channel.close()
        if generation.status is None and grace:
            self._log.info("%s %s before it was ready: waiting for it to exit", generation, why)
            with trio.move_on_after(grace):
                await generation.exited.wait()
        if generation.status is None:
            self._log.warning("%s %s: killing its session", generation, why)
            generation.child.kill_session()
            await generation.exited.wait()
        else:
            self._log.warning("%s exited before it was ready", generation)
        return None

    def _tasks(self) -> trio.Nursery:
        if self._nursery is None:
            raise UsageError("the keeper is not running")
        return self._nursery

    def _notify(self, **fields: str | int) -> None:
        if self._notifier is not None:
            self._notifier.send(fields)

    def _close(self) -> None:
        """The keeper's last word: nothing of it may outlive it unsupervised."""
        for generation in self._live.values():  # only after a bug: ask them to stop
            generation.send_signal(signal.SIGTERM)
            generation.child.close()
            generation.channel.close()
        _close_listeners(self._listeners)
        self._listeners = []
        if self._notifier is not None:
            self._notifier.close()
        if self.pid_file is not None:
            remove_pid_file(self.pid_file, self._pid)


def _close_listeners(listeners: Listeners) -> None:
    for _, sock in listeners:
        sock.close()  # never shutdown(): a generation shares it


def _exit_code(status: int) -> int:
    """A status as a shell reports it: 128 + N for death by signal N."""
    return status if status >= 0 else 128 - status


def _become_subreaper() -> None:
    """Adopt the processes our generations orphan, as PID 1 would (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
