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

from ._accepting import accept_forever
from ._control import serve as serve_control
from ._exceptions import (
    InheritanceError,
    PidFileError,
    RestartError,
    SuccessorExitedError,
    UsageError,
)
from ._handover import (
    DRAIN,
    ENV_VAR,
    MAIN,
    PAUSE,
    RESUME,
    Inheritance,
    LineReader,
    encode,
    encode_word,
    parse_history,
    parse_plain_ready,
    parse_word,
    read_inheritance,
    send_ready,
)
from ._leases import LeaseCounter
from ._listeners import ListenerRegistry
from ._logging import PrefixLog, surviving
from ._options import OpenOptions, Options
from ._pidfile import check_pid_file, remove_pid_file, write_pid_file
from ._restart import Launch, Restarts
from ._signals import check_main_thread, receive_signals
from ._state import ACCEPTING, State, StateMachine
from ._successor import LAUNCHER_GRACE, Successor, default_command
from ._systemd import (
    ACTIVATION_VARIABLES,
    WATCHDOG_VARIABLES,
    Notifier,
    listen_sockets,
    monotonic_usec,
    remove_stored_fds,
    run_watchdog,
    store_fds,
    watchdog_interval,
)
from ._timeline import Timeline

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup
if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DrainReason", "GracefulRestart", "Statistics", "open"]

DrainReason = Literal["handover", "shutdown"]
"""Why a process drains: see :attr:`GracefulRestart.drain_reason`."""

