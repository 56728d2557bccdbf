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
marked ready once hypercorn accepts.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from ._graceful_restart import GracefulRestart
from ._state import State

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
    if message["type"] == "http.response.start" and gr.state is State.DRAINING:
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

    The server holds one lease of ``gr`` while it runs, so the drain waits until hypercorn
    has finished its own graceful shutdown (or the drain deadline passes).

    Args:
        gr: the handle from :func:`graceful_restart_trio.open`.
        app: an ASGI 3 application.
        listeners: from :meth:`GracefulRestart.open_tcp_listeners` or
            :meth:`GracefulRestart.open_unix_listener`. ``serve`` takes them over and
            closes them when it returns.
        config: hypercorn settings; its ``bind`` is replaced by ``listeners``, and its
            ``graceful_timeout`` is raised to outlast ``drain_timeout`` (the drain deadline
            of ``gr`` is the one that counts).
    """
    config = copy.copy(config) if config is not None else Config()
    config.bind = []
    try:
        for listener in listeners:
            # hypercorn takes ownership of the fd it is given and closes it: give it a copy.
            config.bind.append(f"fd://{os.dup(listener.socket.fileno())}")
    finally:
        for listener in listeners:
            await listener.aclose()
    config.graceful_timeout = gr.options.drain_timeout + 1.0
    # hypercorn's own graceful shutdown (answer what was read, close idle keep-alive
    # connections) must run before the drain ends: the server holds a lease until it has.
    async with gr.lease(), trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                hypercorn_serve,
                cast(Any, lease_app(gr, app)),  # hypercorn's own ASGI types are stricter
                config,
                shutdown_trigger=gr.wait_draining,
            )
        )
        gr.ready()
