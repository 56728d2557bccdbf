"""Serve an ASGI (or WSGI) application under ``gr``: HTTP/1.1 on httptools, the rest on hypercorn.

HTTP/1.1 (plaintext, and TLS that negotiates ``http/1.1``) is served by this library's own
connection on ``httptools`` (:mod:`graceful_restart_trio._http11`); HTTP/2 (ALPN ``h2``,
h2c) and WebSocket upgrades by hypercorn's protocol code, which ``http1="hypercorn"``
also selects for HTTP/1.1. Requires hypercorn 0.17 or 0.18 and httptools
(``pip install '.[hypercorn]'`` from a clone);
importing :mod:`graceful_restart_trio` itself imports neither, and importing this
module with another hypercorn version raises ImportError naming the supported range.

Synopsis::

    import graceful_restart_trio as graceful_restart
    from graceful_restart_trio import asgi

    async with graceful_restart.open() as gr:
        await asgi.serve(gr, app, await gr.open_tcp_listeners(8000))

What it adds to ``hypercorn.trio.serve``:

- it serves the listeners ``gr`` hands over, and marks the process ready once they
  accept;
- each HTTP request and WebSocket holds a lease of ``gr``;
- once the process stops accepting, HTTP/1.1 responses carry ``Connection: close``,
  idle connections close promptly (paced, with a lingering close), HTTP/2 connections get
  a graceful GOAWAY, and closed connections are noticed at once; see
  :mod:`graceful_restart_trio._http_connection` for the rules;
- the application's lifespan shutdown runs to completion after the last connection,
  under the drain deadline;
- routes find ``gr`` with :func:`graceful_restart` (to end a WebSocket with 1001 or an
  event stream when the process drains), and :func:`readiness` is a health endpoint
  that says 503 from the moment accepting stops.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from functools import partial
from typing import Any, Final, Literal, cast, final

import trio

from ._graceful_restart import GracefulRestart
from ._http11 import HTTP11Server, Limits
from ._http_connection import HTTPConnection, IdleClose, Pacer
from ._hypercorn import (
    Config,
    Lifespan,
    LifespanFailureError,
    WorkerContext,
    WSGIWrapper,
    wrap_app,
)
from ._state import ACCEPTING, State

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["HTTP1", "HTTP1_ENV", "graceful_restart", "lease_app", "readiness", "serve"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_LEASED = frozenset({"http", "websocket"})
_READY = frozenset({State.SERVING, State.RESTARTING, State.PROBATION})
_CONNECTION_CLOSE = (b"connection", b"close")
_STATE_KEY = "graceful_restart"
HTTP1 = Literal["httptools", "hypercorn"]
"""The HTTP/1.1 code of :func:`serve`: the library's httptools connection, or hypercorn's."""
HTTP1_ENV: Final = "GRACEFUL_RESTART_TRIO_HTTP1"
"""The environment variable that chooses the HTTP/1.1 code when ``serve(http1=None)``."""
_log = logging.getLogger("graceful_restart_trio.asgi")

_NOT_SERVED = {
    "bind": "serve() serves the listeners it is given (gr.open_tcp_listeners)",
    "insecure_bind": "serve() serves the listeners it is given (gr.open_tcp_listeners)",
    "quic_bind": "HTTP/3 is not served",
    "workers": "one process serves; a restart replaces it",
    "graceful_timeout": "the drain deadline is open(drain_timeout=...)",
    "max_requests": "restart with gr.restart() instead",
    "pid_path": "the pid file is open(pid_file=...)",
    "use_reloader": "restart with SIGHUP or gr.restart()",
    "backlog": "listeners are opened by gr.open_tcp_listeners(backlog=...)",
    "user": "unix sockets are opened by gr.open_unix_listener",
    "group": "unix sockets are opened by gr.open_unix_listener",
    "umask": "unix sockets are opened by gr.open_unix_listener",
}
"""hypercorn settings that belong to its own process management: refused, not ignored."""


def lease_app(gr: GracefulRestart, app: ASGIApp) -> ASGIApp:
    """Wrap ``app`` so that each request or WebSocket holds a lease of ``gr``.

    Once ``gr`` stops accepting, HTTP/1.x responses carry ``Connection: close``, as do
    responses to a request that has both ``Content-Length`` and ``Transfer-Encoding``
    (RFC 9112 §6.3: the server must close the connection after it).
    """
    lease = gr.lease()

    call: Callable[..., Awaitable[None]] = app  # an ASGI app, or hypercorn's AppWrapper

    async def leased(scope: Scope, receive: Receive, send: Send, *args: object) -> None:
        if scope["type"] not in _LEASED:
            await call(scope, receive, send, *args)
            return
        async with lease:
            if scope["type"] == "http" and scope.get("http_version", "1.1").startswith("1"):
                send = partial(_close_when_not_accepting, gr, _ambiguous(scope), send)
            await call(scope, receive, send, *args)

    return leased


def _ambiguous(scope: Scope) -> bool:
    """Whether the request's body length is told twice (``Content-Length`` and
    ``Transfer-Encoding``): a request smuggling attempt, after which the connection
    must close."""
    names = {bytes(name).lower() for name, _ in scope.get("headers", ())}
    return b"content-length" in names and b"transfer-encoding" in names


async def _close_when_not_accepting(
    gr: GracefulRestart, ambiguous: bool, send: Send, message: Message
) -> None:
    if message["type"] == "http.response.start" and (ambiguous or gr.state not in ACCEPTING):
        headers = [h for h in message.get("headers", ()) if bytes(h[0]).lower() != b"connection"]
        message = {**message, "headers": [*headers, _CONNECTION_CLOSE]}
    await send(message)


def graceful_restart(scope: Scope) -> GracefulRestart:
    """The ``gr`` serving this request, from an ASGI ``scope`` (HTTP or WebSocket).

    In Starlette and FastAPI it is also ``request.state.graceful_restart``.

    Raises:
        LookupError: the application is not served by :func:`serve`.
    """
    try:
        gr: GracefulRestart = scope["state"][_STATE_KEY]
    except (KeyError, TypeError):
        raise LookupError(
            "no graceful_restart in the ASGI scope's state: serve the app with "
            "graceful_restart_trio.asgi.serve()"
        ) from None
    return gr


@final
class _Readiness:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        serving = graceful_restart(scope).state in _READY
        body = b"serving\n" if serving else b"not serving\n"
        await send(
            {
                "type": "http.response.start",
                "status": 200 if serving else 503,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


readiness: Final[ASGIApp] = _Readiness()
"""An ASGI health endpoint: 200 ``serving`` while this process serves, else 503.

