"""The restart: one story, told once, for a serving process and for the keeper alike.

Theory of operation
-------------------

A process that serves (direct mode: :class:`GracefulRestart`) and the keeper play the
same part in a restart, the *predecessor's*, each through a :class:`Side`: a handful of
short methods that say what that side does at each step. The story itself is
:meth:`Restarts.run`, top to bottom:

1. **signal**: a restart is asked for (``SIGHUP``, a call, the control socket). One
   runs at a time: one asked for meanwhile follows it (:meth:`Restarts.request`);
2. **successor**: the side says how to start it (:class:`Launch`); it starts through the
   launcher (``_successor``) in a session of its own, with a channel, a pidfd naming the
   side, and the listening sockets;
3. **ready**: it says so within ``ready_timeout``, or it is killed with everything it
   started, and the side serves on as before;
4. **probation**: the side stops accepting but keeps its sockets (*pause*). "Ready" is
   not the point of no return: if the successor dies or stops serving within
   ``probation`` seconds, the side accepts again on the same sockets (*resume*) and the
   restart fails with the reason; nothing queued was lost;
5. **commit**: the launcher lets the successor go (it is re-parented to the service
   manager before anyone names it the main process), and the side hands the service
   over (*commit*);
6. **drain** and 7. **exit** are the side's own (a process drains its leases; the keeper
   lets the old generation drain).

Who serves afterwards is never "nobody":

- the probation only ever makes a restart safer: a side that can no longer resume
  (its ``open()`` body ended, the keeper's serving generation exited) ends it at once
  (:meth:`Restarts.cut_probation`): the handover commits early, with no fallback;
- a ready, alive successor is stopped only on an explicit request to stop the service
  (:meth:`Restarts.abandon`, by a shutdown): it is *retired*, asked to stop gracefully
  (it may hold connections it accepted from the shared queue);
- any other error (a bug, the fd limit) is logged with its traceback, the side serves
  on (*failed*), the successor is stopped, and the next restart works. The story runs
  in the side's own nursery: a caller that stops waiting does not stop it.

Each phase is marked on the restart's :class:`Timeline`; every restart ends with one
outcome: ``committed`` or ``failed``, counted in :attr:`Restarts.counts` and kept as
:attr:`Restarts.last` for the status, or ``refused`` when it could not start (only its
asker hears of that).
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, final

import attrs
import trio

from ._exceptions import (
    InheritanceError,
    RestartError,
    RestartUnavailableError,
    SuccessorExitedError,
    SuccessorStartError,
    SuccessorTimeoutError,
)
from ._logging import PrefixLog
from ._state import State
from ._successor import Successor, describe_status, startup_directory
from ._timeline import Timeline

__all__ = ["FIRST_START", "Launch", "Restarts", "Side"]

FIRST_START = "start"
"""The trigger of the keeper's first generation: told as a restart, counted as none."""


@final
@attrs.frozen
class Launch:
    """How a side starts its successor: what :meth:`Side._begin` returns."""

    command: Sequence[str]
    env: Mapping[str, str]
    sockets: Sequence[int]
    """The listening sockets, at fd 5, 6, ... (after the channel and the pidfd)."""
    ready_timeout: float
    probation: float
    accept_ready: Callable[[bytes, list[int]], object]
    """Reads the ready line and the fds sent with it (they are its to close); raises
    :class:`InheritanceError` if that is not a ready."""
    label: str = "successor {}"
    """How the log names the successor, given its pid."""


class Side(Protocol):
    """The predecessor's part. None of these awaits: each runs at an exact point. They
    are private where they are played: the application never calls them.

    ``pause`` and ``commit`` raise :class:`RestartError` if the side is no longer in a
    state to do it (a shutdown came in the same tick): the restart is then abandoned.
    """

    @property
    def state(self) -> State:
        """Where the side is in its life."""

    def _why_not(self) -> str | None:
        """Why a restart cannot start now; None if it can."""

    def _begin(self, timeline: Timeline) -> Launch:
        """A restart starts: say so (state, systemd), and how to start the successor."""

    def _pause(self, successor: Successor) -> None:
        """The successor is ready: stop accepting, keep the sockets."""

    def _resume(self, error: SuccessorExitedError) -> None:
        """The successor stopped during its probation: accept again."""

    def _commit(self, successor: Successor, ready: Any, timeline: Timeline) -> None:  # noqa: ANN401
        """The successor is on its own and stays: hand the service over."""

    def _retire(self, successor: Successor, ask: bool) -> None:
        """Abandoned during the probation: let the successor finish its work and exit
        (ask it to, with ``SIGTERM``, if ``ask``: it did not stop by itself)."""

    def _failed(self, error: RestartError) -> None:
        """The restart failed: serve on as before (unless stopping)."""

    def _recorded(self, timeline: Timeline) -> None:
        """A restart's outcome was recorded (:attr:`Restarts.last`)."""


