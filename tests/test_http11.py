"""The httptools HTTP/1.1 connection (the default of ``asgi.serve``), byte by byte.

Each test serves :class:`tests._raw_http.RecordingApp` in this process on a loopback port
and talks raw HTTP/1.1 over a real socket.
"""

from __future__ import annotations

import itertools
import ssl
import threading
from functools import partial
from pathlib import Path
from typing import cast

import h2.config
import h2.connection
import httpx
import pytest
import trio
import trio.testing
import trustme

import graceful_restart_trio as graceful_restart
from graceful_restart_trio import asgi
from graceful_restart_trio._http11_messages import (
    CHUNKED,
    LENGTH,
    NOTHING,
    Request,
    frame,
    response_head,
)
from graceful_restart_trio._http_connection import LINGER
from graceful_restart_trio._hypercorn import Config

from ._h2 import H2Load
from ._raw_http import (
    RecordingApp,
    exchange,
    parse_responses,
    read_to_eof,
    receive_until,
    serving,
)
from .conftest import TIMEOUT, wait_until

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
GET = b"GET %s HTTP/1.1\r\nHost: example.test\r\n\r\n"
CLOSE = b"GET /last HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"


def quick(keep_alive: float = 5.0) -> Config:
    config = Config()
    config.keep_alive_timeout = keep_alive
    config.root_path = "/root"
    return config


async def test_the_scope_has_every_asgi_2_4_field() -> None:
    """http_version, method, scheme, path (decoded) and raw_path, query_string, root_path,
    lower-cased byte headers, client, server and a copy of the lifespan state."""
    app = RecordingApp()
    async with serving(app, config=quick()) as (_, port):
        request = (
            b"GET /a%20b/%C3%A9?x=1&y=%20 HTTP/1.1\r\nHost: example.test\r\nX-Mixed-Case: V\r\n"
        )
        await exchange(port, request + b"Connection: close\r\n\r\n")
    (scope,) = app.scopes
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert (scope["http_version"], scope["method"], scope["scheme"]) == ("1.1", "GET", "http")
    assert (scope["path"], scope["raw_path"]) == ("/a b/é", b"/a%20b/%C3%A9")
    assert scope["query_string"] == b"x=1&y=%20"
    assert scope["root_path"] == "/root"
    assert scope["headers"] == [
        (b"host", b"example.test"),
        (b"x-mixed-case", b"V"),
        (b"connection", b"close"),
    ]
    assert scope["client"][0] == "127.0.0.1"
    assert scope["server"] == ("127.0.0.1", port)
    assert scope["state"]["answer"] == 42
    assert scope["state"]["graceful_restart"] is not None


async def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    """Five pipelined requests in one write, bodies included: five answers, in order, on
    one connection; the last asked to close."""
    app = RecordingApp()
    post = b"POST /p%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
    pipelined = b"".join(post % (n, n, b"b" * n) for n in range(1, 5)) + CLOSE
    async with serving(app) as (_, port):
        responses = parse_responses(await exchange(port, pipelined))
    assert [r.body for r in responses] == [
        b"POST /p1 1",
        b"POST /p2 2",
        b"POST /p3 3",
        b"POST /p4 4",
        b"GET /last 0",
    ]
    assert [r.header(b"connection") for r in responses] == [None] * 4 + [b"close"]


