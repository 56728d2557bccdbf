"""One HTTP/1.1 connection, parsed by ``httptools`` (llhttp), served in one trio task.

Theory of operation
-------------------

:class:`HTTP11Server` is the connection handler of :func:`graceful_restart_trio.asgi.serve`
on its default path. Each accepted stream gets a :class:`_Connection`: one trio task that
reads, parses, calls the ASGI application and writes the answer, with no task, channel or
cancel scope per request.

- **Parsing.** The connection is the parser's protocol object: ``on_url``,
  ``on_header``, ``on_headers_complete``, ``on_body`` and ``on_message_complete`` build
  :class:`_Request` objects and queue them in arrival order, so pipelined requests are
  answered in order and each body lands in its own request. Bytes are read only when
  someone needs them (the next request, or the application's ``receive()``), so a slow
  application stops the reading and TCP pushes back: what is buffered is bounded (one
  read past the request served; none while 32 requests wait behind it).
- **The rules** are small functions without I/O: :func:`refusal` (what a request's head
  must satisfy before the application sees it), :func:`response_head` (framing:
  ``content-length``, chunked, or until close; ``Connection: close``; no body for HEAD,
  1xx, 204 and 304) and :func:`frame` (a body piece on the wire).
- **Refused requests** are answered and the connection closed: 400 for what llhttp
  refuses (``Content-Length`` with ``Transfer-Encoding``, two ``Content-Length``\\ s, a bad
  chunk size, a ``Transfer-Encoding`` whose last coding is not chunked, obs-fold, a bare
  LF, a missing or repeated ``Host``), 414 for a request target over the limit, 431 for
  a header section over the limits, 413 for a body over ``max_body_size``, 404 for a
  ``Host`` not in ``server_names``, 505 for a version other than 1.0 and 1.1. An
  application that raises before its response gets a 500; after it, a close.
- **Keep-alive.** A response ends the connection (``Connection: close``) when the client
  asked for it, for HTTP/1.0 without keep-alive, when the body cannot be framed
  (HTTP/1.0 without a length), when the request body was not wholly received when the
  response started, after ``keep_alive_max_requests`` requests, and once the process has
  stopped accepting (a restart or a shutdown): the last answer of a draining connection
  says so.
- **Timeouts.** One cancel scope covers the connection, and no request moves a timer:
  the connection notes when it became idle, and
  :meth:`HTTP11Server.close_when_idle_too_long` (one task for all) cancels the scope of
  any connection idle for ``keep_alive_timeout``, checked four times per timeout (at
  most once a second). That also bounds a client that never finishes its headers.
- **I/O.** On a plain socket the connection reads and writes the fd itself: one system
  call per read or write when the socket is ready, a wait only when it is not, and a
  shielded checkpoint after a read that did not wait (others get their turn). After an
  answer, the others take their turn before the next read: under load the next request
  is there by then.
- **Draining.** When accepting stops, :meth:`HTTP11Server.close_idle_when_draining` moves
  the deadline of each idle connection that has served a request to ``H1_QUIET`` from
  now; a connection accepted an instant ago keeps waiting for its first request. When
  the deadline passes the connection waits its turn (a shared
  :class:`~graceful_restart_trio._http_connection.Pacer`) and closes, unless a request
  has arrived meanwhile, which is answered with ``Connection: close``. Closing is
  lingering (RFC 9112 §9.6): half-close, read and drop until the client closes, at most
  ``LINGER`` seconds. With ``idle_close="on-response"`` no deadline is moved: an idle
  connection waits for its next request, answered with ``Connection: close``, or for
  ``keep_alive_timeout``.
- **Hand-over to hypercorn.** HTTP/2 (TLS with ALPN ``h2``, h2c with prior knowledge,
  ``Upgrade: h2c``) and WebSocket upgrades (anything llhttp calls an upgrade) are served
  by hypercorn's protocol code: the request's head is rebuilt from what was parsed and
  given, with the bytes that followed it, to
  :meth:`~graceful_restart_trio._http_connection.HTTPConnection.serve_from`.
- **Each request holds a lease** of ``gr`` while the application runs.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from email.utils import formatdate
from http import HTTPStatus
from math import inf
from typing import Any, Final, final
from urllib.parse import unquote

import attrs
import httptools
import trio

from ._graceful_restart import GracefulRestart
from ._http_connection import (
    H1_QUIET,
    LINGER,
    MAX_RECV,
    HTTPConnection,
    IdleClose,
    Pacer,
    unread,
)
from ._hypercorn import Config, parse_socket_addr
from ._state import ACCEPTING

__all__ = ["HTTP11Server", "Limits", "ResponseHead", "frame", "refusal", "response_head"]

ASGICall = Callable[..., Awaitable[None]]
Message = MutableMapping[str, Any]

_log = logging.getLogger("graceful_restart_trio.asgi")
_ASGI: Final = {"version": "3.0", "spec_version": "2.4"}
_DISCONNECT: Final = {"type": "http.disconnect"}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS_LINES: Final = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())
    for status in HTTPStatus
}
_NO_BODY_STATUS: Final = frozenset({204, 304})
_PREFACE: Final = b"PRI * HTTP/2.0\r\n"
_QUEUED_AHEAD: Final = 32
"""Requests parsed ahead of the one served before reading stops (pipelining)."""

# Response body framing.
LENGTH: Final = 0
CHUNKED: Final = 1
NOTHING: Final = 2
UNTIL_CLOSE: Final = 3


@final
@attrs.frozen
class Limits:
    """What one request may send before it is refused.

    Attributes:
        max_head: bytes of header fields (names, values, separators) → 431.
        max_headers: header fields → 431.
        max_target: bytes of the request target (path and query) → 414.
        max_body: bytes of body, or None for no limit → 413.
        server_names: the ``Host`` values served, or empty for any → 404 (hypercorn's
            ``server_names``).
    """

    max_head: int = 16 * 1024
    max_headers: int = 100
    max_target: int = 8 * 1024
    max_body: int | None = None
    server_names: frozenset[bytes] = frozenset()


class _RefusedError(Exception):
    """Raised in a parser callback: the request breaks a :class:`Limits`."""


@final
class _Request:
    """One request as the parser saw it; its body pieces wait here until read."""

    __slots__ = (
        "body",
        "complete",
        "error",
        "expect_continue",
        "final_read",
        "handoff",
        "head_size",
        "headers",
        "keep_alive",
        "method",
        "queued",
        "received",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.expect_continue = False
        self.queued = False  # its head is complete: it is in the queue
        self.complete = False  # its body is complete
        self.body: list[bytes] = []
        self.received = 0
        self.final_read = False  # the app has had the last http.request
        self.error = 0  # a status to answer with instead of calling the application
        self.handoff: bytes | None = None  # hypercorn serves the rest of the connection


def refusal(request: _Request, limits: Limits) -> int:
    """The status that refuses ``request`` before the application sees it, or 0."""
    if request.version not in ("1.1", "1.0"):
        return 505
    hosts = 0
    host = b""
    for name, value in request.headers:
        if name == b"host":
            hosts += 1
            host = value
        elif (
            name == b"content-length"
            and limits.max_body is not None
            and (int(value) > limits.max_body)
        ):
            return 413
    if hosts > 1 or (hosts == 0 and request.version == "1.1"):
        return 400
    if limits.server_names and host not in limits.server_names:
        return 404
    return 0


_GET = _Request()
_GET.method = b"GET"


@final
@attrs.define
class ResponseHead:
    """A response's head on the wire and how its body is framed."""

    data: bytes
    framing: int
    length: int
    close: bool


