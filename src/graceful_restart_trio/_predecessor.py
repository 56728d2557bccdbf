"""The predecessor's part of a restart: one story, played by a serving process (direct mode)
and by the keeper alike.

Theory of operation
-------------------

:func:`hand_over`, top to bottom:

1. **start** the successor (through the launcher, see ``_successor``) with the listening
   sockets and a channel;
2. wait until it says **ready**, at most ``ready_timeout``; if it exits or times out
   first, kill it and everything it started, and report why;
3. **pause** the serving copy: it stops accepting but keeps its sockets, so the
   successor alone accepts, from the same queues;
4. **probation**: watch the successor for ``probation`` seconds. "Ready" is not the point
   of no return: if it dies now (a lazy import failing on the first request, an OOM
   kill) or stops serving (it closes its channel), the serving copy **resumes** accepting
   on the same sockets, and the restart is reported failed with the reason. Nothing was
   refused: the queues were never closed. A successor that stopped is left to finish
   its own work (*retired*). The probation can only make a restart safer, never cause
   an outage: if the serving copy can no longer resume (its ``open()`` body returned or
   raised, a keeper's generation exited), it sets ``ended`` and the probation ends at
   once: the handover commits early, with no fallback;
5. **commit**: release the launcher, so that the successor is re-parented to the service
   manager (systemd, the keeper, a container's init) before anyone names it the main
   process; then the serving copy hands the service over and drains.

If the story is cancelled (an explicit request to stop the service) before the commit,
the restart is abandoned: a successor that was never ready is killed; one in its
probation is *retired* by the serving copy (asked to stop, gracefully: it may hold
connections it accepted from the shared queue). A ready, alive successor is stopped on
nothing else. Any other error is the serving copy's to recover from: it resumes.

What the serving copy does at each step is its own business (:class:`Serving`): in direct
mode it is this very process; under the keeper it is the generation that serves now.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar, final

import attrs
import trio

from ._exceptions import (
    InheritanceError,
    SuccessorExitedError,
    SuccessorStartError,
    SuccessorTimeoutError,
)
from ._logging import PrefixLog
from ._successor import Successor, describe_status
from ._timeline import Timeline

__all__ = ["Serving", "hand_over"]

T = TypeVar("T")


@final
@attrs.frozen
class Serving:
    """What the copy that serves while a successor starts does at each step of the story.

    None of these may await: each runs at an exact point of the story. ``pause`` and
    ``commit`` raise :class:`RestartError` if the serving copy is no longer in a state
    to do it (a shutdown came in the same tick): the restart is then abandoned.
    """

    pause: Callable[[Successor], None]
    """The successor is ready: stop accepting, keep the sockets."""
    resume: Callable[[Exception], None]
    """The successor died during its probation: accept again."""
    commit: Callable[[Successor], None]
    """The successor is on its own and stays: hand the service over, then drain."""
    retire: Callable[[Successor, bool], None]
    """The restart was abandoned during the probation: let the successor finish its work
    and exit; ask it to stop (``SIGTERM``) if the flag says so (it did not stop itself)."""
    ended: trio.Event = attrs.field(factory=trio.Event)
    """Set when the serving copy can no longer resume: the probation ends at once."""


async def hand_over(
    serving: Serving,
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    fds: Sequence[int],
    ready_timeout: float,
    probation: float,
    log: PrefixLog,
    accept_ready: Callable[[bytes, list[int]], T],
    timeline: Timeline,
    label: str = "successor {}",
) -> tuple[Successor, T]:
    """Start a successor and hand the service over to it; the story in the module docstring.

    ``accept_ready`` reads the ready line and the fds that came with it (they are its to
    close); what it returns is returned. If it raises :class:`InheritanceError`, the
    successor is not ready: it is killed, and the restart fails. Each phase is marked on
    ``timeline``; the caller finishes it. ``label`` names the successor in the log,
    given its pid.

    Returns:
        The successor, committed, and what ``accept_ready`` made of its ready message.

    Raises:
        SuccessorStartError: it could not be started.
        SuccessorExitedError: it exited before it was ready, or during its probation.
        SuccessorTimeoutError: it was not ready within ``ready_timeout``.
    """
    started = time.monotonic()
    deadline = trio.current_time() + ready_timeout
    with trio.move_on_at(deadline) as starting:
        successor = await Successor.start(command, env=env, cwd=cwd, fds=fds)
    if starting.cancelled_caught:
        raise SuccessorTimeoutError(f"the launcher did not start {command[0]!r} in time")
    log.info("%s started: %s", label.format(successor.pid), " ".join(command))
    timeline.mark("spawned", successor=successor.pid)
    paused = False
    try:
        try:
            line, fds = await _ready(successor, deadline, ready_timeout)
        except InheritanceError as error:  # what came with its ready (too many fds, ...)
            raise SuccessorStartError(f"successor {successor.pid}: {error}") from None
        try:
            ready = accept_ready(line, fds)
        except InheritanceError as error:
            raise SuccessorStartError(
                f"successor {successor.pid} said ready wrongly: {error}"
            ) from None
        log.info(
            "%s is ready after %.0f ms: probation for %gs",
            label.format(successor.pid),
            (time.monotonic() - started) * 1000,
            probation,
        )
        timeline.mark("ready")
        serving.pause(successor)
        paused = True
        timeline.mark("stopped accepting", probation=probation)
        try:
            if await _probation(successor, probation, serving.ended):
                timeline.mark("probation cut short")
            await _release(successor)
        except SuccessorExitedError as error:
            serving.resume(error)
            raise
        timeline.mark("committed")
        serving.commit(successor)
    except BaseException as error:
        if paused and not successor.has_exited():  # it may hold connections: let it finish
            serving.retire(successor, not isinstance(error, SuccessorExitedError))
        else:
            with trio.CancelScope(shield=True):
                await successor.kill()
            successor.close()
        raise
    return successor, ready


async def _ready(successor: Successor, deadline: float, timeout: float) -> tuple[bytes, list[int]]:
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
