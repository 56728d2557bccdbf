"""The Starlette app the HTTP benchmarks restart: ``GET /`` (``?seconds=X`` sleeps first).

Usage::

    python benchmarks/_starlette_server.py --port 8000 --pid-file /tmp/app.pid [--probation 0.2]

Served by :func:`graceful_restart_trio.asgi.serve` (HTTP/1.1 and h2c on one port). The
log lines start with the Unix time (``%(created)``), which the benchmark reads.
"""

from __future__ import annotations

import argparse
import logging
import os

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import graceful_restart_trio as graceful_restart
from graceful_restart_trio import asgi


async def hello(request: Request) -> Response:
    await trio.sleep(float(request.query_params.get("seconds", 0)))
    return PlainTextResponse(f"hello from pid {os.getpid()}\n")


app = Starlette(routes=[Route("/", hello)])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid-file", required=True)
    parser.add_argument("--probation", type=float, default=0.2)
    args = parser.parse_args()
    async with graceful_restart.open(pid_file=args.pid_file, probation=args.probation) as gr:
        listeners = await gr.open_tcp_listeners(args.port, host="127.0.0.1")
        await asgi.serve(gr, app, listeners)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(created).3f %(name)s %(message)s")
    trio.run(main)