def response_head(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    request: _Request,
    close: bool,
    date: bytes,
) -> ResponseHead:
    """The head of a response to ``request``; ``close`` asks for ``Connection: close``.

    Framing follows RFC 9112 §6: none for HEAD, 1xx, 204 and 304; the application's
    ``content-length``; else chunked for HTTP/1.1, or until close for HTTP/1.0. The
    application's own ``connection`` and ``transfer-encoding`` fields are replaced.

    Raises:
        ValueError: a header name or value holds CR or LF, or a bad content-length.
    """
    lines = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
    length = -1
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"connection":
            close = close or b"close" in value.lower()
        elif lowered != b"transfer-encoding":
            if lowered == b"content-length":
                length = _content_length(value)
            lines.append(b"%s: %s\r\n" % (name, value))
    framing = _framing(status, length, request)
    as_get = _framing(status, length, _GET) if request.method == b"HEAD" else framing
    if as_get == CHUNKED and request.version == "1.1":
        lines.append(b"transfer-encoding: chunked\r\n")  # for HEAD: what GET would have had
    close = close or framing == UNTIL_CLOSE
    if close:
        lines.append(b"connection: close\r\n")
    elif request.version == "1.0":
        lines.append(b"connection: keep-alive\r\n")
    lines.append(date)
    lines.append(b"\r\n")
    data = b"".join(lines)
    ends = len(lines) - (not date)  # each line has one CR LF: none in a name or value
    if data.count(b"\n") != ends or data.count(b"\r") != ends:
        raise ValueError("CR or LF in a response header")
    return ResponseHead(data, framing, length, close)