@final
@attrs.define(eq=False)
class Restarts:
    """The restarts of one side: the one under way, the one asked for meanwhile, and
    the record of those done."""

    side: Side
    pid: int
    """The side's own pid: the successor gets a pidfd naming it."""
    log: PrefixLog
    nursery: trio.Nursery | None = None
    counts: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Restarts by outcome (``committed``, ``failed``)."""
    last: dict[str, Any] | None = None
    """The last restart's timeline (:meth:`Timeline.as_dict`)."""
    pending: bool = False
    """A restart was asked for while one was under way: it follows."""
    successor: Successor | None = None
    """The successor on probation, if any."""
    _scope: trio.CancelScope | None = None
    _probation_ended: trio.Event = attrs.field(factory=trio.Event)
    _committed: bool = False

    @property
    def under_way(self) -> bool:
        return self._scope is not None

    def request(self, timeline: Timeline) -> None:
        """Start a restart in the background, after the one under way, or not at all."""
        if self.under_way:
            self.log.info("%s: a restart will follow the one under way", timeline.trigger)
            self.pending = True
            timeline.finish("refused", "a restart is under way; another will follow it")
        elif (why := self.side._why_not()) is not None:
            self.log.info("%s ignored: %s", timeline.trigger, why)
            timeline.finish("refused", why)
        else:
            self._scope = trio.CancelScope()  # under way from now: a burst restarts once
            self._tasks().start_soon(self._run_quietly, timeline)

    async def call(self, timeline: Timeline) -> Successor:
        """A restart, waited for: the committed successor, or the error.

        The story runs in the side's nursery: cancelling the caller ends its wait only.

        Raises:
            RestartUnavailableError: it cannot start now.
            RestartError: it failed (see :meth:`run`).
        """
        why = "a restart is under way" if self.under_way else self.side._why_not()
        if why is not None:
            timeline.finish("refused", why)
            raise RestartUnavailableError(why)
        outcome: list[Successor | RestartError] = []
        done = trio.Event()

        async def run() -> None:
            try:
                outcome.append((await self.run(timeline))[0])
            except RestartError as error:
                outcome.append(error)
            except Exception as error:  # a bug of a side's: never the serving process's end
                self.log.exception("the restart failed unexpectedly")
                outcome.append(RestartError(f"restart failed: unexpected error: {error!r}"))
            finally:
                done.set()

        self._scope = trio.CancelScope()
        self._tasks().start_soon(run)
        await done.wait()
        if not outcome:
            raise RestartError("restart abandoned: the process is ending")
        if isinstance(outcome[0], RestartError):
            raise outcome[0]
        return outcome[0]

    def abandon(self) -> bool:
        """A shutdown: abandon the restart under way, if any (True if there was one)."""
        if self._scope is None:
            return False
        self._scope.cancel()
        return True

    def cut_probation(self) -> None:
        """The side can no longer resume: end the probation now, and commit."""
        self._probation_ended.set()

    def conclude(self, timeline: Timeline, outcome: str, reason: str | None = None) -> None:
        """End ``timeline`` with ``outcome`` and record it (once)."""
        if timeline.outcome is not None:
            return
        timeline.finish(outcome, reason)
        if timeline.trigger != FIRST_START:
            self.counts[outcome] += 1
            self.last = timeline.as_dict()
        self.side._recorded(timeline)

    async def run(self, timeline: Timeline) -> tuple[Successor, Any]:
        """The story (see the module docstring); the committed successor and its ready.

        Raises:
            SuccessorStartError, SuccessorExitedError, SuccessorTimeoutError: as
                :class:`RestartError` says; the side serves on.
            RestartError: abandoned by a shutdown, or an unexpected error (logged with
                its traceback; the side serves on).
        """
        self._scope = self._scope or trio.CancelScope()
        self._probation_ended, self._committed = trio.Event(), False
        try:
            with self._scope:
                await trio.lowlevel.checkpoint()  # a shutdown may have come since it was asked
                return await self._hand_over(self.side._begin(timeline), timeline)
            raise RestartError(f"restart abandoned: this process is {self.side.state.value}")  # noqa: TRY301
        except RestartError as error:
            self._end_badly(timeline, error, str(error))
            raise
        except Exception as error:
            self.log.exception("the restart failed unexpectedly")
            failure = RestartError(f"restart failed: unexpected error: {error!r}")
            self._end_badly(timeline, failure, f"unexpected error: {error!r}")
            raise failure from error
        except BaseException:
            self.conclude(timeline, "failed", "abandoned")
            raise
        finally:
            self._scope = self.successor = None
            self.follow_up()

    def _end_badly(self, timeline: Timeline, error: RestartError, reason: str) -> None:
        if self._committed:  # an error after the point of no return: the successor serves
            self.log.error("after the commit: %s", reason)
            self.conclude(timeline, "committed")
        else:
            self.conclude(timeline, "failed", reason)
            self.side._failed(error)

    def follow_up(self) -> None:
        """Carry out a restart asked for while none could start, if one can now."""
        if self.pending and not self.under_way and self.side._why_not() is None:
            self.pending = False
            self.log.info("carrying out the restart asked for meanwhile")
            self.request(Timeline("SIGHUP"))

    async def _hand_over(self, launch: Launch, timeline: Timeline) -> tuple[Successor, Any]:
        started = time.monotonic()
        deadline = trio.current_time() + launch.ready_timeout  # the start counts against it
        successor = await _start(self.pid, launch, deadline)
        name = launch.label.format(successor.pid)
        self.log.info("%s started: %s", name, " ".join(launch.command))
        timeline.mark("spawned", successor=successor.pid)
        accepting = False  # from its ready on, it may hold connections from the queues
        try:
            ready = launch.accept_ready(*await _ready(successor, deadline, launch.ready_timeout))
            accepting = True
            after = (time.monotonic() - started) * 1000
            self.log.info(
                "%s is ready after %.0f ms: probation for %gs", name, after, launch.probation
            )
            timeline.mark("ready")
            self.side._pause(successor)
            self.successor = successor
            timeline.mark("stopped accepting", probation=launch.probation)
            try:
                if await _probation(successor, launch.probation, self._probation_ended):
                    timeline.mark("probation cut short")
                await _release(successor)
            except SuccessorExitedError as error:
                self.side._resume(error)
                raise
            timeline.mark("committed")
            self._committed = True  # the point of no return: nothing undoes it from here
            try:
                self.side._commit(successor, ready, timeline)
            except RestartError:  # refused before it changed anything: a shutdown came
                self._committed = False
                raise
        except InheritanceError as error:  # what came with its ready
            await _kill(successor)
            raise SuccessorStartError(f"{name} said ready wrongly: {error}") from None
        except BaseException as error:
            if self._committed:
                raise
            if accepting and not successor.has_exited():  # it may hold connections
                self.side._retire(successor, not isinstance(error, SuccessorExitedError))
            else:
                await _kill(successor)
            raise
        self.conclude(timeline, "committed")
        return successor, ready

    async def _run_quietly(self, timeline: Timeline) -> None:
        try:
            await self.run(timeline)
        except RestartError:
            pass  # logged, and on the timeline
        except Exception:  # a bug of a side's: never the serving process's end
            self.log.exception("the restart failed unexpectedly")

    def _tasks(self) -> trio.Nursery:
        assert self.nursery is not None, "Restarts.nursery is set before any restart"
        return self.nursery


