"""The duties of the process in charge: the one systemd and the operators deal with.

Theory of operation
-------------------

One process of the service is *in charge* at a time: a first start once it is ready, a
successor once its predecessor committed the handover (or is gone). Only that process:

- pings systemd's watchdog, answers on the control socket, keeps the listeners in
  systemd's fd store (under a keeper, the keeper does these three itself);
- writes the pid file, *before* it says ``READY=1`` (a service manager may read the
  file then). A pid file that cannot be written is a warning (and ``pid_file_error`` in
  the status), never a reason to stop serving;
- tells systemd how things go: ``READY=1``, ``RELOADING=1`` while it restarts,
  ``MAINPID=`` with ``READY=1`` when it hands over (a successor's own ``READY=1`` comes
  that way), and the goodbyes when it shuts down: ``STOPPING=1``, the pid file and the
  unix socket files removed (never after a handover: the successor rewrites the pid file
  at about that time);
- starts successors: it knows what they inherit (:meth:`Charge.begin_restart`).

A notification never raises (see ``_systemd``), and no method here awaits: each duty
runs at an exact point of the story (``_graceful_restart``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, final

import attrs
import trio

from ._control import Controlled
from ._control import serve as serve_control
from ._exceptions import PidFileError
from ._handover import ENV_VAR, encode, parse_plain_ready
from ._listeners import ListenerRegistry
from ._logging import PrefixLog, surviving
from ._options import EXIT_GRACE, Options
from ._pidfile import remove_pid_file, write_pid_file
from ._restart import Launch
from ._successor import default_command
from ._systemd import (
    ACTIVATION_VARIABLES,
    WATCHDOG_VARIABLES,
    Notifier,
    monotonic_usec,
    remove_stored_fds,
    run_watchdog,
    store_fds,
)

if TYPE_CHECKING:
    from ._upstream import Upstream

__all__ = ["Charge"]

CONTROL_NAME = "graceful-restart-control"
"""The control socket's name among the listeners handed over."""