def _content_length(value: bytes) -> int:
    length = int(value)
    if length < 0:
        raise ValueError(f"bad content-length {value!r}")
    return length


def _framing(status: int, length: int, request: _Request) -> int:
    """How a response's body goes on the wire (RFC 9112 §6.3)."""
    if status in _NO_BODY_STATUS or status < 200 or request.method == b"HEAD":
        return NOTHING
    if length >= 0:
        return LENGTH
    return CHUNKED if request.version == "1.1" else UNTIL_CLOSE


def frame(framing: int, body: bytes, more: bool) -> bytes:
    """``body`` as it goes on the wire; ``more`` False ends the body."""
    if framing == CHUNKED:
        data = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        return data if more else data + b"0\r\n\r\n"
    if framing == NOTHING:
        return b""
    return bytes(body)


@final
class _Clock:
    """The ``date`` header line, made once a second."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = 0
        self.line = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.line = b"date: %s\r\n" % formatdate(now, usegmt=True).encode()
        return self.line


@final
@attrs.define(eq=False)
class HTTP11Server:
    """Serve accepted streams (plain or TLS) with the httptools connection.

    Call it with the stream, e.g. as the handler of
    :meth:`GracefulRestart.accept_connections`, and run :meth:`watch` beside the
    accept loop.
    """

    gr: GracefulRestart
    app: ASGICall  # (scope, receive, send)
    config: Config
    lifespan_state: dict[str, Any]
    pacer: Pacer
    fallback: HTTPConnection  # hypercorn's code, for HTTP/2 and upgrades
    limits: Limits = attrs.field(factory=Limits)
    idle_close: IdleClose = "prompt"  # as HTTPConnection.idle_close
    live: set[_Connection] = attrs.field(factory=set)
    clock: _Clock = attrs.field(factory=_Clock)

    async def __call__(self, stream: trio.abc.Stream) -> None:
        if isinstance(stream, trio.SSLStream):
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                with trio.move_on_after(LINGER):
                    await stream.aclose()
                return
            if stream.selected_alpn_protocol() == "h2":
                await self.fallback(stream)
                return
        try:
            connection = _Connection(self, stream)
        except OSError:  # gone already (getpeername: ENOTCONN)
            await trio.aclose_forcefully(stream)
            return
        await connection.run()

    async def watch(self) -> None:
        """Run beside the accept loop: the keep-alive timeouts and the drain policy."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.close_idle_when_draining)
            nursery.start_soon(self.close_when_idle_too_long)

    async def close_when_idle_too_long(self) -> None:
        """Close connections idle for ``keep_alive_timeout`` (checked a few times per
        timeout: a request moves no timer)."""
        timeout = self.config.keep_alive_timeout
        while True:
            await trio.sleep(max(0.01, min(1.0, timeout / 4)))
            now = trio.current_time()
            for connection in list(self.live):
                if connection.idle and now - connection.idle_since >= timeout:
                    connection.scope.cancel()

    async def close_idle_when_draining(self) -> None:
        """Each time accepting stops, let idle used connections close after ``H1_QUIET``."""
        state = self.gr.state_value
        while True:
            await state.wait_value(lambda value: value not in ACCEPTING)
            if self.idle_close == "on-response":
                return  # idle connections wait for their next answer, which closes them
            deadline = trio.current_time() + H1_QUIET
            for connection in list(self.live):
                if connection.idle and connection.used:
                    scope = connection.scope
                    scope.deadline = min(scope.deadline, deadline)
            await state.wait_value(lambda value: value in ACCEPTING)