async def test_http_1_0_closes_unless_keep_alive_is_asked() -> None:
    """HTTP/1.0: ``Connection: close`` and a close; with keep-alive asked, kept open and
    said so; a response without length is sent until close, not chunked."""
    async with serving(RecordingApp()) as (_, port):
        (plain,) = parse_responses(await exchange(port, b"GET /echo HTTP/1.0\r\n\r\n"))
        assert (plain.status, plain.header(b"connection")) == (200, b"close")
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            first = await receive_until(stream, lambda data: data.endswith(b"GET /echo 0"))
            assert b"connection: keep-alive" in first
            await stream.send_all(b"GET /chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            (second,) = parse_responses(await read_to_eof(stream))
    assert (second.body, second.chunked, second.header(b"connection")) == (
        b"one,two",
        False,
        b"close",
    )


async def test_head_204_and_304_have_no_body_and_the_connection_goes_on() -> None:
    """HEAD, 204 and 304 answers carry no body bytes; the next answer is read right after."""
    requests = (
        b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n"
        + GET % b"/status/204"
        + GET % b"/status/304"
        + b"HEAD /chunked HTTP/1.1\r\nHost: x\r\n\r\n"
        + CLOSE
    )
    async with serving(RecordingApp()) as (_, port):
        data = await exchange(port, requests)
    responses = parse_responses(data, bodiless=[True, False, False, True])
    assert [(r.status, r.body) for r in responses] == [
        (200, b""),
        (204, b""),
        (304, b""),
        (200, b""),
        (200, b"GET /last 0"),
    ]
    assert responses[0].header(b"content-length") == b"12"  # of "HEAD /echo 0", unsent


async def test_a_response_without_length_is_chunked_and_chunked_requests_stream() -> None:
    """No content-length: chunked on the wire. A chunked request body reaches the app in
    pieces with more_body, the last one more_body False."""
    app = RecordingApp()
    async with (
        serving(app) as (_, port),
        await trio.open_tcp_stream("127.0.0.1", port) as stream,
    ):
        await stream.send_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        with trio.fail_after(TIMEOUT):
            await app.partial_body.wait()
        await stream.send_all(b"2;ext=1\r\nde\r\n0\r\nTrailer: t\r\n\r\n" + GET % b"/chunked")
        await stream.send_all(CLOSE)
        responses = parse_responses(await read_to_eof(stream))
    first, second = app.received[:2]  # the rest of the body came in one read
    assert (first["body"], first["more_body"]) == (b"abc", True)
    assert (second["body"], second["more_body"]) == (b"de", False)
    assert [r.body for r in responses] == [b"POST /echo 5", b"one,two", b"GET /last 0"]
    assert responses[1].chunked


async def test_100_continue_is_sent_only_when_the_app_reads_the_body() -> None:
    """``Expect: 100-continue``: the app that reads gets the body after a 100; the app
    that answers first sends no 100, and the connection closes after its answer."""
    expect = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    async with (
        serving(RecordingApp()) as (_, port),
        await trio.open_tcp_stream("127.0.0.1", port) as stream,
    ):
        await stream.send_all(expect % b"/echo")
        interim = await receive_until(stream, lambda data: b"\r\n\r\n" in data)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await stream.send_all(b"body" + CLOSE)
        (answer, _) = parse_responses(await read_to_eof(stream))
        assert answer.body == b"POST /echo 4"
        async with await trio.open_tcp_stream("127.0.0.1", port) as second:
            await second.send_all(expect % b"/early")
            (early,) = parse_responses(await read_to_eof(second))
    assert (early.status, early.header(b"connection")) == (200, b"close")


SMUGGLING = {
    "content-length and transfer-encoding": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "two content-lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    ),
    "a bad chunk size": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"
    ),
    "chunked not last": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"
    ),
    "obs-fold": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n",
    "a bare LF": b"GET /echo HTTP/1.1\nHost: x\n\n",
    "no host": b"GET /echo HTTP/1.1\r\n\r\n",
    "two hosts": b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
}


async def test_request_smuggling_is_refused_with_400_and_a_close() -> None:
    """Each ambiguous request gets 400 and the connection closes: the request that
    follows it on the connection is never served."""
    app = RecordingApp()
    async with serving(app) as (_, port):
        for name, request in SMUGGLING.items():
            data = await exchange(port, request + GET % b"/smuggled")
            (response,) = parse_responses(data)
            assert (response.status, response.header(b"connection")) == (400, b"close"), name
    assert [scope["path"] for scope in app.scopes] == []


async def test_limits_answer_431_414_and_413() -> None:
    """Header section too large or too many fields → 431; target too long → 414; a body
    over max_body_size → 413, by content-length and by chunks."""
    config = quick()
    config.h11_max_incomplete_size = 4096
    big_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-F: 1\r\n" * 101 + b"\r\n"
    long_target = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    declared = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n"
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"40\r\n" + b"a" * 64 + b"\r\n" + b"40\r\n" + b"a" * 64 + b"\r\n0\r\n\r\n"
    app = RecordingApp()
    async with serving(app, config=config, max_body_size=100) as (_, port):
        statuses = [
            parse_responses(await exchange(port, request))[0].status
            for request in (big_header, many, long_target, declared, chunked + chunks)
        ]
        fits, _ = parse_responses(await exchange(port, chunked + b"4\r\nabcd\r\n0\r\n\r\n" + CLOSE))
    assert statuses == [431, 431, 414, 413, 413]
    assert fits.body == b"POST /echo 4"


