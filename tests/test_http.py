"""The HTTP layer with real clients: HTTP/1.1, h2c and h2 over TLS (httpx, and a
spec-following h2 client), the lifespan, idle and closed connections, a WebSocket and
an event stream, all through the Starlette example (``examples/starlette_app.py``).

The tests that take the ``http1`` fixture run twice: HTTP/1.1 served by the library's
httptools connection (the default) and by hypercorn's code."""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, WebSocketConnection

import graceful_restart_trio as graceful_restart
from graceful_restart_trio import asgi
from graceful_restart_trio._http_connection import H1_QUIET
from graceful_restart_trio._hypercorn import Config, LifespanFailureError, check_version

from ._h2 import H2Load
from ._load import Client, HttpKeepAlive, Httpx, start_clients
from .conftest import ROOT, TIMEOUT, Server, wait_until
from .test_websocket import ask, open_websocket


async def chat_until_closed(ws: WebSocketConnection) -> None:
    """Talk until the server closes the WebSocket."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ask(ws, "more")


StartServer = Callable[..., Server]
HTTP1_PATHS = ["httptools", "hypercorn"]


@pytest.fixture(params=HTTP1_PATHS)
def http1(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The HTTP/1.1 code, for servers started now (the environment) and in-process."""
    path: str = request.param
    monkeypatch.setenv(asgi.HTTP1_ENV, path)
    return path


APP = ROOT / "examples" / "starlette_app.py"
CAP = 500_000
GOING_AWAY = 1001


def start_app(start_server: StartServer, *args: str) -> tuple[Server, int]:
    """Start the Starlette example (probation 0.2 s); return it and its serving pid."""
    server = start_server(
        "--port", "0", "--probation", "0.2", *args, command=[sys.executable, str(APP)]
    )
    return server, server.wait_serving()


def restart(server: Server, old: int, load: Callable[[], int]) -> int:
    """SIGHUP ``old`` once some requests went through; return the new pid."""
    answered = load()
    wait_until(lambda: load() > answered + 5, "requests before the restart")
    server.signal(signal.SIGHUP, old)
    new = server.wait_handover(old)
    wait_until(lambda: f"[pid {new}] handed the service: in charge" in server.log(), "commit")
    return new


def failures(clients: list[Client]) -> list[str]:
    return [failure for client in clients for failure in client.tally.failures]


def idle_close_race(failure: str) -> bool:
    """The cost of the default ``idle_close="prompt"`` (see the guide): an HTTP/1.1
    request sent on a connection just as the old copy closes it, having found it idle for
    ``H1_QUIET``, which needs the client to have sent nothing for that long (a client
    thread stalled on a busy machine)."""
    found = re.search(r"Server disconnected without sending a response\. \((\d+) ms after", failure)
    return found is not None and int(found.group(1)) >= H1_QUIET * 1000


class SlowHttpx(Httpx):
    path = "/sleep?seconds=0.2"


class Http1Httpx(Httpx):
    http2 = False


def test_http1_h2c_and_a_spec_following_h2_client_lose_nothing_across_restarts(
    start_server: StartServer, http1: str
) -> None:
    """3 restarts under HTTP/1.1, httpx h2c (fast and slow) and h2 with 2 streams in
    flight: every request answered; h2 connections are sent away with GOAWAY; every old
    copy's lifespan shutdown completes and it exits 0."""
    server, first = start_app(start_server)
    clients = [("h2c", Httpx), ("h2c-slow", SlowHttpx), ("h1", Http1Httpx)]
    load = start_clients([*clients, ("h1-keep-alive", HttpKeepAlive)], server.port, CAP)
    stop = threading.Event()
    h2 = H2Load(server.port, stop, streams=2, path="/sleep?seconds=0.05")
    pids = [first]
    with load:
        h2.start()
        for _ in range(3):
            pids.append(restart(server, pids[-1], lambda: load.requests() + h2.completed))
        wait_until(lambda: h2.pids[str(pids[-1])] > 5, "h2 requests to the last copy")
        stop.set()
        h2.join(TIMEOUT)
    lost = failures(load.clients)
    assert [f for f in lost if not idle_close_race(f)] == []
    assert len(lost) <= 1, lost  # at most one such race in three restarts
    assert not h2.failures, h2.failures
    assert h2.goaways >= 1  # each connection it had on an old copy was sent away
    assert set(h2.pids) <= {str(pid) for pid in pids}
    for client in load.clients[:3]:
        assert isinstance(client, Httpx)
        assert set(client.versions) == {"HTTP/1.1" if client.name == "h1" else "HTTP/2"}
    for old in pids[:-1]:
        assert server.wait_exit(old) in (0, None)
        assert f"lifespan shutdown complete (pid {old})" in server.log()
    assert "drain deadline passed" not in server.log()


