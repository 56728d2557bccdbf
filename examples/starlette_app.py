"""A Starlette application served by ``graceful_restart_trio.asgi``: HTTP/1.1, HTTP/2
(h2c, or h2 over TLS with ``--certfile``/``--keyfile``), a WebSocket and an event stream
that end politely when the process drains, a readiness endpoint, and a lifespan whose
shutdown completes.

Run it (needs ``starlette``)::

    python examples/starlette_app.py --port 8000 --pid-file /tmp/app.pid

Routes:

- ``GET /``: ``hello from pid N``; ``GET /sleep?seconds=X`` sleeps first.
- ``GET /events``: server-sent events, one a tick; when the process drains, a last
  ``event: restart`` tells the client to reconnect, and the stream ends.
- ``/ws``: a WebSocket echo; when the process drains it closes with 1001 ("going away").
- ``GET /ready``: 200 while the process accepts, 503 from the moment it stops
  (:func:`graceful_restart_trio.asgi.readiness`), for a load balancer's health check.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence

import trio
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from trio_util import move_on_when

import graceful_restart_trio as graceful_restart
from graceful_restart_trio import asgi

log = logging.getLogger("starlette_app")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    log.info("lifespan startup complete (pid %d)", os.getpid())
    yield
    await trio.sleep(0.2)  # closing a database pool, flushing metrics: it completes
    log.info("lifespan shutdown complete (pid %d)", os.getpid())


async def hello(request: Request) -> Response:
    seconds = float(request.query_params.get("seconds", 0))
    if seconds >= 1:
        log.info("a request sleeps %gs (pid %d)", seconds, os.getpid())
    await trio.sleep(seconds)
    return PlainTextResponse(f"hello from pid {os.getpid()}\n")


async def events(request: Request) -> Response:
    gr = asgi.graceful_restart(request.scope)

    async def stream() -> AsyncIterator[str]:
        tick = 0
        while not gr.draining:
            tick += 1
            yield f"data: tick {tick} from pid {os.getpid()}\n\n"
            with trio.move_on_after(float(request.query_params.get("every", 0.1))):
                await gr.wait_draining()
        yield "event: restart\ndata: reconnect\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    gr = asgi.graceful_restart(websocket.scope)
    async with move_on_when(gr.wait_draining):
        try:
            while True:
                text = await websocket.receive_text()
                await websocket.send_text(f"{os.getpid()} {text}")
        except WebSocketDisconnect:
            return
    await websocket.close(code=1001, reason="server restarting")


app = Starlette(
    routes=[
        Route("/", hello),
        Route("/sleep", hello),
        Route("/events", events),
        WebSocketRoute("/ws", echo),
        Route("/ready", asgi.readiness),
    ],
    lifespan=lifespan,
)


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--pid-file")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--probation", type=float, default=5.0)
    parser.add_argument("--keep-alive-timeout", type=float, default=5.0)
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    args = parser.parse_args(argv)
    config = Config()
    config.keep_alive_timeout = args.keep_alive_timeout
    config.certfile, config.keyfile = args.certfile, args.keyfile
    options = {"drain_timeout": args.drain_timeout, "probation": args.probation}
    async with graceful_restart.open(pid_file=args.pid_file, **options) as gr:
        listeners = await gr.open_tcp_listeners(args.port, host="127.0.0.1")
        await asgi.serve(gr, app, listeners, config)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    trio.run(main)
