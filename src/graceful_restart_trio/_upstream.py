"""The upstream: who handed this process the service, and what it says since.

Theory of operation
-------------------

A process is handed the service by one of three (see ``_handover`` for the channel):

- **nobody**: a first start (its sockets bound now, or systemd's) is in charge as soon
  as it is ready;
- **a predecessor**, the same program, which started this process: once ready, this
  process says ``ready`` on the channel and waits, serving, through its probation. The
  predecessor says ``main`` (with the restart history) once it handed the service over;
  if the channel closes first, the predecessor is gone and this process is in charge
  all the same. Its pidfd says when it has exited: this process ends its own drain only
  after that (:meth:`Upstream.outlive`), and only then warns about inherited listeners
  nobody opened;
- **a keeper** (``_keeper``), which plays the predecessor's part for every generation:
  this process says ``ready`` with its listening sockets attached; the keeper says
  ``main``, then ``pause`` (its next generation is on probation: stop accepting),
  ``resume`` (that generation died: accept again) or ``drain`` (it took over). The
  keeper restarts (a restart signal is passed on to it), answers the control socket,
  keeps the fd store and drains every generation itself.

What the words do to this process is its own (:class:`Follower`); a word that does not
fit the state it finds is ignored. A process that shuts down before it was handed the
service tells its upstream so by closing its end of the channel (:meth:`Upstream.give_back`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Protocol, final

import attrs
import trio

from ._exceptions import InheritanceError
from ._handover import (
    DRAIN,
    MAIN,
    PAUSE,
    RESUME,
    Inheritance,
    LineReader,
    parse_history,
    parse_word,
    read_inheritance,
    send_ready,
)
from ._listeners import ListenerRegistry
from ._logging import PrefixLog, surviving
from ._state import State
from ._systemd import listen_sockets

if TYPE_CHECKING:
    from ._restart import Restarts

__all__ = ["Follower", "Upstream"]


class Follower(Protocol):
    """What the upstream's words do to this process (:class:`GracefulRestart` plays it)."""

    @property
    def state(self) -> State:
        """Where this process is in its life."""

    def _take_charge(self) -> None:
        """``main``, or the predecessor is gone: this process is in charge now."""

    def _keeper_paused(self, successor: str) -> None:
        """``pause``: stop accepting, keep the sockets (from ``SERVING``)."""

    def _keeper_resumed(self) -> None:
        """``resume``: accept again (from ``PROBATION``)."""

    def _keeper_handed_over(self) -> None:
        """``drain``: the keeper's new generation serves; drain (from ``SERVING`` or
        ``PROBATION``)."""


