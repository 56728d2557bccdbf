"""The keeper's workers: ``--workers N`` slots (one without the option), and the roll
that replaces them.

Each :class:`Worker` slot plays the predecessor's part of the story (``_restart.Side``)
for the generation serving in it, with a :class:`Restarts` of its own, so each
replacement is the very story a serving process plays in direct mode: a new generation
starts with the sockets the keeper holds and says ready; the slot's serving generation is
told ``pause`` while the new one is on probation, then ``drain`` (or ``resume`` if the
new one died).

:class:`Workers` are the keeper's restarts: a restart *rolls* the slots, replacing one
after another (``--roll-batch K``: the first alone, then K at a time), so that the other
workers serve throughout and K new copies start at a time (memory: N + K copies, plus
old ones still draining). The first start is a roll too (the first slot binds the
sockets, the others inherit them). A failure stops the roll: the slots not replaced yet
serve on, and the restart's record names the worker and the reason. A restart asked for
during a roll follows it. A worker whose generation exits by itself outside a restart is
replaced (:meth:`Worker.exited`), after a back-off if it crash-loops.
"""

from __future__ import annotations

import collections
import errno
import os
import signal
import time
from typing import TYPE_CHECKING, Any, final

import attrs
import trio

from ._exceptions import RestartError, SuccessorExitedError, SuccessorStartError
from ._generations import Generation, Listeners, close_listeners, ready_listeners
from ._handover import DRAIN, ENV_VAR, MAIN, PAUSE, RESUME, encode
from ._logging import PrefixLog, surviving
from ._reaper import exit_code
from ._restart import FIRST_START, Launch, Restarts
from ._state import State
from ._status import Roll, WorkerSlot
from ._successor import Successor
from ._systemd import ACTIVATION_VARIABLES, WATCHDOG_VARIABLES
from ._timeline import Timeline

if TYPE_CHECKING:
    from ._keeper import Keeper

__all__ = ["Worker", "Workers"]

_STOPPING = (State.DRAINING, State.STOPPED)

NOT_INHERITED = frozenset({"NOTIFY_SOCKET", *ACTIVATION_VARIABLES, *WATCHDOG_VARIABLES})
"""The keeper is systemd's main process: these are its own, never a generation's (the
application's own ``LISTEN_PORT``, say, passes)."""
STABLE = 10.0
"""A worker that served this many seconds before it exited by itself is replaced at once;
one that exits sooner is replaced after a back-off that doubles, up to :data:`BACKOFF_MAX`."""
BACKOFF_MAX = 30.0