async def test_a_client_that_never_finishes_its_headers_is_dropped() -> None:
    """Half a request head, then silence: the connection is closed after the keep-alive
    timeout, without an answer."""
    async with (
        serving(RecordingApp(), config=quick(keep_alive=0.3)) as (_, port),
        await trio.open_tcp_stream("127.0.0.1", port) as stream,
    ):
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        start = trio.current_time()
        assert await read_to_eof(stream) == b""
        assert 0.2 < trio.current_time() - start < TIMEOUT


async def test_an_app_that_raises_gets_a_500_before_its_answer_and_a_close_after() -> None:
    """Raised before http.response.start: 500 and a close. Raised after the first piece:
    the connection closes with the chunked body unfinished. Trailers: refused (500)."""
    async with serving(RecordingApp()) as (_, port):
        (before,) = parse_responses(await exchange(port, GET % b"/raise" + GET % b"/after"))
        late = await exchange(port, GET % b"/raise-late" + GET % b"/after")
        (trailers,) = parse_responses(await exchange(port, GET % b"/trailers"))
    assert (before.status, before.header(b"connection")) == (500, b"close")
    assert late.startswith(b"HTTP/1.1 200 OK\r\n")
    assert late.endswith(b"\r\n\r\n4\r\none,\r\n")  # no last chunk, no second answer
    assert trailers.status == 500


async def test_the_app_learns_when_the_client_goes_away() -> None:
    """After its body, an app waiting on receive() gets http.disconnect when the client
    closes; an app that never answers holds only its own connection (until the drain
    deadline)."""
    app = RecordingApp()
    async with (
        serving(app, drain_timeout=0.5) as (_, port),
        await trio.open_tcp_stream("127.0.0.1", port) as never,
    ):
        await never.send_all(GET % b"/never")
        async with await trio.open_tcp_stream("127.0.0.1", port) as waiting:
            await waiting.send_all(GET % b"/wait-disconnect")
            with trio.fail_after(TIMEOUT):
                await app.entered["/never"].wait()
                await app.entered["/wait-disconnect:body"].wait()
            (other,) = parse_responses(await exchange(port, CLOSE))
            assert other.body == b"GET /last 0"
        with trio.fail_after(TIMEOUT):
            await app.disconnected.wait()
    assert app.received[-1] == {"type": "http.disconnect"}


async def test_tls_http_1_1_is_served_by_the_new_path_and_h2_by_hypercorn(
    tmp_path: Path,
) -> None:
    """Over TLS, ALPN http/1.1 reaches the httptools connection (no server header), h2
    reaches hypercorn's code."""
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    config = Config()
    config.certfile = config.keyfile = str(pem)
    async with serving(RecordingApp(), config=config) as (_, port):
        url = f"https://127.0.0.1:{port}/echo"
        async with httpx.AsyncClient(verify=trusted) as h1:
            one = await h1.get(url)
        async with httpx.AsyncClient(verify=trusted, http2=True, http1=False) as h2:
            two = await h2.get(url)
    assert (one.http_version, one.text, one.headers.get("server")) == (
        "HTTP/1.1",
        "GET /echo 0",
        None,
    )
    assert (two.http_version, two.text) == ("HTTP/2", "GET /echo 0")


async def test_h2c_with_prior_knowledge_and_by_upgrade_go_to_hypercorn() -> None:
    """``PRI *`` as the first bytes, and ``Upgrade: h2c`` after an HTTP/1.1 request on
    the same connection, are both served over HTTP/2."""
    async with serving(RecordingApp()) as (_, port):
        async with httpx.AsyncClient(http2=True, http1=False) as h2c:
            prior = await h2c.get(f"http://127.0.0.1:{port}/echo")
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(GET % b"/echo")
            await receive_until(stream, lambda data: data.endswith(b"GET /echo 0"))
            await stream.send_all(
                b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            )
            switched = await receive_until(stream, lambda data: b"\r\n\r\n" in data)
            await stream.send_all(H2_PREFACE + EMPTY_SETTINGS)
            # the answer to the upgraded request comes as stream 1, in a DATA frame
            await receive_until(stream, lambda data: b"GET /echo 0" in data)
    assert (prior.http_version, prior.text) == ("HTTP/2", "GET /echo 0")
    assert switched.startswith(b"HTTP/1.1 101 ")
    assert b"upgrade: h2c" in switched.lower()


