"""Load for the restart tests: client threads hammering a server on 127.0.0.1.

Each client runs in a thread of its own until :class:`Load` tells it to stop (or it
reaches its request cap), and keeps a :class:`Tally` of what it saw: requests answered,
the pids that answered them, the allowed keep-alive retries, and every failure. A client
thread never raises: whatever goes wrong is a failure in its tally, for the test to
assert on once the threads are joined.

Also here: what ``/proc`` tells about a server process: whether it still holds the
listening socket (it can still accept), and how many fds it has besides its client
connections.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import os
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import attrs
import httpx

CLIENT_TIMEOUT = 10.0
"""Socket timeout of every client operation: a hang is a failure, not a stuck test."""

MAX_FAILURES = 20
"""A client stops after this many failures: enough to see the problem, not a flood."""

ECHO_LINE = b"x\n"


@attrs.define
class Tally:
    """What one client saw."""

    name: str
    requests: int = 0
    retries: int = 0
    pids: Counter[int] = attrs.field(factory=Counter)
    failures: list[str] = attrs.field(factory=list)


class Client(threading.Thread):
    """A load client: calls :meth:`once` in a loop until stopped or capped."""

    stop_on_failure = False
    pause = 0.0
    """Seconds between two requests: a bound on the rate (new connections use up ports)."""

    def __init__(self, name: str, port: int, stop: threading.Event, cap: int) -> None:
        super().__init__(name=name, daemon=True)
        self.port = port
        self.tally = Tally(name)
        self._stop_event = stop
        self._cap = cap

    def run(self) -> None:
        try:
            while self.tally.requests < self._cap and not self._stop_event.wait(self.pause):
                try:
                    pid = self.once()
                except Exception as error:
                    when = datetime.datetime.now().strftime("%H:%M:%S,%f")[:-3]  # as in the log
                    self.tally.failures.append(
                        f"{when} {self.name}, request {self.tally.requests + 1}: {error!r}"
                    )
                    self.reset()
                    if self.stop_on_failure or len(self.tally.failures) >= MAX_FAILURES:
                        break
                else:
                    self.tally.requests += 1
                    self.tally.pids[pid] += 1
        finally:
            self.reset()

    def once(self) -> int:
        """One request; return the pid that answered it."""
        raise NotImplementedError

    def reset(self) -> None:
        """Drop any connection kept between requests (after a failure, and at the end)."""


def read_response(response: http.client.HTTPResponse) -> int:
    """Read a demo answer to the end (a short body raises); return the pid in it."""
    body = response.read().decode()
    if response.status != 200 or not body.startswith("hello from pid "):
        raise AssertionError(f"unexpected answer: {response.status} {body!r}")
    return int(body.split()[-1])


class HttpOneShot(Client):
    """One ``GET /`` per new connection."""

    pause = 0.005

    def once(self) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT)
        try:
            connection.request("GET", "/")
            return read_response(connection.getresponse())
        finally:
            connection.close()


class HttpKeepAlive(Client):
    """``GET /`` over one connection reused for as long as the server keeps it open.

    RFC 9112 §9.3.1: a server may close a connection that is idle, and a client whose new
    request on a reused connection meets that close may retry it. Exactly that case (the
    request was sent on a connection that had served before, and no response byte came
    back) is retried once on a new connection and counted in ``retries``; every other
    error is a failure.
    """

    def __init__(self, name: str, port: int, stop: threading.Event, cap: int) -> None:
        super().__init__(name, port, stop, cap)
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT)

    def once(self) -> int:
        reused = self.connection.sock is not None  # None: closed, the request reconnects
        try:
            self.connection.request("GET", "/")
            response = self.connection.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            if not reused:
                raise
            self.connection.close()
            self.tally.retries += 1
            self.connection.request("GET", "/")
            response = self.connection.getresponse()
        return read_response(response)

    def reset(self) -> None:
        self.connection.close()


class Httpx(Client):
    """``GET path`` with one httpx client (HTTP/2 when ``http2``: h2c, or h2 over TLS).

    httpx is used as it is: no retry is added.
    """

    http2 = True
    path = "/"
    base = "http"
    verify: ssl.SSLContext | bool = True

    def __init__(self, name: str, port: int, stop: threading.Event, cap: int) -> None:
        super().__init__(name, port, stop, cap)
        self.client: httpx.Client | None = None
        self.versions: Counter[str] = Counter()
        self.answered_at = time.monotonic()

    def once(self) -> int:
        if self.client is None:
            self.client = httpx.Client(
                http1=not self.http2, http2=self.http2, timeout=CLIENT_TIMEOUT, verify=self.verify
            )
        try:
            response = self.client.get(f"{self.base}://127.0.0.1:{self.port}{self.path}")
        except httpx.RemoteProtocolError as error:  # say how long the connection was idle
            since = (time.monotonic() - self.answered_at) * 1000
            raise httpx.RemoteProtocolError(
                f"{error} ({since:.0f} ms after the last answer)"
            ) from error
        self.answered_at = time.monotonic()
        body = response.text
        if response.status_code != 200 or not body.startswith("hello from pid "):
            raise AssertionError(f"unexpected answer: {response.status_code} {body!r}")
        self.versions[response.http_version] += 1
        return int(body.split()[-1])

    def reset(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def echo(sock: socket.socket) -> int:
    """One line over an echo connection; return the pid in the answer ``b"<pid> x\\n"``."""
    sock.sendall(ECHO_LINE)
    received = b""
    while not received.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            raise ConnectionError(f"connection closed after {received!r}")
        received += chunk
    pid, _, rest = received.partition(b" ")
    if not pid.isdigit() or rest != ECHO_LINE:
        raise AssertionError(f"unexpected answer: {received!r}")
    return int(pid)


def echo_connect(port: int) -> socket.socket:
    """A new connection to the echo server."""
    return socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)


class EchoOneShot(Client):
    """One line per new connection."""

    pause = 0.005

    def once(self) -> int:
        with echo_connect(self.port) as sock:
            return echo(sock)


class EchoLongLived(Client):
    """Lines over one connection opened at the start and kept to the end.

    Every answer must come from the pid that answered the first one: a long-lived
    connection stays with the generation that accepted it, across restarts.
    """

    def __init__(self, name: str, port: int, stop: threading.Event, cap: int) -> None:
        super().__init__(name, port, stop, cap)
        self.sock = echo_connect(port)
        try:
            self.original = echo(self.sock)
        except BaseException:
            self.sock.close()
            raise

    def once(self) -> int:
        pid = echo(self.sock)
        if pid != self.original:
            raise AssertionError(f"answered by {pid}, not by {self.original}")
        return pid

    stop_on_failure = True  # a broken connection is not reopened: one failure says it all

    def reset(self) -> None:
        self.sock.close()


class Load:
    """Client threads started on entry, stopped and joined on exit."""

    def __init__(self, clients: Sequence[Client], stop: threading.Event) -> None:
        self.clients = list(clients)
        self._stop = stop

    def __enter__(self) -> None:
        for client in self.clients:
            client.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every client and wait for its thread (each is bounded by CLIENT_TIMEOUT)."""
        self._stop.set()
        for client in self.clients:
            client.join(CLIENT_TIMEOUT * 2 + 5)
        stuck = [client.name for client in self.clients if client.is_alive()]
        assert not stuck, f"load clients did not stop: {stuck}"

    @property
    def tallies(self) -> list[Tally]:
        return [client.tally for client in self.clients]

    def requests(self) -> int:
        """Requests answered so far, by every client together (read while running)."""
        return sum(client.tally.requests for client in self.clients)