EXIT_GRACE = 5.0
"""Seconds systemd is asked to wait for a drain beyond ``drain_timeout``."""
BODY_NOTICE = 1.0
"""Seconds the drain waits for the ``open()`` body in silence, once the leases are done."""


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
    _notifier: Notifier | None
    _inheritance: Inheritance | None
    _listeners: ListenerRegistry
    _watchdog: float | None
    _machine: StateMachine = attrs.field(factory=StateMachine)
    _leases: LeaseCounter = attrs.field(factory=LeaseCounter)
    _accept_scopes: set[trio.CancelScope] = attrs.field(factory=set)
    _draining: trio.Event = attrs.field(factory=trio.Event)
    _body_done: trio.Event = attrs.field(factory=trio.Event)
    _served: bool = False
    """Set once the process said ready. A shutdown before it does not wait for the body
    (still starting: nothing was served), which is cancelled as soon as the leases are."""
    _in_charge: trio.Event = attrs.field(factory=trio.Event)
    """Set once this process is the one in charge: a first start once ready, a successor
    once its predecessor committed the handover (or is gone). Only then does it speak to
    systemd, write the pid file, say goodbyes, or restart."""
    _handed_to: Successor | None = None
    """The successor this process handed over to (its channel and pidfd, until the end)."""
    _handed_over: bool = False
    """Set once this process handed the service to a successor: from then on it says no
    goodbye, and leaves the pid file (which the successor rewrites) alone."""
    _predecessor_exited: trio.Event = attrs.field(factory=trio.Event)
    _pid_file_error: str | None = None
    _watchdog_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _shutdown_requests: int = 0
    _pid: int = attrs.field(factory=os.getpid)
    _started_at: float = attrs.field(factory=time.time)
    _control: trio.SocketListener | None = None
    _control_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _restarts: Restarts = attrs.field(init=False)
    """This process's restarts, and those of its predecessors (handed on at commit)."""

    def __attrs_post_init__(self) -> None:
        self._restarts = Restarts(self, self._pid, self._log, self._nursery)

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
        return self._inheritance.generation if self._inheritance else 1

    @property
    def predecessor_pid(self) -> int | None:
        """The pid of the process this one took over from, or None on a first start."""
        return self._inheritance.predecessor if self._inheritance else None

    @property
    def keeper_pid(self) -> int | None:
        """The pid of the keeper this process runs under (see :mod:`.keeper`), or None."""
        return self._inheritance.keeper if self._inheritance else None

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
        scope = trio.CancelScope()
        if self.state not in ACCEPTING:
            scope.cancel()
        self._accept_scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._accept_scopes.discard(scope)

    async def wait_resumed(self) -> bool:
        """After :meth:`accepting` was cancelled: True if this process accepts again.

        It waits while a successor is on probation: True if the successor died and this
        process accepts again, False once it stopped accepting for good.
        """
        return await self._machine.wait_leaving(State.PROBATION) in ACCEPTING

    @property
    def draining(self) -> bool:
        """True once this process has stopped accepting for good (see :meth:`wait_draining`)."""
        return self._draining.is_set()

    @property
    def drain_reason(self) -> DrainReason | None:
        """Why this process stopped accepting for good, or None while it has not.

        ``"handover"``: a successor serves now, so a client may reconnect at once;
        ``"shutdown"``: the service is stopping, so a client should back off. A protocol
        tells its long-lived clients one or the other before it ends their connections.
        """
        if not self._draining.is_set():
            return None
        return "handover" if self._handed_over else "shutdown"

    async def wait_draining(self) -> DrainReason:
        """Return once this process has stopped accepting for good; say why
        (:attr:`drain_reason`).

        Use it as a server's shutdown trigger, e.g. hypercorn's ``shutdown_trigger``.
        """
        await self._draining.wait()
        return "handover" if self._handed_over else "shutdown"

    async def wait_predecessor(self) -> None:
        """Return once the predecessor has exited (at once if there is none, or under a
        keeper, which drains every generation itself).

        For example, to take over a resource only one process may hold at a time. The
        predecessor is named by the pidfd it passed, never by its pid, which may have
        been reused long since.
        """
        await self._predecessor_exited.wait()

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
            self._log.info("listening on tcp %s", _address(sock))
        self._store_listeners()  # opened late: store it too
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
        self._store_listeners()
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
        notifier = self._fd_store()
        if notifier is not None:
            remove_stored_fds(notifier, names)
        return names

    def open_socket(self, name: str, create: Callable[[], socket.socket]) -> socket.socket:
        """A socket the application makes itself, handed over under ``name``.

        Returns the socket inherited under ``name``, or else ``create()``'s. Either way
        the next successor inherits it.
        """
        sock = self._listeners.custom(name, create)
        self._store_listeners()
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
        try:
            while True:
                with self.accepting():
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(accept_forever, listener, handler, handler_nursery)
                        self.ready()
                if not await self.wait_resumed():
                    return
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)  # close() only, never shutdown()

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

        async def leased(stream: trio.SocketStream) -> None:
            async with self._leases:
                try:
                    await handler(stream)
                except Exception:
                    if handler_errors == "raise":
                        self._log.exception("a connection's handler failed: the server ends")
                        raise
                    self._log.exception(
                        "a connection's handler failed: that connection is closed, "
                        "the others are served on"
                    )

        async with self._leases, trio.open_nursery() as handlers:
            await self.accept_connections(listeners, leased, handler_nursery=handlers)

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
        self._served = True
        self._log.info("serving (generation %d)", self.generation)
        if self._inheritance is None:
            self._take_charge()
            return
        keeper = self.keeper_pid is not None
        try:
            send_ready(self._inheritance.channel, self._listeners.handover() if keeper else None)
        except OSError as error:
            self._log.warning("cannot say ready: %s", error)
        self._nursery.start_soon(self._follow_channel)

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
        if self.keeper_pid is not None:
            return (
                f"this process runs under a keeper (pid {self.keeper_pid}): "
                "send SIGHUP to the keeper to restart"
            )
        if self.state is not State.SERVING:
            return f"cannot restart while {self.state.value}"
        if not self._in_charge.is_set():
            return f"predecessor {self.predecessor_pid} has not handed over yet (probation)"
        return None

    def _begin(self, timeline: Timeline) -> Launch:
        self._machine.advance(State.RESTARTING)
        self._log.info("restart requested: starting a successor")
        self._notify(
            RELOADING=1,
            MONOTONIC_USEC=monotonic_usec(),
            STATUS="restarting",
            EXTEND_TIMEOUT_USEC=_usec(self._options.ready_timeout + self._options.probation),
        )
        handover = self._listeners.handover()
        # The watchdog goes to the successor only if it was ours; it will be main.
        dropped = ACTIVATION_VARIABLES + (
            WATCHDOG_VARIABLES if self._watchdog is None else ("WATCHDOG_PID",)
        )
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env[ENV_VAR] = encode(
            self.generation + 1,
            self._pid,
            [name for name, _ in handover],
            socket_files=self._listeners.socket_files(),
        )
        return Launch(
            command=self._options.command or default_command(),
            env=env,
            sockets=[fd for _, fd in handover],
            ready_timeout=self._options.ready_timeout,
            probation=self._options.probation,
            accept_ready=parse_plain_ready,
        )

    def _pause(self, successor: Successor) -> None:
        """The successor is ready: stop accepting, keep the sockets, watch it."""
        if self.state is not State.RESTARTING:  # a shutdown came in the same tick
            raise RestartError(f"restart abandoned: this process is {self.state.value}")
        self._machine.advance(State.PROBATION)
        self._cancel_accepting()
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
        self._notify(
            MAINPID=successor.pid,
            READY=1,
            STATUS=f"serving: generation {self.generation + 1} (pid {successor.pid})",
        )
        timeline.mark("draining", leases=self._leases.count)
        self._restarts.conclude(timeline, "committed")  # now: the successor inherits it
        history = {"last_restart": self._restarts.last, "restarts": dict(self._restarts.counts)}
        with contextlib.suppress(OSError):  # it died already: systemd's problem now
            os.write(successor.channel.fileno(), encode_word(MAIN, history))
        self._log.info("handed over to successor %d", successor.pid)
        self._handed_over, self._handed_to = True, successor
        self._watchdog_scope.cancel()
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
            self._write_pid_file()  # the outcome, for `graceful-restart restart --pid-file`

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
            if self._in_charge.is_set() and not self._handed_over:
                self._say_goodbye()
            elif self._inheritance is not None and not self._in_charge.is_set():
                # Not handed the service yet: tell the predecessor (or keeper), which
                # takes it back.
                with contextlib.suppress(OSError):
                    self._inheritance.channel.shutdown(socket.SHUT_WR)
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
        self._body_done.set()
        restarting = (State.RESTARTING, State.PROBATION)
        if self.state in restarting and self.keeper_pid is None:
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
        elif self.state in restarting:
            self._log.warning(
                "this generation stopped serving during a restart: the keeper's new "
                "generation takes over (no goodbyes); no fallback"
            )
            self._handed_over = True
        self.shutdown()

    # -- the steps ---------------------------------------------------------------------

    def _take_charge(self) -> None:
        """This process is the one in charge now: the watchdog, the control socket, the
        fd store, the pid file (whose failure is only a warning), then ``READY=1``."""
        if self._in_charge.is_set():
            return
        self._in_charge.set()
        if self.keeper_pid is None and self._notifier is not None and self._watchdog is not None:
            self._nursery.start_soon(self._run_watchdog)
        if self._control is not None:
            self._nursery.start_soon(self._serve_control)
        self._store_listeners()
        self._write_pid_file()  # before READY=1: a service manager may read it then
        if self._inheritance is None:  # a successor's READY=1 came with MAINPID=
            self._notify(READY=1, STATUS=f"serving: generation {self.generation} (pid {self._pid})")
        if self.state is State.SERVING:
            self._restarts.follow_up()

    def _write_pid_file(self) -> None:
        """Name this process in the pid file, with the last restart (``cli`` reads it)."""
        if self._options.pid_file is None:
            return
        try:
            write_pid_file(self._options.pid_file, self._pid, self._restarts.last)
        except PidFileError as error:
            self._pid_file_error = str(error)
            self._log.warning("%s; serving on without it", error)
        else:
            self._pid_file_error = None

    def _resume_serving(self, status: str) -> None:
        self._machine.advance(State.SERVING)
        self._notify(READY=1, STATUS=f"serving: generation {self.generation}; {status}")

    def _cancel_accepting(self) -> None:
        for scope in self._accept_scopes:
            scope.cancel()

    def _stop_accepting(self) -> None:
        """For good: close the sockets (the successor, if any, holds its own) and drain."""
        self._draining.set()
        self._control_scope.cancel()
        self._cancel_accepting()
        self._listeners.close()
        self._nursery.start_soon(self._drain)

    def _say_goodbye(self) -> None:
        """The last words of the process in charge (one that never was, says none)."""
        self._listeners.unlink_unix_paths(self._log)
        self._notify(
            STOPPING=1,
            STATUS=f"draining {self._leases.count} lease(s)",
            EXTEND_TIMEOUT_USEC=_usec(self._options.drain_timeout + EXIT_GRACE),
        )

    async def _drain(self) -> None:
        await trio.lowlevel.checkpoint()  # an error that ends the body cancels it: no drain
        self._log.info(
            "stopped accepting; draining %d lease(s) for at most %gs",
            self._leases.count,
            self._options.drain_timeout,
        )
        leases_released = None
        with trio.move_on_after(self._options.drain_timeout) as deadline:
            await self._leases.wait_idle()
            leases_released = trio.current_time()
            if (
                self._in_charge.is_set()
                and self.predecessor_pid
                and self.keeper_pid is None
                and not self._predecessor_exited.is_set()
            ):
                # Exit after it, so that a service manager that kills whatever is left
                # when the main process exits does not cut its drain short.
                self._log.info("waiting for predecessor %s to finish", self.predecessor_pid)
                await self.wait_predecessor()
            if self._served:  # its cleanup (a lifespan shutdown, say) completes
                with trio.move_on_after(BODY_NOTICE):
                    await self._body_done.wait()
                if not self._body_done.is_set():
                    self._log.info(
                        "the leases are released; waiting for the open() body to return "
                        "(still running in it: %s), at most until the drain deadline",
                        ", ".join(self._body_tasks()) or "the body itself",
                    )
                    await self._body_done.wait()
        if deadline.cancelled_caught:
            self._log.warning(
                "drain deadline passed: cancelling %d lease(s)%s",
                self._leases.count,
                " and the open() body" if self._served and not self._body_done.is_set() else "",
            )
        else:
            assert leases_released is not None
            after = (trio.current_time() - leases_released) * 1000
            self._log.info("drained (%.0f ms after the last lease was released)", after)
        self._nursery.cancel_scope.cancel()

    def _body_tasks(self) -> list[str]:
        """The names of the innermost tasks still running in the ``open()`` body."""
        names: list[str] = []
        tasks = [
            task
            for nursery in self._nursery.parent_task.child_nurseries
            if nursery is not self._nursery
            for task in nursery.child_tasks
        ]
        while tasks:
            task = tasks.pop()
            children = [child for n in task.child_nurseries for child in n.child_tasks]
            if children:
                tasks += children
            else:
                names.append(task.name)
        return sorted(names)

    async def _follow_channel(self) -> None:
        """A successor: follow what its predecessor (or keeper) says on the channel.

        ``main``: the handover is committed, this process is in charge. From a keeper
        also ``pause``, ``resume`` and ``drain``. The channel closing means the other
        side is gone: a successor of a process is then on its own, and in charge.
        """
        assert self._inheritance is not None
        async with surviving(self._log, "following the channel"):
            reader = LineReader(trio.socket.from_stdlib_socket(self._inheritance.channel.dup()))
            with reader.socket:
                while line := await reader.receive_line():
                    self._on_word(line)
            if self.keeper_pid is not None:
                self._log.warning("the keeper %s is gone", self.keeper_pid)
                return
            if not self._in_charge.is_set() and self.state is not State.STOPPED:
                self._log.warning("predecessor %s is gone: in charge", self.predecessor_pid)
                self._take_charge()
        if self.keeper_pid is None:
            await self._predecessor_exited.wait()
            for name in self._listeners.unclaimed():
                self._log.warning(
                    "inherited listener %s is not opened (yet): it is kept for a late open, "
                    "and handed on; gr.close_unclaimed() drops it",
                    name,
                )

    def _on_word(self, line: bytes) -> None:
        command, argument = parse_word(line)
        if command == MAIN and self.state is not State.STOPPED:
            self._log.info("handed the service: in charge")
            if argument:  # the keeper keeps its own
                self._inherit_history(argument)
            self._take_charge()
        elif command == PAUSE and self.state is State.SERVING:
            self._machine.advance(State.PROBATION)
            self._cancel_accepting()
            self._log.info(
                "stopped accepting: the keeper's generation %s is on probation", argument
            )
        elif command == RESUME and self.state is State.PROBATION:
            self._log.info("the keeper's new generation died: accepting again")
            self._machine.advance(State.SERVING)
        elif command == DRAIN and self.state in (State.SERVING, State.PROBATION):
            self._log.info("the keeper handed over to %s", argument)
            self._handed_over = True
            self._machine.advance(State.DRAINING)
            self._stop_accepting()

    async def _watch_predecessor(self) -> None:
        """Set :attr:`_predecessor_exited` when it exits (at once if there is none)."""
        if self._inheritance is not None and self.keeper_pid is None:
            await trio.lowlevel.wait_readable(self._inheritance.pidfd)
            last = self._restarts.last
            if last is not None:
                since = time.time() - last.get("requested_at", time.time())
                last["phases"]["old copy exited"] = round(since * 1000)
        self._predecessor_exited.set()

    async def _run_watchdog(self) -> None:
        """Ping systemd's watchdog while this process is the main one."""
        assert self._notifier is not None
        assert self._watchdog is not None
        with self._watchdog_scope:
            await run_watchdog(self._notifier, self._watchdog)

    def _on_restart_signal(self, sig: int) -> None:
        if self._inheritance is not None and self.keeper_pid is not None:
            self._log.info("%s: passing it on to the keeper %d", _signal_name(sig), self.keeper_pid)
            try:
                signal.pidfd_send_signal(self._inheritance.pidfd, signal.SIGHUP)
            except ProcessLookupError:
                self._log.error(
                    "%s ignored: the keeper %d is gone", _signal_name(sig), self.keeper_pid
                )
        elif self.state is State.SERVING and not self._in_charge.is_set():
            self._log.info("%s: a restart will follow the one under way", _signal_name(sig))
            self._restarts.pending = True  # carried out once in charge
        else:
            self._restarts.request(Timeline(_signal_name(sig)))

    def _on_shutdown_signal(self, sig: int) -> None:
        self._shutdown_requests += 1
        again = self._shutdown_requests > 1
        self._log.info("%s received%s", _signal_name(sig), " again" if again else "")
        self.shutdown(immediate=again)

    # -- the control socket (see _control) -----------------------------------------------

    def _control_status(self) -> dict[str, Any]:
        """What ``graceful-restart status`` shows (see ``_control``)."""
        predecessor = self.predecessor_pid
        return {
            "pid": self._pid,
            "main_pid": self._pid,  # what a stop waits for
            "state": self.state.value,
            "generation": self.generation,
            "in_charge": self._in_charge.is_set(),
            "uptime_s": round(time.time() - self._started_at, 3),
            "leases": self._leases.count,
            "keeper": self.keeper_pid,
            "successor": self._successor_pid(),
            "draining": (
                [{"pid": predecessor, "role": "predecessor"}]
                if predecessor and not self._predecessor_exited.is_set()
                else []
            ),
            "listeners": self._listeners.describe(),
            "pid_file_error": self._pid_file_error,
            "restarts": dict(self._restarts.counts),
            "last_restart": self._restarts.last,
        }

    async def _serve_control(self) -> None:
        assert self._control is not None
        with self._control_scope:
            async with surviving(self._log, "the control socket"):
                await serve_control(self._control, self, self._log, self._nursery)

    def _control_restart(self, timeline: Timeline) -> float:
        """For the control socket: start a restart marked on ``timeline``."""
        self._restarts.request(timeline)
        return self._options.ready_timeout + self._options.probation + EXIT_GRACE

    def _control_stop(self, immediate: bool) -> None:
        """For the control socket: a graceful shutdown (logged, as a signal is)."""
        self._log.info("stop asked for on the control socket%s", " (immediate)" * immediate)
        self.shutdown(immediate=immediate)

    def _open_control(self) -> None:
        path = self._options.control
        if path is None:
            return
        if self.keeper_pid is not None:
            self._log.info("control socket %s: the keeper %d has its own", path, self.keeper_pid)
            return
        sock = self._listeners.unix(str(path), 0o600, None, _CONTROL)
        self._control = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._log.info("control socket at %s", path)

    def _inherit_history(self, argument: str) -> None:
        """The restart record and counts the predecessor handed on with ``main``."""
        try:
            counts, self._restarts.last = parse_history(argument)
        except InheritanceError as error:
            self._log.warning("from the predecessor: %s", error)
        else:
            self._restarts.counts.update(counts)

    def _notify(self, **fields: str | int) -> None:
        if self._notifier is not None:
            self._notifier.send(fields)

    def _fd_store(self) -> Notifier | None:
        """Where to keep the listeners in systemd's fd store, if this process does."""
        wanted = self._options.fd_store
        if wanted is None:
            wanted = "FDSTORE" in os.environ
        return self._notifier if wanted and self.keeper_pid is None else None

    def _store_listeners(self) -> None:
        """Keep every listener in systemd's fd store, once this process is in charge.

        Storing a socket again is harmless: systemd keeps one copy.
        """
        notifier = self._fd_store()
        if notifier is not None and self._in_charge.is_set():
            store_fds(notifier, self._listeners.handover())

    def _close(self, failure: Exception | None) -> None:
        """The last word of a process: release everything, say goodbye if in charge; and
        if an error ends it (``failure``), say so at ERROR, with the traceback."""
        if self.state is not State.DRAINING:  # the body failed before any drain began
            self._machine.advance(State.DRAINING)
        self._machine.advance(State.STOPPED)
        self._listeners.close()
        if self._in_charge.is_set() and not self._handed_over and self._options.pid_file:
            # Never after a handover: the successor rewrites the file at about this time,
            # and a check-then-unlink here could remove its new file.
            remove_pid_file(self._options.pid_file, self._pid)
        if self._handed_to is not None:
            self._handed_to.close()
        if self._inheritance is not None:
            self._inheritance.channel.close()
            os.close(self._inheritance.pidfd)
        if self._notifier is not None:
            self._notifier.close()
        if failure is not None:
            self._log.error(
                "exiting on an error in the open() body, cutting %d lease(s)",
                self._leases.count,
                exc_info=failure,
            )
        else:
            self._log.info("exiting (%d lease(s) left)", self._leases.count)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


