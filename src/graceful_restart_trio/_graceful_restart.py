"""The story: start serving, restart into a successor, shut down, drain.

Theory of operation
-------------------

:func:`open` reads what this process inherited (a predecessor's sockets, or systemd's),
then runs the application's ``async with`` body inside a nursery of its own, next to the
signal task. Everything the application does in that body therefore runs inside the
nursery's cancel scope, which is how the drain deadline cancels work that outlives it:
leases themselves stay a bare counter.

A restart, top to bottom (:meth:`GracefulRestart.restart`):

1. start the successor: this program again, in its own session, with the listening
   sockets and a private channel (``_spawn``, ``_handover``);
2. wait until it writes ``ready`` on the channel, at most ``ready_timeout``; if it exits
   or times out, kill its session, report why, and go on serving as before;
3. tell systemd the successor is the main process now;
4. stop accepting here (the successor already accepts on the same sockets, so nothing
   queued is lost), drain the leases under ``drain_timeout``, and end the body.

A shutdown is steps 4 alone, plus the goodbyes a successor must not hear: ``STOPPING=1``
to systemd, removing the pid file and the unix socket files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any, final

import attrs
import trio

from ._exceptions import (
    RestartError,
    RestartUnavailableError,
    SuccessorExitedError,
    SuccessorStartError,
    SuccessorTimeoutError,
)
from ._handover import (
    ENV_VAR,
    MAIN,
    Inheritance,
    encode,
    read_inheritance,
    read_line,
    send_ready,
    wait_ready,
)
from ._leases import LeaseCounter
from ._listeners import ListenerRegistry, shared_dup
from ._logging import PrefixLog
from ._options import Options
from ._pidfile import check_pid_file, remove_pid_file, write_pid_file
from ._signals import check_main_thread, receive_signals
from ._spawn import Child, default_command, spawn, startup_directory
from ._state import State, StateMachine
from ._systemd import Notifier, listen_fds, monotonic_usec, run_watchdog, watchdog_interval

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["GracefulRestart", "Statistics", "open"]

EXIT_GRACE = 5.0
"""Seconds a successor that closed its channel gets to exit by itself before it is killed."""

_ACTIVATION = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID")
_WATCHDOG = ("WATCHDOG_USEC", "WATCHDOG_PID")


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
        successor: the process this one handed over to, or None.
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
    :meth:`shutdown`). The body of the ``async with`` ends by cancellation once the drain
    is over; :func:`open` absorbs that cancellation and returns normally.
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
    _restart_scope: trio.CancelScope | None = None
    _watchdog_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _shutdown_requests: int = 0
    _successor: int | None = None
    _served: bool = False
    _successor_channel: trio.socket.SocketType | None = None
    _pid: int = attrs.field(factory=os.getpid)

    # -- what the application asks -------------------------------------------------------

    @property
    def state(self) -> State:
        """Where this process is in its life (see :class:`State`)."""
        return self._machine.state

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

    def statistics(self) -> Statistics:
        """A snapshot of the state, the leases held, the generation and the pids."""
        return Statistics(
            state=self.state,
            leases=self._leases.count,
            generation=self.generation,
            pid=self._pid,
            predecessor=self.predecessor_pid,
            successor=self._successor,
        )

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

        Entered after accepting stopped, it is cancelled at once. Closing a listener when
        the loop ends is right (``SocketListener.aclose`` only closes this process's fd);
        never ``shutdown()`` it, the successor shares it.

        Example::

            with gr.accepting():
                await trio.serve_listeners(handler, listeners, handler_nursery=nursery)
        """
        scope = trio.CancelScope()
        if self._draining.is_set():
            scope.cancel()
        self._accept_scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._accept_scopes.discard(scope)

    async def wait_draining(self) -> None:
        """Return once this process has stopped accepting (shutdown or handover).

        Use it as a server's shutdown trigger, e.g. hypercorn's ``shutdown_trigger``.
        """
        await self._draining.wait()

    @property
    def keeper_pid(self) -> int | None:
        """The pid of the keeper this process runs under (see :mod:`.keeper`), or None."""
        return self._inheritance.keeper if self._inheritance else None

    async def wait_predecessor(self) -> None:
        """Return once the predecessor has exited (at once if there is none).

        For example, to take over a resource only one process may hold at a time.
        """
        if self.predecessor_pid is None:
            return
        try:
            pidfd = os.pidfd_open(self.predecessor_pid)
        except ProcessLookupError:
            return
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)

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
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    def open_socket(self, name: str, create: Callable[[], socket.socket]) -> socket.socket:
        """A socket the application makes itself, handed over under ``name``.

        Returns the socket inherited under ``name``, or else ``create()``'s. Either way
        the next successor inherits it.
        """
        return self._listeners.custom(name, create)

    async def serve_listeners(
        self,
        handler: Callable[[trio.SocketStream], Awaitable[object]],
        listeners: list[trio.SocketListener],
    ) -> None:
        """:func:`trio.serve_listeners`, with each connection under a lease.

        Accepts until this process stops accepting, marks the process :meth:`ready`
        once the accept loops run, and returns when the last handler has finished.
        The server itself holds one lease while it runs, so the drain also waits for a
        connection accepted an instant before accepting stopped.
        """

        async def leased(stream: trio.SocketStream) -> None:
            async with self._leases:
                await handler(stream)

        # The server holds a lease of its own until its last handler is done, so that a
        # connection accepted just before accepting stopped is drained, not cancelled.
        async with self._leases, trio.open_nursery() as handlers:
            with self.accepting():
                async with trio.open_nursery() as acceptors:
                    await acceptors.start(
                        partial(trio.serve_listeners, leased, listeners, handler_nursery=handlers)
                    )
                    self.ready()

    # -- the story ---------------------------------------------------------------------

    def ready(self) -> None:
        """Say this process is serving: its listeners accept.

        A successor tells its predecessor, which then hands over; a first start tells
        systemd. Writes the pid file, closes inherited listeners nobody asked for, and
        starts the systemd watchdog. Does nothing if the process is not starting.

        Raises:
            PidFileError: the pid file cannot be written.
        """
        if self.state is not State.STARTING:
            return
        if self._options.pid_file is not None:
            write_pid_file(self._options.pid_file, self._pid)
        self._served = True
        for name in self._listeners.close_unclaimed():
            self._log.warning("inherited listener %s was not opened again: closed it", name)
        self._machine.advance(State.SERVING)
        channel = self._inheritance.channel if self._inheritance else None
        keeper = self.keeper_pid is not None
        if channel is None:
            self._notify(READY=1, STATUS="serving")
        else:
            try:
                send_ready(channel, self._listeners.handover() if keeper else None)
            except OSError as error:
                self._log.warning("cannot say ready, predecessor gone: %s", error)
            if keeper:
                self._nursery.start_soon(self._follow_keeper, channel)
        if self._notifier is not None and self._watchdog is not None and not keeper:
            # A successor waits until its predecessor has made it systemd's main process.
            self._nursery.start_soon(self._run_watchdog, channel)
        self._log.info("serving (generation %d)", self.generation)

    async def restart(self) -> int:
        """Replace this process by a new copy of the program; return the new pid.

        Starts the successor with the listening sockets and waits for it to be ready.
        Then this process stops accepting, drains, and ends the :func:`open` body; this
        call returns as soon as the successor serves.

        Raises:
            RestartUnavailableError: not serving (starting, restarting or draining).
            SuccessorStartError: the successor could not be started.
            SuccessorExitedError: it exited before it was ready.
            SuccessorTimeoutError: it was not ready within ``ready_timeout``; it was killed.
            RestartError: a shutdown began meanwhile; the successor was killed.

        In every error case this process keeps serving (unless it is shutting down).
        """
        if self.keeper_pid is not None:
            raise RestartUnavailableError(
                f"this process runs under a keeper (pid {self.keeper_pid}): "
                "send SIGHUP to the keeper to restart"
            )
        if self.state is not State.SERVING:
            raise RestartUnavailableError(f"cannot restart while {self.state.value}")
        self._machine.advance(State.RESTARTING)
        self._log.info("restart requested: starting a successor")
        self._notify(
            RELOADING=1,
            MONOTONIC_USEC=monotonic_usec(),
            STATUS="restarting",
            EXTEND_TIMEOUT_USEC=_usec(self._options.ready_timeout),
        )
        self._restart_scope = trio.CancelScope()
        try:
            with self._restart_scope:
                successor, channel = await self._start_successor()
        except RestartError as error:
            if self._machine.state is State.RESTARTING:
                self._log.error("restart failed, still serving: %s", error)
                self._rollback(f"restart failed: {error}")
            raise
        except BaseException:  # cancelled: by shutdown(), or the caller's own scope
            self._abandon()
            raise
        finally:
            self._restart_scope = None
        if self._machine.state is not State.RESTARTING:
            self._abandon()
            raise RestartError("restart abandoned: this process is shutting down")
        self._successor = successor.pid
        self._notify(MAINPID=successor.pid, READY=1)
        with contextlib.suppress(OSError):  # it died already: its own problem now
            await channel.send(MAIN)
        self._log.info("successor %d is ready: handing over", successor.pid)
        self._begin_drain(handover=True)
        return successor.pid

    def shutdown(self, *, immediate: bool = False) -> None:
        """Stop accepting, drain the leases, and end the :func:`open` body.

        Harmless to call again. With ``immediate=True`` (or on the second shutdown signal)
        the drain is cut short: everything still running is cancelled now. A restart
        under way is abandoned and its successor killed.
        """
        if self.state is State.STOPPED:
            return
        if self.state is not State.DRAINING:
            if self._restart_scope is not None:
                self._restart_scope.cancel()
            self._begin_drain(handover=False)
        if immediate:
            self._log.warning("cutting the drain short: cancelling %d lease(s)", self._leases.count)
            self._nursery.cancel_scope.cancel()

    # -- the steps ---------------------------------------------------------------------

    async def _start_successor(self) -> tuple[Child, trio.socket.SocketType]:
        handover = self._listeners.handover()
        # The watchdog goes to the successor only if it was ours; it will be main.
        dropped = _ACTIVATION + (_WATCHDOG if self._watchdog is None else ("WATCHDOG_PID",))
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env[ENV_VAR] = encode(
            self.generation + 1,
            self._pid,
            [name for name, _ in handover],
            socket_files=self._listeners.socket_files(),
        )
        command = self._options.command or default_command()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = trio.socket.from_stdlib_socket(ours)
        with theirs:
            try:
                child = spawn(
                    command,
                    env=env,
                    cwd=startup_directory(),
                    fds=[theirs.fileno(), *(fd for _, fd in handover)],
                )
            except OSError as error:
                channel.close()
                raise SuccessorStartError(f"cannot start {command[0]!r}: {error}") from error
        self._log.info("successor %d started: %s", child.pid, " ".join(command))
        ready = False
        try:
            with trio.move_on_after(self._options.ready_timeout) as timeout:
                ready = await wait_ready(channel)
                if not ready:  # it closed the channel: it is on its way out
                    with trio.move_on_after(EXIT_GRACE):
                        await child.wait()
        finally:
            if not ready:
                channel.close()
                child.kill_session()
                with trio.CancelScope(shield=True):
                    await child.wait()
        if not ready:
            if timeout.cancelled_caught:
                raise SuccessorTimeoutError(
                    f"successor {child.pid} was not ready within "
                    f"{self._options.ready_timeout:g}s: killed it"
                )
            raise SuccessorExitedError(
                f"successor {child.pid} exited with status {child.returncode} before it was ready",
                child.returncode or 0,
            )
        self._successor_channel = channel  # closed when we exit
        self._nursery.start_soon(self._reap, child)
        return child, channel

    def _rollback(self, status: str) -> None:
        self._machine.advance(State.SERVING)
        self._notify(READY=1, STATUS=f"serving; {status}")

    def _abandon(self) -> None:
        if self.state is State.RESTARTING:
            self._log.warning("restart abandoned, successor stopped")
            self._rollback("restart abandoned")
        else:
            self._log.warning("restart abandoned, successor stopped: shutting down")

    def _begin_drain(self, *, handover: bool) -> None:
        self._machine.advance(State.DRAINING)
        self._draining.set()
        for scope in self._accept_scopes:
            scope.cancel()
        self._listeners.close()
        if handover:
            self._watchdog_scope.cancel()  # the successor is systemd's main process now
        else:
            if self._served:  # one that never served must not remove the server's files
                self._listeners.unlink_unix_paths()
            self._notify(
                STOPPING=1,
                STATUS=f"draining {self._leases.count} lease(s)",
                EXTEND_TIMEOUT_USEC=_usec(self._options.drain_timeout + EXIT_GRACE),
            )
        self._nursery.start_soon(self._drain)

    async def _drain(self) -> None:
        self._log.info(
            "stopped accepting; draining %d lease(s) for at most %gs",
            self._leases.count,
            self._options.drain_timeout,
        )
        with trio.move_on_after(self._options.drain_timeout) as deadline:
            await self._leases.wait_idle()
            if self.predecessor_pid is not None and _is_alive(self.predecessor_pid):
                # Exit after it, so that a service manager that kills whatever is left
                # when the main process exits does not cut its drain short.
                self._log.info("waiting for predecessor %d to finish", self.predecessor_pid)
                await self.wait_predecessor()
        if deadline.cancelled_caught:
            self._log.warning("drain deadline passed: cancelling %d lease(s)", self._leases.count)
        else:
            self._log.info("drained")
        self._nursery.cancel_scope.cancel()

    async def _reap(self, child: Child) -> None:
        try:
            returncode = await child.wait()
        finally:
            child.close()
        self._log.info("successor %d exited with status %d", child.pid, returncode)

    async def _follow_keeper(self, stdlib_channel: socket.socket) -> None:
        """Under a keeper: drain when it says a successor took over."""
        with trio.socket.from_stdlib_socket(shared_dup(stdlib_channel)) as channel:
            while line := await read_line(channel):
                command, _, argument = line.decode().partition(" ")
                if command == "drain" and self.state is State.SERVING:
                    self._successor = int(argument)
                    self._log.info("the keeper handed over to %s", argument)
                    self._begin_drain(handover=True)
        self._log.warning("the keeper %s is gone", self.keeper_pid)

    async def _run_watchdog(self, predecessor: socket.socket | None) -> None:
        """Ping systemd's watchdog, once this process is the main one."""
        assert self._notifier is not None
        assert self._watchdog is not None
        with self._watchdog_scope:
            if predecessor is not None:
                with trio.socket.from_stdlib_socket(shared_dup(predecessor)) as channel:
                    await read_line(channel)  # "main", or closed: either way we are main
            await run_watchdog(self._notifier, self._watchdog)

    def _on_restart_signal(self, sig: int) -> None:
        if self.keeper_pid is not None:
            self._log.info("%s: passing it on to the keeper %d", _signal_name(sig), self.keeper_pid)
            os.kill(self.keeper_pid, signal.SIGHUP)
        elif self.state is State.SERVING:
            self._nursery.start_soon(self._restart_quietly)
        else:
            self._log.info("%s ignored: %s", _signal_name(sig), self.state.value)

    async def _restart_quietly(self) -> None:
        try:
            await self.restart()
        except RestartUnavailableError as error:
            self._log.info("restart signal ignored: %s", error)
        except RestartError:
            pass  # logged by restart()

    def _on_shutdown_signal(self, sig: int) -> None:
        self._shutdown_requests += 1
        again = self._shutdown_requests > 1
        self._log.info("%s received%s", _signal_name(sig), " again" if again else "")
        self.shutdown(immediate=again)

    def _notify(self, **fields: str | int) -> None:
        if self._notifier is not None:
            self._notifier.send(fields)

    def _close(self) -> None:
        """The last word of a process: release everything, say goodbye if not handed over."""
        if self.state is not State.DRAINING:  # the body failed before any drain began
            self._machine.advance(State.DRAINING)
        self._machine.advance(State.STOPPED)
        self._listeners.close()
        if self._successor is None and self._options.pid_file is not None:
            remove_pid_file(self._options.pid_file, self._pid)  # only if it still names us
        if self._successor_channel is not None:
            self._successor_channel.close()
        if self._inheritance is not None:
            self._inheritance.channel.close()
        if self._notifier is not None:
            self._notifier.close()
        self._log.info("exiting (%d lease(s) left)", self._leases.count)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def _usec(seconds: float) -> int:
    return int(seconds * 1_000_000)


