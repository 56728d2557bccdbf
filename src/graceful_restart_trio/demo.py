"""The demo server: a real HTTP/1.1 server you can restart under load with ``kill -HUP``.

Run it::

    python -m graceful_restart_trio.demo --port 8000 --pid-file /tmp/demo.pid

then, from another terminal::

    curl http://127.0.0.1:8000/                 # "hello from pid N"
    curl 'http://127.0.0.1:8000/sleep?seconds=5' &
    kill -HUP "$(cat /tmp/demo.pid)"            # new pid answers; the sleeper still completes
    sleep 6                                     # the 5 s probation: then the new pid is main
    kill -TERM "$(cat /tmp/demo.pid)"           # drain and exit

It is a small ASGI app served by :func:`graceful_restart_trio.asgi.serve`: HTTP/1.1 on
the library's httptools connection (``--http1 hypercorn``: on hypercorn's code), HTTP/2
(h2c) on hypercorn's.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config

import graceful_restart_trio as graceful_restart
from graceful_restart_trio.asgi import Receive, Scope, Send, serve

__all__ = ["app", "main"]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /`` answers ``hello from pid N``; ``GET /sleep?seconds=X`` first sleeps X s."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "http":
        return
    status, text = 200, f"hello from pid {os.getpid()}\n"
    if scope["path"] == "/sleep":
        try:
            seconds = float(parse_qs(scope["query_string"].decode())["seconds"][0])
        except (KeyError, ValueError):
            status, text = 400, "usage: /sleep?seconds=X\n"
        else:
            await trio.sleep(seconds)
    elif scope["path"] != "/":
        status, text = 404, "not found\n"
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _serve(args: argparse.Namespace) -> None:
    async with graceful_restart.open(
        pid_file=args.pid_file, drain_timeout=args.drain_timeout, probation=args.probation
    ) as gr:
        listeners = await gr.open_tcp_listeners(args.port, host=args.host)
        config = Config()
        config.errorlog = logging.getLogger("hypercorn.error")  # one handler: logging's
        await serve(gr, app, listeners, config, http1=args.http1)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve until shut down."""
    parser = argparse.ArgumentParser(
        prog="python -m graceful_restart_trio.demo",
        description="An HTTP server that restarts with kill -HUP and drains on kill -TERM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--pid-file", help="file to hold the pid of the serving process")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument(
        "--probation", type=float, default=5.0, help="seconds a new copy is watched (default 5)"
    )
    parser.add_argument(
        "--http1",
        choices=["httptools", "hypercorn"],
        help="the HTTP/1.1 code (default: $GRACEFUL_RESTART_TRIO_HTTP1, else httptools)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    trio.run(_serve, args)


if __name__ == "__main__":
    main()
