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

With ``--workers N`` the keeper runs N copies (*workers*) of the application at once,
each a generation in a slot of its own (``_workers``), all accepting on the very same
listening sockets the keeper holds: a connection queued at any moment is accepted by some
live worker, and none is lost when one goes away. A restart *rolls* the slots: it
replaces one worker after another, each through the story above (ready, probation,
``pause``/``resume``/``drain`` for that slot's old worker); a failure stops the roll and
the workers it did not reach serve on. A worker that exits by itself outside a restart
is replaced (after a back-off if it crash-loops) rather than stopping the keeper.

The duties of any PID 1 or subreaper (adopting orphans, reaping, which signals to pass
on, the exit code) are ``_reaper``'s; this module says what they mean for generations.

The keeper goes through the same :class:`State` table as an application process
(``_state``): ``STARTING``, ``SERVING`` once every worker of generation 1 is ready,
``RESTARTING`` while a restart (a roll) is under way, from its request to its outcome
(each worker slot shows its own probation), ``DRAINING`` once it stops (a stop signal,
or the last serving generation exited by itself, or generation 1 never became ready)
until every generation has exited, then ``STOPPED``.

The application is unchanged under a keeper: the library notices ``"keeper"`` in what it
inherits, says ready with its sockets, follows ``pause``/``resume``/``drain``, and passes
``SIGHUP`` on.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import final

import attrs
import trio

from ._control import serve as serve_control
from ._exceptions import (
    PidFileError,
    UsageError,
)
from ._generations import Generation, HeldListeners, Listeners
from ._listeners import ListenerRegistry
from ._logging import PrefixLog, surviving
from ._options import EXIT_GRACE, probation_seconds, ready_seconds
from ._pidfile import remove_pid_file, write_pid_file
from ._reaper import FORWARDED, become_subreaper, reap
from ._restart import FIRST_START
from ._signals import receive_signals
from ._state import State, StateMachine
from ._status import Draining, Status
from ._systemd import (
    Notifier,
    monotonic_usec,
    run_watchdog,
    store_fds,
    watchdog_interval,
)
from ._timeline import Timeline
from ._workers import Worker, Workers

__all__ = ["LOGGER", "STOP_GRACE", "Keeper", "KeeperStatistics"]

LOGGER = "graceful_restart_trio.keeper"

STOP_GRACE = 10.0
"""Seconds the draining generations get to exit once the serving one exited by itself;
then they are killed."""


@final
@attrs.frozen
class KeeperStatistics:
    """A snapshot of a :class:`Keeper`, from :meth:`Keeper.statistics`.

    Attributes:
        state: where the keeper is in its life (the same :class:`State` table as a process).
        pid: the keeper's own pid, which never changes.
        serving: the pid of the serving generation (the first worker's that has one), or None.
        starting: the pid of a generation starting or on probation, or None.
        draining: the pids of older generations still running.
        generations: how many generations were started so far (one per restart).
        listeners: the names of the listening sockets the keeper holds.
        workers: the pid serving in each worker slot (None where none does).
    """

    state: State
    pid: int
    serving: int | None
    starting: int | None
    draining: tuple[int, ...]
    generations: int
    listeners: tuple[str, ...]
    workers: tuple[int | None, ...] = ()


def _command_list(command: Sequence[str]) -> list[str]:
    if isinstance(command, str) or not command or not all(isinstance(a, str) for a in command):
        raise ValueError(f"command must be a non-empty list of strings, not {command!r}")
    return list(command)


def _worker_count(workers: int) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number of at least 1, not {workers!r}")
    return workers


def _roll_batch(keeper: Keeper, batch: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= keeper.workers:
        raise ValueError(f"roll_batch must be from 1 to workers ({keeper.workers}), not {batch!r}")


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
        workers: how many copies of the application serve at once, on the same sockets;
            a restart replaces them one after another.
        roll_batch: how many workers a restart replaces at a time.
    """

    command: list[str] = attrs.field(converter=_command_list)
    ready_timeout: float = attrs.field(default=60.0, converter=ready_seconds)
    probation: float = attrs.field(default=5.0, converter=probation_seconds)
    pid_file: Path | None = None
    fd_store: bool = False
    control: Path | None = None
    workers: int = attrs.field(default=1, validator=lambda _s, _a, v: _worker_count(v))
    roll_batch: int = attrs.field(default=1, validator=lambda s, _a, v: _roll_batch(s, v))
    _log: PrefixLog = attrs.field(
        init=False, factory=lambda: PrefixLog(logging.getLogger(LOGGER), f"[keeper {os.getpid()}]")
    )
    _machine: StateMachine = attrs.field(init=False, factory=StateMachine)
    pid: int = attrs.field(init=False, factory=os.getpid)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _notifier: Notifier | None = attrs.field(init=False, default=None)
    live: dict[int, Generation] = attrs.field(init=False, factory=dict)
    held: HeldListeners = attrs.field(init=False, factory=lambda: HeldListeners([]))
    generation: int = attrs.field(init=False, default=0)
    """The generation the last restart started (one per restart, in every slot)."""
    _workers: Workers = attrs.field(init=False)
    _stop_requests: int = attrs.field(init=False, default=0)
    _start_failure: int | None = attrs.field(init=False, default=None)
    _stopped: trio.Event = attrs.field(init=False, factory=trio.Event)
    _started_at: float = attrs.field(init=False, factory=time.time)
    _control: ListenerRegistry | None = attrs.field(init=False, default=None)
    _pid_file_error: str | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        slots = [Worker(number, self, self._log) for number in range(self.workers)]
        self._workers = Workers(self, slots, self._log, batch=self.roll_batch)

    @property
    def state(self) -> State:
        """Where the keeper is in its life (see :class:`State`)."""
        return self._machine.state

    def statistics(self) -> KeeperStatistics:
        """A snapshot of the state, the generations and the listeners held."""
        serving = [worker.alive for worker in self._workers.slots]
        starting = [w.new for w in self._workers.slots if w.new]
        busy = {g.pid for g in serving + starting if g}
        first = next((g for g in serving if g), None)
        return KeeperStatistics(
            state=self._machine.state,
            pid=self.pid,
            serving=first.pid if first else None,
            starting=starting[0].pid if starting else None,
            draining=tuple(pid for pid in self.live if pid not in busy),
            generations=self.generation,
            listeners=tuple(self.held.names()),
            workers=tuple(g.pid if g else None for g in serving),
        )

    # -- the story -----------------------------------------------------------------------

    async def run(self) -> int:
        """Run the application until it has stopped; return the keeper's exit status.

        That is the serving generation's status (128 + N if signal N killed it; with
        workers, the first that is not 0); at the first start, that of the generation
        that failed to start: 127 if the command cannot be found, 126 if it cannot be run.

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
        self.held = HeldListeners.from_systemd(os.environ, self.pid)
        if self.pid_file is not None:
            write_pid_file(self.pid_file, self.pid)  # at start, a failure is fatal
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for worker in self._workers.slots:
                    worker.restarts.nursery = nursery
                handlers: dict[signal.Signals, Callable[[signal.Signals], None]] = {
                    **dict.fromkeys(FORWARDED, self._workers.pass_on),
                    signal.SIGHUP: lambda sig: self._workers.request(Timeline(sig.name)),
                    signal.SIGTERM: self._on_stop_signal,
                    signal.SIGINT: self._on_stop_signal,
                    signal.SIGCHLD: lambda _: reap(self._on_child_exit),
                }
                await nursery.start(receive_signals, handlers, self._log)
                self._open_control(nursery)
                reap(self._on_child_exit)
                interval = watchdog_interval(os.environ, self.pid)
                if self._notifier is not None and interval is not None:
                    nursery.start_soon(run_watchdog, self._notifier, interval)
                self._workers.request(Timeline(FIRST_START))
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._close()
        status = self._start_failure or self._workers.exit_status()
        self._log.info("exiting with status %d", status)
        return status

    def _rolling(self, first: bool) -> None:
        """A roll begins (see :class:`Workers`): a restart, or the first start."""
        self.generation += 1
        if not first:
            self._machine.advance(State.RESTARTING)
            self._notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS="restarting")

    def _rolled(self, first: bool, committed: bool) -> None:
        """A roll ended: serve on (with every worker, or those the roll did not reach)."""
        if not first:
            self._write_pid_file()
        if self.state not in (State.STARTING, State.RESTARTING):
            return  # stopping
        if first and not committed:  # and the workers already started stop too
            self._start_failure = self._start_failure or 1
            self._begin_stop("generation 1 never became ready")
            self._pass_on(signal.SIGTERM)
            return
        self._machine.advance(State.SERVING)
        failed = "" if committed else "; restart failed"
        self._notify(READY=1, STATUS=f"serving: generation {self.generation}{failed}")
        if self.workers > 1:
            self._log.info("%d worker(s) serving%s", len(self._workers.alive()), failed)

    def _take_over(self, new: Generation, ready: Listeners) -> None:
        """``new`` serves: hold the listeners it sent, for every generation after it."""
        self.held.take_over(ready)
        self._log.info("%s serving with %d listener(s)", new, len(ready))
        if self._notifier is not None and (self.fd_store or "FDSTORE" in os.environ):
            store_fds(self._notifier, [(name, sock.fileno()) for name, sock in ready])

    # -- stopping ------------------------------------------------------------------------

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._stop_requests += 1
        self._log.info("%s received%s: stopping", sig.name, " again" * (self._stop_requests > 1))
        self._begin_stop(f"{sig.name} received")
        self._pass_on(sig)

    def _pass_on(self, sig: signal.Signals) -> None:
        """Pass ``sig`` on to every live generation."""
        for generation in list(self.live.values()):
            self._log.info("passing %s on to %s", sig.name, generation)
            generation.send_signal(sig)

    def _begin_stop(self, reason: str) -> None:
        """Enter DRAINING (once); the keeper ends when no generation is left."""
        if self._machine.state not in (State.DRAINING, State.STOPPED):
            self._machine.advance(State.DRAINING)
            self._notify(STOPPING=1, STATUS=f"stopping: {reason}")
            self._log.info("stopping: %s", reason)
            if self._workers.abandon():
                self._log.info("abandoning the restart under way")
        self._check_stopped()

    def _check_stopped(self) -> None:
        """STOPPED once no generation is left, nor one about to be (being adopted)."""
        busy = any(worker.restarts.under_way for worker in self._workers.slots)
        if self._machine.state is State.DRAINING and not self.live and not busy:
            self._machine.advance(State.STOPPED)
            self._stopped.set()

    def _on_child_exit(self, pid: int, status: int) -> None:
        """A child was reaped: a generation, or an orphan we adopted."""
        generation = self.live.pop(pid, None)
        if generation is None:
            self._log.debug("reaped %d (status %d)", pid, status)
            return
        generation.reaped(status)
        self._log.info("%s exited with status %d", generation, status)
        if self._machine.state is State.DRAINING:
            self._check_stopped()
        else:
            self._workers.slots[generation.worker or 0].exited(generation)

    def _stop_by_itself(self, serving: Generation) -> None:
        """The serving generation is gone: stop the rest, briefly, and exit with its status."""
        self._begin_stop(f"the serving {serving} exited by itself")
        self._pass_on(signal.SIGTERM)
        if self.live:
            self._tasks().start_soon(self._kill_after_grace)

    async def _kill_after_grace(self) -> None:
        await trio.sleep(STOP_GRACE)
        for generation in list(self.live.values()):
            self._log.warning("%s still runs after %gs: killing it", generation, STOP_GRACE)
            await generation.successor.kill()

    # -- the steps -----------------------------------------------------------------------

    def _tasks(self) -> trio.Nursery:
        assert self._nursery is not None, "the keeper is running"
        return self._nursery

    def _notify(self, **fields: str | int) -> None:
        if self._notifier is not None:
            self._notifier.send(fields)

    def _write_pid_file(self) -> None:
        """The keeper's pid, with the last restart (``graceful-restart`` reads it)."""
        if self.pid_file is None:
            return
        try:
            write_pid_file(self.pid_file, self.pid, self._workers.last)
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

    def _control_status(self) -> Status:
        """What ``graceful-restart status`` shows (see ``_control``)."""
        stats = self.statistics()
        serving = next(iter(self._workers.alive()), None)
        return Status(
            pid=stats.serving,
            main_pid=self.pid,  # what a stop waits for
            state=self.state.value,
            generation=serving.number if serving else 0,
            in_charge=serving is not None,
            uptime_s=round(time.time() - self._started_at, 3),
            leases=None,  # the generations count their own
            keeper=self.pid,
            successor=stats.starting,
            draining=tuple(Draining(pid, self.live[pid].role) for pid in stats.draining),
            listeners=self.held.describe(),
            restarts=dict(self._workers.counts),
            last_restart=self._workers.last,
            pid_file_error=self._pid_file_error,
            workers=tuple(worker.describe() for worker in self._workers.slots),
            roll=self._workers.progress(),
        )

    def _control_restart(self, timeline: Timeline) -> float:
        """For the control socket: start a restart marked on ``timeline``."""
        self._workers.request(timeline)
        return self.workers * (self.ready_timeout + self.probation) + EXIT_GRACE

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
        for generation in self.live.values():  # only after a bug: ask them to stop
            generation.send_signal(signal.SIGTERM)
            generation.successor.close()
        self.held.close()
        if self._notifier is not None:
            self._notifier.close()
        if self.pid_file is not None and not remove_pid_file(self.pid_file, self.pid):
            self._log.warning("the pid file %s was not removed", self.pid_file)
