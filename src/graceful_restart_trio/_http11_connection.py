"""One HTTP/1.1 connection: :class:`HTTP11Connection`, one trio task from accept to close.

It reads (the fd itself on a plain socket), feeds llhttp and is the parser's protocol
(its ``on_*`` callbacks queue :class:`~graceful_restart_trio._http11_messages.Request`
objects), calls the ASGI application for each request in turn under a lease, gives it
``receive()`` and ``send()``, writes the answers, and closes (lingering) or hands the
connection to hypercorn. :class:`~graceful_restart_trio._http11.HTTP11Server` makes one
per accepted stream and closes idle ones; the theory of operation of the whole path is in
:mod:`graceful_restart_trio._http11`, the message rules in
:mod:`graceful_restart_trio._http11_messages`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import MutableMapping
from math import inf
from typing import TYPE_CHECKING, Any, Final, final
from urllib.parse import unquote

import httptools
import trio

from ._http11_messages import (
    LENGTH,
    RefusedError,
    Request,
    frame,
    refusal,
    response_head,
)
from ._http_connection import H1_QUIET, LINGER, MAX_RECV, unread
from ._hypercorn import parse_socket_addr
from ._state import ACCEPTING

if TYPE_CHECKING:
    from ._http11 import HTTP11Server

__all__ = ["HTTP11Connection"]

Message = MutableMapping[str, Any]

_log = logging.getLogger("graceful_restart_trio.asgi")
_ASGI: Final = {"version": "3.0", "spec_version": "2.4"}
_DISCONNECT: Final = {"type": "http.disconnect"}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_PREFACE: Final = b"PRI * HTTP/2.0\r\n"
_QUEUED_AHEAD: Final = 32
"""Requests parsed ahead of the one served before reading stops (pipelining)."""


@final
class HTTP11Connection:
    """The life of one connection; also the parser's protocol (its ``on_*`` methods)."""

    def __init__(self, server: HTTP11Server, stream: Any) -> None:  # noqa: ANN401 - a stream
        self.server = server
        self.stream = stream
        self.gr = server.gr
        self.limits = server.limits
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[Request] = deque()
        self.parsing = Request()
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

    async def _next_request(self) -> Request | None:
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

    async def _respond(self, request: Request) -> bool:
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
            self._refuse(refused.args[0] if isinstance(refused, RefusedError) else 400)
        except httptools.HttpParserError:
            seen = b"".join(self.seen) if self.seen is not None else b""
            if seen.startswith(_PREFACE):  # h2c with prior knowledge
                handoff = Request()
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
        self.parsing = Request()

    def on_url(self, url: bytes) -> None:
        request = self.parsing
        request.url += url
        if len(request.url) > self.limits.max_target:
            raise RefusedError(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.parsing
        if request.queued:
            return  # a trailer field: dropped
        request.headers.append((name.lower(), value))
        request.head_size += len(name) + len(value) + 4
        if request.head_size > self.limits.max_head or (
            len(request.headers) > self.limits.max_headers
        ):
            raise RefusedError(431)

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
            raise RefusedError(413)
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

    async def _send_error(self, status: int, request: Request) -> None:
        """An empty answer that closes the connection (as hypercorn's are)."""
        if request.version not in ("1.1", "1.0"):
            request = Request()
        head = response_head(
            status, [(b"content-length", b"0")], request, True, self.server.clock.date()
        )
        self.close = True
        await self._write(head.data)
