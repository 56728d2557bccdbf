"""The HTTP/1.1 message rules, without I/O: what a request may be, how a response is framed.

What the connection (:mod:`graceful_restart_trio._http11_connection`) asks of them:

- :class:`Limits`: what one request may send before it is refused (431, 414, 413, 404).
- :class:`Request`: one request as the parser saw it (head, body pieces, its state);
  the connection's parser callbacks fill it, raising :class:`RefusedError` for a
  request that breaks a limit.
- :func:`refusal`: the status that refuses a complete request head before the
  application sees it (505; 413 for a ``content-length`` over the limit; 400 for a
  missing or repeated ``Host``; 404), or 0.
- :func:`response_head`: a response's head on the wire and its body's framing
  (:class:`ResponseHead`): ``content-length``, chunked, or until close (RFC 9112 §6);
  nothing for HEAD, 1xx, 204 and 304; ``Connection: close`` when asked or needed.
- :func:`frame`: a body piece as it goes on the wire for a framing (:data:`LENGTH`,
  :data:`CHUNKED`, :data:`NOTHING`, :data:`UNTIL_CLOSE`).
- :class:`Clock`: the ``date`` header line, made once a second.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Final, final

import attrs

__all__ = [
    "CHUNKED",
    "LENGTH",
    "NOTHING",
    "UNTIL_CLOSE",
    "Clock",
    "Limits",
    "RefusedError",
    "Request",
    "ResponseHead",
    "frame",
    "refusal",
    "response_head",
]

_STATUS_LINES: Final = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())
    for status in HTTPStatus
}
_NO_BODY_STATUS: Final = frozenset({204, 304})

# Response body framing.
LENGTH: Final = 0
CHUNKED: Final = 1
NOTHING: Final = 2
UNTIL_CLOSE: Final = 3


@final
@attrs.frozen
class Limits:
    """What one request may send before it is refused.

    Attributes:
        max_head: bytes of header fields (names, values, separators) → 431.
        max_headers: header fields → 431.
        max_target: bytes of the request target (path and query) → 414.
        max_body: bytes of body, or None for no limit → 413.
        server_names: the ``Host`` values served, or empty for any → 404 (hypercorn's
            ``server_names``).
    """

    max_head: int = 16 * 1024
    max_headers: int = 100
    max_target: int = 8 * 1024
    max_body: int | None = None
    server_names: frozenset[bytes] = frozenset()


class RefusedError(Exception):
    """Raised in a parser callback: the request breaks a :class:`Limits`."""


@final
class Request:
    """One request as the parser saw it; its body pieces wait here until read."""

    __slots__ = (
        "body",
        "complete",
        "error",
        "expect_continue",
        "final_read",
        "handoff",
        "head_size",
        "headers",
        "keep_alive",
        "method",
        "queued",
        "received",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.expect_continue = False
        self.queued = False  # its head is complete: it is in the queue
        self.complete = False  # its body is complete
        self.body: list[bytes] = []
        self.received = 0
        self.final_read = False  # the app has had the last http.request
        self.error = 0  # a status to answer with instead of calling the application
        self.handoff: bytes | None = None  # hypercorn serves the rest of the connection


def refusal(request: Request, limits: Limits) -> int:
    """The status that refuses ``request`` before the application sees it, or 0."""
    if request.version not in ("1.1", "1.0"):
        return 505
    hosts = 0
    host = b""
    for name, value in request.headers:
        if name == b"host":
            hosts += 1
            host = value
        elif (
            name == b"content-length"
            and limits.max_body is not None
            and (int(value) > limits.max_body)
        ):
            return 413
    if hosts > 1 or (hosts == 0 and request.version == "1.1"):
        return 400
    if limits.server_names and host not in limits.server_names:
        return 404
    return 0


_GET = Request()
_GET.method = b"GET"


@final
@attrs.define
class ResponseHead:
    """A response's head on the wire and how its body is framed."""

    data: bytes
    framing: int
    length: int
    close: bool


def response_head(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    request: Request,
    close: bool,
    date: bytes,
) -> ResponseHead:
    """The head of a response to ``request``; ``close`` asks for ``Connection: close``.

    Framing follows RFC 9112 §6: none for HEAD, 1xx, 204 and 304; the application's
    ``content-length``; else chunked for HTTP/1.1, or until close for HTTP/1.0. The
    application's own ``connection`` and ``transfer-encoding`` fields are replaced.

    Raises:
        ValueError: a header name or value holds CR or LF, or a bad content-length.
    """
    lines = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
    length = -1
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"connection":
            close = close or b"close" in value.lower()
        elif lowered != b"transfer-encoding":
            if lowered == b"content-length":
                length = _content_length(value)
            lines.append(b"%s: %s\r\n" % (name, value))
    framing = _framing(status, length, request)
    as_get = _framing(status, length, _GET) if request.method == b"HEAD" else framing
    if as_get == CHUNKED and request.version == "1.1":
        lines.append(b"transfer-encoding: chunked\r\n")  # for HEAD: what GET would have had
    close = close or framing == UNTIL_CLOSE
    if close:
        lines.append(b"connection: close\r\n")
    elif request.version == "1.0":
        lines.append(b"connection: keep-alive\r\n")
    lines.append(date)
    lines.append(b"\r\n")
    data = b"".join(lines)
    ends = len(lines) - (not date)  # each line has one CR LF: none in a name or value
    if data.count(b"\n") != ends or data.count(b"\r") != ends:
        raise ValueError("CR or LF in a response header")
    return ResponseHead(data, framing, length, close)


def _content_length(value: bytes) -> int:
    length = int(value)
    if length < 0:
        raise ValueError(f"bad content-length {value!r}")
    return length


def _framing(status: int, length: int, request: Request) -> int:
    """How a response's body goes on the wire (RFC 9112 §6.3)."""
    if status in _NO_BODY_STATUS or status < 200 or request.method == b"HEAD":
        return NOTHING
    if length >= 0:
        return LENGTH
    return CHUNKED if request.version == "1.1" else UNTIL_CLOSE


def frame(framing: int, body: bytes, more: bool) -> bytes:
    """``body`` as it goes on the wire; ``more`` False ends the body."""
    if framing == CHUNKED:
        data = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        return data if more else data + b"0\r\n\r\n"
    if framing == NOTHING:
        return b""
    return bytes(body)


@final
class Clock:
    """The ``date`` header line, made once a second."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = 0
        self.line = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.line = b"date: %s\r\n" % formatdate(now, usegmt=True).encode()
        return self.line
