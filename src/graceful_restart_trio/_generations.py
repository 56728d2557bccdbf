"""What the keeper holds: the generations of the application it started, and the
listening sockets it keeps between them.

A :class:`Generation` is one process of the application, named by a pidfd (see
:class:`Successor`), so that no signal reaches another process that got its pid later.
:class:`HeldListeners` are the sockets every new process inherits: at first those
systemd passed the keeper (socket activation, the fd store), then those the last process
to take over sent with its ready (:func:`ready_listeners`).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import MutableMapping
from typing import final

import attrs
import trio

from ._exceptions import InheritanceError
from ._handover import encode_word, parse_ready
from ._listeners import describe_address
from ._status import Listener
from ._successor import Successor
from ._systemd import listen_sockets

__all__ = ["Generation", "HeldListeners", "Listeners", "close_listeners", "ready_listeners"]

Listeners = list[tuple[str, socket.socket]]

_logger = logging.getLogger("graceful_restart_trio.keeper")


@final
@attrs.define(eq=False)
class Generation:
    """One process of the application the keeper started, in one worker slot."""

    number: int
    successor: Successor
    worker: int | None = None
    """The worker slot it serves in (None without ``--workers``)."""
    status: int | None = None
    exited: trio.Event = attrs.field(factory=trio.Event)
    retiring: bool = False
    """A task follows it to its end (:meth:`Successor.wait_retired`), and closes it then."""

    @property
    def pid(self) -> int:
        """The process id (also its process group and session id)."""
        return self.successor.pid

    @property
    def role(self) -> str:
        """``generation N``, or ``worker W generation N``."""
        where = "" if self.worker is None else f"worker {self.worker} "
        return f"{where}generation {self.number}"

    def __str__(self) -> str:
        return f"{self.role} pid {self.pid}"

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` unless it has exited."""
        if self.status is None:
            self.successor.send_signal(sig)

    def tell(self, word: str, pid: int | None = None) -> None:
        """Say ``word`` on its channel (``main``, ``pause <pid>``, ``resume``, ``drain <pid>``)."""
        try:
            os.write(self.successor.channel.fileno(), encode_word(word, pid))
        except OSError as error:
            _logger.warning("cannot tell %s %r: %s", self, word, error)

    def reaped(self, status: int) -> None:
        """Record its exit status and wake whoever waits for it."""
        self.status = status
        if not self.retiring:  # else the retiring task still waits on its pidfd
            self.successor.close()
        self.exited.set()


@final
@attrs.define(eq=False)
class HeldListeners:
    """The listening sockets the keeper holds between generations, by name."""

    listeners: Listeners
    systemds: frozenset[str] = frozenset()
    """Names of the listeners systemd passed the keeper: their socket files are systemd's."""

    @classmethod
    def from_systemd(cls, environ: MutableMapping[str, str], pid: int) -> HeldListeners:
        """Those systemd passed to ``pid`` (see :func:`listen_sockets`).

        Raises:
            InheritanceError: ``LISTEN_FDS`` and its kin are malformed.
        """
        listeners = listen_sockets(environ, pid)
        return cls(listeners, frozenset(name for name, _ in listeners))

    def names(self) -> list[str]:
        return [name for name, _ in self.listeners]

    def fds(self) -> list[int]:
        return [sock.fileno() for _, sock in self.listeners]

    def socket_files(self) -> list[str]:
        """The unix listeners whose socket file is the application's to remove on the final
        stop: all but those systemd made (a predecessor says the same)."""
        return [
            name
            for name, sock in self.listeners
            if sock.family == socket.AF_UNIX and name not in self.systemds
        ]

    def describe(self) -> tuple[Listener, ...]:
        """Each listener's name and address, for the status."""
        return tuple(Listener(name, describe_address(sock)) for name, sock in self.listeners)

    def take_over(self, ready: Listeners) -> None:
        """A new generation serves: hold its listeners, close ours."""
        close_listeners(self.listeners)
        self.listeners = ready

    def close(self) -> None:
        close_listeners(self.listeners)
        self.listeners = []


def ready_listeners(line: bytes, fds: list[int]) -> Listeners:
    """The listening sockets a generation sent with ``ready [names]``, every one checked.

    Raises:
        InheritanceError: the line is not that, or an fd is not a socket (all are closed).
    """
    try:
        names = parse_ready(line, len(fds))
        for name, fd in zip(names, fds, strict=True):
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise InheritanceError(f"{name!r} (fd {fd}) is not a socket")  # noqa: TRY301
    except InheritanceError:
        for fd in fds:
            os.close(fd)
        raise
    # socket(fileno=) leaves O_NONBLOCK alone: the application shares that flag.
    return [(name, socket.socket(fileno=fd)) for name, fd in zip(names, fds, strict=True)]


def close_listeners(listeners: Listeners) -> None:
    for _, sock in listeners:
        sock.close()  # never shutdown(): a generation shares it