def start_clients(
    factories: Sequence[tuple[str, Callable[[str, int, threading.Event, int], Client]]],
    port: int,
    cap: int,
) -> Load:
    """Make the clients (``(name, class)``), sharing one stop event; not started yet."""
    stop = threading.Event()
    clients: list[Client] = []
    try:
        for name, factory in factories:
            clients.append(factory(name, port, stop, cap))
    except BaseException:
        for client in clients:
            client.reset()
        raise
    return Load(clients, stop)


# -- what /proc says about a server process -------------------------------------------


def _tcp_listeners(port: int) -> set[str]:
    """The inodes of the sockets listening on TCP ``port`` (IPv4)."""
    inodes = set()
    with Path("/proc/net/tcp").open() as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def listener_inode(port: int) -> str:
    """The inode of the socket listening on ``port``: every generation shares it."""
    inodes = _tcp_listeners(port)
    assert len(inodes) == 1, f"listening sockets on port {port}: {inodes}"
    return inodes.pop()


def _fd_links(pid: int) -> list[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links


def holds_listener(pid: int, inode: str) -> bool:
    """Whether ``pid`` still has an fd on the listening socket, i.e. can still accept.

    Stricter than the "stopped accepting" log line, which the library writes when it
    *asks* the server to stop: the server's accept loop closes its own copy a moment later.
    """
    try:
        return f"socket:[{inode}]" in _fd_links(pid)
    except (FileNotFoundError, ProcessLookupError):  # it has exited
        return False


def fds_besides_connections(pid: int, listener: str) -> int:
    """``open_fds(pid)`` minus its TCP connections: what must not vary under load.

    Counts every fd that is not a socket, every unix socket (trio's wakeup pair, the
    handover channel) and every fd on the listening socket (inode ``listener``). Left
    out: the other sockets, i.e. the connections of the client load, whose number at
    any moment depends on the load, not on the server.
    """
    links = _fd_links(pid)
    with Path("/proc/net/unix").open() as table:
        next(table)
        unix = {f"socket:[{line.split()[6]}]" for line in table if len(line.split()) > 6}
    kept = {*unix, f"socket:[{listener}]"}
    return sum(1 for link in links if not link.startswith("socket:") or link in kept)


class LogTail:
    """Counts lines containing ``text`` in a growing log, reading only what is new."""

    def __init__(self, path: Path, text: str) -> None:
        self._path = path
        self._text = text.encode()
        self._offset = 0
        self._partial = b""
        self.count = 0

    def update(self) -> int:
        """Read what was appended since last time; return the count so far."""
        with self._path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        self.count += sum(1 for line in lines if self._text in line)
        return self.count
