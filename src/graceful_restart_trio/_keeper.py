"""The keeper: a supervising process with a stable pid, restarting the application under it.

Theory of operation
-------------------

Some process managers follow exactly one pid: PID 1 of a docker or Kubernetes container,
supervisord, runit, systemd ``Type=simple``. An in-place restart changes the pid that
serves, which they take for a crash. The keeper is the process they follow instead. It
never serves and never restarts itself; it plays the predecessor's part of a restart
(``_restart``, the very story a serving process plays in direct mode) for every
*generation* of the application:

1. **start**: generation 1 gets a channel (fd 3), a pidfd naming the keeper (fd 4) and the
   sockets the keeper holds: none, or those systemd passed it (socket activation, the fd
   store). It opens its listeners and says ``ready ["name", ...]\\n`` with the listening
   sockets attached (``SCM_RIGHTS``). The keeper keeps those sockets, tells it ``main``
   (it is in charge: it writes its pid file) and tells systemd ``READY=1``.
2. **restart** (``SIGHUP``, sent to the keeper or passed on by the application): start
   generation n+1 with the kept sockets at fd 5, 6, ... and wait for its ``ready``, at
   most ``ready_timeout``. If it exits or times out first, kill it and everything it
   started: the serving generation serves on. Otherwise tell the serving generation
   ``pause`` (it stops accepting, keeps its sockets) and watch the new one through its
   probation: if it dies, tell the old one ``resume``; if not, keep the sockets it sent,
   tell the new one ``main`` and the old one ``drain <new pid>``. A ``SIGHUP`` during a
   restart is carried out once it is over.
3. **stop** (``SIGTERM`` or ``SIGINT``): pass the signal on to every live generation; the
   serving one drains, a second signal cuts the drains short. Once every generation has
   exited, the keeper exits with the serving generation's status.
4. **reap** (``SIGCHLD``): ``waitpid(-1)`` until nothing is left, remembering the status of
   each generation. The keeper is a child subreaper (and may be PID 1), so processes the
   application orphans become its children too: they are reaped silently. If the serving
   generation exits by itself, the keeper stops: it passes ``SIGTERM`` to the draining
   generations, gives them :data:`STOP_GRACE` seconds, and exits with that status.
5. **forward** every other catchable signal (``SIGUSR1`` to reopen logs, ``SIGWINCH``,
   ``SIGQUIT``, ...) to the serving generation, as tini and dumb-init do: none of them may
   kill the keeper and orphan the application.

The duties of any PID 1 or subreaper (adopting orphans, reaping, which signals to pass
on, the exit code) are ``_reaper``'s; this module says what they mean for generations.

The keeper goes through the same :class:`State` table as an application process
(``_state``): ``STARTING``, ``SERVING`` once generation 1 is ready, ``RESTARTING`` while a
new generation starts, ``PROBATION`` while it is watched, ``DRAINING`` once it stops (a
stop signal, or the serving generation exited by itself, or generation 1 never became
ready) until every generation has exited, then ``STOPPED``.

The application is unchanged under a keeper: the library notices ``"keeper"`` in what it
inherits, says ready with its sockets, follows ``pause``/``resume``/``drain``, and passes
``SIGHUP`` on.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, final

import attrs
import trio

from ._control import serve as serve_control
from ._exceptions import (
    InheritanceError,
    PidFileError,
    RestartError,
    SuccessorExitedError,
    SuccessorStartError,
    UsageError,
)
from ._handover import DRAIN, ENV_VAR, MAIN, PAUSE, RESUME, encode, encode_word, parse_ready
from ._listeners import ListenerRegistry, describe_address
from ._logging import PrefixLog, surviving
from ._options import probation_seconds, ready_seconds
from ._pidfile import remove_pid_file, write_pid_file
from ._reaper import FORWARDED, become_subreaper, exit_code, reap
from ._restart import FIRST_START, Launch, Restarts
from ._signals import receive_signals
from ._state import State, StateMachine
from ._successor import Successor
from ._systemd import (
    ACTIVATION_VARIABLES,
    WATCHDOG_VARIABLES,
    Notifier,
    listen_sockets,
    monotonic_usec,
    run_watchdog,
    store_fds,
    watchdog_interval,
)
from ._timeline import Timeline

__all__ = ["STOP_GRACE", "Generation", "Keeper", "KeeperStatistics"]

LOGGER = "graceful_restart_trio.keeper"

STOP_GRACE = 10.0
"""Seconds the draining generations get to exit once the serving one exited by itself;
then they are killed."""

_NOT_INHERITED = frozenset({"NOTIFY_SOCKET", *ACTIVATION_VARIABLES, *WATCHDOG_VARIABLES})
"""The keeper is systemd's main process: these are its own, never a generation's (the
application's own ``LISTEN_PORT``, say, passes)."""

Listeners = list[tuple[str, socket.socket]]


@final
@attrs.define(eq=False)
class Generation:
    """One copy of the application the keeper started.

    It is named by a pidfd (see :class:`Successor`), so no signal can reach another
    process that got its pid later.
    """

    number: int
    successor: Successor
    status: int | None = None
    exited: trio.Event = attrs.field(factory=trio.Event)
    retiring: bool = False
    """A task follows it to its end (:meth:`Successor.wait_retired`), and closes it then."""

    @property
    def pid(self) -> int:
        """The process id (also its process group and session id)."""
        return self.successor.pid

    def __str__(self) -> str:
        return f"generation {self.number} pid {self.pid}"

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` unless it has exited."""
        if self.status is None:
            self.successor.send_signal(sig)

    def tell(self, word: str, pid: int | None = None) -> None:
        """Say ``word`` on its channel (``main``, ``pause <pid>``, ``resume``, ``drain <pid>``)."""
        try:
            os.write(self.successor.channel.fileno(), encode_word(word, pid))
        except OSError as error:
            logging.getLogger(LOGGER).warning("cannot tell %s %r: %s", self, word, error)

    def reaped(self, status: int) -> None:
        """Record its exit status and wake whoever waits for it."""
        self.status = status
        if not self.retiring:  # else the retiring task still waits on its pidfd
            self.successor.close()
        self.exited.set()


@final
@attrs.frozen
class KeeperStatistics:
    """A snapshot of a :class:`Keeper`, from :meth:`Keeper.statistics`.

    Attributes:
        state: where the keeper is in its life (the same :class:`State` table as a process).
        pid: the keeper's own pid, which never changes.
        serving: the pid of the serving generation, or None.
        starting: the pid of a generation starting or on probation, or None.
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


@final
@attrs.define(eq=False)
class HeldListeners:
    """The listening sockets the keeper holds between generations, by name.

    At first those systemd passed the keeper (socket activation, the fd store), if any;
    each generation that takes over replaces them with those it sent with its ready.
    """

    listeners: Listeners
    systemds: frozenset[str] = frozenset()
    """Names of the listeners systemd passed the keeper: their socket files are systemd's."""
    offered: Listeners = attrs.field(factory=list)
    """The listeners a new generation sent with its ready, until it takes over."""

    @classmethod
    def from_systemd(cls, environ: MutableMapping[str, str], pid: int) -> HeldListeners:
        """Those systemd passed to ``pid`` (see :func:`listen_sockets`).

        Raises:
            InheritanceError: ``LISTEN_FDS`` and its kin are malformed.
        """
        listeners = listen_sockets(environ, pid)
        return cls(listeners, frozenset(name for name, _ in listeners))

    def names(self) -> list[str]:
        return [name for name, _ in self.listeners]

    def fds(self) -> list[int]:
        return [sock.fileno() for _, sock in self.listeners]

    def socket_files(self) -> list[str]:
        """The unix listeners whose socket file is the application's to remove on the final
        stop: all but those systemd made (a predecessor says the same)."""
        return [
            name
            for name, sock in self.listeners
            if sock.family == socket.AF_UNIX and name not in self.systemds
        ]

    def describe(self) -> list[dict[str, str]]:
        """Each listener's name and address, for the status."""
        return [{"name": name, "address": describe_address(sock)} for name, sock in self.listeners]

    def accept_ready(self, line: bytes, fds: list[int]) -> Listeners:
        """Keep what a new generation sent with its ready, checked (see :class:`Launch`)."""
        self.offered = _ready_listeners(line, fds)
        return self.offered

    def take_over(self, ready: Listeners) -> None:
        """The new generation serves: hold its listeners, close ours."""
        _close_listeners(self.listeners)
        self.listeners = ready

    def drop_offered(self) -> None:
        """A restart ended: close what the new generation sent, unless it took over."""
        if self.offered is not self.listeners:
            _close_listeners(self.offered)
        self.offered = []

    def close(self) -> None:
        _close_listeners(self.listeners)
        self.listeners = []


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
        probation: seconds a ready new generation is watched before the old one drains.
        pid_file: where to write the keeper's own pid (removed at exit), or None.
        fd_store: keep the listeners in systemd's file descriptor store (also done when
            systemd says the unit has one, ``$FDSTORE``), so that they outlive a
            ``systemctl restart``.
        control: the path of the control socket the keeper serves (``graceful-restart
            status``, ``restart``, ``stop``), or None.
    """

    command: list[str] = attrs.field(converter=_command_list)
    ready_timeout: float = attrs.field(default=60.0, converter=ready_seconds)
    probation: float = attrs.field(default=5.0, converter=probation_seconds)
    pid_file: Path | None = None
    fd_store: bool = False
    control: Path | None = None
    _log: PrefixLog = attrs.field(
        init=False, factory=lambda: PrefixLog(logging.getLogger(LOGGER), f"[keeper {os.getpid()}]")
    )
    _machine: StateMachine = attrs.field(init=False, factory=StateMachine)
    _pid: int = attrs.field(init=False, factory=os.getpid)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _notifier: Notifier | None = attrs.field(init=False, default=None)
    _live: dict[int, Generation] = attrs.field(init=False, factory=dict)
    _serving: Generation | None = attrs.field(init=False, default=None)
    _old: Generation | None = attrs.field(init=False, default=None)
    """During a restart: the generation that serves."""
    _new: Generation | None = attrs.field(init=False, default=None)
    """During a restart: the new generation, once it is ready."""
    _held: HeldListeners = attrs.field(init=False, factory=lambda: HeldListeners([]))
    _generations: int = attrs.field(init=False, default=0)
    _stop_requests: int = attrs.field(init=False, default=0)
    _start_failure: int | None = attrs.field(init=False, default=None)
    _stopped: trio.Event = attrs.field(init=False, factory=trio.Event)
    _started_at: float = attrs.field(init=False, factory=time.time)
    _control: ListenerRegistry | None = attrs.field(init=False, default=None)
    _pid_file_error: str | None = attrs.field(init=False, default=None)
    _restarts: Restarts = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._restarts = Restarts(self, self._pid, self._log)

    @property
    def state(self) -> State:
        """Where the keeper is in its life (see :class:`State`)."""
        return self._machine.state

    def statistics(self) -> KeeperStatistics:
        """A snapshot of the state, the generations and the listeners held."""
        serving, starting, draining = self._roles()
        return KeeperStatistics(
            state=self._machine.state,
            pid=self._pid,
            serving=serving.pid if serving else None,
            starting=starting.pid if starting else None,
            draining=tuple(generation.pid for generation in draining),
            generations=self._generations,
            listeners=tuple(self._held.names()),
        )

    def _roles(self) -> tuple[Generation | None, Generation | None, list[Generation]]:
        """The serving generation (while it runs), the one starting or on probation, and
        the other live ones: those draining."""
        serving = self._serving if self._serving and self._serving.status is None else None
        starting = self._new if self._new is not self._serving else None
        others = [g for g in self._live.values() if g is not serving and g is not starting]
        return serving, starting, others

    # -- the story -----------------------------------------------------------------------

    async def run(self) -> int:
        """Run the application until it has stopped; return the keeper's exit status.

        That is the serving generation's status (128 + N if signal N killed it); 127 if
        the command cannot be found, 126 if it cannot be run.

        Raises:
            PidFileError: the pid file cannot be written.
            InheritanceError: what systemd passed (``NOTIFY_SOCKET``, ``LISTEN_FDS``) is
                malformed.
            UsageError: the keeper was run before.
        """
        if self._nursery is not None or self._machine.state is not State.STARTING:
            raise UsageError("a Keeper runs once")
        become_subreaper()
        self._notifier = Notifier.from_environ(os.environ)  # checked before anything is made
        self._held = HeldListeners.from_systemd(os.environ, self._pid)
        if self.pid_file is not None:
            write_pid_file(self.pid_file, self._pid)  # at start, a failure is fatal
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = self._restarts.nursery = nursery
                handlers: dict[signal.Signals, Callable[[signal.Signals], None]] = {
                    **dict.fromkeys(FORWARDED, self._on_other_signal),
                    signal.SIGHUP: self._on_restart_signal,
                    signal.SIGTERM: self._on_stop_signal,
                    signal.SIGINT: self._on_stop_signal,
                    signal.SIGCHLD: self._on_child_signal,
                }
                await nursery.start(receive_signals, handlers, self._log)
                self._open_control(nursery)
                reap(self._on_child_exit)
                interval = watchdog_interval(os.environ, self._pid)
                if self._notifier is not None and interval is not None:
                    nursery.start_soon(run_watchdog, self._notifier, interval)
                nursery.start_soon(self._start_first)
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._close()
        if self._serving is not None and self._serving.status is not None:
            status = exit_code(self._serving.status)
        else:  # nothing ran: the command cannot be started, or a stop came first
            status = self._start_failure or 0
        self._log.info("exiting with status %d", status)
        return status

    async def _start_first(self) -> None:
        try:
            await self._restarts.run(Timeline(FIRST_START))
        except RestartError:
            pass  # logged, and recorded by _failed
        except Exception:  # a bug: the keeper stops, as if generation 1 never became ready
            self._log.exception("starting generation 1 failed unexpectedly")
            self._start_failure = self._start_failure or 1
        if self._serving is None:
            self._begin_stop("generation 1 never became ready")

    def _on_restart_signal(self, sig: signal.Signals) -> None:
        self._restarts.request(Timeline(sig.name))

    # The predecessor's part of the story (see _restart.Side), for the next generation:
    # the serving generation is told what to do; the new one becomes a Generation.

    def _why_not(self) -> str | None:
        return None if self.state is State.SERVING else f"the keeper is {self.state.value}"

    def _begin(self, timeline: Timeline) -> Launch:
        old = self._serving
        self._generations += 1
        self._old, self._new = old, None
        if old is not None:
            self._machine.advance(State.RESTARTING)
            self._log.info("restart requested: %s serves, starting its successor", old)
            self._notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS="restarting")
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        held = self._held
        env[ENV_VAR] = encode(
            self._generations,
            old.pid if old else None,
            held.names(),
            keeper=self._pid,
            socket_files=held.socket_files(),
        )
        return Launch(
            command=self.command,
            env=env,
            sockets=held.fds(),
            ready_timeout=self.ready_timeout,
            probation=self.probation if old else 0.0,
            accept_ready=held.accept_ready,
            label=f"generation {self._generations} pid {{}}",
        )

    def _adopt(self, successor: Successor) -> Generation:
        """From now on it is ours to reap (once the launcher lets it go) and to stop."""
        self._new = Generation(self._generations, successor)
        self._live[successor.pid] = self._new
        return self._new

    def _pause(self, successor: Successor) -> None:
        if self.state not in (State.STARTING, State.RESTARTING):
            raise RestartError(f"abandoned: the keeper is {self.state.value}")
        self._adopt(successor)
        if self._old is not None:
            self._machine.advance(State.PROBATION)
            self._old.tell(PAUSE, successor.pid)

    def _resume(self, error: SuccessorExitedError) -> None:
        if self._new is not None and self._new.successor.has_exited():
            self._live.pop(self._new.pid, None)  # the launcher reaped it
            self._new = None
        if self._old is not None and self.state is State.PROBATION:
            self._machine.advance(State.SERVING)
            self._old.tell(RESUME)

    def _commit(self, successor: Successor, ready: Listeners, timeline: Timeline) -> None:
        if self.state not in (State.STARTING, State.PROBATION):
            raise RestartError(f"abandoned: the keeper is {self.state.value}")
        new = self._new
        assert new is not None  # adopted when it paused the old one
        self._serving = new
        self._machine.advance(State.SERVING)
        new.tell(MAIN)
        self._held.take_over(ready)
        self._log.info("%s serving with %d listener(s)", new, len(ready))
        if self._notifier is not None and (self.fd_store or "FDSTORE" in os.environ):
            store_fds(self._notifier, [(name, sock.fileno()) for name, sock in ready])
        if self._old is not None:
            self._old.tell(DRAIN, successor.pid)
            self._log.info("handed over from %s to %s", self._old, new)
            timeline.mark("draining", generation=self._old.number, pid=self._old.pid)
        self._notify(READY=1, STATUS=f"serving: {new}")

    def _failed(self, error: RestartError) -> None:
        old = self._old
        self._old = self._new = None
        if self.state in (State.DRAINING, State.STOPPED):
            return  # stopping: every generation was told
        self._log.error("generation %d: %s", self._generations, error)
        if old is None:  # generation 1: the keeper exits as a shell would
            if isinstance(error, SuccessorStartError):
                self._start_failure = 127 if error.errno == errno.ENOENT else 126
            elif isinstance(error, SuccessorExitedError):
                self._start_failure = exit_code(error.returncode or 0)
            else:
                self._start_failure = 1
        elif old.status is not None:
            self._stop_by_itself(old)
        elif self.state in (State.RESTARTING, State.PROBATION):
            if self.state is State.PROBATION:  # an error after the pause
                old.tell(RESUME)
            self._machine.advance(State.SERVING)
        if old is not None and old.status is None and self.state is State.SERVING:
            self._notify(READY=1, STATUS=f"serving: {old}; restart failed")
            self._log.error("restart failed: %s serves on", old)

    def _recorded(self, timeline: Timeline) -> None:
        self._held.drop_offered()
        if timeline.trigger != FIRST_START:
            self._write_pid_file()

    def _retire(self, successor: Successor, ask: bool) -> None:
        # A stop abandoned the restart (and tells every live generation), an error did,
        # or the new one stopped by itself: either way it finishes its work and exits.
        unknown = self._new is None  # ready, but a stop came before it was adopted
        generation = self._new or self._adopt(successor)
        self._new = None
        generation.retiring = True
        self._log.info("%s on probation is stopping", generation)
        if ask and (unknown or self.state is not State.DRAINING):  # else the stop told it
            generation.send_signal(signal.SIGTERM)
        self._tasks().start_soon(self._wait_retired, generation)

    async def _wait_retired(self, generation: Generation) -> None:
        status: int | None = None
        async with surviving(self._log, f"following the retired {generation}"):
            status = await generation.successor.wait_retired()
        if self._live.pop(generation.pid, None) is not None:
            generation.reaped(status if status is not None else 0)
            self._log.info("%s exited with status %s", generation, status)
            self._check_stopped()

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._stop_requests += 1
        again = self._stop_requests > 1
        self._log.info("%s received%s: stopping", sig.name, " again" if again else "")
        self._begin_stop(f"{sig.name} received")
        self._pass_on(sig)

    def _pass_on(self, sig: signal.Signals) -> None:
        """Pass ``sig`` on to every live generation."""
        for generation in list(self._live.values()):
            self._log.info("passing %s on to %s", sig.name, generation)
            generation.send_signal(sig)

    def _on_other_signal(self, sig: signal.Signals) -> None:
        serving = self._serving
        if serving is not None and serving.status is None:
            self._log.info("passing %s on to %s", sig.name, serving)
            serving.send_signal(sig)
        else:
            self._log.info("%s ignored: no generation serves", sig.name)

    def _begin_stop(self, reason: str) -> None:
        """Enter DRAINING (once); the keeper ends when no generation is left."""
        if self._machine.state not in (State.DRAINING, State.STOPPED):
            self._machine.advance(State.DRAINING)
            self._notify(STOPPING=1, STATUS=f"stopping: {reason}")
            self._log.info("stopping: %s", reason)
            if self._restarts.abandon():
                self._log.info("abandoning the restart under way")
        self._check_stopped()

    def _check_stopped(self) -> None:
        if self._machine.state is State.DRAINING and not self._live:
            self._machine.advance(State.STOPPED)
            self._stopped.set()

    def _on_child_signal(self, _sig: signal.Signals) -> None:
        reap(self._on_child_exit)

    def _on_child_exit(self, pid: int, status: int) -> None:
        """A child was reaped: a generation, or an orphan we adopted."""
        generation = self._live.pop(pid, None)
        if generation is None:
            self._log.debug("reaped %d (status %d)", pid, status)
            return
        generation.reaped(status)
        self._log.info("%s exited with status %d", generation, status)
        self._on_generation_exit(generation)

    def _on_generation_exit(self, generation: Generation) -> None:
        if self._machine.state is State.DRAINING:
            self._check_stopped()
        elif generation is self._serving and self._machine.state is State.SERVING:
            self._stop_by_itself(generation)
        elif generation is self._old and self.state in (State.RESTARTING, State.PROBATION):
            self._log.warning(
                "the serving %s exited %s; no fallback",
                generation,
                "during the probation: committing early"
                if self.state is State.PROBATION
                else "while its successor starts: committing as soon as it is ready",
            )
            self._restarts.cut_probation()

    def _stop_by_itself(self, serving: Generation) -> None:
        """The serving generation is gone: stop the rest, briefly, and exit with its status."""
        self._begin_stop(f"the serving {serving} exited by itself")
        self._pass_on(signal.SIGTERM)
        if self._live:
            self._tasks().start_soon(self._kill_after_grace)

    async def _kill_after_grace(self) -> None:
        await trio.sleep(STOP_GRACE)
        for generation in list(self._live.values()):
            self._log.warning("%s still runs after %gs: killing it", generation, STOP_GRACE)
            await generation.successor.kill()

    # -- the steps -----------------------------------------------------------------------

    def _tasks(self) -> trio.Nursery:
        if self._nursery is None:
            raise UsageError("the keeper is not running")
        return self._nursery

    def _notify(self, **fields: str | int) -> None:
        if self._notifier is not None:
            self._notifier.send(fields)

    def _write_pid_file(self) -> None:
        """The keeper's pid, with the last restart (``graceful-restart`` reads it)."""
        if self.pid_file is None:
            return
        try:
            write_pid_file(self.pid_file, self._pid, self._restarts.last)
        except PidFileError as error:
            self._pid_file_error = str(error)
            self._log.warning("%s; the keeper goes on without it", error)
        else:
            self._pid_file_error = None

    # -- the control socket (see _control) -------------------------------------------------

    def _open_control(self, nursery: trio.Nursery) -> None:
        if self.control is None:
            return
        self._control = ListenerRegistry()
        sock = self._control.unix(str(self.control), 0o600, None, "control")
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._log.info("control socket at %s", self.control)
        nursery.start_soon(self._serve_control, listener)

    async def _serve_control(self, listener: trio.SocketListener) -> None:
        async with surviving(self._log, "the control socket"):
            await serve_control(listener, self, self._log, self._tasks())

    def _control_status(self) -> dict[str, Any]:
        """What ``graceful-restart status`` shows (see ``_control``)."""
        serving, starting, draining = self._roles()
        return {
            "pid": serving.pid if serving else None,
            "main_pid": self._pid,  # what a stop waits for
            "state": self.state.value,
            "generation": serving.number if serving else 0,
            "in_charge": serving is not None,
            "uptime_s": round(time.time() - self._started_at, 3),
            "leases": None,  # the generations count their own
            "keeper": self._pid,
            "successor": starting.pid if starting else None,
            "draining": [{"pid": g.pid, "role": f"generation {g.number}"} for g in draining],
            "listeners": self._held.describe(),
            "restarts": dict(self._restarts.counts),
            "last_restart": self._restarts.last,
            "pid_file_error": self._pid_file_error,
        }

    def _control_restart(self, timeline: Timeline) -> float:
        """For the control socket: start a restart marked on ``timeline``."""
        self._restarts.request(timeline)
        return self.ready_timeout + self.probation + 5.0

    def _control_stop(self, immediate: bool) -> None:
        """For the control socket: stop as on SIGTERM (twice, when ``immediate``)."""
        for _ in range(2 if immediate else 1):
            self._on_stop_signal(signal.SIGTERM)

    def _close(self) -> None:
        """The keeper's last word: nothing of it may outlive it unsupervised, and nothing
        that fails here (a file it cannot remove) changes its exit status."""
        if self._control is not None:
            self._control.close()
            self._control.unlink_unix_paths(self._log)
        for generation in self._live.values():  # only after a bug: ask them to stop
            generation.send_signal(signal.SIGTERM)
            generation.successor.close()
        self._held.close()
        if self._notifier is not None:
            self._notifier.close()
        if self.pid_file is not None and not remove_pid_file(self.pid_file, self._pid):
            self._log.warning("the pid file %s was not removed", self.pid_file)


def _ready_listeners(line: bytes, fds: list[int]) -> Listeners:
    """The listening sockets a generation sent with ``ready [names]``, every one checked.

    Raises:
        InheritanceError: the line is not that, or an fd is not a socket (all are closed).
    """
    try:
        names = parse_ready(line, len(fds))
        _check_sockets(names, fds)
    except InheritanceError:
        for fd in fds:
            os.close(fd)
        raise
    # socket(fileno=) leaves O_NONBLOCK alone: the application shares that flag.
    return [(name, socket.socket(fileno=fd)) for name, fd in zip(names, fds, strict=True)]


def _check_sockets(names: list[str], fds: list[int]) -> None:
    for name, fd in zip(names, fds, strict=True):
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise InheritanceError(f"{name!r} (fd {fd}) is not a socket")


def _close_listeners(listeners: Listeners) -> None:
    for _, sock in listeners:
        sock.close()  # never shutdown(): a generation shares it
