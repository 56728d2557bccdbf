"""The handover protocol between a process and its successor.

Theory of operation
-------------------

The predecessor starts the successor (through the launcher, see ``_successor``) with
these file descriptors:

* fd 3: its end of a private ``AF_UNIX`` stream socket pair, the *channel*;
* fd 4: a pidfd naming the predecessor (or the keeper), so that the successor can wait
  for it and signal it without ever naming another process by a reused pid;
* fd 5, 6, ...: the listening sockets, in the order the variable below lists them.

and one environment variable, :data:`ENV_VAR`, holding JSON::

    {"version": 1, "generation": 2, "predecessor": 4242, "channel": 3, "pidfd": 4,
     "listeners": [["tcp:127.0.0.1:8000", 5], ["unix:/run/app.sock", 6]],
     "socket_files": ["unix:/run/app.sock"]}

(``socket_files``: the unix listeners whose socket file the library created, and which
the last generation removes when it stops for good; a file systemd made is not listed.)

The successor reads and removes the variable as it starts, and trusts it only if the
channel is one end of a socket pair made by the predecessor (or keeper) the variable
names, and the pidfd names that process too. The predecessor makes the channel with
``socketpair()`` (see ``Successor.start``) and hands the other end to nobody; the kernel
says who made a pair (``SO_PEERCRED`` of a pair names the process that made it) and that
it is one: an ``AF_UNIX`` stream socket whose own name and peer's name are both empty.
A socket merely connected to one of the predecessor's unix listeners also has the
predecessor as its ``SO_PEERCRED``, but its peer's name is the listener's (a path, or an
abstract name); a connection the predecessor made to someone else's listener has that
listener's name as its own. So the variable cannot make us signal, wait for, or hand our
sockets to any process but the one that made our channel. (A secret in the variable
would add nothing: whoever forges the variable writes the secret too. Whoever may start
this program can still start it as the successor of a process of its own, with a pair
of its own: that gives it nothing a first start would not.)

The successor opens its listeners from the inherited sockets and, once they accept, writes
``ready\\n`` on the channel. The predecessor then stops accepting (the sockets
are shared, so nothing queued is lost) and watches the successor through its probation;
if it survives, the predecessor commits the handover, drains, and exits. If the channel
closes before ``ready`` came, the successor died.

Under a *keeper* (``"keeper": <pid>`` in the variable, see ``_keeper``) the keeper plays
the predecessor's part for every generation, and "predecessor" may be null. A generation
then says ready with the names of its listeners, ``ready ["tcp:...", ...]\\n``, and passes
the listening sockets along (``SCM_RIGHTS``), so that the keeper holds them for the next
generation. The keeper tells it ``main\\n`` once it is in charge; later ``pause\\n``
when a successor is ready (stop accepting, keep the sockets), then ``resume\\n`` if that
successor died during its probation, or ``drain <successor pid>\\n`` once the successor
took over.

A line on the channel is at most :data:`MAX_LINE` bytes (:class:`LineReader` refuses a
longer one); file descriptors that come along where none are expected are closed.

Without a keeper, once the predecessor has told systemd that the successor is the main
process (``MAINPID=``), it writes ``main\\n`` on the channel: only then is the successor
in charge: it writes the pid file, pings systemd's watchdog, and may restart in turn.
"""

from __future__ import annotations

import array
import json
import os
import socket
import stat
import struct
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, NoReturn, final

import attrs
import trio

from ._exceptions import InheritanceError

__all__ = [
    "DRAIN",
    "ENV_VAR",
    "MAIN",
    "MAX_LINE",
    "PAUSE",
    "READY",
    "RESUME",
    "Inheritance",
    "LineReader",
    "encode",
    "encode_word",
    "parse_history",
    "parse_plain_ready",
    "parse_ready",
    "parse_word",
    "read_inheritance",
    "send_ready",
]

ENV_VAR = "GRACEFUL_RESTART_TRIO"
VERSION = 1
READY = b"ready\n"
MAIN = "main"
"""To the successor: the handover is committed, it is in charge (with the restart
history as JSON when the predecessor is a process)."""
PAUSE = "pause"
"""Keeper to the serving generation: a successor (pid) is on probation: stop accepting."""
RESUME = "resume"
"""Keeper to the serving generation: the successor died: accept again."""
DRAIN = "drain"
"""Keeper to the serving generation: the successor (pid) took over: drain."""
MAX_LINE = 65536
"""The longest line (without its newline) a channel carries: far above any the library
says (a ready line naming 253 listeners, ``main`` with the restart record), far below
what could hurt the reader."""
_MAX_FDS = 253
"""``SCM_MAX_FD``: the most file descriptors one message can carry."""
_CHUNK = 4096
"""Bytes read from a channel at a time."""


