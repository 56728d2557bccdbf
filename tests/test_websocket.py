"""Websockets under a restart (examples/websocket_server.py): 1001, reconnect, drain deadline."""

from __future__ import annotations

import contextlib
import itertools
import signal
import sys
from collections.abc import AsyncIterator, Callable

import pytest
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, wrap_client_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Request, TextMessage

from .conftest import ROOT, TIMEOUT, Server, children

StartServer = Callable[..., Server]
EXAMPLE = ROOT / "examples" / "websocket_server.py"
GOING_AWAY = 1001


async def start_example(start_server: StartServer, *args: str) -> tuple[Server, int]:
    """Start the websocket example; return it and the pid that serves."""
    server = start_server("--port", "0", *args, command=[sys.executable, str(EXAMPLE)])
    return server, await trio.to_thread.run_sync(server.wait_serving)


@contextlib.asynccontextmanager
async def open_websocket(port: int, path: str = "/") -> AsyncIterator[WebSocketConnection]:
    """A websocket to ``ws://127.0.0.1:PORT/path``, on a TCP stream closed on the way out.

    Not ``open_websocket_url``: in trio-websocket 0.12 a client whose server closes first
    never closes its socket (``aclose()`` returns early), which is a ResourceWarning.
    """
    async with (
        await trio.open_tcp_stream("127.0.0.1", port) as stream,
        trio.open_nursery() as nursery,
    ):
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", path)
        try:
            yield ws
        finally:
            await ws.aclose()


async def ask(ws: WebSocketConnection, message: str) -> str | bytes:
    """Send one message and return the answer."""
    await ws.send_message(message)
    return await ws.get_message()


async def chat_until_closed(
    ws: WebSocketConnection, sent: list[str], answers: list[str | bytes]
) -> CloseReason | None:
    """Send a message, wait for its answer, again, until the server closes; return why."""
    with contextlib.suppress(ConnectionClosed):
        for number in itertools.count():
            message = f"m{number}"
            await ws.send_message(message)
            sent.append(message)
            answers.append(await ws.get_message())
    return ws.closed


async def test_sighup_closes_websockets_with_1001_and_the_successor_answers(
    start_server: StartServer,
) -> None:
    """SIGHUP: open websockets are answered, then closed with 1001; new ones reach the new pid."""
    server, old = await start_example(start_server)
    sent: list[str] = []
    answers: list[str | bytes] = []
    with trio.fail_after(TIMEOUT):
        async with open_websocket(server.port) as ws:
            assert await ask(ws, "hello") == f"{old} hello"
            async with trio.open_nursery() as nursery:
                closing: list[CloseReason | None] = []

                async def chat() -> None:
                    closing.append(await chat_until_closed(ws, sent, answers))

                nursery.start_soon(chat)
                await trio.to_thread.run_sync(server.signal, signal.SIGHUP)
                new = await trio.to_thread.run_sync(server.wait_handover, old)
    (reason,) = closing
    assert reason is not None
    assert reason.code == GOING_AWAY, reason
    assert answers, "the chat ran during the handover"
    # Answered in order, each by the old pid; at most the last message (sent while the
    # close frame was on its way) is unanswered, and it goes to the successor instead.
    assert answers == [f"{old} {message}" for message in sent[: len(answers)]]
    unanswered = sent[len(answers) :]
    assert len(unanswered) <= 1, unanswered
    assert await trio.to_thread.run_sync(server.wait_exit, old) == 0
    with trio.fail_after(TIMEOUT):
        async with open_websocket(server.port) as ws:
            for message in ["again", *unanswered]:
                assert await ask(ws, message) == f"{new} {message}"
            await trio.to_thread.run_sync(server.signal, signal.SIGTERM, new)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason is not None
    assert closed.value.reason.code == GOING_AWAY, closed.value.reason
    assert await trio.to_thread.run_sync(server.wait_exit, new) == 0
    log = server.log()
    assert f"[pid {old}] drained" in log
    assert f"[pid {new}] drained" in log
    assert children() == []


async def next_event(stream: trio.SocketStream, client: WSConnection) -> Event:
    """The next websocket event the raw client gets from the server."""
    while (event := next(client.events(), None)) is None:
        data = await stream.receive_some()
        assert data, "the server closed the connection"
        client.receive_data(data)
    return event


async def test_client_ignoring_the_close_is_cut_off_at_the_drain_deadline(
    start_server: StartServer,
) -> None:
    """A client that never answers the close holds the old copy only until the drain deadline."""
    server, old = await start_example(start_server, "--drain-timeout", "2")
    with trio.fail_after(TIMEOUT):
        async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
            client = WSConnection(ConnectionType.CLIENT)
            await stream.send_all(client.send(Request(host="127.0.0.1", target="/")))
            assert isinstance(await next_event(stream, client), AcceptConnection)
            await stream.send_all(client.send(TextMessage(data="hello")))
            answer = await next_event(stream, client)
            assert isinstance(answer, TextMessage)
            assert answer.data == f"{old} hello"
            await trio.to_thread.run_sync(server.signal, signal.SIGHUP)
            new = await trio.to_thread.run_sync(server.wait_handover, old)
            # From now on the client reads nothing until the old copy is gone.
            assert await trio.to_thread.run_sync(server.wait_exit, old) == 0
            close = await next_event(stream, client)
            assert isinstance(close, CloseConnection)
            assert close.code == GOING_AWAY
            assert await stream.receive_some() == b"", "cut off after the close"
    log = server.log()
    assert f"[pid {old}] drain deadline passed" in log
    assert f"[pid {old}] drained" not in log
    await trio.to_thread.run_sync(server.signal, signal.SIGTERM, new)
    assert await trio.to_thread.run_sync(server.wait_exit, new) == 0
    assert children() == []