_CONTROL = "graceful-restart-control"
"""The control socket's name among the listeners handed over."""


def _usec(seconds: float) -> int:
    return int(seconds * 1_000_000)


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
    inheritance = read_inheritance(os.environ)
    if inheritance is not None:
        inherited = inheritance.listeners
        log.info(
            "generation %d, taking over from %s with %d listener(s)",
            inheritance.generation,
            inheritance.predecessor or f"nobody (under keeper {inheritance.keeper})",
            len(inherited),
        )
    else:
        inherited = listen_sockets(os.environ, pid)
    gr: GracefulRestart | None = None
    escaped: BaseException | None = None
    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            gr = _active = GracefulRestart(
                options=settings,
                nursery=nursery,
                log=log,
                notifier=notifier,
                inheritance=inheritance,
                listeners=ListenerRegistry(
                    inherited, inheritance.socket_files if inheritance else frozenset()
                ),
                watchdog=watchdog_interval(os.environ, pid),
            )
            handlers: dict[Any, Callable[[Any], None]] = {}
            handlers.update(dict.fromkeys(settings.restart_signals, gr._on_restart_signal))
            handlers.update(dict.fromkeys(settings.shutdown_signals, gr._on_shutdown_signal))
            await nursery.start(receive_signals, handlers, log)
            nursery.start_soon(gr._watch_predecessor)
            gr._open_control()
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
            _close_unused(inherited, inheritance, notifier)
    if escaped is not None:
        raise escaped  # outside the handler: its __cause__ and __context__ stay its own
    # The process is about to exit: spare it the interpreter's last full garbage
    # collection, which under load took longer than the whole drain (benchmarks/
    # http_restarts.py). Objects made from now on are collected as usual.
    gc.freeze()


def _close_unused(
    inherited: list[tuple[str, socket.socket]],
    inheritance: Inheritance | None,
    notifier: Notifier | None,
) -> None:
    """What :func:`open` took before it failed to start."""
    ListenerRegistry(inherited).close()
    if inheritance is not None:
        inheritance.channel.close()
        os.close(inheritance.pidfd)
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