def test_response_head_rules() -> None:
    """Without a socket: framing headers by method, status and version; the app's own
    ``connection`` and ``transfer-encoding`` replaced; CR or LF in a field refused."""
    get, head, old = Request(), Request(), Request()
    get.method, head.method, old.method, old.version = b"GET", b"HEAD", b"GET", "1.0"
    mixed = [(b"Connection", b"keep-alive"), (b"Transfer-Encoding", b"gzip"), (b"x-a", b"b")]

    def lines(status: int, request: Request, close: bool = False) -> list[bytes]:
        return response_head(status, mixed, request, close, b"").data.split(b"\r\n")[1:-2]

    assert lines(200, get) == [b"x-a: b", b"transfer-encoding: chunked"]
    assert lines(200, head) == [b"x-a: b", b"transfer-encoding: chunked"]
    assert lines(204, get) == [b"x-a: b"]
    assert lines(200, old) == [b"x-a: b", b"connection: close"]
    assert lines(200, get, close=True) == [
        b"x-a: b",
        b"transfer-encoding: chunked",
        b"connection: close",
    ]
    for bad in [(b"x", b"a\r\nset-cookie: c"), (b"x", b"a\nb"), (b"x\r", b"a")]:
        with pytest.raises(ValueError, match="CR or LF"):
            response_head(200, [bad], get, False, b"date: now\r\n")


def test_framing_rules() -> None:
    """The body framing on the wire, without a socket."""
    assert frame(CHUNKED, b"abc", more=True) == b"3\r\nabc\r\n"
    assert frame(CHUNKED, b"", more=False) == b"0\r\n\r\n"
    assert frame(CHUNKED, b"abc", more=False) == b"3\r\nabc\r\n0\r\n\r\n"
    assert frame(LENGTH, b"abc", more=False) == b"abc"
    assert frame(NOTHING, b"abc", more=False) == b""


async def test_an_unknown_http1_choice_is_refused() -> None:
    """``http1`` names one of the two paths."""
    async with graceful_restart.open() as gr:
        with pytest.raises(ValueError, match="http1='h3'"):
            await asgi.serve(gr, RecordingApp(), [], http1=cast(asgi.HTTP1, "h3"))


# -- the restart guarantees, on both paths ------------------------------------------------

HTTP1_PATHS = ["httptools", "hypercorn"]


@pytest.mark.parametrize("http1", HTTP1_PATHS)
async def test_a_request_in_flight_holds_a_lease_and_its_answer_says_close(
    http1: asgi.HTTP1,
) -> None:
    """Accepting stops while a request runs: it holds a lease, its answer says
    ``Connection: close``, the connection then closes; the drain waits for it."""
    app = RecordingApp()
    async with (
        serving(app, http1) as (gr, port),
        await trio.open_tcp_stream("127.0.0.1", port) as stream,
    ):
        await stream.send_all(GET % b"/gate")
        with trio.fail_after(TIMEOUT):
            await app.entered["/gate"].wait()
        assert gr.lease().count == 1
        gr.shutdown()
        app.gate.set()
        (response,) = parse_responses(await read_to_eof(stream))
        assert (response.body, response.header(b"connection")) == (b"GET /gate 0", b"close")
        assert gr.lease().count == 0


@pytest.mark.parametrize("http1", HTTP1_PATHS)
async def test_idle_connections_close_when_accepting_stops_and_new_ones_get_one_answer(
    http1: asgi.HTTP1,
) -> None:
    """Once accepting stops: a used idle keep-alive connection gets a clean close (FIN,
    no answer owed); one accepted but not yet used still gets its first request
    answered, with ``Connection: close``."""
    async with (
        serving(RecordingApp(), http1) as (gr, port),
        await trio.open_tcp_stream("127.0.0.1", port) as used,
        await trio.open_tcp_stream("127.0.0.1", port) as fresh,
    ):
        await used.send_all(GET % b"/echo")
        await receive_until(used, lambda data: data.endswith(b"GET /echo 0"))
        gr.shutdown()
        assert await read_to_eof(used) == b""
        await fresh.send_all(GET % b"/echo")
        (answer,) = parse_responses(await read_to_eof(fresh))
    assert (answer.body, answer.header(b"connection")) == (b"GET /echo 0", b"close")