@final
@attrs.define(eq=False)
class Worker:
    """One worker slot: the generation serving in it, and how to replace it."""

    number: int
    keeper: Keeper
    log: PrefixLog
    restarts: Restarts = attrs.field(init=False)
    serving: Generation | None = None
    old: Generation | None = None
    """During a replacement: the generation that serves."""
    new: Generation | None = None
    """During a replacement: the new generation, once it is ready."""
    paused: bool = False
    """The old generation was told ``pause``: on a failure it is told ``resume``."""
    offered: Listeners = attrs.field(factory=list)
    """The listeners the new generation sent with its ready, until it takes over."""
    lock: trio.Lock = attrs.field(factory=trio.Lock)
    """Held while the slot is being replaced: one replacement at a time."""
    since: float = attrs.field(factory=time.monotonic)
    """When the serving generation took over (for the crash back-off)."""
    quick_exits: int = 0
    """How many generations in a row exited by themselves soon after they took over."""

    def __attrs_post_init__(self) -> None:
        self.restarts = Restarts(self, self.keeper.pid, self.log)

    @property
    def alive(self) -> Generation | None:
        """The serving generation, if it runs."""
        return self.serving if self.serving and self.serving.status is None else None

    @property
    def state(self) -> State:
        """Where the slot is: like a process (see :class:`State`)."""
        if self.keeper.state in _STOPPING:
            return self.keeper.state
        if self.restarts.under_way:
            return State.PROBATION if self.paused else State.RESTARTING
        return State.SERVING if self.alive else State.STARTING

    def describe(self) -> WorkerSlot:
        """The slot, for the status."""
        serving = self.alive
        return WorkerSlot(
            worker=self.number,
            pid=serving.pid if serving else None,
            generation=serving.number if serving else None,
            state=self.state.value,
            successor=self.new.pid if self.new else None,
            uptime_s=round(time.monotonic() - self.since, 3) if serving else None,
        )

    def exited(self, generation: Generation) -> None:
        """A generation of this slot exited (the keeper is not stopping)."""
        if generation is self.old and self.restarts.under_way:
            self.log.warning(
                "the serving %s exited %s; no fallback",
                generation,
                "during the probation: committing early"
                if self.paused
                else "while its successor starts: committing as soon as it is ready",
            )
            self.restarts.cut_probation()
        elif generation is self.serving:
            self._serving_exited(generation)

    def _serving_exited(self, gone: Generation) -> None:
        """``gone`` served here and exited by itself. Alone (or before every worker ever
        served), it stops the keeper; among other workers, it is replaced: at once if it
        had served :data:`STABLE` seconds, else after a back-off that doubles."""
        others = [g for g in self.keeper._workers.alive() if g is not gone]
        if not others or self.keeper.state is State.STARTING:
            self.keeper._stop_by_itself(gone)  # nobody serves: the service stopped
            return
        self.serving = None  # it is replaced: its status is not the keeper's to report
        lived = time.monotonic() - self.since
        self.quick_exits = self.quick_exits + 1 if lived < STABLE else 0
        delay = min(BACKOFF_MAX, 0.5 * 2 ** (self.quick_exits - 1)) if self.quick_exits else 0.0
        self.log.warning(
            "%s exited by itself after %.1fs: starting a replacement%s",
            gone,
            lived,
            f" in {delay:g}s ({self.quick_exits} quick exit(s) in a row)" if delay else "",
        )
        self.keeper._tasks().start_soon(self._replace, delay)

    async def _replace(self, delay: float) -> None:
        while True:
            await trio.sleep(delay)
            async with self.lock:
                if self.keeper.state in _STOPPING or self.alive:
                    return
                try:
                    await self.restarts.run(Timeline(f"worker {self.number} exited"))
                except RestartError:
                    if self.keeper.state in _STOPPING:
                        return
                    delay = min(BACKOFF_MAX, max(1.0, 2 * delay))
                    self.log.error("worker %d: trying again in %gs", self.number, delay)  # noqa: TRY400 - logged
                else:
                    return
                finally:
                    self.keeper._check_stopped()

    def accept_ready(self, line: bytes, fds: list[int]) -> Listeners:
        """Keep what a new generation sent with its ready, checked (see :class:`Launch`)."""
        self.offered = ready_listeners(line, fds)
        return self.offered

    # The predecessor's part of the story (see _restart.Side), for the slot's next
    # generation: the serving one is told what to do; the new one becomes a Generation.

    def _why_not(self) -> str | None:
        return (
            f"the keeper is {self.keeper.state.value}" if self.keeper.state in _STOPPING else None
        )

    def _begin(self, timeline: Timeline) -> Launch:
        keeper, old = self.keeper, self.alive
        self.old, self.new, self.paused = old, None, False
        if old is not None:
            self.log.info("restart requested: %s serves, starting its successor", old)
        env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
        env[ENV_VAR] = encode(
            keeper.generation,
            old.pid if old else None,
            keeper.held.names(),
            keeper=keeper.pid,
            socket_files=keeper.held.socket_files(),
        )
        return Launch(
            command=keeper.command,
            env=env,
            sockets=keeper.held.fds(),
            ready_timeout=keeper.ready_timeout,
            probation=keeper.probation if old else 0.0,
            accept_ready=self.accept_ready,
            label=f"{self._where}generation {keeper.generation} pid {{}}",
        )

    @property
    def _where(self) -> str:
        return "" if self.keeper.workers == 1 else f"worker {self.number} "

    def _adopt(self, successor: Successor) -> Generation:
        """From now on it is ours to reap (once the launcher lets it go) and to stop."""
        worker = None if self.keeper.workers == 1 else self.number
        self.new = Generation(self.keeper.generation, successor, worker=worker)
        self.keeper.live[successor.pid] = self.new
        return self.new

    def _pause(self, successor: Successor) -> None:
        if self.keeper.state in _STOPPING:
            raise RestartError(f"abandoned: the keeper is {self.keeper.state.value}")
        self._adopt(successor)
        if self.old is not None:
            self.paused = True
            self.old.tell(PAUSE, successor.pid)

    def _resume(self, error: SuccessorExitedError) -> None:
        if self.new is not None and self.new.successor.has_exited():
            self.keeper.live.pop(self.new.pid, None)  # the launcher reaped it
            self.new = None
        if self.old is not None and self.paused and self.keeper.state not in _STOPPING:
            self.paused = False
            self.old.tell(RESUME)

    def _commit(self, successor: Successor, ready: Listeners, timeline: Timeline) -> None:
        if self.keeper.state in _STOPPING:
            raise RestartError(f"abandoned: the keeper is {self.keeper.state.value}")
        new, old = self.new, self.old
        assert new is not None  # adopted when it paused the old one
        self.serving, self.since = new, time.monotonic()
        if old is not None:  # a restart: a crash loop, if any, is over
            self.quick_exits = 0
        self.old = self.new = None
        self.paused = False
        new.tell(MAIN)
        self.keeper._take_over(new, ready)
        if old is not None:
            old.tell(DRAIN, successor.pid)
            self.log.info("handed over from %s to %s", old, new)
            timeline.mark("draining", generation=old.number, pid=old.pid)

    def _failed(self, error: RestartError) -> None:
        old, paused = self.old, self.paused
        self.old = self.new = None
        self.paused = False
        if self.keeper.state in _STOPPING:
            return  # stopping: every generation was told
        self.log.error("%sgeneration %d: %s", self._where, self.keeper.generation, error)
        if old is None:  # nothing served in this slot: a first start, or a replacement
            if self.keeper.state is State.STARTING:  # the keeper exits as a shell would
                self.keeper._start_failure = _shell_status(error)
        elif old.status is not None:
            self._serving_exited(old)
        else:
            if paused:  # an error after the pause
                old.tell(RESUME)
            self.log.error("restart failed: %s serves on", old)

    def _recorded(self, timeline: Timeline) -> None:
        if self.offered is not self.keeper.held.listeners:
            close_listeners(self.offered)
        self.offered = []

    def _retire(self, successor: Successor, ask: bool) -> None:
        # A stop abandoned the restart (and tells every live generation), an error did,
        # or the new one stopped by itself: either way it finishes its work and exits.
        unknown = self.new is None  # ready, but a stop came before it was adopted
        generation = self.new or self._adopt(successor)
        self.new = None
        generation.retiring = True
        self.log.info("%s on probation is stopping", generation)
        if ask and (unknown or self.keeper.state is not State.DRAINING):  # else the stop told it
            generation.send_signal(signal.SIGTERM)
        self.keeper._tasks().start_soon(self._wait_retired, generation)

    async def _wait_retired(self, generation: Generation) -> None:
        status: int | None = None
        async with surviving(self.log, f"following the retired {generation}"):
            status = await generation.successor.wait_retired()
        if self.keeper.live.pop(generation.pid, None) is not None:
            generation.reaped(status if status is not None else 0)
            self.log.info("%s exited with status %s", generation, status)
            self.keeper._check_stopped()