@final
@attrs.define(eq=False)
class Charge:
    """The duties of the process in charge (see the module docstring)."""

    options: Options
    log: PrefixLog
    notifier: Notifier | None
    watchdog: float | None
    """How often systemd's watchdog wants a ping, if it watches this process."""
    upstream: Upstream
    pid: int
    _taken: bool = False
    pid_file_error: str | None = None
    _watchdog_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _control: trio.SocketListener | None = None
    _control_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    @property
    def taken(self) -> bool:
        """This process is the one in charge."""
        return self._taken

    def open_control(self, listeners: ListenerRegistry) -> None:
        """Open the control socket (handed over like a listener); it serves once in charge."""
        path = self.options.control
        if path is None:
            return
        if self.upstream.keeper is not None:
            self.log.info(
                "control socket %s: the keeper %d has its own", path, self.upstream.keeper
            )
            return
        sock = listeners.unix(str(path), 0o600, None, CONTROL_NAME)
        self._control = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self.log.info("control socket at %s", path)

    def take(
        self,
        nursery: trio.Nursery,
        target: Controlled,
        listeners: ListenerRegistry,
        last_restart: dict[str, Any] | None,
    ) -> bool:
        """This process is the one in charge now: the watchdog, the control socket, the
        fd store, the pid file (whose failure is only a warning), then ``READY=1``.
        False if it already was."""
        if self._taken:
            return False
        self._taken = True
        if self.upstream.keeper is None and self.notifier is not None and self.watchdog is not None:
            nursery.start_soon(self._run_watchdog, self.notifier, self.watchdog)
        if self._control is not None:
            nursery.start_soon(self._serve_control, self._control, target, nursery)
        self.store(listeners)
        self.write_pid_file(last_restart)  # before READY=1: a service manager may read it then
        if self.upstream.first_start:  # a successor's READY=1 came with MAINPID=
            generation = self.upstream.generation
            self.notify(READY=1, STATUS=f"serving: generation {generation} (pid {self.pid})")
        return True

    def write_pid_file(self, last_restart: dict[str, Any] | None) -> None:
        """Name this process in the pid file, with the last restart (``cli`` reads it)."""
        if self.options.pid_file is None:
            return
        try:
            write_pid_file(self.options.pid_file, self.pid, last_restart)
        except PidFileError as error:
            self.pid_file_error = str(error)
            self.log.warning("%s; serving on without it", error)
        else:
            self.pid_file_error = None

    def notify(self, **fields: str | int) -> None:
        if self.notifier is not None:
            self.notifier.send(fields)

    def store(self, listeners: ListenerRegistry) -> None:
        """Keep every listener in systemd's fd store, once this process is in charge.

        Storing a socket again is harmless: systemd keeps one copy.
        """
        notifier = self._fd_store()
        if notifier is not None and self._taken:
            store_fds(notifier, listeners.handover())

    def unstore(self, names: list[str]) -> None:
        """Drop closed listeners from systemd's fd store."""
        notifier = self._fd_store()
        if notifier is not None:
            remove_stored_fds(notifier, names)

    def begin_restart(self, listeners: ListenerRegistry) -> Launch:
        """Tell systemd a restart begins; how to start the successor."""
        options = self.options
        self.notify(
            RELOADING=1,
            MONOTONIC_USEC=monotonic_usec(),
            STATUS="restarting",
            EXTEND_TIMEOUT_USEC=_usec(options.ready_timeout + options.probation),
        )
        handover = listeners.handover()
        # The watchdog goes to the successor only if it was ours; it will be main.
        dropped = ACTIVATION_VARIABLES + (
            WATCHDOG_VARIABLES if self.watchdog is None else ("WATCHDOG_PID",)
        )
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env[ENV_VAR] = encode(
            self.upstream.generation + 1,
            self.pid,
            [name for name, _ in handover],
            socket_files=listeners.socket_files(),
        )
        return Launch(
            command=options.command or default_command(),
            env=env,
            sockets=[fd for _, fd in handover],
            ready_timeout=options.ready_timeout,
            probation=options.probation,
            accept_ready=parse_plain_ready,
        )

    def resume(self, status: str) -> None:
        """The restart failed: this process serves on, and says so."""
        generation = self.upstream.generation
        self.notify(READY=1, STATUS=f"serving: generation {generation}; {status}")

    def hand_over(self, successor: int) -> None:
        """The successor is the main process from now on: systemd hears it, and this
        process pings the watchdog no more."""
        self.notify(
            MAINPID=successor,
            READY=1,
            STATUS=f"serving: generation {self.upstream.generation + 1} (pid {successor})",
        )
        self._watchdog_scope.cancel()

    def stop_control(self) -> None:
        """Answer no more on the control socket (it stopped accepting for good)."""
        self._control_scope.cancel()

    def say_goodbye(self, listeners: ListenerRegistry, leases: int) -> None:
        """The last words of the process in charge (one that never was, says none)."""
        listeners.unlink_unix_paths(self.log)
        self.notify(
            STOPPING=1,
            STATUS=f"draining {leases} lease(s)",
            EXTEND_TIMEOUT_USEC=_usec(self.options.drain_timeout + EXIT_GRACE),
        )

    def close(self, handed_over: bool) -> None:
        """The end: remove the pid file if this process is (still) the one it names."""
        if self._taken and not handed_over and self.options.pid_file:
            # Never after a handover: the successor rewrites the file at about this time,
            # and a check-then-unlink here could remove its new file.
            remove_pid_file(self.options.pid_file, self.pid)
        if self.notifier is not None:
            self.notifier.close()

    def _fd_store(self) -> Notifier | None:
        """Where to keep the listeners in systemd's fd store, if this process does."""
        wanted = self.options.fd_store
        if wanted is None:
            wanted = "FDSTORE" in os.environ
        return self.notifier if wanted and self.upstream.keeper is None else None

    async def _run_watchdog(self, notifier: Notifier, interval: float) -> None:
        """Ping systemd's watchdog while this process is the main one."""
        with self._watchdog_scope:
            await run_watchdog(notifier, interval)

    async def _serve_control(
        self, listener: trio.SocketListener, target: Controlled, nursery: trio.Nursery
    ) -> None:
        with self._control_scope:
            async with surviving(self.log, "the control socket"):
                await serve_control(listener, target, self.log, nursery)


def _usec(seconds: float) -> int:
    return int(seconds * 1_000_000)