@final
class _Connection:
    """The life of one connection; also the parser's protocol (its ``on_*`` methods)."""

    def __init__(self, server: HTTP11Server, stream: Any) -> None:  # noqa: ANN401 - a stream
        self.server = server
        self.stream = stream
        self.gr = server.gr
        self.limits = server.limits
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[_Request] = deque()
        self.parsing = _Request()
        self.request = self.parsing  # the one being served
        self.seen: list[bytes] | None = []  # the bytes before the first head (h2c preface)
        self.stopped = False  # the parser has stopped: nothing more is parsed
        self.eof = False  # the client closed its side (or the connection broke)
        self.broken = False  # writing failed: the client is gone
        self.lingering = False
        self.idle = True
        self.idle_since = trio.current_time()
        self.used = False
        self.prompt = server.idle_close == "prompt"
        self.served = 0
        self.scope = trio.CancelScope()
        self.lease = server.gr.lease()
        self.app = server.app
        self.receive = self._receive_message
        self.send = self._send_message
        # the response in progress
        self.started = False
        self.finished = False
        self.close = False
        self.head = b""
        self.framing = LENGTH
        self.remaining = 0
        tls = isinstance(stream, trio.SSLStream)
        sock = stream.transport_stream.socket if tls else stream.socket
        self.fd: int = sock.fileno() if isinstance(stream, trio.SocketStream) else -1
        self.scope_template: dict[str, Any] = {
            "type": "http",
            "asgi": _ASGI,
            "scheme": "https" if tls else "http",
            "root_path": server.config.root_path,
            "client": parse_socket_addr(sock.family, sock.getpeername()),
            "server": parse_socket_addr(sock.family, sock.getsockname()),
        }

    # -- the connection's life ------------------------------------------------------------

    async def run(self) -> None:
        server = self.server
        server.live.add(self)
        handoff: bytes | None = None
        try:
            try:
                while True:
                    with self.scope:
                        handoff = await self._serve_requests()
                        if handoff is None:
                            await self._linger()
                            return
                    if handoff is not None:
                        break
                    if self.lingering:
                        return  # for LINGER seconds: enough
                    # cancelled: the keep-alive timeout, or the drain's quiet has passed
                    if self.used and self.gr.state not in ACCEPTING:
                        await server.pacer.wait_turn()
                        if unread(self.stream):  # a request came as we closed: answer it
                            self.scope = trio.CancelScope()
                            continue
                    self.scope = trio.CancelScope()
                    with self.scope:
                        await self._linger()
                    return
            finally:
                server.live.discard(self)
            await server.fallback.serve_from(self.stream, handoff)
        finally:
            if handoff is None:
                await self._close_stream()

    async def _close_stream(self) -> None:
        if isinstance(self.stream, trio.SocketStream):
            self.stream.socket.close()  # the accept loop's aclose_forcefully follows
        else:
            with trio.move_on_after(LINGER):  # TLS: close_notify
                await self.stream.aclose()

    async def _serve_requests(self) -> bytes | None:
        """Answer requests until the connection should close; or the bytes for hypercorn."""
        while True:
            request = await self._next_request()
            if request is None:
                return None
            if request.handoff is not None:
                return request.handoff
            status = request.error or refusal(request, self.limits)
            if status:
                await self._send_error(status, request)
                return None
            if not await self._respond(request):
                return None

    async def _next_request(self) -> _Request | None:
        """The next request whose head is complete, reading as needed; None to close."""
        ready = self.ready
        if not ready:
            if self.eof or self.stopped:
                return None
            self.idle = True
            self.idle_since = trio.current_time()
            if self.used and self.prompt and self.gr.state not in ACCEPTING:  # close soon
                self.scope.deadline = self.idle_since + H1_QUIET
            pending = 0
            wait_first = self.used
            while not ready:
                data = await self._read(wait_first)
                wait_first = False
                if not data:
                    return None
                pending += len(data)
                if not ready and pending > self.limits.max_head + self.limits.max_target:
                    self._refuse(431)
            self.idle = False
            if self.scope.deadline != inf:  # a request came as the drain closes: answer it
                self.scope.deadline = inf
        return ready.popleft()

    async def _respond(self, request: _Request) -> bool:
        """Call the application for ``request``; whether the connection stays open."""
        self.used = True
        self.served += 1
        self.request = request
        self.started = self.finished = False
        self.close = not request.keep_alive or (
            self.served >= self.server.config.keep_alive_max_requests
        )
        url = request.url
        if url[:1] == b"/":
            raw_path, _, query = url.partition(b"?")
        else:  # absolute form, or "*"
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("latin-1")
        scope = {
            **self.scope_template,
            "http_version": request.version,
            "method": request.method.decode("ascii"),
            "path": unquote(path) if "%" in path else path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": request.headers,
            "state": self.server.lifespan_state.copy(),
        }
        with self.lease:
            try:
                await self.app(scope, self.receive, self.send)
            except Exception:
                _log.exception("Exception in ASGI application")
                if not self.started:
                    await self._send_error(request.error or 500, request)
                return False
            if not self.started:
                if not request.error:
                    _log.error("ASGI application returned without starting a response")
                await self._send_error(request.error or 500, request)
                return False
        return self.finished and not self.close and request.complete

    async def _linger(self) -> None:
        """RFC 9112 §9.6: half-close, then read and drop until the client closes, for at
        most ``LINGER`` seconds (the deadline of the connection's scope, which the
        caller has entered). Nothing when the client closed first, or over TLS (no
        half-close: close_notify, then close)."""
        fd = self.fd
        if self.eof or self.broken or fd < 0:
            return
        self.idle = False  # neither the keep-alive timeout nor the drain touch it now
        self.lingering = True
        self.scope.deadline = trio.current_time() + LINGER
        try:
            self.stream.socket.shutdown(socket.SHUT_WR)
            while True:
                try:
                    if not os.read(fd, MAX_RECV):
                        return
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
        except OSError:
            return

    async def _read(self, wait_first: bool = False) -> bytes:
        """Read once and parse what came; b"" when the client is gone.

        On a plain socket it reads the fd itself: one system call when data is there
        (then a shielded checkpoint, for fairness), else a wait and one more.
        ``wait_first``: a keep-alive client that has just been answered cannot have sent
        its next request yet; the other connections take their turn first (a shielded
        checkpoint), and under load the request is there when the read comes: no wait,
        whose ``epoll_ctl`` and wake-up cost more than the turn.
        """
        fd = self.fd
        if fd < 0:
            try:
                data: bytes = await self.stream.receive_some(MAX_RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
        else:
            waited = False
            if wait_first:  # let the others run: the client answers meanwhile, mostly
                await trio.lowlevel.cancel_shielded_checkpoint()
                waited = True
            while True:
                try:
                    data = os.read(fd, MAX_RECV)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    waited = True
                    continue
                except OSError:
                    data = b""
                break
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        if not data:
            self.eof = True
            return b""
        if self.seen is not None:
            self.seen.append(data)
        if not self.stopped:
            self._feed(data)
        return data

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            request = self.parsing
            head = [b"%s %s HTTP/%s\r\n" % (request.method, request.url, request.version.encode())]
            head += [b"%s: %s\r\n" % header for header in request.headers]
            request.handoff = b"".join(head) + b"\r\n" + data[upgrade.args[0] :]
            self.stopped = True
        except httptools.HttpParserCallbackError as error:
            refused = error.__context__
            self._refuse(refused.args[0] if isinstance(refused, _RefusedError) else 400)
        except httptools.HttpParserError:
            seen = b"".join(self.seen) if self.seen is not None else b""
            if seen.startswith(_PREFACE):  # h2c with prior knowledge
                handoff = _Request()
                handoff.handoff = seen
                self.ready.append(handoff)
                self.stopped = True
            else:
                self._refuse(400)

    def _refuse(self, status: int) -> None:
        """Answer the request being parsed with ``status`` (in its turn), and stop parsing."""
        request = self.parsing
        request.error = status
        if not request.queued:
            request.queued = True
            self.ready.append(request)
        self.stopped = True

    # -- the parser's callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = _Request()

    def on_url(self, url: bytes) -> None:
        request = self.parsing
        request.url += url
        if len(request.url) > self.limits.max_target:
            raise _RefusedError(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.parsing
        if request.queued:
            return  # a trailer field: dropped
        request.headers.append((name.lower(), value))
        request.head_size += len(name) + len(value) + 4
        if request.head_size > self.limits.max_head or (
            len(request.headers) > self.limits.max_headers
        ):
            raise _RefusedError(431)

    def on_headers_complete(self) -> None:
        request = self.parsing
        parser = self.parser
        request.queued = True
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        if request.version == "1.1":
            for name, value in request.headers:
                if name == b"expect" and value.lower() == b"100-continue":
                    request.expect_continue = True
        elif any(name == b"transfer-encoding" for name, _ in request.headers):
            request.keep_alive = False  # RFC 9112 §6.1: HTTP/1.0 framing is faulty: close
        self.seen = None
        self.ready.append(request)

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        request.received += len(body)
        max_body = self.limits.max_body
        if max_body is not None and request.received > max_body:
            raise _RefusedError(413)
        request.body.append(body)

    def on_message_complete(self) -> None:
        self.parsing.complete = True

    # -- the application's receive and send -------------------------------------------------

    async def _receive_message(self) -> Message:
        request = self.request
        while True:
            if self.finished or request.error or self.broken:
                return _DISCONNECT
            body = request.body
            if body or (request.complete and not request.final_read):
                data = body[0] if len(body) == 1 else b"".join(body)
                body.clear()
                request.final_read = request.complete
                return {"type": "http.request", "body": data, "more_body": not request.complete}
            if self.eof:
                return _DISCONNECT
            if self.stopped or (request.complete and len(self.ready) > _QUEUED_AHEAD):
                await trio.sleep_forever()  # no more news: the response ends the wait
            if request.expect_continue and not self.started:
                request.expect_continue = False
                await self._write(_CONTINUE)
            await self._read()

    async def _send_message(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if not self.started or self.finished:
                raise RuntimeError("http.response.body outside a response")
            more = message.get("more_body", False)
            body = message.get("body", b"")
            if self.framing == LENGTH:
                self.remaining -= len(body)
                if self.remaining < 0:
                    raise RuntimeError("response body longer than its content-length")
                if not more and self.remaining:
                    self.close = True  # shorter than announced: the client must see the end
            data = frame(self.framing, body, more)
            if self.head:
                data, self.head = self.head + data, b""
            if not more:
                self.finished = True
            if data:
                await self._write(data)
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            if message.get("trailers", False):
                raise RuntimeError("response trailers are not supported")
            request = self.request
            close = self.close or not request.complete or self.eof or self.gr.state not in ACCEPTING
            head = response_head(
                int(message["status"]),
                message.get("headers", ()),
                request,
                close,
                self.server.clock.date() if self.server.config.include_date_header else b"",
            )
            self.started = True
            self.head, self.framing, self.remaining, self.close = (
                head.data,
                head.framing,
                head.length,
                head.close,
            )
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on HTTP")

    async def _write(self, data: bytes) -> None:
        """``send_all``; on a plain socket one system call on the fd, and no checkpoint,
        when the socket takes it all (the read that follows a response waits anyway)."""
        if self.broken:
            return  # the client is gone: what the application still sends is dropped
        fd = self.fd
        try:
            if fd < 0:
                await self.stream.send_all(data)
                return
            view: bytes | memoryview = data
            while True:
                try:
                    sent = os.write(fd, view)
                except BlockingIOError:
                    sent = 0
                if sent == len(view):
                    return
                view = memoryview(view)[sent:]
                await trio.lowlevel.wait_writable(fd)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.broken = self.close = True

    async def _send_error(self, status: int, request: _Request) -> None:
        """An empty answer that closes the connection (as hypercorn's are)."""
        if request.version not in ("1.1", "1.0"):
            request = _Request()
        head = response_head(
            status, [(b"content-length", b"0")], request, True, self.server.clock.date()
        )
        self.close = True
        await self._write(head.data)