@pytest.mark.parametrize("http1", HTTP1_PATHS)
async def test_a_request_that_comes_as_an_idle_connection_drains_is_answered(
    http1: asgi.HTTP1,
) -> None:
    """A used keep-alive connection, idle when accepting stops, sends a request at once:
    it is answered in full (it takes longer than the drain's 50 ms of quiet), with
    ``Connection: close``."""
    app = RecordingApp()
    async with (
        serving(app, http1) as (gr, port),
        await trio.open_tcp_stream("127.0.0.1", port) as stream,
    ):
        await stream.send_all(GET % b"/echo")
        await receive_until(stream, lambda data: data.endswith(b"GET /echo 0"))
        gr.shutdown()
        await trio.testing.wait_all_tasks_blocked()  # the server has seen the drain begin
        await stream.send_all(GET % b"/slow")
        (response,) = parse_responses(await read_to_eof(stream))
    assert (response.body, response.header(b"connection")) == (b"GET /slow 0", b"close")


@pytest.mark.parametrize("http1", HTTP1_PATHS)
async def test_after_content_length_with_transfer_encoding_the_connection_closes(
    http1: asgi.HTTP1,
) -> None:
    """RFC 9112 §6.3, on both paths: a request with ``Content-Length: 6`` and a chunked
    body ``0\\r\\n\\r\\n``, then ``GET /smuggled`` on the same connection: one answer (400
    here, 200 by the chunked body on hypercorn's path), then the close; ``/smuggled``
    never reaches the app."""
    app = RecordingApp()
    smuggling = SMUGGLING["content-length and transfer-encoding"] + GET % b"/smuggled"
    async with serving(app, http1) as (_, port):
        (response,) = parse_responses(await exchange(port, smuggling))
    assert response.header(b"connection") == b"close"
    assert response.status == (400 if http1 == "httptools" else 200)
    assert "/smuggled" not in [scope["path"] for scope in app.scopes]


@pytest.mark.parametrize("http1", HTTP1_PATHS)
async def test_server_names_answer_404_to_another_host(http1: asgi.HTTP1) -> None:
    """hypercorn's ``server_names``, on both paths: another ``Host`` gets 404, the
    application never sees it."""
    config = Config()
    config.server_names = ["good.test"]
    app = RecordingApp()
    other = b"GET /echo HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n"
    good = b"GET /echo HTTP/1.1\r\nHost: good.test\r\nConnection: close\r\n\r\n"
    async with (
        serving(app, http1, config) as (_, port),
        await trio.open_tcp_stream("127.0.0.1", port) as stream,
    ):
        await stream.send_all(other)
        # hypercorn's path leaves this connection open, Connection: close or not
        refused = await receive_until(stream, lambda data: b"\r\n\r\n" in data)
        (served,) = parse_responses(await exchange(port, good))
    assert refused.startswith(b"HTTP/1.1 404 ")
    assert served.status == 200
    assert [scope["headers"][0] for scope in app.scopes] == [(b"host", b"good.test")]


