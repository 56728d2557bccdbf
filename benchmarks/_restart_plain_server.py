"""The demo app on hypercorn's trio worker, without graceful_restart_trio's restart machinery.

Used by ``restart_under_load.py`` for the two restart methods it compares the library with::

    python benchmarks/_restart_plain_server.py --port P              # (a) SO_REUSEADDR
    python benchmarks/_restart_plain_server.py --port P --reuseport  # (b) + SO_REUSEPORT

It binds the socket itself (SO_REUSEADDR, and SO_REUSEPORT with ``--reuseport``, so that a
new copy can bind the port while the old one still listens) and gives it to
``hypercorn.trio.serve`` as ``fd://N``. SIGTERM or SIGINT is hypercorn's graceful
shutdown: stop accepting, close the listener, finish the requests in flight, exit.

The app is ``graceful_restart_trio.demo.app``, the one the library's demo serves;
importing it costs ~15 ms of the library's own imports, which this start-up includes.
"""

from __future__ import annotations

import argparse
import signal
import socket
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from graceful_restart_trio.demo import app

BACKLOG = 4096
"""As the library binds (hypercorn then calls ``listen(config.backlog)`` again, in both)."""


def _listening_socket(host: str, port: int, *, reuseport: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


async def _serve(host: str, port: int, *, reuseport: bool, graceful_timeout: float) -> None:
    # Handle the stop signals before listening, so that no SIGTERM can kill us half-way.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def stop_signal() -> None:
            async for _ in signals:
                return

        sock = _listening_socket(host, port, reuseport=reuseport)
        config = Config()
        config.graceful_timeout = graceful_timeout
        config.bind = [f"fd://{sock.detach()}"]  # hypercorn takes ownership of the fd
        # hypercorn's own ASGI types are stricter than the demo app's (as in asgi.py)
        await serve(cast(Any, app), config, shutdown_trigger=stop_signal)


def main() -> None:
    """Parse the command line and serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reuseport", action="store_true", help="also set SO_REUSEPORT")
    parser.add_argument("--graceful-timeout", type=float, default=5.0)
    args = parser.parse_args()
    trio.run(
        lambda: _serve(
            args.host, args.port, reuseport=args.reuseport, graceful_timeout=args.graceful_timeout
        )
    )


if __name__ == "__main__":
    main()