Route it where the load balancer or Kubernetes readiness probe looks, e.g.
``Route("/readyz", asgi.readiness)`` in Starlette. It says 503 while starting and from
the moment a drain begins (a shutdown, or the old copy after a handover), so the prober
stops sending new connections here while the drain finishes what is in flight. During a
restart and a successor's probation it says 200: the service goes on serving (a probe on
a new connection reaches whichever process accepts).
"""


async def serve(
    gr: GracefulRestart,
    app: Callable[..., Any],
    listeners: Sequence[trio.abc.Listener[Any]],
    config: Config | None = None,
    *,
    http1: HTTP1 | None = None,
    max_body_size: int | None = None,
    idle_close: IdleClose = "prompt",
) -> None:
    """Serve ``app`` on ``listeners`` until ``gr`` stops accepting and the work is done.

    Returns after the last connection has ended and the application's lifespan shutdown
    has completed; the drain waits for both, up to ``drain_timeout``.

    Args:
        gr: the handle from :func:`graceful_restart_trio.open`.
        app: an ASGI 3 application, or a WSGI application (as hypercorn tells them apart).
        listeners: from :meth:`GracefulRestart.open_tcp_listeners` or
            :meth:`GracefulRestart.open_unix_listener`; closed when accepting stops.
        config: hypercorn settings. With ``certfile``/``keyfile`` set, the listeners
            speak TLS (HTTP/2 by ALPN); h2c works on plain listeners. Settings of
            hypercorn's own process management (``bind``, ``workers``,
            ``graceful_timeout``, ``max_requests``, ...) are refused. On the httptools
            path ``keep_alive_timeout`` (which also bounds a client that never finishes
            its headers), ``keep_alive_max_requests``, ``h11_max_incomplete_size`` (the
            header section: 431), ``server_names``, ``root_path``,
            ``include_date_header`` and the TLS settings apply.
        http1: the HTTP/1.1 code: ``"httptools"`` (this library's connection, the
            default) or ``"hypercorn"`` (hypercorn's, on h11). None: the environment
            variable ``GRACEFUL_RESTART_TRIO_HTTP1`` if set, else ``"httptools"``.
        max_body_size: on the httptools path, the largest request body in bytes; a
            larger one is answered 413 and the connection closed. None: no limit.
        idle_close: once accepting stops, an idle HTTP/1.1 keep-alive connection is
            closed ``"prompt"``ly (after 50 ms of quiet, paced: the old copy exits
            soon, but a client that writes into the connection as it closes, without
            checking it first, loses that request), or ``"on-response"`` (HAProxy's
            ``idle-close-on-response``: it stays open until its next request, whose
            answer says ``Connection: close``, or until idle for
            ``keep_alive_timeout``: no request is lost that way, and the old copy may
            linger up to ``keep_alive_timeout``).

    Raises:
        ValueError: ``config`` sets something :func:`serve` does not do; the message
            names the field and what to use instead; or ``http1`` is neither choice.
        hypercorn.utils.LifespanFailureError: the application's lifespan startup failed.
    """
    config = config if config is not None else Config()
    _check_config(config)
    http1 = http1 or cast(HTTP1, os.environ.get(HTTP1_ENV) or "httptools")
    if http1 not in ("httptools", "hypercorn"):
        raise ValueError(f"http1={http1!r}: choose 'httptools' or 'hypercorn'")
    if idle_close not in ("prompt", "on-response"):
        raise ValueError(f"idle_close={idle_close!r}: choose 'prompt' or 'on-response'")
    app_wrapper = wrap_app(app, config.wsgi_max_body_size, None)
    wrapped = lease_app(gr, cast(Any, app_wrapper))
    served = list(listeners)
    if config.ssl_enabled and (tls := config.create_ssl_context()) is not None:
        served = [trio.SSLListener(listener, tls, https_compatible=True) for listener in served]
    state: dict[str, Any] = {_STATE_KEY: gr}
    # WSGI has no lifespan (and hypercorn's lifespan fails on a WSGI app under trio).
    lifespan = (
        None
        if isinstance(app_wrapper, WSGIWrapper)
        else Lifespan(cast(Any, wrapped), config, state)
    )
    pacer = Pacer()
    connection = HTTPConnection(gr, wrapped, config, WorkerContext(None), state, pacer, idle_close)
    handler: Callable[[Any], Awaitable[None]] = connection
    http11: HTTP11Server | None = None
    if http1 == "httptools":
        http11 = HTTP11Server(
            gr,
            _direct_call(app_wrapper),
            config,
            state,
            pacer,
            connection,
            Limits(
                max_head=config.h11_max_incomplete_size,
                max_body=max_body_size,
                server_names=frozenset(name.encode() for name in config.server_names),
            ),
            idle_close,
        )
        handler = http11
    try:
        async with trio.open_nursery() as lifespan_nursery:
            if lifespan is not None:
                await lifespan_nursery.start(lifespan.handle_lifespan)
                await lifespan.wait_for_startup()
            if http11 is not None:
                lifespan_nursery.start_soon(http11.watch)
            for listener in served:
                _log.info("Running on %s", _url(listener))
            async with trio.open_nursery() as connections:
                await gr.accept_connections(served, handler, handler_nursery=connections)
            if lifespan is not None:
                await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        failure, _ = group.split(LifespanFailureError)
        if failure is None:
            raise
        raise _first(failure) from None  # the application's own error, not a group of one


def _direct_call(app_wrapper: object) -> Callable[..., Awaitable[None]]:
    """``(scope, receive, send)`` for the httptools path: the ASGI app itself, or the
    WSGI wrapper with trio's thread calls."""
    if not isinstance(app_wrapper, WSGIWrapper):  # hypercorn's ASGIWrapper
        return cast(Callable[..., Awaitable[None]], cast(Any, app_wrapper).app)
    return partial(app_wrapper, sync_spawn=trio.to_thread.run_sync, call_soon=trio.from_thread.run)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def _check_config(config: Config) -> None:
    default = Config()
    for field, instead in _NOT_SERVED.items():
        if getattr(config, field, None) != getattr(default, field, None):
            raise ValueError(f"hypercorn Config.{field} is not used by asgi.serve(): {instead}")


def _url(listener: trio.abc.Listener[Any]) -> str:
    tls = isinstance(listener, trio.SSLListener)
    inner = listener.transport_listener if tls else listener  # type: ignore[attr-defined]
    scheme = "https" if tls else "http"
    if not isinstance(inner, trio.SocketListener):
        return f"{scheme} on {inner!r}"
    address = inner.socket.getsockname()
    if isinstance(address, str) or inner.socket.family == trio.socket.AF_UNIX:
        return f"{scheme}+unix:{address!r}"
    host, port = address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}"
