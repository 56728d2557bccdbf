"""The control socket: operators ask the process in charge for its status, a restart, a stop.

Theory of operation
-------------------

The socket is a unix stream socket (mode 0600) at the path of the ``control`` option (the
keeper's ``--control``). It is handed to every successor like a listener, so its path
never changes, and only the process in charge accepts on it (under the keeper, the
keeper).

One request per connection: one JSON object on one line, ``{"command": "status"}``,
``{"command": "restart"}`` or ``{"command": "stop", "immediate": false}``. The answer is
JSON lines: events as they happen (``{"event": "spawned", "ms": 12, "successor": 4242}``)
and one last line with ``"result"``: ``"ok"`` or ``"failed"``, with ``"reason"``.
``graceful-restart`` (:mod:`graceful_restart_trio.cli`) is the client.

Each connection, in this order:

1. At most :data:`MAX_CONNECTIONS` connections are served at once. One more is answered
   ``too many control connections (8)`` at once (what it already sent is dropped, nothing
   is waited for) and closed, holding no place: idle clients cannot use up the process's
   file descriptors, which a restart needs.
2. The peer is checked before anything is read: it is served only if ``SO_PEERCRED``
   says it is root or runs as this process's user. Another uid is answered
   ``uid N may not control this``; its input is then read and dropped until it closes,
   for at most :data:`LINGER` seconds (holding its place), so that it gets the refusal
   rather than a reset.
3. The request is read: at most :data:`MAX_REQUEST` bytes within :data:`READ_TIMEOUT`
   seconds. Anything that is not one JSON object on one line (too long, too slow,
   not UTF-8, nested too deep for the parser, not an object) is answered
   ``bad request: ...``.
4. The command runs against the process's state at that moment, also once a shutdown
   has begun.

Each connection is isolated: an error of the connection itself means the operator went
away and ends it quietly; any other error (the command's own, or a bug here) is logged
with its traceback, answered ``internal error: ...`` while the connection still works,
and ends that one conversation, never the serving process (or the keeper).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import partial
from typing import Any, Protocol

import trio

from ._accepting import accept_forever
from ._handover import peer_credentials
from ._logging import PrefixLog
from ._status import Status
from ._timeline import Timeline

__all__ = [
    "LINGER",
    "MAX_CONNECTIONS",
    "MAX_REQUEST",
    "READ_TIMEOUT",
    "Controlled",
    "Reply",
    "allowed_peer",
    "handle_connection",
    "serve",
]

MAX_CONNECTIONS = 8
"""How many control connections are served at once; more are refused at once."""
MAX_REQUEST = 4096
"""The longest request line, in bytes."""
READ_TIMEOUT = 10.0
"""Seconds a client has to send its request line."""
LINGER = 1.0
"""Seconds a refused peer has to close after its refusal, before the connection is closed."""
DISCARD_READS = 16
"""How many reads of what a peer over the cap already sent are dropped before closing."""

Reply = Callable[[dict[str, Any]], Awaitable[None]]
Command = Callable[[dict[str, Any], Reply], Awaitable[None]]


class _OperatorGone(Exception):  # noqa: N818 - an event, not a failure
    """The connection itself failed: the operator went away."""


class Controlled(Protocol):
    """What the process in charge (direct mode) or the keeper does for the commands."""

    def _control_status(self) -> Status:
        """The status."""

    def _control_restart(self, timeline: Timeline) -> float:
        """Start a restart marked on ``timeline`` (which it finishes, refused or not);
        return the longest it may take, in seconds."""

    def _control_stop(self, immediate: bool) -> None:
        """Begin a graceful stop (``immediate``: cut the drain short)."""


async def serve(
    listener: trio.SocketListener, target: Controlled, log: PrefixLog, nursery: trio.Nursery
) -> None:
    """Accept operators on ``listener`` until cancelled; each in ``nursery``.

    At most :data:`MAX_CONNECTIONS` are served at once (see the module docstring).
    """
    places = trio.CapacityLimiter(MAX_CONNECTIONS)
    commands: dict[str, Command] = {
        "status": lambda request, reply: _status(target, reply),
        "restart": lambda request, reply: _restart(target, reply),
        "stop": lambda request, reply: _stop(target, request, reply),
    }

    async def connection(stream: trio.SocketStream) -> None:
        await handle_connection(stream, commands, log, places)

    await accept_forever(listener, connection, nursery)


async def _status(target: Controlled, reply: Reply) -> None:
    await reply({"result": "ok", "status": target._control_status().as_json()})


async def _restart(target: Controlled, reply: Reply) -> None:
    status = target._control_status()
    await reply({"event": "requested", "pid": status.pid, "generation": status.generation})
    timeline = Timeline("control")
    events = timeline.watch()
    longest = target._control_restart(timeline)
    # Shielded: a drain that ends right after the commit must not cut the outcome off.
    # The timeline always finishes (a commit, a failure, or a shutdown abandons the
    # story); the deadline bounds an operator who stops reading.
    with trio.CancelScope(shield=True, deadline=trio.current_time() + longest):
        async for event in events:
            if event["event"] == "finished":
                ok = event["outcome"] == "committed"
                await reply({**event, "result": "ok" if ok else "failed"})
            else:
                await reply(event)


async def _stop(target: Controlled, request: dict[str, Any], reply: Reply) -> None:
    status = target._control_status()
    await reply({"event": "stopping", "pid": status.main_pid, "leases": status.leases})
    target._control_stop(bool(request.get("immediate", False)))
    await reply({"result": "ok", "pid": status.main_pid})


def allowed_peer(sock: socket.socket) -> tuple[bool, int]:
    """Whether the peer is root or our own user; and its uid."""
    _, uid, _ = peer_credentials(sock)
    return uid in (0, os.geteuid()), uid


async def handle_connection(
    stream: trio.SocketStream,
    commands: Mapping[str, Command],
    log: PrefixLog,
    places: trio.CapacityLimiter,
) -> None:
    """Serve one control connection, if one of ``places`` is free; nothing it raises leaves it.

    Cancellation goes through: the connection ends with the task group it runs in.
    """
    try:
        try:
            places.acquire_nowait()
        except trio.WouldBlock:
            await _refuse_at_once(stream, f"too many control connections ({places.total_tokens})")
            return
        try:
            await _converse(stream, commands, log)
        finally:
            places.release()
    except _OperatorGone:
        pass
    except Exception:
        log.exception("control: a connection failed")


async def _converse(
    stream: trio.SocketStream, commands: Mapping[str, Command], log: PrefixLog
) -> None:
    """Check the peer, read the request, run the command (see the module docstring)."""
    allowed, uid = allowed_peer(stream.socket)  # type: ignore[arg-type]
    if not allowed:
        log.warning("control: refused a peer with uid %d", uid)
        await _refuse(stream, f"uid {uid} may not control this")
        return
    try:
        request = await _read_request(stream)
    except _OperatorGone:
        raise
    except Exception as error:  # anything the request does to the parser is its own fault
        await _reply(stream, {"result": "failed", "reason": f"bad request: {error!r}"})
        return
    name = request.get("command")
    command = commands.get(str(name))
    if command is None:
        known = ", ".join(sorted(commands))
        reason = f"unknown command {name!r} (known: {known})"
        await _reply(stream, {"result": "failed", "reason": reason})
        return
    try:
        await command(request, partial(_reply, stream))
    except _OperatorGone:
        raise
    except Exception as error:
        log.exception("control: the %s command failed", name)
        await _reply(stream, {"result": "failed", "reason": f"internal error: {error!r}"})


@contextlib.contextmanager
def _operator_side() -> Iterator[None]:
    """Errors of the connection itself mean the operator went away."""
    try:
        yield
    except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
        raise _OperatorGone from error


async def _reply(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    with _operator_side():
        await stream.send_all(json.dumps(message).encode() + b"\n")


async def _refuse(stream: trio.SocketStream, reason: str) -> None:
    """Answer ``reason``, then drop the peer's input until it closes, for at most LINGER.

    A unix socket closed with unread input makes the peer's next read fail with
    ECONNRESET, and a peer that sends its request after the close gets EPIPE: this way
    the refusal arrives, then the end of the connection.
    """
    await _reply(stream, {"result": "failed", "reason": reason})
    with _operator_side():
        await stream.send_eof()
        with trio.move_on_after(LINGER):
            while await stream.receive_some(MAX_REQUEST):
                pass


async def _refuse_at_once(stream: trio.SocketStream, reason: str) -> None:
    """Answer ``reason``, and drop what the peer already sent without waiting for more.

    A connection over the cap may not hold its file descriptor any longer than that.
    """
    await _reply(stream, {"result": "failed", "reason": reason})
    with contextlib.suppress(OSError):  # BlockingIOError: nothing more has arrived
        for _ in range(DISCARD_READS):
            if not os.read(stream.socket.fileno(), MAX_REQUEST):
                break


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    data = b""
    with trio.fail_after(READ_TIMEOUT):
        while b"\n" not in data:
            with _operator_side():
                chunk = await stream.receive_some(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                raise ValueError(f"longer than {MAX_REQUEST} bytes")
    request = json.loads(data.split(b"\n", 1)[0] or b"null")
    if not isinstance(request, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 - the client's error, as a value
    return request
