"""The story: start serving, restart into a successor, shut down, drain.

Theory of operation
-------------------

:func:`open` reads what this process inherited (a predecessor's sockets, or systemd's),
then runs the application's ``async with`` body inside a nursery of its own, next to the
signal task. Everything the application does in that body therefore runs inside the
nursery's cancel scope, which is how the drain deadline cancels work that outlives it:
leases themselves stay a bare counter.

A restart, top to bottom (:meth:`GracefulRestart.restart`, and ``_restart`` for the
steps the keeper plays too):

1. signal: ``SIGHUP`` (or a call) asks for it;
2. successor: this program again, started through the launcher in its own session, with
   the listening sockets, a pidfd naming us and a private channel;
3. ready: it says so on the channel within ``ready_timeout``, or it is killed (with
   everything it started) and this process goes on serving as before;
4. probation: this process stops accepting but keeps its sockets; if the successor dies
   within ``probation`` seconds, this process accepts again and reports why;
5. commit: the launcher lets the successor go (it is re-parented to systemd, or to the
   nearest subreaper); systemd hears ``MAINPID=`` with ``READY=1``; the successor hears
   ``main`` and takes charge (pid file, watchdog, its own restarts); this process closes
   its sockets;
6. drain: the leases, the predecessor if this process served and has one, and the
   ``open()`` body's return (its cleanup after serving, an ASGI lifespan shutdown),
   all under ``drain_timeout``;
7. exit: what is left is cancelled, :func:`open` returns.

A shutdown is steps 6 and 7 alone, plus the goodbyes only the process in charge may say
(after the drain has begun, and none of them can stop it): ``STOPPING=1`` to systemd,
removing the pid file and the unix socket files. A shutdown during a restart abandons
it: a successor that was never ready is killed, one on probation is asked to stop
gracefully.

Who serves afterwards is never "nobody":

- the probation never causes an outage: if the ``open()`` body ends during it (returns
  or raises), this process can no longer resume, so the handover commits at once (no
  fallback). A ready, alive successor is stopped only on an explicit request to stop
  the service (a shutdown signal, :meth:`GracefulRestart.shutdown`, the control socket);
- the story runs in the library's nursery: a :meth:`GracefulRestart.restart` caller
  that is cancelled stops waiting, the restart goes on;
- any other error in the story is logged with its traceback; this process serves on,
  the successor is stopped, and the next restart works.

The parts, each in a module of its own: the restart story (``_restart``: this class
plays the predecessor's side of it), the upstream (``_upstream``: who handed this
process the service, and what it says since), the accepting gate (``_accepting``), the
duties of the process in charge (``_charge``: systemd, the pid file, the control
socket) and the drain (``_drain``).

Every handler the library runs for someone else (a control connection, the channel, a
signal) is isolated: its error is logged and ends that one conversation, never this
process. Every step re-checks the state after each ``await``: a shutdown may come at
any point.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Literal, final

import attrs
import trio
from trio_util import AsyncValue

from ._accepting import Gate
from ._charge import Charge
from ._drain import Drain
from ._exceptions import RestartError, SuccessorExitedError, UsageError
from ._handover import MAIN, encode_word
from ._leases import LeaseCounter
from ._listeners import ListenerRegistry, describe_address
from ._logging import PrefixLog, surviving
from ._options import EXIT_GRACE, OpenOptions, Options
from ._pidfile import check_pid_file
from ._restart import Launch, Restarts
from ._signals import check_main_thread, receive_signals
from ._state import State, StateMachine
from ._status import Draining, Status
from ._successor import LAUNCHER_GRACE, Successor
from ._systemd import Notifier, watchdog_interval
from ._timeline import Timeline
from ._upstream import Upstream

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup
if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DrainReason", "GracefulRestart", "Statistics", "open"]

DrainReason = Literal["handover", "shutdown"]
"""Why a process drains: see :attr:`GracefulRestart.drain_reason`."""


@final
@attrs.frozen
class Statistics:
    """A snapshot of a :class:`GracefulRestart`, from :meth:`GracefulRestart.statistics`.

    Attributes:
        state: where the process is in its life.
        leases: how many leases are held: work in flight, where each running server
            helper (:meth:`GracefulRestart.serve_listeners`, :func:`asgi.serve`) counts
            as one until its connections are closed.
        generation: 1 for a first start, one more for each restart since.
        pid: this process.
        predecessor: the process this one took over from, or None.
        successor: the process this one handed over to (or is watching on probation),
            or None.
    """

    state: State
    leases: int
    generation: int
    pid: int
    predecessor: int | None
    successor: int | None


@final
@attrs.define(eq=False)
class GracefulRestart:
    """The handle :func:`open` yields: listeners, leases, restarts and shutdown.

    Synopsis::

        async with graceful_restart_trio.open(drain_timeout=10) as gr:
            listeners = await gr.open_tcp_listeners(8000)
            await gr.serve_listeners(handler, listeners)

    ``SIGHUP`` restarts (see :meth:`restart`), ``SIGTERM`` and ``SIGINT`` shut down (see
    :meth:`shutdown`). The drain waits for the leases and for the body of the
    ``async with`` to return; at ``drain_timeout`` what is left is cancelled, and
    :func:`open` absorbs that cancellation and returns normally.
    """

    _options: Options
    _nursery: trio.Nursery
    _log: PrefixLog
    _upstream: Upstream
    """Who handed this process the service, and what it says since."""
    _listeners: ListenerRegistry
    _charge: Charge
    """The duties of the process in charge: systemd, the pid file, the control socket."""
    _machine: StateMachine = attrs.field(factory=StateMachine)
    _leases: LeaseCounter = attrs.field(factory=LeaseCounter)
    _handed_to: Successor | None = None
    """The successor this process handed over to (its channel and pidfd, until the end)."""
    _handed_over: bool = False
    """Set once this process handed the service to a successor: from then on it says no
    goodbye, and leaves the pid file (which the successor rewrites) alone."""
    _shutdown_requests: int = 0
    _pid: int = attrs.field(factory=os.getpid)
    _started_at: float = attrs.field(factory=time.time)
    _restarts: Restarts = attrs.field(init=False)
    """This process's restarts, and those of its predecessors (handed on at commit)."""
    _gate: Gate = attrs.field(init=False)
    """The accept loops' cancel scopes: closed when this process stops accepting."""
    _drain: Drain = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._restarts = Restarts(self, self._pid, self._log, self._nursery)
        self._gate = Gate(self._machine, self._leases, self._log, self.ready)
        timeout = self._options.drain_timeout
        self._drain = Drain(
            self._log, self._leases, timeout, self._nursery, self._charge, self._upstream
        )

    # -- what the application asks -------------------------------------------------------

    @property
    def state(self) -> State:
        """Where this process is in its life (see :class:`State`)."""
        return self._machine.state

    @property
    def state_value(self) -> AsyncValue:
        """The state as a :class:`trio_util.AsyncValue`, to wait for a change of it.

        For example, a readiness endpoint that says 503 the moment accepting stops::

            await gr.state_value.wait_value(lambda state: state not in ACCEPTING)
        """
        return self._machine.value

    @property
    def options(self) -> Options:
        """The options :func:`open` was given, validated."""
        return self._options

    @property
    def generation(self) -> int:
        """1 for a first start, and one more for each restart since."""
        return self._upstream.generation

    @property
    def predecessor_pid(self) -> int | None:
        """The pid of the process this one took over from, or None on a first start."""
        return self._upstream.predecessor

    @property
    def keeper_pid(self) -> int | None:
        """The pid of the keeper this process runs under (see :mod:`.keeper`), or None."""
        return self._upstream.keeper

    def statistics(self) -> Statistics:
        """A snapshot of the state, the leases held, the generation and the pids."""
        return Statistics(
            state=self.state,
            leases=self._leases.count,
            generation=self.generation,
            pid=self._pid,
            predecessor=self.predecessor_pid,
            successor=self._successor_pid(),
        )

    def _successor_pid(self) -> int | None:
        successor = self._restarts.successor or self._handed_to
        return successor.pid if successor else None

    def lease(self) -> LeaseCounter:
        """The lease for one unit of in-flight work: ``async with gr.lease(): ...``.

        The drain waits for every lease to be released. A lease may be taken after
        draining began (a request already accepted must finish); it is still counted.
        Work still under a lease when ``drain_timeout`` passes is cancelled.
        """
        return self._leases

    @contextmanager
    def accepting(self) -> Iterator[trio.CancelScope]:
        """A cancel scope for an accept loop, cancelled when this process stops accepting.

        That is for good (a shutdown, a committed handover) or for a successor's
        probation; then :meth:`wait_resumed` says whether to accept again. Entered while
        not accepting, it is cancelled at once. Never ``shutdown()`` a listener: the
        successor shares it. :meth:`accept_connections` does all this for you.

        Example::

            async with gr.lease(), trio.open_nursery() as handlers:  # the server's lease
                while True:
                    with gr.accepting():
                        await my_accept_loop(listeners, handler_nursery=handlers)
                    if not await gr.wait_resumed():
                        break
        """
        with self._gate.accepting() as scope:
            yield scope

    async def wait_resumed(self) -> bool:
        """After :meth:`accepting` was cancelled: True if this process accepts again.

        It waits while a successor is on probation: True if the successor died and this
        process accepts again, False once it stopped accepting for good.
        """
        return await self._gate.wait_resumed()

    @property
    def draining(self) -> bool:
        """True once this process has stopped accepting for good (see :meth:`wait_draining`)."""
        return self._drain.began

    @property
    def drain_reason(self) -> DrainReason | None:
        """Why this process stopped accepting for good, or None while it has not.

        ``"handover"``: a successor serves now, so a client may reconnect at once;
        ``"shutdown"``: the service is stopping, so a client should back off. A protocol
        tells its long-lived clients one or the other before it ends their connections.
        """
        if not self._drain.began:
            return None
        return "handover" if self._handed_over else "shutdown"

    async def wait_draining(self) -> DrainReason:
        """Return once this process has stopped accepting for good; say why
        (:attr:`drain_reason`).

        Use it as a server's shutdown trigger, e.g. hypercorn's ``shutdown_trigger``.
        """
        await self._drain.wait_began()
        return "handover" if self._handed_over else "shutdown"

    async def wait_predecessor(self) -> None:
        """Return once the predecessor has exited (at once if there is none, or under a
        keeper, which drains every generation itself).

        For example, to take over a resource only one process may hold at a time. The
        predecessor is named by the pidfd it passed, never by its pid, which may have
        been reused long since.
        """
        await self._upstream.wait_exited()

    async def open_tcp_listeners(
        self,
        port: int,
        *,
        host: str | None = None,
        backlog: int | None = None,
        name: str | None = None,
    ) -> list[trio.SocketListener]:
        """Listeners on TCP ``host``:``port``, handed over from the predecessor or bound now.

        Like :func:`trio.open_tcp_listeners`. The listener's name (default ``tcp:HOST:PORT``
        as asked, so port 0 keeps the port it got first) is how a successor finds it again.

        Raises:
            ListenerError: the address cannot be bound, or the inherited socket of that
                name is not a listening TCP socket.
        """
        socks = await self._listeners.tcp(port, host, backlog, name)
        for sock in socks:
            self._log.info("listening on tcp %s", describe_address(sock))
        self._charge.store(self._listeners)  # opened late: store it too
        return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in socks]

    async def open_unix_listener(
        self,
        path: str,
        *,
        mode: int | None = None,
        backlog: int | None = None,
        name: str | None = None,
    ) -> trio.SocketListener:
        """A listener on the unix socket ``path``, handed over or bound now.

        A stale socket file nobody listens on is replaced. The file is removed on the
        final shutdown only, never during a restart.

        Raises:
            ListenerError: something else is at ``path``, or another process listens there.
        """
        sock = self._listeners.unix(path, mode, backlog, name)
        self._log.info("listening on unix %s", sock.getsockname())
        self._charge.store(self._listeners)
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    def close_unclaimed(self) -> list[str]:
        """Close the inherited listeners this process has not opened again; their names.

        A listener the predecessor had and this program no longer opens is kept (and
        handed on to the next successor), because the application may open it late:
        closing it would refuse, or lose, the connections queued on it. Call this once
        every listener is open, to drop the ones a new configuration no longer has.
        """
        names = self._listeners.close_unclaimed()
        for name in names:
            self._log.info("closed inherited listener %s, which nobody opened", name)
        self._charge.unstore(names)
        return names

    def open_socket(self, name: str, create: Callable[[], socket.socket]) -> socket.socket:
        """A socket the application makes itself, handed over under ``name``.

        Returns the socket inherited under ``name``, or else ``create()``'s. Either way
        the next successor inherits it.
        """
        sock = self._listeners.custom(name, create)
        self._charge.store(self._listeners)
        return sock

    async def accept_connections(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        handler: Callable[[Any], Awaitable[object]],
        *,
        handler_nursery: trio.Nursery,
    ) -> None:
        """Accept on ``listeners`` while this process accepts, then close them.

        Each connection runs ``handler(stream)`` in ``handler_nursery``. Marks the
        process :meth:`ready` once the accept loops run. It pauses while a successor is
        on probation and accepts again if that successor dies; it returns once this
        process stopped accepting for good.
        """
        await self._gate.accept_connections(listeners, handler, handler_nursery=handler_nursery)

    async def serve_listeners(
        self,
        handler: Callable[[trio.SocketStream], Awaitable[object]],
        listeners: list[trio.SocketListener],
        *,
        handler_errors: Literal["log", "raise"] = "log",
    ) -> None:
        """Like :func:`trio.serve_listeners`, with each connection under a lease.

        Accepts until this process stops accepting (see :meth:`accept_connections`),
        marks the process :meth:`ready` once the accept loops run, and returns when the
        last handler has finished. The server itself holds one lease while it runs, so
        the drain also waits for a connection accepted an instant before accepting
        stopped.

        One client's failing handler never cuts the others: an exception a handler
        raises is logged at ERROR with its traceback, and ends that connection only,
        as every HTTP server does. ``handler_errors="raise"`` keeps trio's semantics
        instead: the exception ends the server and the :func:`open` body (and the
        process, unless the application catches it), logged at ERROR first.
        """
        await self._gate.serve_listeners(handler, listeners, handler_errors=handler_errors)

    # -- the story ---------------------------------------------------------------------

    def ready(self) -> None:
        """Say this process is serving: its listeners accept.

        A first start takes charge now (pid file, ``READY=1``, the watchdog). A successor
        tells its predecessor, which watches it through its probation and then hands
        over; a process under a keeper tells the keeper, with its sockets. Does nothing
        if the process is not starting. A pid file that cannot be written is a warning
        (and ``pid_file_error`` in the status), never a reason to stop serving.
        """
        if self.state is not State.STARTING:
            return
        self._machine.advance(State.SERVING)
        self._drain.served = True
        self._log.info("serving (generation %d)", self.generation)
        if self._upstream.first_start:
            self._take_charge()
        else:
            self._upstream.say_ready(self._listeners)
            self._nursery.start_soon(self._upstream.follow, self, self._restarts, self._listeners)

    async def restart(self) -> int:
        """Replace this process by a new copy of the program; return the new pid.

        Starts the successor with the listening sockets, waits for it to be ready, and
        watches it through its probation (see the ``probation`` option). Then this
        process hands over, drains, and ends the :func:`open` body; this call returns
        once the handover is committed.

        Raises:
            RestartUnavailableError: not serving (starting, restarting or draining), not
                yet in charge (a successor whose predecessor is still watching it), or
                under a keeper (restart the keeper instead).
            SuccessorStartError: the successor could not be started.
            SuccessorExitedError: it exited before it was ready, or during its probation.
            SuccessorTimeoutError: it was not ready within ``ready_timeout``; it was killed.
            RestartError: a shutdown began meanwhile and the restart was abandoned; or an
                unexpected error (``restart failed: unexpected error: ...``, logged with
                its traceback).

        In every error case this process keeps serving (unless it is shutting down).
        The restart runs in the library's nursery: cancelling the caller ends its wait
        only, and the restart goes on.
        """
        return (await self._restarts.call(Timeline("call"))).pid

    # The predecessor's part of the story (see _restart.Side).

    def _why_not(self) -> str | None:
        if (refusal := self._upstream.why_not_restart()) is not None:
            return refusal
        if self.state is not State.SERVING:
            return f"cannot restart while {self.state.value}"
        if not self._charge.taken:
            return f"predecessor {self.predecessor_pid} has not handed over yet (probation)"
        return None

    def _begin(self, timeline: Timeline) -> Launch:
        self._machine.advance(State.RESTARTING)
        self._log.info("restart requested: starting a successor")
        return self._charge.begin_restart(self._listeners)

    def _pause(self, successor: Successor) -> None:
        """The successor is ready: stop accepting, keep the sockets, watch it."""
        if self.state is not State.RESTARTING:  # a shutdown came in the same tick
            raise RestartError(f"restart abandoned: this process is {self.state.value}")
        self._machine.advance(State.PROBATION)
        self._gate.close()
        self._log.info("stopped accepting: successor %d is on probation", successor.pid)

    def _resume(self, error: SuccessorExitedError) -> None:
        """The successor died during its probation: accept again."""
        if self.state is State.PROBATION:
            self._log.error("restart failed, still serving: %s: accepting again", error)
            self._resume_serving(f"restart failed: {error}")

    def _commit(self, successor: Successor, ready: object, timeline: Timeline) -> None:
        """The point of no return: the successor is systemd's main process from now on."""
        if self.state is not State.PROBATION:  # a shutdown came while releasing it
            raise RestartError(f"restart abandoned: this process is {self.state.value}")
        self._machine.advance(State.DRAINING)
        self._charge.hand_over(successor.pid)  # MAINPID=, READY=1; no more watchdog pings
        timeline.mark("draining", leases=self._leases.count)
        self._restarts.conclude(timeline, "committed")  # now: the successor inherits it
        history = {"last_restart": self._restarts.last, "restarts": dict(self._restarts.counts)}
        with contextlib.suppress(OSError):  # it died already: systemd's problem now
            os.write(successor.channel.fileno(), encode_word(MAIN, history))
        self._log.info("handed over to successor %d", successor.pid)
        self._handed_over, self._handed_to = True, successor
        self._stop_accepting()
        if self._restarts.pending:
            self._restarts.pending = False
            self._log.info("passing the restart asked for meanwhile on to %d", successor.pid)
            successor.send_signal(signal.SIGHUP)

    def _retire(self, successor: Successor, ask: bool) -> None:
        """The restart was abandoned during the probation: let the successor stop."""
        self._leases.__enter__()  # now: the drain that begins in this tick must wait for it
        if ask:  # a shutdown abandoned the restart, or an error did
            self._log.info("asking successor %d on probation to stop", successor.pid)
            successor.send_signal(signal.SIGTERM)
        self._nursery.start_soon(self._stop_successor, successor)

    def _failed(self, error: RestartError) -> None:
        if self.state in (State.RESTARTING, State.PROBATION):
            self._log.error("restart failed, still serving: %s", error)
            self._resume_serving(f"restart failed: {error}")

    def _recorded(self, timeline: Timeline) -> None:
        if timeline.outcome == "failed" and not self._handed_over:
            # The outcome, for `graceful-restart restart --pid-file`.
            self._charge.write_pid_file(self._restarts.last)

    async def _stop_successor(self, successor: Successor) -> None:
        try:
            async with surviving(self._log, "following a retired successor"):
                await successor.wait_retired()
        finally:
            self._leases.__exit__(None, None, None)  # the lease retire took

    def shutdown(self, *, immediate: bool = False) -> None:
        """Stop accepting, drain the leases, and end the :func:`open` body.

        Harmless to call again. With ``immediate=True`` (or on the second shutdown signal)
        the drain is cut short: everything still running is cancelled now. A restart
        under way is abandoned: a successor not ready yet is killed, one on probation is
        asked to stop gracefully. After a committed handover it is a drain without
        goodbyes: the successor is in charge.
        """
        if self.state is State.STOPPED:
            return
        if self.state is not State.DRAINING:
            if self._restarts.abandon():
                self._log.warning("restart abandoned: shutting down")
            self._machine.advance(State.DRAINING)
            self._stop_accepting()
            if self._charge.taken and not self._handed_over:
                self._charge.say_goodbye(self._listeners, self._leases.count)
            elif not self._charge.taken:
                self._upstream.give_back()
        if immediate:
            self._log.warning("cutting the drain short: cancelling %d lease(s)", self._leases.count)
            self._nursery.cancel_scope.cancel()

    async def _body_ended(self) -> None:
        """The ``open()`` body returned or raised: this process serves no more.

        A successor that is starting or on probation is the only copy that can serve
        now: stopping it would leave nobody serving, so the handover commits as soon as
        it is ready, with no probation (under a keeper, the keeper does that when this
        generation exits). Anything else is a shutdown.
        """
        self._drain.body_ended()
        restarting = (State.RESTARTING, State.PROBATION)
        if self.state in restarting and self._restarts.under_way:  # ours
            self._log.warning(
                "this process stopped serving %s; no fallback",
                "during the probation: committing early"
                if self.state is State.PROBATION
                else "while its successor starts: committing as soon as it is ready",
            )
            self._restarts.cut_probation()
            longest = self._options.ready_timeout + 2 * LAUNCHER_GRACE  # the story's bounds
            with trio.move_on_after(longest):
                await self._machine.value.wait_value(lambda state: state not in restarting)
        elif self.state in restarting:  # the keeper's
            self._log.warning(
                "this generation stopped serving during a restart: the keeper's new "
                "generation takes over (no goodbyes); no fallback"
            )
            self._handed_over = True
        self.shutdown()

    # -- the steps ---------------------------------------------------------------------

    def _take_charge(self) -> None:
        """This process is the one in charge now (see :meth:`Charge.take`); a restart
        asked for meanwhile follows."""
        taken = self._charge.take(self._nursery, self, self._listeners, self._restarts.last)
        if taken and self.state is State.SERVING:
            self._restarts.follow_up()

    def _resume_serving(self, status: str) -> None:
        self._machine.advance(State.SERVING)
        self._charge.resume(status)

    def _stop_accepting(self) -> None:
        """For good: close the sockets (the successor, if any, holds its own) and drain."""
        self._drain.begin()
        self._charge.stop_control()
        self._gate.close()
        self._listeners.close()
        self._nursery.start_soon(self._drain.run)

    # -- what the keeper says (see _upstream.Follower) -----------------------------------

    def _keeper_paused(self, successor: str) -> None:
        self._machine.advance(State.PROBATION)
        self._gate.close()
        self._log.info("stopped accepting: the keeper's generation %s is on probation", successor)

    def _keeper_resumed(self) -> None:
        self._machine.advance(State.SERVING)

    def _keeper_handed_over(self) -> None:
        self._handed_over = True
        self._machine.advance(State.DRAINING)
        self._stop_accepting()

    # -- signals -------------------------------------------------------------------------

    def _on_restart_signal(self, sig: int) -> None:
        trigger = _signal_name(sig)
        if self._upstream.pass_on_restart(trigger):  # under a keeper: the keeper restarts
            return
        if self.state is State.SERVING and not self._charge.taken:
            self._log.info("%s: a restart will follow the one under way", trigger)
            self._restarts.pending = True  # carried out once in charge
        else:
            self._restarts.request(Timeline(trigger))

    def _on_shutdown_signal(self, sig: int) -> None:
        self._shutdown_requests += 1
        again = self._shutdown_requests > 1
        self._log.info("%s received%s", _signal_name(sig), " again" if again else "")
        self.shutdown(immediate=again)

    # -- the control socket (see _control) -----------------------------------------------

    def _control_status(self) -> Status:
        """What ``graceful-restart status`` shows (see ``_control``)."""
        predecessor = self.predecessor_pid
        return Status(
            pid=self._pid,
            main_pid=self._pid,  # what a stop waits for
            state=self.state.value,
            generation=self.generation,
            in_charge=self._charge.taken,
            uptime_s=round(time.time() - self._started_at, 3),
            leases=self._leases.count,
            keeper=self.keeper_pid,
            successor=self._successor_pid(),
            draining=(
                (Draining(predecessor, "predecessor"),)
                if predecessor and not self._upstream.exited
                else ()
            ),
            listeners=self._listeners.describe(),
            pid_file_error=self._charge.pid_file_error,
            restarts=dict(self._restarts.counts),
            last_restart=self._restarts.last,
        )

    def _control_restart(self, timeline: Timeline) -> float:
        """For the control socket: start a restart marked on ``timeline``."""
        self._restarts.request(timeline)
        return self._options.ready_timeout + self._options.probation + EXIT_GRACE

    def _control_stop(self, immediate: bool) -> None:
        """For the control socket: a graceful shutdown (logged, as a signal is)."""
        self._log.info("stop asked for on the control socket%s", " (immediate)" * immediate)
        self.shutdown(immediate=immediate)

    def _close(self, failure: Exception | None) -> None:
        """The last word of a process: release everything, say goodbye if in charge; and
        if an error ends it (``failure``), say so at ERROR, with the traceback."""
        if self.state is not State.DRAINING:  # the body failed before any drain began
            self._machine.advance(State.DRAINING)
        self._machine.advance(State.STOPPED)
        self._listeners.close()
        self._charge.close(self._handed_over)  # the pid file, unless handed over
        if self._handed_to is not None:
            self._handed_to.close()
        self._upstream.close()
        if failure is not None:
            self._log.error(
                "exiting on an error in the open() body, cutting %d lease(s)",
                self._leases.count,
                exc_info=failure,
            )
        else:
            self._log.info("exiting (%d lease(s) left)", self._leases.count)


