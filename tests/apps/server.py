"""The server the tests run: the demo app, or a plain trio echo server, under the library.

Like a real deployment, what a new copy does is read at start-up from a *deploy file*
(``--deploy-file``), so a test can "deploy" a bad version and then send SIGHUP:

``ok``                 serve normally
``crash-at-import``    exit with status 3 before opening anything
``hang-before-ready``  open the listeners, never say ready
``exit-after-ready``   say ready, then exit 4 at once
``listen-elsewhere``   listen on a listener named ``elsewhere`` instead of the usual one
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config

import graceful_restart_trio as graceful_restart
from graceful_restart_trio.asgi import Receive, Scope, Send, serve
from graceful_restart_trio.demo import app


def deployed(path: str | None) -> str:
    """The behaviour the deploy file asks for (``ok`` when there is none)."""
    if path is None or not Path(path).exists():
        return "ok"
    return Path(path).read_text(encoding="utf-8").strip() or "ok"


async def echo(gr: graceful_restart.GracefulRestart, stream: trio.SocketStream) -> None:
    """Answer each chunk with ``<pid> <chunk>`` until the client closes.

    The chunk ``restart`` calls ``gr.restart()`` and answers with its outcome.
    """
    async for chunk in stream:
        reply = chunk
        if chunk.strip() == b"restart":
            try:
                answer = f"restarted {await gr.restart()}"
            except graceful_restart.RestartError as error:
                answer = f"failed {type(error).__name__}: {error}"
            reply = answer.encode() + b"\n"
        await stream.send_all(f"{os.getpid()} ".encode() + reply)


async def logged_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The demo app, logging when a request starts (tests wait for that line)."""
    if scope["type"] == "http":
        logging.getLogger("app").info("request %s started", scope["path"])
    await app(scope, receive, send)


async def main(args: argparse.Namespace, behaviour: str) -> None:
    options: dict[str, object] = {
        "pid_file": args.pid_file,
        "drain_timeout": args.drain_timeout,
        "ready_timeout": args.ready_timeout,
        "probation": args.probation,
    }
    async with graceful_restart.open(**options) as gr:
        if args.unix:
            listeners = [await gr.open_unix_listener(args.unix)]
        else:
            name = "elsewhere" if behaviour == "listen-elsewhere" else None
            listeners = await gr.open_tcp_listeners(args.port, host="127.0.0.1", name=name)
        if behaviour == "hang-before-ready":
            await trio.sleep_forever()
        if behaviour == "exit-after-ready":
            gr.ready()
            sys.exit(4)
        if args.kind == "echo":
            await gr.serve_listeners(partial(echo, gr), listeners)
        else:
            config = Config()
            config.errorlog = logging.getLogger("hypercorn.error")
            await serve(gr, logged_app, listeners, config)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["http", "echo"], default="http")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--unix")
    parser.add_argument("--pid-file", required=True)
    parser.add_argument("--deploy-file")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    parser.add_argument("--probation", type=float, default=0.2)
    arguments = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    behaviour = deployed(arguments.deploy_file)
    if behaviour == "crash-at-import":
        sys.exit(3)
    trio.run(main, arguments, behaviour)
