"""Serve an ASGI application (Starlette, Quart-trio, FastAPI, ...) with hypercorn under ``gr``.

Requires hypercorn (``pip install graceful-restart-trio[hypercorn]``); importing
:mod:`graceful_restart_trio` itself does not import it.

Synopsis::

    import graceful_restart_trio as graceful_restart
    from graceful_restart_trio.asgi import serve

    async with graceful_restart.open() as gr:
        await serve(gr, app, await gr.open_tcp_listeners(8000))

What it adds to ``hypercorn.trio.serve``: it serves the listeners ``gr`` hands over;
each HTTP request and WebSocket connection holds a lease; once this process stops
accepting, every response carries ``Connection: close`` and idle keep-alive
connections are closed, so well-behaved clients move to the successor; the process is
marked ready once hypercorn accepts. It uses hypercorn's trio connection handling
(``TCPServer``, ``Lifespan``), which is why the supported hypercorn versions are pinned.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from ._graceful_restart import GracefulRestart
from ._state import ACCEPTING

__all__ = ["lease_app", "serve"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_LEASED = frozenset({"http", "websocket"})
_CONNECTION_CLOSE = (b"connection", b"close")


def lease_app(gr: GracefulRestart, app: ASGIApp) -> ASGIApp:
    """Wrap ``app`` so that each request or WebSocket holds a lease of ``gr``.

    While ``gr`` drains, HTTP responses carry ``Connection: close``.
    """
    lease = gr.lease()

    async def leased(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in _LEASED:
            await app(scope, receive, send)
            return
        async with lease:
            if scope["type"] == "http":
                send = partial(_close_when_draining, gr, send)
            await app(scope, receive, send)

    return leased


async def _close_when_draining(gr: GracefulRestart, send: Send, message: Message) -> None:
    if message["type"] == "http.response.start" and gr.state not in ACCEPTING:
        headers = [h for h in message.get("headers", ()) if bytes(h[0]).lower() != b"connection"]
        message = {**message, "headers": [*headers, _CONNECTION_CLOSE]}
    await send(message)


async def serve(
    gr: GracefulRestart,
    app: ASGIApp,
    listeners: Sequence[trio.SocketListener],
    config: Config | None = None,
) -> None:
    """Serve ``app`` on ``listeners`` until ``gr`` stops accepting and the requests are done.

    This is hypercorn's trio worker with the accept loop under :meth:`GracefulRestart.accepting`.
    hypercorn's own shutdown is not used: it closes every connection that has no request
    *parsed* yet, including one that was just accepted and whose request is still on the
    wire, which a client sees as a failed request. Here, when the process stops accepting,
    the connections it has go on: each next response carries ``Connection: close``, and
    idle keep-alive connections close after ``config.keep_alive_timeout`` (5 s by
    default), the moment RFC 9112 lets a client retry elsewhere. The server holds one
    lease of ``gr`` until its last connection is closed (or the drain deadline passes).

    Args:
        gr: the handle from :func:`graceful_restart_trio.open`.
        app: an ASGI 3 application.
        listeners: from :meth:`GracefulRestart.open_tcp_listeners` or
            :meth:`GracefulRestart.open_unix_listener`; closed when accepting stops.
        config: hypercorn settings (``bind`` is ignored: ``listeners`` are served). With
            ``certfile``/``keyfile`` set, the listeners speak TLS.
    """
    config = config if config is not None else Config()
    wrapped = cast(Any, wrap_app(cast(Any, lease_app(gr, app)), config.wsgi_max_body_size, None))
    served: list[trio.abc.Listener[Any]] = list(listeners)
    tls = config.create_ssl_context() if config.ssl_enabled else None
    if tls is not None:
        served = [trio.SSLListener(listener, tls, https_compatible=True) for listener in listeners]
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    worker = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        connection = partial(TCPServer, wrapped, config, worker, ConnectionState(lifespan_state))
        for listener in served:
            await config.log.info(f"Running on {_describe(listener)}")
        async with gr.lease(), trio.open_nursery() as connections:
            await gr.accept_connections(served, connection, handler_nursery=connections)
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


def _describe(listener: trio.abc.Listener[Any]) -> str:
    scheme = "https" if isinstance(listener, trio.SSLListener) else "http"
    inner = listener.transport_listener if isinstance(listener, trio.SSLListener) else listener
    address = inner.socket.getsockname() if isinstance(inner, trio.SocketListener) else "?"
    return f"{scheme}://{address}"
