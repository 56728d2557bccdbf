"""A hello-world HTTP/1.1 keep-alive server, for server_throughput.py.

Two variants of the same trio + h11 connection handler:

- ``plain``: ``trio.serve_listeners`` on ``trio.open_tcp_listeners``, no library at all;
- ``leased``: under ``graceful_restart_trio.open()``, ``gr.open_tcp_listeners`` +
  ``gr.serve_listeners`` (one lease per connection) and ``async with gr.lease():`` around
  each request as well.

And three of the same ASGI app:

- ``hypercorn``: ``hypercorn.trio.serve``, no library at all;
- ``asgi``: under ``graceful_restart_trio.open()``, ``graceful_restart_trio.asgi.serve``
  (HTTP/1.1 on the library's httptools connection, its default);
- ``asgi-hypercorn``: the same with ``http1="hypercorn"`` (hypercorn's h11 code).

(uvicorn, for comparison, runs from ``_uvicorn_server.py``: it needs no trio.)

Binds port 0 on 127.0.0.1 and prints the port on stdout (one line) once listening.
SIGTERM stops it: ``plain`` cancels at once, ``leased`` lets the library drain.

Usage::

    python benchmarks/_hello_server.py --variant plain|leased|hypercorn|asgi|asgi-hypercorn
        [--cpu N]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

import h11
import trio

HOST = "127.0.0.1"
BODY = b"hello"
RESPONSE_HEADERS = [
    ("content-type", "text/plain"),
    ("content-length", str(len(BODY))),
    ("server", "hello-bench"),
]
MAX_RECV = 65536

Handler = Callable[[trio.SocketStream], Awaitable[None]]


def make_handler(lease: Callable[[], AbstractAsyncContextManager[None]] | None) -> Handler:
    """The connection handler; ``lease()``, if given, is entered around each request.

    Without ``lease`` there is no ``async with`` at all: the baseline pays for nothing.
    """

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await next_event(conn, stream)
                if not isinstance(event, h11.Request):
                    return  # the client closed, or sent something we do not serve
                if lease is None:
                    answered = await answer(conn, stream)
                else:
                    async with lease():
                        answered = await answer(conn, stream)
                if not answered:
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    return handle


async def answer(conn: h11.Connection, stream: trio.SocketStream) -> bool:
    """Read the rest of the request, send 200 "hello"; False if the client went away."""
    while not isinstance(await next_event(conn, stream), h11.EndOfMessage):
        if conn.their_state is h11.CLOSED:
            return False
    await stream.send_all(respond(conn))
    return True


def respond(conn: h11.Connection) -> bytes:
    """The bytes of a complete 200 "hello" response."""
    parts = [
        conn.send(h11.Response(status_code=200, headers=RESPONSE_HEADERS, reason=b"OK")),
        conn.send(h11.Data(data=BODY)),
        conn.send(h11.EndOfMessage()),
    ]
    return b"".join(part for part in parts if part is not None)


async def next_event(conn: h11.Connection, stream: trio.SocketStream) -> object:
    """The next h11 event, reading from ``stream`` as needed."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(MAX_RECV))


def announce(listeners: list[trio.SocketListener]) -> None:
    """Print the port so the benchmark can connect."""
    print(listeners[0].socket.getsockname()[1], flush=True)


async def serve_plain() -> None:
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    async with trio.open_nursery() as nursery:
        await nursery.start(stop_on_sigterm, nursery.cancel_scope)
        announce(listeners)
        await trio.serve_listeners(make_handler(None), listeners)


async def stop_on_sigterm(
    scope: trio.CancelScope | None,
    stopped: trio.Event | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for _ in signals:
            if scope is not None:
                scope.cancel()
            if stopped is not None:
                stopped.set()
            return


async def serve_leased(drain_timeout: float) -> None:
    import graceful_restart_trio as graceful_restart  # noqa: PLC0415 - plain must not load it

    async with graceful_restart.open(drain_timeout=drain_timeout) as gr:
        listeners = await gr.open_tcp_listeners(0, host=HOST)
        announce(listeners)
        await gr.serve_listeners(make_handler(gr.lease), listeners)


async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:  # noqa: ANN401
    """The ASGI app: ``hello`` with the same headers as the h11 handler."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(name.encode(), value.encode()) for name, value in RESPONSE_HEADERS]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


async def serve_hypercorn() -> None:
    from hypercorn.config import Config  # noqa: PLC0415 - the h11 variants must not load it
    from hypercorn.trio import serve  # noqa: PLC0415

    sock = socket.socket()
    sock.bind((HOST, 0))
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    print(sock.getsockname()[1], flush=True)
    stopped = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(stop_on_sigterm, None, stopped)
        await serve(cast(Any, hello_app), config, shutdown_trigger=stopped.wait)
        nursery.cancel_scope.cancel()


async def serve_asgi(drain_timeout: float, http1: str = "httptools") -> None:
    import graceful_restart_trio as graceful_restart  # noqa: PLC0415
    from graceful_restart_trio import asgi  # noqa: PLC0415

    async with graceful_restart.open(drain_timeout=drain_timeout) as gr:
        listeners = await gr.open_tcp_listeners(0, host=HOST)
        announce(listeners)
        await asgi.serve(gr, hello_app, listeners, http1=cast(asgi.HTTP1, http1))


def main() -> None:
    parser = argparse.ArgumentParser(description="hello-world HTTP server for benchmarks")
    parser.add_argument(
        "--variant",
        choices=["plain", "leased", "hypercorn", "asgi", "asgi-hypercorn"],
        required=True,
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=2.0, help="leased: drain bound (default 2 s)"
    )
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.variant == "plain":
        trio.run(serve_plain)
    elif args.variant == "leased":
        trio.run(serve_leased, args.drain_timeout)
    elif args.variant == "hypercorn":
        trio.run(serve_hypercorn)
    elif args.variant == "asgi-hypercorn":
        trio.run(serve_asgi, args.drain_timeout, "hypercorn")
    else:
        trio.run(serve_asgi, args.drain_timeout)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