def _signal_name(sig: int) -> str:
    return signal.Signals(sig).name


@asynccontextmanager
async def open(
    **options: Any,  # noqa: ANN401 - validated by Options, which names a bad one
) -> AsyncIterator[GracefulRestart]:
    """Run a server that can be restarted and shut down gracefully.

    An async context manager yielding a :class:`GracefulRestart`. It must run in the
    main thread (it handles signals). Its body runs inside a nursery the library owns,
    next to the signal task; the body ends, by cancellation, once a shutdown or a handover
    has drained, and :func:`open` then returns normally. If the body ends by itself the
    same shutdown runs first; if it raises, the exception propagates unchanged.

    Args:
        **options: see :class:`Options` (``drain_timeout``, ``ready_timeout``,
            ``pid_file``, ``restart_signals``, ``shutdown_signals``, ``command``,
            ``logger``, ``systemd``).

    Raises:
        TypeError, ValueError: an option is wrong; the message names it.
        UsageError: not in the main thread.
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
    settings = Options(**options)
    check_main_thread()
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
        inherited = [(s.name, socket.socket(fileno=s.fd)) for s in listen_fds(os.environ, pid)]
    gr: GracefulRestart | None = None
    try:
        async with trio.open_nursery() as nursery:
            gr = GracefulRestart(
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
            await nursery.start(receive_signals, handlers)
            try:
                yield gr
            finally:
                gr.shutdown()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        if gr is not None:
            gr._close()
        else:
            ListenerRegistry(inherited).close()
            if inheritance is not None:
                inheritance.channel.close()
            if notifier is not None:
                notifier.close()
