"""uvicorn, one worker (``[standard]``: httptools and uvloop), serving the hello app.

For ``server_throughput.py --compare http1``: the same answer as ``_hello_server.py``'s
ASGI variants. Needs only uvicorn (run it with an interpreter that has
``uvicorn[standard]``). Picks a free port on 127.0.0.1, prints it, serves until SIGTERM
(the benchmark retries its first request until the server answers).

Usage::

    python benchmarks/_uvicorn_server.py [--cpu N]
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
from typing import Any

uvicorn: Any = importlib.import_module("uvicorn")  # not in the type-checking environment

HOST = "127.0.0.1"
BODY = b"hello"
HEADERS = [
    (b"content-type", b"text/plain"),
    (b"content-length", b"5"),
    (b"server", b"hello-bench"),
]


async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:  # noqa: ANN401
    """``hello``, with the same headers as ``_hello_server.py``."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main() -> None:
    parser = argparse.ArgumentParser(description="uvicorn hello server for benchmarks")
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    with socket.socket() as probe:  # a free port (uvicorn binds it itself)
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        hello_app, host=HOST, port=port, workers=1, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    print(port, flush=True)
    server.run()


if __name__ == "__main__":
    main()
