"""The restart story (``_restart.Restarts``) in process, over a fake :class:`Side`.

Each branch of the story runs against a real but tiny successor
(``tests/apps/story_successor.py``, started through the real launcher, with a real
channel and pidfd) and a fake side that records every call the story makes. The tests
assert on that record, on the restart's :class:`Timeline` and on ``Restarts.counts`` and
``Restarts.last``. They wait on the timeline's events, never on a sleep, and each ends
with no child process left (the test process is a subreaper: see ``conftest``).

Trio's real clock: the waits are on real file descriptors. Probations are short (0.2 s)
where the test lets them run out, and long (30 s) where the test ends them itself.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import attrs
import pytest
import trio

from graceful_restart_trio._exceptions import (
    RestartError,
    RestartUnavailableError,
    SuccessorExitedError,
    SuccessorStartError,
    SuccessorTimeoutError,
)
from graceful_restart_trio._handover import parse_plain_ready
from graceful_restart_trio._logging import PrefixLog
from graceful_restart_trio._restart import Launch, Restarts
from graceful_restart_trio._state import State
from graceful_restart_trio._successor import Successor
from graceful_restart_trio._timeline import Timeline

from .conftest import children, is_running, stop_everything

APP = Path(__file__).resolve().parent / "apps" / "story_successor.py"
SHORT = 0.2
"""A probation the test lets run out."""
LONG = 30.0
"""A probation or ready timeout the test ends itself: reaching it fails the test."""
ABANDONED = "restart abandoned: this process is draining"
"""What a side says when a shutdown came in the same tick (see ``Side``)."""


@attrs.define(eq=False)
class FakeSide:
    """A side that records every call the story makes, in order, with its argument.

    ``why_not`` is what :meth:`_why_not` answers; ``on`` maps a call's name to a hook
    run after it is recorded (one that raises plays a shutdown in the same tick, or a
    bug). Successors left to it (committed or retired) are kept for the test to stop.
    """

    behaviour: str
    ready_timeout: float = 5.0
    probation: float = SHORT
    why_not: str | None = None
    state: State = State.SERVING
    on: dict[str, Callable[[], object]] = attrs.field(factory=dict)
    calls: list[tuple[str, Any]] = attrs.field(factory=list)
    left: list[Successor] = attrs.field(factory=list)

    def names(self) -> list[str]:
        """The calls made so far, by name."""
        return [name for name, _ in self.calls]

    def argument(self, name: str) -> Any:
        """What the (only) call ``name`` was given."""
        (argument,) = [argument for called, argument in self.calls if called == name]
        return argument

    def _record(self, name: str, argument: Any = None) -> None:
        self.calls.append((name, argument))
        if name in self.on:
            self.on[name]()

    def _why_not(self) -> str | None:
        self._record("why_not", self.why_not)
        return self.why_not

    def _begin(self, timeline: Timeline) -> Launch:
        self._record("begin", timeline.trigger)
        return Launch(
            command=[sys.executable, "-I", "-S", str(APP), self.behaviour],
            env=dict(os.environ),
            sockets=[],
            ready_timeout=self.ready_timeout,
            probation=self.probation,
            accept_ready=parse_plain_ready,
        )

    def _pause(self, successor: Successor) -> None:
        self._record("pause", successor.pid)

    def _resume(self, error: SuccessorExitedError) -> None:
        self._record("resume", error)

    def _commit(self, successor: Successor, ready: object, timeline: Timeline) -> None:
        self.left.append(successor)
        self._record("commit", successor.pid)

    def _retire(self, successor: Successor, ask: bool) -> None:
        self.left.append(successor)
        self._record("retire", ask)

    def _failed(self, error: RestartError) -> None:
        self._record("failed", error)

    def _recorded(self, timeline: Timeline) -> None:
        self._record("recorded", timeline.outcome)


def restarts_of(side: FakeSide) -> Restarts:
    return Restarts(side, os.getpid(), PrefixLog(logging.getLogger(__name__), "[story]"))


def shutdown() -> NoReturn:
    """What ``_pause`` or ``_commit`` raise when a shutdown came in the same tick."""
    raise RestartError(ABANDONED)


async def act_at(
    events: trio.MemoryReceiveChannel[dict[str, Any]], phase: str, act: Callable[[], object]
) -> None:
    """Call ``act()`` the moment the timeline reaches ``phase``."""
    async for event in events:
        if event["event"] == phase:
            act()
            return
    raise AssertionError(f"the restart ended before {phase!r}")


async def stop(successor: Successor) -> int:
    """Stop a successor the story left running (``SIGTERM``); its exit status."""
    released = _released(successor)
    successor.send_signal(signal.SIGTERM)
    status = await successor.wait_exit()  # as the launcher saw it, if still there
    if released:  # our child (the test process is a subreaper), and it has exited
        status = os.waitstatus_to_exitcode(os.waitpid(successor.pid, 0)[1])  # noqa: ASYNC222
    else:
        await successor.kill()  # reaps the launcher
    successor.close()
    assert status is not None
    return status


def _released(successor: Successor) -> bool:
    """Whether the launcher let it go: the test process is its parent now."""
    stat = Path(f"/proc/{successor.pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid()


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    """Each test ends with no child process it made: the story and the test stopped
    them all (any left are killed, and the test fails)."""
    before = set(children())
    yield
    left = [pid for pid in children() if pid not in before]
    if left:
        stop_everything([])
    assert left == []


async def test_a_ready_successor_is_paused_for_its_probation_then_committed() -> None:
    side = FakeSide("ready-then-stay")
    restarts = restarts_of(side)
    timeline = Timeline("call")
    successor, ready = await restarts.run(timeline)
    assert ready is None  # a plain ready
    assert side.calls == [
        ("begin", "call"),
        ("pause", successor.pid),
        ("commit", successor.pid),
        ("recorded", "committed"),
    ]
    assert list(timeline.phases) == ["spawned", "ready", "stopped accepting", "committed"]
    probation = timeline.phases["committed"] - timeline.phases["stopped accepting"]
    assert probation >= SHORT * 1000 - 2
    assert (timeline.outcome, timeline.reason) == ("committed", None)
    assert timeline.details == {"successor": successor.pid, "probation": SHORT}
    assert restarts.counts == {"committed": 1}
    assert restarts.last == timeline.as_dict()
    assert (restarts.under_way, restarts.successor, restarts.pending) == (False, None, False)
    assert _released(successor)  # the launcher let it go: re-parented to the subreaper
    assert side.left == [successor]
    assert await stop(successor) == 0


async def test_a_successor_that_exits_before_ready_fails_the_restart() -> None:
    side = FakeSide("exit-before-ready")
    restarts = restarts_of(side)
    timeline = Timeline("call")
    with pytest.raises(SuccessorExitedError, match="exited with status 3 before it was ready"):
        await restarts.run(timeline)
    assert side.names() == ["begin", "recorded", "failed"]
    error = side.argument("failed")
    assert isinstance(error, SuccessorExitedError)
    assert error.returncode == 3
    assert list(timeline.phases) == ["spawned"]
    assert (timeline.outcome, timeline.reason) == ("failed", str(error))
    assert restarts.counts == {"failed": 1}
    assert restarts.last == timeline.as_dict()


async def test_a_successor_never_ready_is_killed_at_the_ready_timeout() -> None:
    side = FakeSide("never-ready", ready_timeout=1.0)
    restarts = restarts_of(side)
    timeline = Timeline("call")
    started = trio.current_time()
    with pytest.raises(SuccessorTimeoutError, match="was not ready within 1s: killed it"):
        await restarts.run(timeline)
    assert trio.current_time() - started >= 1.0
    assert side.names() == ["begin", "recorded", "failed"]
    assert list(timeline.phases) == ["spawned"]
    assert not is_running(timeline.details["successor"])
    assert timeline.outcome == "failed"
    assert restarts.counts == {"failed": 1}


async def test_garbage_instead_of_ready_is_a_start_error() -> None:
    side = FakeSide("garbage")
    restarts = restarts_of(side)
    timeline = Timeline("call")
    with pytest.raises(SuccessorStartError, match=r"said ready wrongly: said b'hello' with 0 fd"):
        await restarts.run(timeline)
    assert side.names() == ["begin", "recorded", "failed"]
    assert list(timeline.phases) == ["spawned"]
    assert not is_running(timeline.details["successor"])
    assert restarts.counts == {"failed": 1}


async def test_death_on_probation_resumes_the_side() -> None:
    side = FakeSide("ready-then-exit")
    restarts = restarts_of(side)
    timeline = Timeline("call")
    with pytest.raises(SuccessorExitedError, match="exited with status 4 during its probation"):
        await restarts.run(timeline)
    assert side.names() == ["begin", "pause", "resume", "recorded", "failed"]
    error = side.argument("resume")
    assert error is side.argument("failed")
    assert isinstance(error, SuccessorExitedError)
    assert error.returncode == 4
    assert list(timeline.phases) == ["spawned", "ready", "stopped accepting"]
    assert (timeline.outcome, timeline.reason) == ("failed", str(error))
    assert restarts.counts == {"failed": 1}


async def test_a_successor_that_stops_serving_on_probation_is_retired_unasked() -> None:
    """It shut its channel down but lives on (finishing its work): the side accepts
    again, and lets it finish without asking it to stop."""
    side = FakeSide("ready-then-stop-serving")
    restarts = restarts_of(side)
    timeline = Timeline("call")
    with pytest.raises(SuccessorExitedError, match="stopped serving during its probation"):
        await restarts.run(timeline)
    assert side.names() == ["begin", "pause", "resume", "retire", "recorded", "failed"]
    assert side.argument("retire") is False
    error = side.argument("resume")
    assert isinstance(error, SuccessorExitedError)
    assert error.returncode is None
    assert list(timeline.phases) == ["spawned", "ready", "stopped accepting"]
    assert timeline.outcome == "failed"
    (successor,) = side.left
    assert await stop(successor) == 0


async def test_a_shutdown_before_the_story_starts_abandons_it() -> None:
    side = FakeSide("ready-then-stay", state=State.DRAINING)
    restarts = restarts_of(side)
    timeline = Timeline("SIGHUP")
    async with trio.open_nursery() as nursery:
        restarts.nursery = nursery
        restarts.request(timeline)
        assert restarts.abandon()
    assert side.names() == ["why_not", "recorded", "failed"]
    assert timeline.phases == {}
    assert (timeline.outcome, timeline.reason) == ("failed", ABANDONED)
    assert restarts.counts == {"failed": 1}
    assert not restarts.abandon()  # nothing under way any more


async def test_a_shutdown_while_the_launcher_starts_abandons_the_restart() -> None:
    side = FakeSide("ready-then-stay", state=State.DRAINING)
    restarts = restarts_of(side)
    side.on["begin"] = restarts.abandon
    timeline = Timeline("call")
    with pytest.raises(RestartError, match=ABANDONED):
        await restarts.run(timeline)
    assert side.names() == ["begin", "recorded", "failed"]
    assert timeline.phases == {}
    assert (timeline.outcome, timeline.reason) == ("failed", ABANDONED)


async def test_a_shutdown_before_ready_kills_the_successor() -> None:
    side = FakeSide("never-ready", ready_timeout=LONG, state=State.DRAINING)
    restarts = restarts_of(side)
    timeline = Timeline("call")
    events = timeline.watch()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        restarts.nursery = nursery
        nursery.start_soon(act_at, events, "spawned", restarts.abandon)
        with pytest.raises(RestartError, match=ABANDONED):
            await restarts.call(timeline)
    assert trio.current_time() - started < LONG
    assert side.names() == ["why_not", "begin", "recorded", "failed"]
    assert list(timeline.phases) == ["spawned"]
    assert not is_running(timeline.details["successor"])
    assert (timeline.outcome, timeline.reason) == ("failed", ABANDONED)
    assert restarts.counts == {"failed": 1}


async def test_a_shutdown_at_the_pause_retires_the_ready_successor() -> None:
    """Ready, it may already hold connections from the shared queues: asked to stop
    gracefully, never killed."""
    side = FakeSide("ready-then-stay", state=State.DRAINING, on={"pause": shutdown})
    restarts = restarts_of(side)
    timeline = Timeline("call")
    with pytest.raises(RestartError, match=ABANDONED):
        await restarts.run(timeline)
    assert side.names() == ["begin", "pause", "retire", "recorded", "failed"]
    assert side.argument("retire") is True
    assert list(timeline.phases) == ["spawned", "ready"]
    assert (timeline.outcome, timeline.reason) == ("failed", ABANDONED)
    (successor,) = side.left
    assert await stop(successor) == 0


async def test_a_shutdown_on_probation_retires_the_successor_asking_it_to_stop() -> None:
    side = FakeSide("ready-then-stay", probation=LONG, state=State.DRAINING)
    restarts = restarts_of(side)
    timeline = Timeline("call")
    events = timeline.watch()
    async with trio.open_nursery() as nursery:
        restarts.nursery = nursery
        nursery.start_soon(act_at, events, "stopped accepting", restarts.abandon)
        with pytest.raises(RestartError, match=ABANDONED):
            await restarts.call(timeline)
    assert side.names() == ["why_not", "begin", "pause", "retire", "recorded", "failed"]
    assert side.argument("retire") is True
    assert list(timeline.phases) == ["spawned", "ready", "stopped accepting"]
    assert (timeline.outcome, timeline.reason) == ("failed", ABANDONED)
    (successor,) = side.left
    assert not _released(successor)  # still the launcher's: never committed
    assert await stop(successor) == 0


async def test_a_shutdown_at_the_commit_retires_the_released_successor() -> None:
    side = FakeSide("ready-then-stay", state=State.DRAINING, on={"commit": shutdown})
    restarts = restarts_of(side)
    timeline = Timeline("call")
    with pytest.raises(RestartError, match=ABANDONED):
        await restarts.run(timeline)
    assert side.names() == ["begin", "pause", "commit", "retire", "recorded", "failed"]
    assert side.argument("retire") is True
    assert list(timeline.phases) == ["spawned", "ready", "stopped accepting", "committed"]
    assert (timeline.outcome, timeline.reason) == ("failed", ABANDONED)
    assert restarts.counts == {"failed": 1}
    successor = side.left[-1]
    assert side.left == [successor, successor]  # committed, then retired
    assert _released(successor)
    assert await stop(successor) == 0


async def test_a_cut_probation_commits_at_once() -> None:
    side = FakeSide("ready-then-stay", probation=LONG)
    restarts = restarts_of(side)
    timeline = Timeline("call")
    events = timeline.watch()
    async with trio.open_nursery() as nursery:
        restarts.nursery = nursery
        nursery.start_soon(act_at, events, "stopped accepting", restarts.cut_probation)
        successor = await restarts.call(timeline)
    assert side.names() == ["why_not", "begin", "pause", "commit", "recorded"]
    assert list(timeline.phases) == [
        *("spawned", "ready", "stopped accepting"),
        *("probation cut short", "committed"),
    ]
    assert timeline.phases["committed"] < LONG * 1000
    assert timeline.outcome == "committed"
    assert restarts.counts == {"committed": 1}
    assert await stop(successor) == 0


async def test_a_cancelled_caller_leaves_the_restart_to_commit() -> None:
    side = FakeSide("ready-then-stay")
    restarts = restarts_of(side)
    timeline = Timeline("call")
    events = timeline.watch()
    async with trio.open_nursery() as nursery:
        restarts.nursery = nursery
        with trio.CancelScope() as caller:
            nursery.start_soon(act_at, events, "ready", caller.cancel)
            await restarts.call(timeline)
        assert caller.cancelled_caught
        assert timeline.outcome is None  # the story goes on in the side's nursery
    assert side.names() == ["why_not", "begin", "pause", "commit", "recorded"]
    assert timeline.outcome == "committed"
    assert restarts.counts == {"committed": 1}
    (successor,) = side.left
    assert await stop(successor) == 0


async def test_a_story_cancelled_from_outside_is_recorded_as_abandoned() -> None:
    """The side's nursery is cancelled (the process ends): the restart is recorded, the
    successor killed, and the cancellation goes on (no ``_failed``: nothing serves on)."""
    side = FakeSide("never-ready", ready_timeout=LONG)
    restarts = restarts_of(side)
    timeline = Timeline("SIGHUP")
    events = timeline.watch()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(act_at, events, "spawned", nursery.cancel_scope.cancel)
        await restarts.run(timeline)
        raise AssertionError("not cancelled")
    assert side.names() == ["begin", "recorded"]
    assert (timeline.outcome, timeline.reason) == ("failed", "abandoned")
    assert not is_running(timeline.details["successor"])
    assert restarts.counts == {"failed": 1}


async def test_a_restart_asked_for_meanwhile_follows_the_one_under_way() -> None:
    side = FakeSide("ready-then-stay")
    restarts = restarts_of(side)
    first, second = Timeline("SIGHUP"), Timeline("control")
    async with trio.open_nursery() as nursery:
        restarts.nursery = nursery
        restarts.request(first)
        restarts.request(second)
        assert restarts.pending
        assert (second.outcome, second.reason) == (
            "refused",
            "a restart is under way; another will follow it",
        )
    assert side.names() == [
        *("why_not", "begin", "pause", "commit", "recorded"),
        *("why_not", "why_not", "begin", "pause", "commit", "recorded"),  # follow_up, request
    ]
    assert [argument for name, argument in side.calls if name == "begin"] == ["SIGHUP"] * 2
    assert not restarts.pending
    assert first.outcome == "committed"
    assert restarts.counts == {"committed": 2}
    assert restarts.last is not None
    assert restarts.last["trigger"] == "SIGHUP"
    assert restarts.last["requested_at"] > first.requested_at
    one, two = side.left
    assert one.pid != two.pid
    assert [await stop(one), await stop(two)] == [0, 0]


async def test_a_restart_asked_for_meanwhile_waits_until_the_side_allows_it() -> None:
    side = FakeSide("ready-then-stay")
    restarts = restarts_of(side)
    async with trio.open_nursery() as nursery:
        restarts.nursery = nursery
        restarts.request(Timeline("SIGHUP"))
        side.why_not = "cannot restart while draining"
        restarts.request(Timeline("SIGHUP"))
    assert side.names() == ["why_not", "begin", "pause", "commit", "recorded", "why_not"]
    assert restarts.pending  # follow_up asked, and the side said no
    side.why_not = None
    async with trio.open_nursery() as nursery:
        restarts.nursery = nursery
        restarts.follow_up()
    assert side.names()[6:] == ["why_not", "why_not", "begin", "pause", "commit", "recorded"]
    assert not restarts.pending
    assert restarts.counts == {"committed": 2}
    assert [await stop(successor) for successor in side.left] == [0, 0]


async def test_a_restart_the_side_refuses_starts_nothing() -> None:
    side = FakeSide("ready-then-stay", why_not="cannot restart while starting")
    restarts = restarts_of(side)
    called, requested = Timeline("call"), Timeline("SIGHUP")
    with pytest.raises(RestartUnavailableError, match="cannot restart while starting"):
        await restarts.call(called)
    restarts.request(requested)
    assert side.names() == ["why_not", "why_not"]
    for timeline in (called, requested):
        assert (timeline.outcome, timeline.reason) == ("refused", "cannot restart while starting")
    assert (restarts.counts, restarts.last, restarts.pending) == ({}, None, False)


async def test_a_call_while_a_restart_is_under_way_is_refused() -> None:
    side = FakeSide("ready-then-stay", probation=LONG)
    restarts = restarts_of(side)
    first, second = Timeline("SIGHUP"), Timeline("call")
    events = first.watch()
    async with trio.open_nursery() as nursery:
        restarts.nursery = nursery
        restarts.request(first)
        with pytest.raises(RestartUnavailableError, match="a restart is under way"):
            await restarts.call(second)
        await act_at(events, "stopped accepting", restarts.cut_probation)
    assert (second.outcome, second.reason) == ("refused", "a restart is under way")
    assert not restarts.pending  # a call is refused, not queued
    assert first.outcome == "committed"
    (successor,) = side.left
    assert await stop(successor) == 0


async def test_an_unexpected_error_in_the_side_fails_the_restart() -> None:
    def bug() -> NoReturn:
        raise ValueError("a bug")

    side = FakeSide("ready-then-stay", on={"pause": bug})
    restarts = restarts_of(side)
    timeline = Timeline("call")
    with pytest.raises(RestartError, match=r"restart failed: unexpected error: ValueError") as info:
        await restarts.run(timeline)
    assert isinstance(info.value.__cause__, ValueError)
    # Ready, it may hold connections already: retired (asked to stop), never killed.
    assert side.names() == ["begin", "pause", "retire", "recorded", "failed"]
    assert side.argument("retire") is True
    assert side.argument("failed") is info.value
    assert list(timeline.phases) == ["spawned", "ready"]
    assert (timeline.outcome, timeline.reason) == (
        "failed",
        "unexpected error: ValueError('a bug')",
    )
    assert restarts.counts == {"failed": 1}
    (successor,) = side.left
    assert await stop(successor) == 0
