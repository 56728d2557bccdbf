"""Serve an ASGI (or WSGI) application with hypercorn's protocol code under ``gr``.

Requires hypercorn 0.17 or 0.18 (``pip install '.[hypercorn]'`` from a clone);
importing :mod:`graceful_restart_trio` itself does not import it, and importing this
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
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from functools import partial
from typing import Any, Final, cast, final

import trio

from ._graceful_restart import GracefulRestart
from ._http_connection import HTTPConnection, Pacer
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

__all__ = ["graceful_restart", "lease_app", "readiness", "serve"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_LEASED = frozenset({"http", "websocket"})
_READY = frozenset({State.SERVING, State.RESTARTING, State.PROBATION})
_CONNECTION_CLOSE = (b"connection", b"close")
_STATE_KEY = "graceful_restart"
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

    Once ``gr`` stops accepting, HTTP/1.x responses carry ``Connection: close``.
    """
    lease = gr.lease()

    call: Callable[..., Awaitable[None]] = app  # an ASGI app, or hypercorn's AppWrapper

    async def leased(scope: Scope, receive: Receive, send: Send, *args: object) -> None:
        if scope["type"] not in _LEASED:
            await call(scope, receive, send, *args)
            return
        async with lease:
            if scope["type"] == "http" and scope.get("http_version", "1.1").startswith("1"):
                send = partial(_close_when_not_accepting, gr, send)
            await call(scope, receive, send, *args)

    return leased


async def _close_when_not_accepting(gr: GracefulRestart, send: Send, message: Message) -> None:
    if message["type"] == "http.response.start" and gr.state not in ACCEPTING:
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
            ``graceful_timeout``, ``max_requests``, ...) are refused.

    Raises:
        ValueError: ``config`` sets something :func:`serve` does not do; the message
            names the field and what to use instead.
        hypercorn.utils.LifespanFailureError: the application's lifespan startup failed.
    """
    config = config if config is not None else Config()
    _check_config(config)
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
    connection = HTTPConnection(gr, wrapped, config, WorkerContext(None), state, Pacer())
    try:
        async with trio.open_nursery() as lifespan_nursery:
            if lifespan is not None:
                await lifespan_nursery.start(lifespan.handle_lifespan)
                await lifespan.wait_for_startup()
            for listener in served:
                _log.info("Running on %s", _url(listener))
            async with trio.open_nursery() as connections:
                await gr.accept_connections(served, connection, handler_nursery=connections)
            if lifespan is not None:
                await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        failure, _ = group.split(LifespanFailureError)
        if failure is None:
            raise
        raise _first(failure) from None  # the application's own error, not a group of one


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