async def _start(pid: int, launch: Launch, deadline: float) -> Successor:
    """Start the successor, with a pidfd naming ``pid`` (the side) before the sockets."""
    try:
        me = os.pidfd_open(pid)
    except OSError as error:
        raise SuccessorStartError(f"cannot open a pidfd for pid {pid}: {error}") from error
    try:
        with trio.move_on_at(deadline):
            return await Successor.start(
                launch.command, env=launch.env, cwd=startup_directory(), fds=[me, *launch.sockets]
            )
    finally:
        os.close(me)
    raise SuccessorTimeoutError(f"the launcher did not start {launch.command[0]!r} in time")


async def _ready(successor: Successor, deadline: float, timeout: float) -> tuple[bytes, list[int]]:
    """Its ready line and the fds that came with it, by ``deadline``."""
    with trio.move_on_at(deadline):
        return await successor.wait_ready()
    raise SuccessorTimeoutError(
        f"successor {successor.pid} was not ready within {timeout:g}s: killed it"
    )


async def _probation(successor: Successor, seconds: float, ended: trio.Event) -> bool:
    """Watch it for ``seconds``, or until ``ended`` is set (then return True).

    Raises:
        SuccessorExitedError: it exited or stopped serving first.
    """
    stopped: list[int | None] = []
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                stopped.append(await successor.wait_stopped())
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await ended.wait()
            nursery.cancel_scope.cancel()
    if stopped:
        status = stopped[0]
        how = "stopped serving" if status is None else f"exited with {describe_status(status)}"
        raise SuccessorExitedError(f"successor {successor.pid} {how} during its probation", status)
    return ended.is_set()


async def _release(successor: Successor) -> None:
    """Let it go on its own (see :meth:`Successor.release`); raise if it exited first."""
    if not await successor.release():
        status = successor.returncode or 0
        raise SuccessorExitedError(
            f"successor {successor.pid} exited with {describe_status(status)} "
            "at the end of its probation",
            status,
        )


async def _kill(successor: Successor) -> None:
    with trio.CancelScope(shield=True):
        await successor.kill()
    successor.close()