def _shell_status(error: RestartError) -> int:
    """127 if the command cannot be found, 126 if it cannot be run, else its own."""
    if isinstance(error, SuccessorStartError):
        return 127 if error.errno == errno.ENOENT else 126
    if isinstance(error, SuccessorExitedError):
        return exit_code(error.returncode or 0)
    return 1


@final
@attrs.define(eq=False)
class Workers:
    """The keeper's worker slots, and its restarts: each rolls the slots in turn."""

    keeper: Keeper
    slots: list[Worker]
    log: PrefixLog
    counts: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Restarts by outcome (``committed``, ``failed``)."""
    last: dict[str, Any] | None = None
    """The last restart's timeline (:meth:`Timeline.as_dict`)."""
    batch: int = 1
    """How many workers a roll replaces at a time (``--roll-batch``)."""
    rolled: int = 0
    """How many slots the roll under way has replaced."""
    _scope: trio.CancelScope | None = None
    _pending: bool = False

    @property
    def under_way(self) -> bool:
        return self._scope is not None

    def alive(self) -> list[Generation]:
        """The serving generation of each slot that has one."""
        return [generation for worker in self.slots if (generation := worker.alive)]

    def pass_on(self, sig: signal.Signals) -> None:
        """Pass ``sig`` on to every serving generation (``SIGUSR1``, say)."""
        for generation in self.alive():
            self.log.info("passing %s on to %s", sig.name, generation)
            generation.send_signal(sig)
        if not self.alive():
            self.log.info("%s ignored: no generation serves", sig.name)

    def progress(self) -> Roll | None:
        """The roll under way, for the status."""
        return Roll(self.rolled, len(self.slots)) if self.under_way else None

    def exit_status(self) -> int:
        """The first of the last serving generations' exit statuses that is not 0."""
        codes = [
            exit_code(w.serving.status)
            for w in self.slots
            if w.serving and w.serving.status is not None
        ]
        return next((code for code in codes if code), 0)

    def request(self, timeline: Timeline) -> None:
        """Start a roll in the background, after the one under way, or not at all."""
        first = timeline.trigger == FIRST_START
        if self._scope is not None:
            self.log.info("%s: a restart will follow the one under way", timeline.trigger)
            self._pending = True
            timeline.finish("refused", "a restart is under way; another will follow it")
        elif not first and self.keeper.state is not State.SERVING:
            self.log.info("%s ignored: the keeper is %s", timeline.trigger, self.keeper.state.value)
            timeline.finish("refused", f"the keeper is {self.keeper.state.value}")
        else:
            self._scope = trio.CancelScope()
            self.keeper._rolling(first)  # now: a stop in the same tick finds it restarting
            self.keeper._tasks().start_soon(self._roll, timeline, first)

    def abandon(self) -> bool:
        """A stop: abandon the roll and any replacement under way (True if there was one)."""
        abandoned = [worker.restarts.abandon() for worker in self.slots]
        if self._scope is not None:
            self._scope.cancel()
        return any(abandoned)

    async def _roll(self, timeline: Timeline, first: bool) -> None:
        assert self._scope is not None
        outcome, reason = "failed", "abandoned"
        try:
            with self._scope:
                await self._replace_each(timeline)
                outcome = "committed"
        except RestartError as error:
            reason = str(error)
        except Exception as error:  # a bug: never the keeper's end
            self.log.exception("the restart failed unexpectedly")
            reason = f"unexpected error: {error!r}"
        self._scope = None
        if len(self.slots) > 1:
            timeline.details["workers"] = [
                worker.alive and worker.alive.pid for worker in self.slots
            ]
        timeline.finish(outcome, None if outcome == "committed" else reason)
        if not first:
            self.counts[timeline.outcome or outcome] += 1
            self.last = timeline.as_dict()
        self.keeper._rolled(first, committed=outcome == "committed")
        if self._pending and self.keeper.state is State.SERVING:
            self._pending = False
            self.log.info("carrying out the restart asked for meanwhile")
            self.request(Timeline("SIGHUP"))

    async def _replace_each(self, timeline: Timeline) -> None:
        """Replace (or start) the first worker alone (it binds any listener the others
        do not have yet, and they inherit it), then the others :attr:`batch` at a time.

        Raises:
            RestartError: a new generation failed; the roll stops after its batch.
        """
        self.rolled = 0
        rest = self.slots[1:]
        batches = [self.slots[:1]] + [
            rest[at : at + self.batch] for at in range(0, len(rest), self.batch)
        ]
        for batch in batches:
            failures: list[str] = []
            async with trio.open_nursery() as nursery:
                for worker in batch:
                    nursery.start_soon(self._replace, worker, timeline, failures)
            if failures:
                raise RestartError("; ".join(failures))

    async def _replace(self, worker: Worker, timeline: Timeline, failures: list[str]) -> None:
        alone = len(self.slots) == 1
        step = timeline if alone else timeline.step(f"worker {worker.number}")
        async with worker.lock:
            try:
                await worker.restarts.run(step)
            except RestartError as error:
                failures.append(str(error) if alone else f"worker {worker.number}: {error}")
            else:
                self.rolled += 1
            finally:
                self.keeper._check_stopped()
