"""A trio echo server that restarts with ``kill -HUP`` and drains on ``kill -TERM``.

Run it, then talk to it with ``nc 127.0.0.1 8007``::

    python examples/echo_server.py --port 8007 --pid-file /tmp/echo.pid
    kill -HUP "$(cat /tmp/echo.pid)"    # a new copy takes over; open connections stay
    kill -TERM "$(cat /tmp/echo.pid)"   # stop accepting, finish, exit

Each reply line starts with the pid of the process that answered.
"""

from __future__ import annotations

import argparse
import logging
import os

import trio

import graceful_restart_trio as graceful_restart


async def echo(stream: trio.SocketStream) -> None:
    """Answer each chunk with ``<pid> <chunk>`` until the client closes."""
    async for chunk in stream:
        await stream.send_all(f"{os.getpid()} ".encode() + chunk)


async def main(port: int, pid_file: str | None, drain_timeout: float) -> None:
    async with graceful_restart.open(pid_file=pid_file, drain_timeout=drain_timeout) as gr:
        listeners = await gr.open_tcp_listeners(port, host="127.0.0.1")
        await gr.serve_listeners(echo, listeners)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8007)
    parser.add_argument("--pid-file")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    trio.run(main, args.port, args.pid_file, args.drain_timeout)