async def test_an_h2_client_that_goes_away_mid_response_leaves_no_lease() -> None:
    """A client opens 10 HTTP/2 streams for 200 kB answers, reads nothing (flow control
    stops the answers) and closes: every stream's lease is released at once, not at the
    drain deadline."""
    app = RecordingApp()
    async with serving(app, drain_timeout=30) as (gr, port):
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        for stream_id in range(1, 21, 2):
            client.send_headers(
                stream_id,
                [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/big")],
                end_stream=True,
            )
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(client.data_to_send())
            with trio.fail_after(TIMEOUT):
                while gr.lease().count < 10:
                    await app.entered["/big:body"].wait()
                    await trio.sleep(0.01)
        with trio.fail_after(5):  # the drain deadline is 30 s
            await gr.lease().wait_idle()


async def test_http2_past_keep_alive_max_requests_every_stream_completes() -> None:
    """``keep_alive_max_requests`` = 100, 10 streams in flight: after its 100th stream
    the connection gets a drain's GOAWAY (one step once idle, else the two-step after
    5 s), the streams it processed complete, the rest are retried on a new connection;
    no stream fails (hypercorn's own GOAWAY at the limit cuts those in flight)."""
    config = Config()
    config.keep_alive_max_requests = 100
    stop = threading.Event()
    async with serving(RecordingApp(), config=config) as (_, port):
        load = H2Load(port, stop, streams=10, path="/echo")
        load.start()
        try:
            await trio.to_thread.run_sync(wait_until, lambda: load.goaways >= 1, "a GOAWAY")
            done = load.completed
            await trio.to_thread.run_sync(wait_until, lambda: load.completed > done + 20, "more")
        finally:
            stop.set()
            await trio.to_thread.run_sync(load.join, TIMEOUT)
    assert load.failures == []
    assert load.connections >= 2
    assert load.completed > 100


async def paced_client(port: int, running: trio.Event, outcomes: list[str]) -> None:
    """One keep-alive connection, a request every 66 ms, never checking the connection
    before writing and never retrying; ends with ``answered-close`` (an answer said
    ``Connection: close``) or ``lost`` (the connection ended before the answer)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        for number in itertools.count():
            if number == 2:
                running.set()
            await stream.send_all(GET % b"/echo")
            try:
                data = await receive_until(stream, lambda data: data.endswith(b"GET /echo 0"))
            except AssertionError:  # closed before the answer
                outcomes.append("lost")
                return
            if b"connection: close" in data:
                outcomes.append("answered-close")
                return
            await trio.sleep(0.066)  # the client's pace, not a wait for the server


@pytest.mark.parametrize("http1", HTTP1_PATHS)
async def test_with_idle_close_on_response_a_paced_client_loses_nothing(
    http1: asgi.HTTP1,
) -> None:
    """``idle_close="on-response"``: 10 keep-alive clients pacing a request every 66 ms
    (that never check a connection before writing, never retry) through a shutdown:
    each gets an answer that says ``Connection: close``; none loses a request."""
    outcomes: list[str] = []
    async with (
        serving(RecordingApp(), http1, idle_close="on-response") as (gr, port),
        trio.open_nursery() as clients,
    ):
        started = []
        for _ in range(10):
            running = trio.Event()
            started.append(running)
            clients.start_soon(paced_client, port, running, outcomes)
        with trio.fail_after(TIMEOUT):
            for running in started:
                await running.wait()
        gr.shutdown()
    assert outcomes == ["answered-close"] * 10


async def test_a_client_that_never_closes_is_let_go_after_the_linger() -> None:
    """The server closes (an HTTP/1.0 answer) and lingers for the client's close; a
    client that keeps its side open and silent holds the drain for ``LINGER`` (5 s),
    not until the drain deadline (30 s)."""
    stream: trio.SocketStream | None = None
    try:
        async with serving(RecordingApp(), drain_timeout=30) as (gr, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /echo HTTP/1.0\r\n\r\n")
            (response,) = parse_responses(await read_to_eof(stream))  # the server's FIN
            gr.shutdown()
            start = trio.current_time()
        held = trio.current_time() - start  # serve() waited for the lingering connection
    finally:
        if stream is not None:
            await stream.aclose()
    assert response.body == b"GET /echo 0"
    assert LINGER - 0.5 < held < LINGER + 5


async def test_a_unix_socket_is_served(tmp_path: Path) -> None:
    """On a unix socket: answered, with no client or server address in the scope."""
    app = RecordingApp()
    async with graceful_restart.open() as gr, trio.open_nursery() as nursery:
        listener = await gr.open_unix_listener(str(tmp_path / "http.sock"))
        nursery.start_soon(partial(asgi.serve, gr, app, [listener]))
        await gr.state_value.wait_value(graceful_restart.State.SERVING)
        async with await trio.open_unix_socket(str(tmp_path / "http.sock")) as stream:
            await stream.send_all(CLOSE)
            (response,) = parse_responses(await read_to_eof(stream))
        gr.shutdown()
    assert response.body == b"GET /last 0"
    assert (app.scopes[0]["client"], app.scopes[0]["server"]) == (None, None)
