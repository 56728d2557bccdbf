"""The control socket: operators ask the process in charge for its status, a restart, a stop.

Theory of operation
-------------------

The socket is a unix stream socket (mode 0600) at the path of the ``control`` option (the
keeper's ``--control``). It is handed to every successor like a listener, so its path
never changes, and only the process in charge accepts on it (under the keeper, the
keeper). A peer is served only if ``SO_PEERCRED`` says it is root or runs as this
process's user.

One request per connection: one JSON object on one line, ``{"command": "status"}``,
``{"command": "restart"}`` or ``{"command": "stop", "immediate": false}``. The answer is
JSON lines: events as they happen (``{"event": "spawned", "ms": 12, "successor": 4242}``)
and one last line with ``"result"``: ``"ok"`` or ``"failed"``, with ``"reason"``.
``graceful-restart`` (:mod:`graceful_restart_trio.cli`) is the client.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import trio

from ._accepting import accept_forever
from ._handover import peer_credentials
from ._logging import PrefixLog
from ._timeline import Timeline

__all__ = ["MAX_REQUEST", "Controlled", "Reply", "allowed_peer", "handle_connection", "serve"]

MAX_REQUEST = 4096
Reply = Callable[[dict[str, Any]], Awaitable[None]]
Command = Callable[[dict[str, Any], Reply], Awaitable[None]]


class Controlled(Protocol):
    """What the process in charge (direct mode) or the keeper does for the commands."""

    def _control_status(self) -> dict[str, Any]:
        """The status: JSON values only."""

    def _control_restart(self, timeline: Timeline) -> float:
        """Start a restart marked on ``timeline`` (which it finishes, refused or not);
        return the longest it may take, in seconds."""

    def _control_stop(self, immediate: bool) -> None:
        """Begin a graceful stop (``immediate``: cut the drain short)."""


async def serve(
    listener: trio.SocketListener, target: Controlled, log: PrefixLog, nursery: trio.Nursery
) -> None:
    """Accept operators on ``listener`` until cancelled; each in ``nursery``."""
    commands: dict[str, Command] = {
        "status": lambda request, reply: _status(target, reply),
        "restart": lambda request, reply: _restart(target, reply),
        "stop": lambda request, reply: _stop(target, request, reply),
    }

    async def connection(stream: trio.SocketStream) -> None:
        await handle_connection(stream, commands, log)

    await accept_forever(listener, connection, nursery)


async def _status(target: Controlled, reply: Reply) -> None:
    await reply({"result": "ok", "status": target._control_status()})


async def _restart(target: Controlled, reply: Reply) -> None:
    status = target._control_status()
    await reply({"event": "requested", "pid": status["pid"], "generation": status["generation"]})
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
    await reply({"event": "stopping", "pid": status["main_pid"], "leases": status["leases"]})
    target._control_stop(bool(request.get("immediate", False)))
    await reply({"result": "ok", "pid": status["main_pid"]})


def allowed_peer(sock: socket.socket) -> tuple[bool, int]:
    """Whether the peer is root or our own user; and its uid."""
    _, uid, _ = peer_credentials(sock)
    return uid in (0, os.geteuid()), uid


async def handle_connection(
    stream: trio.SocketStream, commands: Mapping[str, Command], log: PrefixLog
) -> None:
    """Serve one control connection: check the peer, read the request, run the command."""

    async def reply(message: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(message).encode() + b"\n")

    async with stream:
        try:
            # The request is read first, also from a peer that is refused: closing with
            # unread input would reset the connection, and the refusal with it.
            request = await _read_request(stream)
            allowed, uid = allowed_peer(stream.socket)  # type: ignore[arg-type]
            if not allowed:
                log.warning("control: refused a peer with uid %d", uid)
                await reply({"result": "failed", "reason": f"uid {uid} may not control this"})
                return
            command = commands.get(str(request.get("command")))
            if command is None:
                known = ", ".join(sorted(commands))
                reason = f"unknown command {request.get('command')!r} (known: {known})"
                await reply({"result": "failed", "reason": reason})
                return
            await command(request, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the operator went away
        except (ValueError, trio.TooSlowError) as error:
            with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                await reply({"result": "failed", "reason": f"bad request: {error!r}"})


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    data = b""
    with trio.fail_after(10):
        while b"\n" not in data:
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
