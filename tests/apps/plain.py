"""A server in the plainest style of 0.1: its accept loop under ``gr.accepting()``.

The ``open()`` body ends when the accept loop ends and the handlers are done: it never
calls ``gr.wait_resumed()``, so once it stops accepting for a successor's probation it
cannot accept again. That is the pattern the library must never turn into an outage.

HTTP/1.1 with keep-alive, just enough for the load clients: ``GET /`` answers ``hello
from pid N``, ``GET /sleep?seconds=S`` answers the same after S seconds. Once this
process stops accepting, each answer says ``Connection: close``.

``--raise-when-done``: the body raises once its accept loop has ended (an application's
own bug, met during a probation). ``--end-on-restart``: the body ends its accept loop as
soon as a restart begins, before the successor is ready. ``--ready-delay S``: wait S
seconds before saying ready.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from urllib.parse import parse_qs, urlsplit

import trio

import graceful_restart_trio as graceful_restart
from graceful_restart_trio import ACCEPTING, State


class BodyError(Exception):
    """What the body raises with ``--raise-when-done``."""


async def handle(gr: graceful_restart.GracefulRestart, stream: trio.SocketStream) -> None:
    buffer = b""
    while True:
        while b"\r\n\r\n" not in buffer:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
        url = urlsplit(target)
        if url.path == "/sleep":
            logging.getLogger("app").info("request /sleep started")
            await trio.sleep(float(parse_qs(url.query)["seconds"][0]))
        body = f"hello from pid {os.getpid()}".encode()
        closing = gr.state not in ACCEPTING
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            + f"Content-Length: {len(body)}\r\n".encode()
            + (b"Connection: close\r\n" if closing else b"")
            + b"\r\n"
            + body
        )
        if closing:
            return


async def main(args: argparse.Namespace) -> None:
    async with graceful_restart.open(
        pid_file=args.pid_file, drain_timeout=args.drain_timeout
    ) as gr:
        listeners = await gr.open_tcp_listeners(args.port, host="127.0.0.1")

        async def handler(stream: trio.SocketStream) -> None:
            async with gr.lease():
                await handle(gr, stream)

        async with trio.open_nursery() as handlers:

            async def accept_loop(
                task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                with gr.accepting():
                    await trio.serve_listeners(
                        handler, listeners, handler_nursery=handlers, task_status=task_status
                    )

            await trio.sleep(args.ready_delay)
            await handlers.start(accept_loop)
            gr.ready()
            if args.end_on_restart:
                await gr.state_value.wait_value(
                    lambda state: state in (State.RESTARTING, State.DRAINING)
                )
                handlers.cancel_scope.cancel()
        if args.raise_when_done:
            raise BodyError("the body failed after its accept loop ended")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pid-file", required=True)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--raise-when-done", action="store_true")
    parser.add_argument("--end-on-restart", action="store_true")
    parser.add_argument("--ready-delay", type=float, default=0.0)
    arguments = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    trio.run(main, arguments)