@final
@attrs.frozen
class Inheritance:
    """What a successor receives from its predecessor."""

    generation: int
    predecessor: int | None
    channel: socket.socket
    listeners: list[tuple[str, socket.socket]]
    pidfd: int
    """Names the predecessor, or the keeper: whoever holds the other end of the channel."""
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
    listeners = [[name, 5 + index] for index, name in enumerate(listener_names)]
    data: dict[str, object] = {
        "version": VERSION,
        "generation": generation,
        "predecessor": predecessor,
        "channel": 3,
        "pidfd": 4,
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


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """The pid, uid and gid of the process at the other end of a unix socket."""
    pid, uid, gid = struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    )
    return pid, uid, gid


def _check_peer(channel: int, pidfd: int, peer: int | None) -> None:
    """Trust the variable only if ``channel`` is one end of a socket pair that ``peer``
    made, and ``pidfd`` names ``peer`` (see the module docstring for why that suffices).

    Whoever sets the variable could otherwise receive our listening sockets (with a
    keeper, on ``ready``) or have us signal any pid it names.
    """
    if peer is None:
        raise InheritanceError(f"{ENV_VAR}: names neither a predecessor nor a keeper")
    try:
        with socket.socket(fileno=os.dup(channel)) as sock:
            domain = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
            kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
            if (domain, kind) != (socket.AF_UNIX, socket.SOCK_STREAM):
                raise InheritanceError(
                    f"{ENV_VAR}: fd {channel} is not a unix stream socket: not handed over "
                    "by our predecessor"
                )
            names = sock.getsockname(), sock.getpeername()
            sender, _, _ = peer_credentials(sock)
    except OSError as error:
        raise InheritanceError(f"{ENV_VAR}: fd {channel} is not a channel: {error}") from None
    if any(names):
        raise InheritanceError(
            f"{ENV_VAR}: fd {channel} is a connection ({names[0]!r} to {names[1]!r}), not "
            "one end of a socket pair: not handed over by our predecessor"
        )
    named = _pidfd_pid(pidfd)
    if sender != peer or named != peer:
        raise InheritanceError(
            f"{ENV_VAR} names pid {peer}, but the channel was made by pid {sender} and the "
            f"pidfd names pid {named}: not handed over by our predecessor"
        )
    os.set_inheritable(pidfd, False)


def _pidfd_pid(fd: int) -> int | None:
    """The pid a pidfd names (from ``/proc/self/fdinfo``); None if ``fd`` is not a pidfd."""
    try:
        info = Path(f"/proc/self/fdinfo/{fd}").read_text()
    except OSError:
        return None
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key == "Pid":
            return int(value)
    return None


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
    pidfd = _int(data, "pidfd")
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
    fds = [channel_fd, pidfd, *(fd for _, fd in entries)]
    if min(fds) < 3:
        raise InheritanceError(f"{ENV_VAR}: file descriptors must be 3 or more: {fds}")
    if len(set(fds)) != len(fds):
        raise InheritanceError(f"{ENV_VAR}: file descriptors repeat: {fds}")
    for fd in fds:
        try:
            is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
        except (OSError, OverflowError):
            raise InheritanceError(f"{ENV_VAR}: fd {fd} is not open") from None
        if not is_socket and fd != pidfd:
            raise InheritanceError(f"{ENV_VAR}: fd {fd} is not a socket")
    peer = keeper or predecessor
    _check_peer(channel_fd, pidfd, peer)
    del environ[ENV_VAR]
    return Inheritance(
        generation=generation,
        predecessor=predecessor,
        channel=_socket(channel_fd),
        listeners=[(name, _socket(fd)) for name, fd in entries],
        pidfd=pidfd,
        keeper=keeper,
        socket_files=frozenset(socket_files),
    )


def encode_word(word: str, argument: object = None) -> bytes:
    """One channel line: ``word``, then ``argument`` (a pid, or JSON for anything else)."""
    if argument is None:
        return f"{word}\n".encode()
    text = (
        str(argument) if isinstance(argument, int) else json.dumps(argument, separators=(",", ":"))
    )
    return f"{word} {text}\n".encode()