def test_h2_over_tls_across_a_restart_and_a_stop(
    start_server: StartServer, tmp_path: Path, http1: str
) -> None:
    """h2 negotiated by ALPN with a test certificate: a restart under load loses nothing;
    a stop lets the request in flight finish."""
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)

    class Tls(Httpx):
        base, verify = "https", trusted

    class SlowTls(Tls):
        path = "/sleep?seconds=0.2"

    server, first = start_app(start_server, "--certfile", str(pem), "--keyfile", str(pem))
    load = start_clients([("h2", Tls), ("h2-slow", SlowTls)], server.port, CAP)
    with load:
        second = restart(server, first, load.requests)
        answered = load.requests()
        wait_until(lambda: load.requests() > answered + 5, "requests after the restart")
    assert not failures(load.clients)
    for client in load.clients:
        assert isinstance(client, Httpx)
        assert set(client.versions) == {"HTTP/2"}
    answers: list[str] = []
    with httpx.Client(http2=True, verify=trusted, timeout=TIMEOUT) as h2:

        def slow_request() -> None:
            url = f"https://127.0.0.1:{server.port}/sleep?seconds=1"
            answers.append(h2.get(url).text)

        in_flight = threading.Thread(target=slow_request)
        in_flight.start()
        wait_until(lambda: f"a request sleeps 1s (pid {second})" in server.log(), "the request")
        server.signal(signal.SIGTERM, second)
        in_flight.join(TIMEOUT)
    assert answers == [f"hello from pid {second}\n"]
    assert server.wait_exit(second) in (0, None)
    assert f"lifespan shutdown complete (pid {second})" in server.log()


def test_idle_and_client_closed_connections_do_not_hold_the_drain(
    start_server: StartServer, http1: str
) -> None:
    """With a 600 s keep-alive and drain deadline, a SIGTERM still exits at once: idle
    HTTP/1.1 and HTTP/2 connections are closed (a clean FIN), closed ones are noticed."""
    server, pid = start_app(start_server, "--keep-alive-timeout", "600", "--drain-timeout", "600")
    idle, closed = (http.client.HTTPConnection("127.0.0.1", server.port) for _ in range(2))
    for connection in (idle, closed):
        connection.request("GET", "/")
        response = connection.getresponse()
        assert response.read().decode() == f"hello from pid {pid}\n"
        # hypercorn names itself; the library's connection sends no server header
        assert response.getheader("server") == {"hypercorn": "hypercorn-h11"}.get(http1)
    closed.close()
    with httpx.Client(http1=False, http2=True) as h2c:
        assert h2c.get(f"http://127.0.0.1:{server.port}/").http_version == "HTTP/2"
        server.signal(signal.SIGTERM, pid)
        assert server.wait_exit(pid) in (0, None)
    assert idle.sock is not None
    assert idle.sock.recv(1) == b""  # the server's FIN, not a reset
    idle.close()
    assert "drained" in server.log()
    assert "drain deadline passed" not in server.log()


async def test_websocket_closes_with_1001_and_event_stream_ends_on_restart(
    start_server: StartServer, http1: str
) -> None:
    """Through Starlette: on a restart the WebSocket is closed with 1001 and the event
    stream says ``event: restart`` and ends; new connections reach the successor."""
    server, old = await trio.to_thread.run_sync(start_app, start_server)
    port = server.port
    async with (
        httpx.AsyncClient(timeout=TIMEOUT) as client,
        client.stream("GET", f"http://127.0.0.1:{port}/events?every=0.05") as events,
        open_websocket(port, "/ws") as ws,
    ):
        assert await ask(ws, "hi") == f"{old} hi"
        lines = events.aiter_lines()
        assert (await anext(lines)).startswith(f"data: tick 1 from pid {old}")
        server.signal(signal.SIGHUP, old)
        with trio.fail_after(TIMEOUT):
            await chat_until_closed(ws)
        assert ws.closed is not None
        assert ws.closed.code == GOING_AWAY
        rest = [line async for line in lines]
        assert rest[-3:-1] == ["event: restart", "data: reconnect"]
    new = await trio.to_thread.run_sync(server.wait_handover, old)
    async with open_websocket(port, "/ws") as ws:
        assert await ask(ws, "again") == f"{new} again"
    assert await trio.to_thread.run_sync(server.wait_exit, old) in (0, None)


