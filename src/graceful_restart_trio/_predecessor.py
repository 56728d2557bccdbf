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
   its own work (*retired*);
5. **commit**: release the launcher, so that the successor is re-parented to the service
   manager (systemd, the keeper, a container's init) before anyone names it the main
   process; then the serving copy hands the service over and drains.

If the story is cancelled (a shutdown, the caller's own scope) before the commit, the
restart is abandoned: a successor that was never ready is killed; one in its probation
is *retired* by the serving copy (asked to stop, gracefully: it may hold connections it
accepted from the shared queue).

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
    retire: Callable[[Successor], None]
    """The restart was abandoned during the probation: stop the successor gracefully."""


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
        line, fds = await _ready(successor, deadline, ready_timeout)
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
            await _probation(successor, probation)
        except SuccessorExitedError as error:
            serving.resume(error)
            raise
        timeline.mark("committed")
        serving.commit(successor)
    except BaseException:
        if paused and not successor.has_exited():  # it may hold connections: let it finish
            serving.retire(successor)
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


async def _probation(successor: Successor, seconds: float) -> None:
    """Watch it for ``seconds``, then let it go on its own; raise if it stops first."""
    with trio.move_on_after(seconds):
        status = await successor.wait_stopped()
        how = "stopped serving" if status is None else f"exited with {describe_status(status)}"
        raise SuccessorExitedError(f"successor {successor.pid} {how} during its probation", status)
    if not await successor.release():
        status = successor.returncode or 0
        raise SuccessorExitedError(
            f"successor {successor.pid} exited with {describe_status(status)} "
            "at the end of its probation",
            status,
        )
