"""One corpus of raw requests, answered by both HTTP/1.1 paths of ``asgi.serve``.

The same :class:`tests._raw_http.RecordingApp` is served by the library's httptools
connection and by hypercorn's h11 code; each request of :data:`CORPUS` goes to each on a
new connection. Status, header fields (but ``date`` and ``server``) and bodies must
agree, except where :data:`DIFFERENCES` says why the httptools path is right.
"""

from __future__ import annotations

from graceful_restart_trio import asgi
from graceful_restart_trio._hypercorn import Config

from ._raw_http import RecordingApp, exchange, parse_responses, serving
from .test_http11 import SMUGGLING

CLOSE = b"Connection: close\r\n"
CORPUS = {
    "get": b"GET /echo HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "post with content-length": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n" + CLOSE + b"\r\nabc"
    ),
    "post chunked": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        + CLOSE
        + b"\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    "head": b"HEAD /echo HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "head of a chunked answer": b"HEAD /chunked HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "chunked answer": b"GET /chunked HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "204": b"GET /status/204 HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "304": b"GET /status/304 HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "404": b"GET /status/404 HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "http/1.0": b"GET /echo HTTP/1.0\r\n\r\n",
    "http/1.0 without length": b"GET /chunked HTTP/1.0\r\n\r\n",
    "http/1.0 keep-alive": (
        b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /echo HTTP/1.0\r\n\r\n"
    ),
    "pipelined": b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n"
    + CLOSE
    + b"\r\n",
    "absolute form": b"GET http://x/abs?q=1 HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "percent-encoded path": b"GET /a%20b HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "options *": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "app raises": b"GET /raise HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "app asks for trailers": b"GET /trailers HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "lower-case method": b"get /echo HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
    "http/0.9": b"GET /echo\r\n\r\n",
    "HTTP/2.0 request line": b"GET /echo HTTP/2.0\r\nHost: x\r\n\r\n",
    "space before colon": b"GET /echo HTTP/1.1\r\nHost : x\r\n\r\n",
    "NUL in a value": b"GET /echo HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    "negative content-length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "transfer-encoding gzip": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nab"
    ),
    "TLS to a plain port": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
    "header section of 20 KiB": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    ),
    **{f"smuggling: {name}": request for name, request in SMUGGLING.items()},
}
"""Valid, odd and malformed requests: each case of the connection's rules."""

DIFFERENCES: dict[str, tuple[list[int], str]] = {
    "http/1.0 keep-alive": (
        [200, 200],
        "h11 has no HTTP/1.0 keep-alive and answers the second request 400; RFC 9112 "
        "§9.3 / Appendix C.2.2 keeps an HTTP/1.0 connection that asked for keep-alive",
    ),
    "absolute form": (
        [200],
        "RFC 9112 §3.2.2: a server must accept the absolute form; hypercorn gives the app "
        "the whole URL as its path, the new path the path (/abs) and query",
    ),
    "app asks for trailers": (
        [500],
        "ASGI's http.response.trailers are not served: refused before anything is sent "
        "(500); hypercorn sends a 200 head and then breaks the connection",
    ),
    "lower-case method": (
        [400],
        "methods are case-sensitive (RFC 9110 §9.1); llhttp knows the registered methods "
        "only; h11 passes any token through as 'get'",
    ),
    "http/0.9": ([505], "both refuse; 505 names the reason (an HTTP version not served)"),
    "HTTP/2.0 request line": (
        [505],
        "HTTP/2 is not a text request line: hypercorn answers it as HTTP/1.1",
    ),
    "transfer-encoding gzip": (
        [400],
        "RFC 9112 §6.3 (4): chunked not last in a request: MUST answer 400 and close "
        "(hypercorn: 501)",
    ),
    "header section of 20 KiB": (
        [431],
        "over h11_max_incomplete_size (16 KiB): refused with 431; h11 applies that limit "
        "only to what it still has to parse and served a head that came in one read",
    ),
    "smuggling: content-length and transfer-encoding": (
        [400],
        "RFC 9112 §6.3 (3) allows both; the library answers by the chunked body and closes "
        "on hypercorn's path, refuses (400) on the new one",
    ),
    "smuggling: chunked not last": ([400], "RFC 9112 §6.3 (4): 400 (hypercorn: 501)"),
    "smuggling: obs-fold": (
        [400],
        "RFC 9112 §5.2: a server must reject obs-fold (400) or replace it; h11 unfolds it",
    ),
    "smuggling: a bare LF": (
        [400],
        "llhttp is strict about CRLF (RFC 9112 §2.2 allows, never requires, a bare LF); "
        "refusing closes a parser-disagreement smuggling vector",
    ),
}
"""Where the httptools path answers otherwise, its statuses and why it is right."""

Answer = list[tuple[int, list[tuple[bytes, bytes]], bytes]]
"""Status (negative: the body was cut), header fields, body; one a response."""


async def answers(http1: asgi.HTTP1) -> dict[str, Answer]:
    """Each corpus request's answers from one path (headers sorted, no date/server)."""
    config = Config()
    config.keep_alive_timeout = 0.5  # what stays open after its answers closes soon
    found: dict[str, Answer] = {}
    async with serving(RecordingApp(), http1, config) as (_, port):
        for name, request in CORPUS.items():
            data = await exchange(port, request)
            responses = parse_responses(data, [request.startswith(b"HEAD")])
            found[name] = [
                (
                    response.status if response.complete else -response.status,
                    sorted(h for h in response.headers if h[0] not in (b"date", b"server")),
                    response.body,
                )
                for response in responses
            ]
    return found


async def test_both_paths_answer_the_corpus_alike_but_for_the_listed_differences() -> None:
    """Every corpus request: the same answers on both paths, or a listed difference with
    the new path's statuses as recorded."""
    new, old = await answers("httptools"), await answers("hypercorn")
    differing = {name for name in CORPUS if new[name] != old[name]}
    assert differing == set(DIFFERENCES), sorted(differing ^ set(DIFFERENCES))
    for name, (statuses, _) in DIFFERENCES.items():
        assert [status for status, _, _ in new[name]] == statuses, name
    assert len(CORPUS) - len(DIFFERENCES) >= 20  # most of it agrees