# -- in-process: the asgi module's contract -----------------------------------------------


async def call(app: Any, scope: dict[str, Any]) -> tuple[int, bytes]:
    """Call an ASGI app; return its status and body."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def test_readiness_says_200_while_serving_and_503_while_starting_or_draining() -> None:
    async with graceful_restart.open() as gr:
        scope = {"type": "http", "state": {"graceful_restart": gr}}
        assert await call(asgi.readiness, scope) == (503, b"not serving\n")  # starting
        gr.ready()
        assert await call(asgi.readiness, scope) == (200, b"serving\n")
        gr.shutdown()
        assert await call(asgi.readiness, scope) == (503, b"not serving\n")
    with pytest.raises(LookupError, match=r"asgi\.serve"):
        asgi.graceful_restart({"type": "http", "state": {}})


@pytest.mark.parametrize("version", ["0.16.0", "0.19.0", "1.0"])
def test_an_unsupported_hypercorn_fails_clearly(version: str) -> None:
    with pytest.raises(ImportError, match=rf"hypercorn >=0\.17,<0\.19 .* {version} is installed"):
        check_version(version)
    check_version("0.17.3")
    check_version("0.18.0")


@pytest.mark.parametrize(
    ("field", "value"), [("bind", ["0.0.0.0:80"]), ("workers", 2), ("graceful_timeout", 9.0)]
)
async def test_config_fields_not_served_are_refused(field: str, value: object) -> None:
    config = Config()
    setattr(config, field, value)
    async with graceful_restart.open() as gr:
        with pytest.raises(ValueError, match=rf"Config\.{field} is not used"):
            await asgi.serve(gr, asgi.readiness, [], config)


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"wsgi {environ['PATH_INFO']}".encode()]


async def test_a_wsgi_app_is_served_and_the_log_names_a_url(
    caplog: pytest.LogCaptureFixture, http1: str
) -> None:
    caplog.set_level(logging.INFO, logger="graceful_restart_trio")
    async with graceful_restart.open() as gr, trio.open_nursery() as nursery:
        listeners = await gr.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(asgi.serve, gr, wsgi_app, listeners)
        await gr.state_value.wait_value(graceful_restart.State.SERVING)
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/path")
        assert (response.status_code, response.text) == (200, "wsgi /path")
        gr.shutdown()
    assert f"Running on http://127.0.0.1:{port}" in caplog.text


async def failing_lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database"})


async def serve_failing_lifespan() -> None:
    async with graceful_restart.open() as gr:
        await asgi.serve(gr, failing_lifespan, await gr.open_tcp_listeners(0, host="127.0.0.1"))


async def test_a_failed_lifespan_startup_is_raised_as_itself() -> None:
    with pytest.raises(LifespanFailureError, match="no database"):
        await serve_failing_lifespan()


async def test_an_idle_connection_gets_a_clean_close_when_accepting_stops(http1: str) -> None:
    """In-process: a keep-alive connection that served a request sees FIN, then the
    server reads what the client still sends (nothing is reset)."""
    async with graceful_restart.open() as gr, trio.open_nursery() as nursery:
        listeners = await gr.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(asgi.serve, gr, wsgi_app, listeners)
        await gr.state_value.wait_value(graceful_restart.State.SERVING)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            await trio.to_thread.run_sync(sock.sendall, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            response = b""
            while not response.endswith(b"0\r\n\r\n"):  # the last chunk
                response += await trio.to_thread.run_sync(sock.recv, 4096)
            assert b"wsgi /" in response
            gr.shutdown()
            assert await trio.to_thread.run_sync(sock.recv, 4096) == b""
