"""The HTTP/1.1 server on ``httptools`` (llhttp): :class:`HTTP11Server`, and how the path works.

:class:`HTTP11Server` takes each accepted stream (TLS handshake, ALPN ``h2`` to hypercorn),
gives it a connection, and runs the keep-alive timeouts and the drain policy for all of
them. One connection is :mod:`graceful_restart_trio._http11_connection`; the message
rules (limits, refusals, response framing) are :mod:`graceful_restart_trio._http11_messages`.

Theory of operation
-------------------

:class:`HTTP11Server` is the connection handler of :func:`graceful_restart_trio.asgi.serve`
on its default path. Each accepted stream gets an
:class:`~graceful_restart_trio._http11_connection.HTTP11Connection`: one trio task that
reads, parses, calls the ASGI application and writes the answer, with no task, channel or
cancel scope per request.

- **Parsing.** The connection is the parser's protocol object: ``on_url``,
  ``on_header``, ``on_headers_complete``, ``on_body`` and ``on_message_complete`` build
  :class:`~graceful_restart_trio._http11_messages.Request` objects and queue them in
  arrival order, so pipelined requests are answered in order and each body lands in its
  own request. Bytes are read only when someone needs them (the next request, or the
  application's ``receive()``), so a slow application stops the reading and TCP pushes
  back: what is buffered is bounded (one read past the request served; none while 32
  requests wait behind it).
- **The rules** are small functions without I/O, in
  :mod:`graceful_restart_trio._http11_messages`: ``refusal`` (what a request's head
  must satisfy before the application sees it), ``response_head`` (framing:
  ``content-length``, chunked, or until close; ``Connection: close``; no body for HEAD,
  1xx, 204 and 304) and ``frame`` (a body piece on the wire).
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

from collections.abc import Awaitable, Callable
from typing import Any, final

import attrs
import trio

from ._graceful_restart import GracefulRestart
from ._http11_connection import HTTP11Connection
from ._http11_messages import Clock, Limits
from ._http_connection import H1_QUIET, LINGER, HTTPConnection, IdleClose, Pacer
from ._hypercorn import Config
from ._state import ACCEPTING

__all__ = ["HTTP11Server", "Limits"]  # Limits: what HTTP11Server takes, as asgi.serve imports it

ASGICall = Callable[..., Awaitable[None]]


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
    live: set[HTTP11Connection] = attrs.field(factory=set)
    clock: Clock = attrs.field(factory=Clock)

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
            connection = HTTP11Connection(self, stream)
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
