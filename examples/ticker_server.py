"""A line-based TCP server with long-lived subscribers, restarted without cutting one.

Each client that connects gets ``tick N from PID`` every 100 ms. When this copy drains,
every subscriber is told why, in the protocol, before its connection ends:

- ``reconnect``: a new copy serves now (a restart): connect again at once;
- ``bye``: the service is stopping: back off.

then the connection ends cleanly: half-close (FIN), read and drop what the client still
sends until it closes (at most 5 s), close. No reset, nothing cut short::

    python examples/ticker_server.py --port 8008 --pid-file /tmp/ticker.pid
    nc 127.0.0.1 8008                      # tick 1 from 4242, tick 2 from 4242, ...
    kill -HUP "$(cat /tmp/ticker.pid)"     # after the probation: "reconnect", then the end
    kill -TERM "$(cat /tmp/ticker.pid)"    # subscribers get "bye"
"""

from __future__ import annotations

import argparse
import logging
import os

import trio

import graceful_restart_trio as graceful_restart

TICK = 0.1
LINGER = 5.0


async def subscriber(gr: graceful_restart.GracefulRestart, stream: trio.SocketStream) -> None:
    """Tick until this copy drains; then say why, and end the connection cleanly."""
    try:
        count = 0
        while gr.drain_reason is None:
            count += 1
            await stream.send_all(f"tick {count} from {os.getpid()}\n".encode())
            with trio.move_on_after(TICK):  # only the wait is cut short, never a send
                await gr.wait_draining()
        await stream.send_all(b"reconnect\n" if gr.drain_reason == "handover" else b"bye\n")
        await stream.send_eof()
        with trio.move_on_after(LINGER):
            while await stream.receive_some():
                pass
    except trio.BrokenResourceError:
        pass  # the client left first: nothing to say to it


async def main(port: int, pid_file: str | None, probation: float) -> None:
    async with graceful_restart.open(pid_file=pid_file, probation=probation) as gr:
        listeners = await gr.open_tcp_listeners(port, host="127.0.0.1")

        async def handler(stream: trio.SocketStream) -> None:
            await subscriber(gr, stream)

        await gr.serve_listeners(handler, listeners)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8008)
    parser.add_argument("--pid-file")
    parser.add_argument("--probation", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    trio.run(main, args.port, args.pid_file, args.probation)
