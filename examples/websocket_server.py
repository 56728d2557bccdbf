"""A trio-websocket echo server that restarts with ``kill -HUP`` and drains on ``kill -TERM``.

Run it, then talk to it with any websocket client (``python -m websockets``,
``websocat``, a browser) at ``ws://127.0.0.1:8765/``::

    python examples/websocket_server.py --port 8765 --pid-file /tmp/ws.pid
    kill -HUP "$(cat /tmp/ws.pid)"    # a new copy takes over; open websockets get 1001
    kill -TERM "$(cat /tmp/ws.pid)"   # stop accepting, close websockets with 1001, exit

Each reply is ``<pid> <message>``, from the process that answered. A websocket is
long-lived, so each one holds a lease. When this process starts draining (after a
``SIGHUP`` handover, or on ``SIGTERM``), it answers the message in hand, if any, then
closes every websocket with code 1001 ("going away"). The client reconnects, and its new
websocket reaches the successor. A message the client sent while the close frame was on
its way is not answered (RFC 6455 allows no data after a close frame): the client sends
it again on its new websocket. A client that never completes the close is cut off at
``--drain-timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

import graceful_restart_trio as graceful_restart

GOING_AWAY = 1001
"""The close code that tells a client to reconnect (RFC 6455, section 7.4.1)."""


async def receive_unless_draining(
    ws: WebSocketConnection, gr: graceful_restart.GracefulRestart
) -> str | bytes | None:
    """The next message; None once this process drains or the client has closed.

    A message already received when draining begins is returned, not dropped.
    """
    message: str | bytes | None = None

    async def receive() -> None:
        nonlocal message
        with contextlib.suppress(ConnectionClosed):
            message = await ws.get_message()
        nursery.cancel_scope.cancel()

    async def until_draining() -> None:
        await gr.wait_draining()
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        nursery.start_soon(until_draining)
    return message


async def echo(request: WebSocketRequest, gr: graceful_restart.GracefulRestart) -> None:
    """Answer each message with ``<pid> <message>``; close with 1001 once draining."""
    async with gr.lease():  # one lease per websocket, for as long as it is open
        ws = await request.accept()
        pid = os.getpid()
        try:
            while (message := await receive_unless_draining(ws, gr)) is not None:
                if isinstance(message, str):
                    await ws.send_message(f"{pid} {message}")
                else:
                    await ws.send_message(f"{pid} ".encode() + message)
        except ConnectionClosed:
            return  # the client went away while we answered
        # Draining (or closed by the client, where aclose() does nothing): going away.
        await ws.aclose(code=GOING_AWAY, reason="server restarting")


async def main(port: int, pid_file: str | None, drain_timeout: float) -> None:
    async with graceful_restart.open(pid_file=pid_file, drain_timeout=drain_timeout) as gr:
        listeners = await gr.open_tcp_listeners(port, host="127.0.0.1")

        async def serve_websocket(stream: trio.SocketStream) -> None:
            await echo(await wrap_server_stream(handlers, stream), gr)

        # Like gr.serve_listeners: the server holds a lease until its last handler is
        # done; it accepts until this process stops accepting (pausing while a successor
        # is on probation); it says ready once it accepts.
        async with gr.lease(), trio.open_nursery() as handlers:
            await gr.accept_connections(listeners, serve_websocket, handler_nursery=handlers)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--pid-file")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    trio.run(main, args.port, args.pid_file, args.drain_timeout)