def parse_word(line: bytes) -> tuple[str, str]:
    """The word and the argument of a channel line (see :func:`encode_word`)."""
    word, _, argument = line.decode(errors="replace").partition(" ")
    return word, argument


def parse_history(argument: str) -> tuple[dict[str, int], dict[str, Any] | None]:
    """The restart counts and the last restart a predecessor sent with ``main``.

    Raises:
        InheritanceError: it is not that.
    """
    try:
        history = json.loads(argument)
        counts = {str(k): int(v) for k, v in history["restarts"].items()}
        last = history["last_restart"]
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise InheritanceError(f"the restart history is unreadable: {error!r}") from None
    well_formed = (
        isinstance(last, dict)
        and isinstance(last.get("phases"), dict)
        and isinstance(last.get("requested_at"), (int, float))
    )
    return counts, last if well_formed else None


def parse_plain_ready(line: bytes, fds: list[int]) -> None:
    """A successor of a process says a plain ``ready``, with nothing attached.

    Raises:
        InheritanceError: it said something else (the fds are closed either way).
    """
    for fd in fds:
        os.close(fd)
    if line != READY.strip() or fds:
        raise InheritanceError(f"said {line[:200]!r} with {len(fds)} fd(s)")


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
    if line == READY.strip() and not sockets:
        return []
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


@final
@attrs.define(eq=False)
class LineReader:
    """Reads a channel line by line, with the file descriptors sent along (``SCM_RIGHTS``).

    A line is at most :data:`MAX_LINE` bytes; reading is linear in what arrives (each byte
    is searched for the newline once). Where no fds are expected, read with
    :meth:`receive_line` or :meth:`drop_until_closed`: they close any that come.

    Synopsis::

        reader = LineReader(trio.socket.from_stdlib_socket(sock))
        line, fds = await reader.receive()  # b"" once the other end has closed
        word = await reader.receive_line()  # the same, and any fds are closed
    """

    socket: trio.socket.SocketType
    _buffer: bytearray = attrs.field(factory=bytearray)
    _searched: int = 0
    """How many bytes at the start of the buffer hold no newline."""
    _fds: list[int] = attrs.field(factory=list)

    async def receive(self) -> tuple[bytes, list[int]]:
        """The next line (without its newline) and the fds that came since the last one.

        The fds are the caller's to close. b"" once the channel is closed. (The kernel
        may hand over a message's fds with bytes sent before it, in one read: they come
        with the line those bytes end.)

        Raises:
            InheritanceError: a line longer than :data:`MAX_LINE` bytes, or more fds than
                one message can carry. The fds received are closed, and what is buffered
                dropped: the channel is of no further use.
        """
        while (end := self._buffer.find(b"\n", self._searched)) < 0:
            self._searched = len(self._buffer)
            if self._searched > MAX_LINE:
                self._fail(f"a line longer than {MAX_LINE} bytes")
            data, cut = await self._receive_some()
            if cut:
                self._fail("sent more file descriptors than one message can carry")
            if not data:
                return b"", self._take_fds()
            self._buffer += data
        if end > MAX_LINE:
            self._fail(f"a line longer than {MAX_LINE} bytes")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._searched = 0
        return line, self._take_fds()

    async def receive_line(self) -> bytes:
        """The next line, from a channel that sends no fds: any that come are closed.

        Raises:
            InheritanceError: as :meth:`receive`.
        """
        line, fds = await self.receive()
        _close(fds)
        return line

    async def drop_until_closed(self) -> None:
        """Read and drop everything until the other end closes, closing any fds that come.

        For a channel on which nothing more is expected: its memory stays bounded.
        """
        self._buffer.clear()
        self._searched = 0
        self.close_fds()
        while (await self._receive_some())[0]:
            self.close_fds()
        self.close_fds()

    async def _receive_some(self) -> tuple[bytes, bool]:
        """What arrives next (b"" once closed), its fds added to ours; and whether the
        kernel had to drop fds (more than one message can carry)."""
        data, ancillary, flags, _ = await self.socket.recvmsg(
            _CHUNK, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % 4])
                self._fds += received
        return data, bool(flags & socket.MSG_CTRUNC)

    def _fail(self, why: str) -> NoReturn:
        self._buffer.clear()
        self._searched = 0
        self.close_fds()
        raise InheritanceError(why)

    def _take_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def close_fds(self) -> None:
        """Close the fds received and not yet returned."""
        _close(self._take_fds())


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
