"""Raw HTTP/1.1 over a socket: an in-process server on loopback, bytes in, responses out.

The responses are parsed here by hand (status, header fields, body by ``content-length``,
chunked, or until close), so that what the server sent is checked as sent.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Any

import attrs
import trio

import graceful_restart_trio as graceful_restart
from graceful_restart_trio import asgi
from graceful_restart_trio._http_connection import IdleClose
from graceful_restart_trio._hypercorn import Config

from .conftest import TIMEOUT

Message = dict[str, Any]


@attrs.frozen
class Response:
    """One parsed response: header names lower-cased, body de-chunked."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool = False
    complete: bool = True  # False: the connection ended inside the body

    def header(self, name: bytes) -> bytes | None:
        """The value of the last field called ``name``, or None."""
        found = [value for key, value in self.headers if key == name]
        return found[-1] if found else None


def parse_responses(data: bytes, bodiless: Sequence[bool] = ()) -> list[Response]:
    """Every response in ``data``; ``bodiless[i]``: the i-th final response answers HEAD."""
    responses: list[Response] = []
    while data:
        head, separator, data = data.partition(b"\r\n\r\n")
        assert separator, f"an incomplete response head: {head!r}"
        status_line, *lines = head.split(b"\r\n")
        status = int(status_line.split(b" ")[1])
        headers = [
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(b":") for line in lines)
        ]
        names = {name for name, _ in headers}
        final = [response for response in responses if response.status >= 200]
        head_request = len(final) < len(bodiless) and bodiless[len(final)]
        chunked = b"transfer-encoding" in names
        complete = True
        if status < 200 or status in (204, 304) or head_request:
            body = b""
        elif chunked:
            body, data, complete = dechunk(data)
        elif b"content-length" in names:
            length = int(dict(headers)[b"content-length"])
            body, data = data[:length], data[length:]
        else:
            body, data = data, b""
        responses.append(Response(status, headers, body, chunked, complete))
    return responses


def dechunk(data: bytes) -> tuple[bytes, bytes, bool]:
    """A chunked body, what follows it, and whether its last chunk came."""
    body = b""
    while True:
        size_line, separator, data = data.partition(b"\r\n")
        if not separator:
            return body, b"", False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            _, _, rest = data.partition(b"\r\n")  # no trailers are sent
            return body, rest, True
        body += data[:size]
        data = data[size + 2 :]


async def read_to_eof(stream: trio.abc.Stream, timeout: float = TIMEOUT) -> bytes:
    """Everything the server sends until it closes (a reset ends it too)."""
    chunks = []
    with trio.fail_after(timeout):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection; return all the server sent until it closed."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(data)
        return await read_to_eof(stream)


async def receive_until(stream: trio.abc.Stream, done: Callable[[bytes], bool]) -> bytes:
    """Read until ``done(what came so far)``; fail if the server closes first."""
    data = b""
    with trio.fail_after(TIMEOUT):
        while not done(data):
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk
    return data


@contextlib.asynccontextmanager
async def serving(
    app: Any,
    http1: asgi.HTTP1 = "httptools",
    config: Config | None = None,
    *,
    max_body_size: int | None = None,
    drain_timeout: float = 10,
    idle_close: IdleClose = "prompt",
) -> AsyncIterator[tuple[graceful_restart.GracefulRestart, int]]:
    """``asgi.serve(app)`` in this process on a loopback port; shut down on the way out."""
    async with (
        graceful_restart.open(drain_timeout=drain_timeout) as gr,
        trio.open_nursery() as nursery,
    ):
        listeners = await gr.open_tcp_listeners(0, host="127.0.0.1")
        port = int(listeners[0].socket.getsockname()[1])
        serve = partial(
            asgi.serve,
            gr,
            app,
            listeners,
            config,
            http1=http1,
            max_body_size=max_body_size,
            idle_close=idle_close,
        )
        nursery.start_soon(serve)
        await gr.state_value.wait_value(graceful_restart.State.SERVING)
        yield gr, port
        gr.shutdown()


@attrs.define
class RecordingApp:
    """An ASGI app whose routes exercise the protocol; it keeps each scope and message.

    - ``/echo`` (and any other path): reads the body; answers ``METHOD PATH BYTES``.
    - ``/chunked``: no content-length, two body messages.
    - ``/status/N``: status N with a body of ``x`` (dropped where none is allowed).
    - ``/early``: answers 200 without reading the body.
    - ``/raise``: raises before the response; ``/raise-late`` after its first piece.
    - ``/trailers``: asks for response trailers.
    - ``/wait-disconnect``: reads the body, then waits for ``http.disconnect``.
    - ``/never``: never answers.
    - ``/gate``: waits for ``gate``, then answers like ``/echo``.
    - ``/big``: 200 kB.
    - ``/slow``: takes 0.2 s, then answers like ``/echo``.
    """

    scopes: list[dict[str, Any]] = attrs.field(factory=list)
    received: list[Message] = attrs.field(factory=list)
    entered: defaultdict[str, trio.Event] = attrs.field(factory=lambda: defaultdict(trio.Event))
    """Set when a request for the path has come to the app (``/x`` and ``/x:body`` once
    its body has been read)."""
    disconnected: trio.Event = attrs.field(factory=trio.Event)
    partial_body: trio.Event = attrs.field(factory=trio.Event)
    gate: trio.Event = attrs.field(factory=trio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                scope["state"]["answer"] = 42
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.scopes.append(scope)
        path = scope["path"]
        self.entered[path].set()
        await self.before_body(path, send)
        body = b"" if path == "/early" else await self.read_body(receive)
        self.entered[f"{path}:body"].set()
        if path == "/wait-disconnect":
            message = await receive()
            self.received.append(message)
            if message["type"] == "http.disconnect":
                self.disconnected.set()
        elif path == "/big":
            await self.answer(send, 200, b"x" * 200_000)
        elif path.startswith("/status/"):
            await self.answer(send, int(path.rsplit("/", 1)[1]), b"x")
        elif path in ("/chunked", "/raise-late"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"one,", "more_body": True})
            if path == "/raise-late":
                raise RuntimeError("the application fails while answering")
            await send({"type": "http.response.body", "body": b"two"})
        else:
            await self.answer(send, 200, f"{scope['method']} {path} {len(body)}".encode())

    async def before_body(self, path: str, send: Any) -> None:
        if path == "/never":
            await trio.sleep_forever()
        elif path == "/gate":
            await self.gate.wait()
        elif path == "/slow":
            await trio.sleep(0.2)  # longer than the drain's 50 ms of quiet
        elif path == "/raise":
            raise RuntimeError("the application fails before answering")
        elif path == "/trailers":
            await send({"type": "http.response.start", "status": 200, "trailers": True})

    async def read_body(self, receive: Any) -> bytes:
        body = b""
        while True:
            message: Message = await receive()
            self.received.append(message)
            body += bytes(message.get("body", b""))
            if not message.get("more_body", False):
                return body
            self.partial_body.set()

    @staticmethod
    async def answer(send: Any, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