@final
@attrs.define(eq=False)
class Upstream:
    """Who handed this process the service: nobody (``inheritance`` None), a
    predecessor, or a keeper; see the module docstring."""

    inheritance: Inheritance | None
    log: PrefixLog
    _exited: trio.Event = attrs.field(factory=trio.Event)
    _main_said: bool = False
    """The upstream said ``main`` and this process took charge."""

    @classmethod
    def read(
        cls, environ: MutableMapping[str, str], log: PrefixLog, pid: int
    ) -> tuple[Upstream, ListenerRegistry]:
        """This process's upstream, and the listening sockets handed to it: a
        predecessor's (or keeper's), or else systemd's (socket activation).

        Raises:
            InheritanceError: what a predecessor passed is malformed.
            SocketActivationError: what systemd passed is malformed.
        """
        inheritance = read_inheritance(environ)
        if inheritance is None:
            return cls(None, log), ListenerRegistry(listen_sockets(environ, pid))
        log.info(
            "generation %d, taking over from %s with %d listener(s)",
            inheritance.generation,
            inheritance.predecessor or f"nobody (under keeper {inheritance.keeper})",
            len(inheritance.listeners),
        )
        listeners = ListenerRegistry(inheritance.listeners, inheritance.socket_files)
        return cls(inheritance, log), listeners

    @property
    def first_start(self) -> bool:
        """Nobody handed the service over: this process is in charge once ready."""
        return self.inheritance is None

    @property
    def generation(self) -> int:
        return self.inheritance.generation if self.inheritance else 1

    @property
    def predecessor(self) -> int | None:
        return self.inheritance.predecessor if self.inheritance else None

    @property
    def keeper(self) -> int | None:
        return self.inheritance.keeper if self.inheritance else None

    @property
    def exited(self) -> bool:
        """The predecessor has exited (or there is none to wait for)."""
        return self._exited.is_set()

    async def wait_exited(self) -> None:
        await self._exited.wait()

    def why_not_restart(self) -> str | None:
        """Under a keeper, the keeper restarts, never this process."""
        if self.keeper is None:
            return None
        return (
            f"this process runs under a keeper (pid {self.keeper}): "
            "send SIGHUP to the keeper to restart"
        )

    def pass_on_restart(self, trigger: str) -> bool:
        """Under a keeper, pass a restart signal on to it (True); else False."""
        if self.inheritance is None or self.keeper is None:
            return False
        self.log.info("%s: passing it on to the keeper %d", trigger, self.keeper)
        try:
            signal.pidfd_send_signal(self.inheritance.pidfd, signal.SIGHUP)
        except ProcessLookupError:
            self.log.error("%s ignored: the keeper %d is gone", trigger, self.keeper)  # noqa: TRY400 - no traceback to tell
        return True

    def say_ready(self, listeners: ListenerRegistry) -> None:
        """Tell the predecessor that this process serves; the keeper, with the sockets."""
        assert self.inheritance is not None
        handover = listeners.handover() if self.keeper is not None else None
        try:
            send_ready(self.inheritance.channel, handover)
        except OSError as error:
            self.log.warning("cannot say ready: %s", error)

    async def follow(
        self, follower: Follower, restarts: Restarts, listeners: ListenerRegistry
    ) -> None:
        """Follow what the predecessor (or keeper) says on the channel.

        ``main``: the handover is committed, this process is in charge. From a keeper
        also ``pause``, ``resume`` and ``drain``. The channel closing means the other
        side is gone: a successor of a process is then on its own, and in charge.
        """
        assert self.inheritance is not None
        async with surviving(self.log, "following the channel"):
            reader = LineReader(trio.socket.from_stdlib_socket(self.inheritance.channel.dup()))
            with reader.socket:
                while line := await reader.receive_line():
                    self._on_word(follower, restarts, line)
            if self.keeper is not None:
                self.log.warning("the keeper %s is gone", self.keeper)
                return
            if not self._main_said and follower.state is not State.STOPPED:
                self.log.warning("predecessor %s is gone: in charge", self.predecessor)
                follower._take_charge()
        if self.keeper is None:
            await self._exited.wait()
            for name in listeners.unclaimed():
                self.log.warning(
                    "inherited listener %s is not opened (yet): it is kept for a late open, "
                    "and handed on; gr.close_unclaimed() drops it",
                    name,
                )

    def _on_word(self, follower: Follower, restarts: Restarts, line: bytes) -> None:
        word, argument = parse_word(line)
        state = follower.state
        if word == MAIN and state is not State.STOPPED:
            self.log.info("handed the service: in charge")
            if argument:  # the keeper keeps its own
                self._inherit_history(restarts, argument)
            self._main_said = True
            follower._take_charge()
        elif word == PAUSE and state is State.SERVING:
            follower._keeper_paused(argument)
        elif word == RESUME and state is State.PROBATION:
            self.log.info("the keeper's new generation died: accepting again")
            follower._keeper_resumed()
        elif word == DRAIN and state in (State.SERVING, State.PROBATION):
            self.log.info("the keeper handed over to %s", argument)
            follower._keeper_handed_over()

    def _inherit_history(self, restarts: Restarts, argument: str) -> None:
        """The restart record and counts the predecessor handed on with ``main``."""
        try:
            counts, restarts.last = parse_history(argument)
        except InheritanceError as error:
            self.log.warning("from the predecessor: %s", error)
        else:
            restarts.counts.update(counts)

    async def watch(self, restarts: Restarts) -> None:
        """Note when the predecessor exits (at once if there is none, or a keeper)."""
        if self.inheritance is not None and self.keeper is None:
            await trio.lowlevel.wait_readable(self.inheritance.pidfd)
            last = restarts.last
            if last is not None:
                since = time.time() - last.get("requested_at", time.time())
                last["phases"]["old copy exited"] = round(since * 1000)
        self._exited.set()

    async def outlive(self) -> None:
        """Wait for a predecessor still draining, so that a service manager that kills
        whatever is left when the main process exits does not cut its drain short."""
        if self.predecessor and self.keeper is None and not self._exited.is_set():
            self.log.info("waiting for predecessor %s to finish", self.predecessor)
            await self._exited.wait()

    def give_back(self) -> None:
        """A shutdown before this process was handed the service: tell the predecessor
        (or keeper), which takes it back."""
        if self.inheritance is not None:
            with contextlib.suppress(OSError):
                self.inheritance.channel.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if self.inheritance is not None:
            self.inheritance.channel.close()
            os.close(self.inheritance.pidfd)
