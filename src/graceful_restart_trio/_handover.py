"""The handover protocol between a process and its successor.

Theory of operation
-------------------

The predecessor starts the successor with these file descriptors (see ``_spawn``):

* fd 3: its end of a private ``AF_UNIX`` stream socket pair, the *channel*;
* fd 4, 5, ...: the listening sockets, in the order the variable below lists them.

and one environment variable, :data:`ENV_VAR`, holding JSON::

    {"version": 1, "generation": 2, "predecessor": 4242, "channel": 3,
     "listeners": [["tcp:127.0.0.1:8000", 4], ["unix:/run/app.sock", 5]],
     "socket_files": ["unix:/run/app.sock"]}

(``socket_files``: the unix listeners whose socket file the library created, and which
the last generation removes when it stops for good; a file systemd made is not listed.)

The successor reads and removes the variable as it starts. It opens its listeners from
the inherited sockets and, once they accept, writes ``ready\\n`` on the channel. The
predecessor then stops accepting (the sockets are shared, so nothing queued is lost),
drains, and exits. If the channel closes before ``ready`` came, the successor died.

Under a *keeper* (``"keeper": <pid>`` in the variable, see ``_keeper``) the keeper plays
the predecessor's part for every generation, and "predecessor" may be null. A generation
then says ready with the names of its listeners, ``ready ["tcp:...", ...]\\n``, and passes
the listening sockets along (``SCM_RIGHTS``), so that the keeper holds them for the next
generation; later the keeper tells it ``drain <successor pid>\\n`` when a successor took
over.

Without a keeper, once the predecessor has told systemd that the successor is the main
process (``MAINPID=``), it writes ``main\\n`` on the channel: only then may the successor
speak to systemd as the main process (the watchdog pings, say).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import MutableMapping
from typing import Any, final

import attrs
import trio

from ._exceptions import InheritanceError

__all__ = [
    "ENV_VAR",
    "MAIN",
    "READY",
    "Inheritance",
    "encode",
    "parse_ready",
    "read_inheritance",
    "read_line",
    "send_ready",
    "wait_ready",
]

ENV_VAR = "GRACEFUL_RESTART_TRIO"
VERSION = 1
READY = b"ready\n"
MAIN = b"main\n"


@final
@attrs.frozen
class Inheritance:
    """What a successor receives from its predecessor."""

    generation: int
    predecessor: int | None
    channel: socket.socket
    listeners: list[tuple[str, socket.socket]]
    keeper: int | None = None
    socket_files: frozenset[str] = frozenset()


def encode(
    generation: int,
    predecessor: int | None,
    listener_names: list[str],
    keeper: int | None = None,
    socket_files: list[str] | None = None,
) -> str:
    """The value of :data:`ENV_VAR` for a successor started with the fd layout above."""
    listeners = [[name, 4 + index] for index, name in enumerate(listener_names)]
    data: dict[str, object] = {
        "version": VERSION,
        "generation": generation,
        "predecessor": predecessor,
        "channel": 3,
        "listeners": listeners,
        "socket_files": socket_files or [],
    }
    if keeper is not None:
        data["keeper"] = keeper
    return json.dumps(data, separators=(",", ":"))


def _socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    return sock


def _int(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InheritanceError(f"{ENV_VAR}: {key!r} is missing or not an integer")
    return value


def _optional_pid(data: dict[str, Any], key: str) -> int | None:
    if data.get(key) is None:
        return None
    pid = _int(data, key)
    if pid <= 0:
        raise InheritanceError(f"{ENV_VAR}: {key!r} is not a pid: {pid}")
    return pid


def read_inheritance(environ: MutableMapping[str, str]) -> Inheritance | None:
    """Read and remove :data:`ENV_VAR`; None when this process is a first start.

    Everything is checked before any socket is taken over, so a malformed variable
    is never half-applied.

    Raises:
        InheritanceError: the variable is malformed; the message says how.
    """
    raw = environ.get(ENV_VAR)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as error:
        raise InheritanceError(f"{ENV_VAR} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise InheritanceError(f"{ENV_VAR}: unknown format (expected version {VERSION})")
    generation = _int(data, "generation")
    predecessor = _optional_pid(data, "predecessor")
    keeper = _optional_pid(data, "keeper")
    channel_fd = _int(data, "channel")
    socket_files = data.get("socket_files", [])
    if not isinstance(socket_files, list) or not all(isinstance(n, str) for n in socket_files):
        raise InheritanceError(f"{ENV_VAR}: 'socket_files' is not a list of names")
    entries = data.get("listeners")
    if not isinstance(entries, list):
        raise InheritanceError(f"{ENV_VAR}: 'listeners' is missing or not a list")
    for entry in entries:
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], int)
        ):
            raise InheritanceError(f"{ENV_VAR}: bad listener entry {entry!r}")
    fds = [channel_fd, *(fd for _, fd in entries)]
    if min(fds) < 3:
        raise InheritanceError(f"{ENV_VAR}: file descriptors must be 3 or more: {fds}")
    if len(set(fds)) != len(fds):
        raise InheritanceError(f"{ENV_VAR}: file descriptors repeat: {fds}")
    for fd in fds:
        try:
            is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
        except (OSError, OverflowError):
            raise InheritanceError(f"{ENV_VAR}: fd {fd} is not open") from None
        if not is_socket:
            raise InheritanceError(f"{ENV_VAR}: fd {fd} is not a socket")
    del environ[ENV_VAR]
    return Inheritance(
        generation=generation,
        predecessor=predecessor,
        channel=_socket(channel_fd),
        listeners=[(name, _socket(fd)) for name, fd in entries],
        keeper=keeper,
        socket_files=frozenset(socket_files),
    )


async def wait_ready(channel: trio.socket.SocketType) -> bool:
    """Read the channel until the successor says ready (True) or closes it (False)."""
    received = b""
    while not received.endswith(b"\n"):
        chunk = await channel.recv(64)
        if not chunk:
            return False
        received += chunk
    return received == READY


def send_ready(channel: socket.socket, listeners: list[tuple[str, int]] | None) -> None:
    """Say ready; to a keeper (``listeners`` given), with the listening sockets attached."""
    if listeners is None:
        channel.sendall(READY)
        return
    names = json.dumps([name for name, _ in listeners]).encode()
    socket.send_fds(channel, [b"ready " + names + b"\n"], [fd for _, fd in listeners])


def parse_ready(line: bytes, sockets: int) -> list[str]:
    """The names in a ``ready [names]`` line (see :func:`send_ready`), one per socket sent.

    Raises:
        InheritanceError: the line is not that, or names more or fewer than ``sockets``.
    """
    command, _, argument = line.partition(b" ")
    try:
        names = json.loads(argument) if command == b"ready" else None
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise InheritanceError(f"said {line[:200]!r}, not 'ready [names]'")
    if len(names) != sockets:
        raise InheritanceError(f"named {len(names)} listener(s) but sent {sockets}")
    return names


async def read_line(channel: trio.socket.SocketType) -> bytes:
    """The next line the channel carries (without its newline); b"" once it is closed."""
    line = b""
    while not line.endswith(b"\n"):
        byte = await channel.recv(1)
        if not byte:
            return b""
        line += byte
    return line[:-1]