def _signal_name(sig: int) -> str:
    return signal.Signals(sig).name


_active: GracefulRestart | None = None
"""The process's one GracefulRestart, while :func:`open` runs."""


@asynccontextmanager
async def open(**options: Unpack[OpenOptions]) -> AsyncIterator[GracefulRestart]:
    """Run a server that can be restarted and shut down gracefully.

    An async context manager yielding a :class:`GracefulRestart`. It must run in the
    main thread (it handles signals), once at a time. Its body runs inside a nursery the
    library owns, next to the signal task. Once a shutdown or a handover begins, the
    drain waits for the leases and for the body to return (the helpers that serve return
    once accepting stops and their connections are done, so cleanup written after them
    runs; a process that never said ready does not wait for its body); at
    ``drain_timeout``, or on a second shutdown signal, what is left is
    cancelled, and :func:`open` returns normally. If the body returns first the same
    shutdown runs; if it raises, the exception propagates unchanged (its cause and
    context intact).

    Args:
        **options: see :class:`Options` (``drain_timeout``, ``ready_timeout``,
            ``probation``, ``pid_file``, ``control``, ``restart_signals``,
            ``shutdown_signals``, ``command``, ``logger``, ``systemd``, ``fd_store``);
            type checkers know them (:class:`OpenOptions`) and reject a misspelt one.

    Raises:
        TypeError, ValueError: an option is wrong; the message names it.
        UsageError: not in the main thread, or another :func:`open` is running.
        PidFileError: the pid file's directory does not exist.
        InheritanceError: what a predecessor or systemd passed is malformed.

    Example::

        import graceful_restart_trio as graceful_restart

        async def main():
            async with graceful_restart.open(pid_file="/run/app.pid") as gr:
                listeners = await gr.open_tcp_listeners(8000)
                await gr.serve_listeners(handle_connection, listeners)

        trio.run(main)
    """
    global _active  # noqa: PLW0603 - one per process, by nature
    settings = Options(**options)
    check_main_thread()
    if _active is not None:
        raise UsageError("graceful_restart_trio.open() is already running in this process")
    if settings.pid_file is not None:
        check_pid_file(settings.pid_file)
    pid = os.getpid()
    log = PrefixLog(logging.getLogger(settings.logger), f"[pid {pid}]")
    notifier = Notifier.from_environ(os.environ) if settings.systemd else None
    upstream, listeners = Upstream.read(os.environ, log, pid)
    gr: GracefulRestart | None = None
    escaped: BaseException | None = None
    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            watchdog = watchdog_interval(os.environ, pid)
            charge = Charge(settings, log, notifier, watchdog, upstream, pid)
            gr = _active = GracefulRestart(
                options=settings,
                nursery=nursery,
                log=log,
                upstream=upstream,
                listeners=listeners,
                charge=charge,
            )
            handlers: dict[Any, Callable[[Any], None]] = {}
            handlers.update(dict.fromkeys(settings.restart_signals, gr._on_restart_signal))
            handlers.update(dict.fromkeys(settings.shutdown_signals, gr._on_shutdown_signal))
            await nursery.start(receive_signals, handlers, log)
            nursery.start_soon(upstream.watch, gr._restarts)
            charge.open_control(listeners)
            try:
                yield gr
            finally:
                with trio.CancelScope(shield=True):  # bounded: see _body_ended
                    await gr._body_ended()
    except BaseExceptionGroup as group:
        escaped = _unwrap(group)
        failure = group if escaped is None else escaped
        if escaped is None:
            raise
    finally:
        _active = None
        if gr is not None:
            gr._close(failure if isinstance(failure, Exception) else None)
        else:
            _close_unused(listeners, upstream, notifier)
    if escaped is not None:
        raise escaped  # outside the handler: its __cause__ and __context__ stay its own
    # The process is about to exit: spare it the interpreter's last full garbage
    # collection, which under load took longer than the whole drain (benchmarks/
    # http_restarts.py). Objects made from now on are collected as usual.
    gc.freeze()


def _close_unused(
    listeners: ListenerRegistry,
    upstream: Upstream,
    notifier: Notifier | None,
) -> None:
    """What :func:`open` took before it failed to start."""
    listeners.close()
    upstream.close()
    if notifier is not None:
        notifier.close()


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception a nursery wrapped, or one ``Cancelled`` if it is all cancellations."""
    only: BaseException = group.exceptions[0]
    if len(group.exceptions) == 1 and not isinstance(only, BaseExceptionGroup):
        return only
    leaves = _leaves(group)
    if leaves and all(isinstance(leaf, trio.Cancelled) for leaf in leaves):
        return leaves[0]
    return None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exception in group.exceptions:
        if isinstance(exception, BaseExceptionGroup):
            leaves += _leaves(exception)
        else:
            leaves.append(exception)
    return leaves
