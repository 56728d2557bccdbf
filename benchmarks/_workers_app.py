"""The hello ASGI app that names the process that answered, for ``workers.py``.

``GET /`` answers ``hello`` with the headers of ``_hello_server.py``'s ASGI app plus
``x-pid: <pid of the answering process>``; ``GET /slow?ms=N`` answers the same after N
ms (a request in flight across a restart). It sleeps with trio under trio and with
asyncio under an asyncio loop (uvicorn, granian).

The module imports neither trio nor the library at the top, so uvicorn and granian serve
``_workers_app:app`` from an interpreter that has neither. Run as a script, it serves the
app with ``graceful_restart_trio.asgi.serve`` (HTTP/1.1 on the httptools path) under
``graceful_restart_trio.open()`` on 127.0.0.1:PORT; under the keeper that is one worker.

Usage::

    python benchmarks/_workers_app.py [--port PORT]
    uvicorn --app-dir benchmarks _workers_app:app ...
    granian --interface asgi --working-dir benchmarks _workers_app:app ...
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

HOST = "127.0.0.1"
BODY = b"hello"
HEADERS = [
    (b"content-type", b"text/plain"),
    (b"content-length", str(len(BODY)).encode()),
    (b"server", b"hello-bench"),
]


async def sleep(seconds: float) -> None:
    """Sleep on whichever event loop runs this: asyncio's, else trio's."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        import trio  # noqa: PLC0415 - not under asyncio: trio is running

        await trio.sleep(seconds)
    else:
        await asyncio.sleep(seconds)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:  # noqa: ANN401
    """``hello`` and the pid; ``/slow?ms=N`` after N ms."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/slow":
        query = dict(p.split(b"=", 1) for p in scope["query_string"].split(b"&") if b"=" in p)
        await sleep(int(query.get(b"ms", b"0")) / 1000)
    headers = [*HEADERS, (b"x-pid", str(os.getpid()).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


async def serve(port: int) -> None:
    """The app on ``asgi.serve`` under ``graceful_restart_trio.open()``."""
    import graceful_restart_trio as graceful_restart  # noqa: PLC0415 - see the docstring
    from graceful_restart_trio import asgi  # noqa: PLC0415

    async with graceful_restart.open() as gr:
        listeners = await gr.open_tcp_listeners(port, host=HOST)
        await asgi.serve(gr, app, listeners)


def main() -> None:
    import trio  # noqa: PLC0415 - see the docstring

    parser = argparse.ArgumentParser(description="hello app with the pid, for workers.py")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0)")
    args = parser.parse_args()
    trio.run(serve, args.port)


if __name__ == "__main__":
    main()
