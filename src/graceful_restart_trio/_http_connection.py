"""One HTTP connection, served by hypercorn's protocol code, that knows how to end.

Theory of operation
-------------------

hypercorn's ``ProtocolWrapper`` turns bytes into ASGI calls and back (HTTP/1.1, h2c,
HTTP/2 over TLS, WebSocket). :class:`HTTPConnection` gives it a socket, like hypercorn's
own ``TCPServer``, and decides *when the connection ends*, which is where a restart
needs more than hypercorn does:

- A client that closes an idle connection is noticed at once (hypercorn's ``TCPServer``
  keeps such a connection in CLOSE-WAIT until its keep-alive timer fires, and the drain
  waits for it). An HTTP/2 client that goes away with streams in flight ends them: their
  applications stop waiting to send (hypercorn leaves them waiting for ever).
- Once the process stops accepting, an HTTP/1.1 connection idle for ``H1_QUIET`` is
  closed (with ``idle_close="on-response"``: left open until its next answer, which
  says ``Connection: close``, or until idle for ``keep_alive_timeout``); a busy one
  closes after its response (``asgi`` adds ``Connection: close``), as does an idle one
  whose next request has already arrived, unread. The closes are paced by a
  :class:`Pacer` so that ten thousand idle clients do not all reconnect in the same
  millisecond.
- An HTTP/2 connection gets a GOAWAY. If it is idle, one GOAWAY naming the last stream
  the server has seen; if streams stay in flight for ``_H2_QUIET_WAIT`` (5 s), the
  graceful two-step of RFC 9113 §6.8 (the same GOAWAY ends a connection after
  ``keep_alive_max_requests`` streams, in place of hypercorn's, which cuts the streams
  in flight): a GOAWAY with the largest stream id and a PING,
  then, once the PING is answered, the GOAWAY with the real last stream id. Streams
  opened above it are never processed (the client retries them elsewhere, as the
  GOAWAY tells it). The GOAWAY frames are written beside the ``h2`` library, which
  refuses every frame after a GOAWAY of its own, and the streams it has accepted must
  still complete.
- Closing follows RFC 9112 §9.6: half-close (``FIN``), then read and drop whatever the
  client still sends until it closes too (at most ``LINGER`` seconds), then close. A
  request that arrives as the connection closes is never processed: the client sees a
  clean close before any byte of a response, and may retry it.
"""

from __future__ import annotations

import fcntl
import os
import sys
import termios
from math import inf
from typing import Any, Final, Literal, final

import attrs
import h2.connection
import h2.errors
import h2.events
import trio
from hyperframe.frame import GoAwayFrame, PingFrame
from trio_util import AsyncValue, move_on_when

from ._graceful_restart import GracefulRestart
from ._hypercorn import (
    Closed,
    Config,
    ConnectionState,
    Event,
    H2Protocol,
    ProtocolWrapper,
    RawData,
    TaskGroup,
    Updated,
    WorkerContext,
    parse_socket_addr,
)
from ._state import ACCEPTING

__all__ = ["H1_QUIET", "LINGER", "MAX_RECV", "HTTPConnection", "IdleClose", "Pacer", "unread"]

MAX_RECV: Final = 2**16
LINGER: Final = 5.0
"""Seconds a closing connection reads and drops what the client still sends."""
H1_QUIET: Final = 0.05
"""Seconds an HTTP/1.1 connection must stay idle, once accepting stopped, to be closed:
a client that sends its next request at once gets ``Connection: close`` with the answer
instead of meeting a close (which httpx, for one, does not retry)."""
_H2_QUIET_WAIT: Final = 5.0
"""Seconds an HTTP/2 connection with streams in flight may take to become idle before
it gets the two-step GOAWAY: a client that aborts its streams on any GOAWAY (httpx does)
is best told when it has none in flight."""
_LAST_POSSIBLE_STREAM: Final = 2**31 - 1
IdleClose = Literal["prompt", "on-response"]


@final
@attrs.define(eq=False)
class Pacer:
    """Spaces out events: each :meth:`wait_turn` returns at least ``interval`` seconds
    after the one before (a few connections close at once, ten thousand over a second)."""

    interval: float = 1e-4
    _next: float = -inf

    async def wait_turn(self) -> None:
        self._next = max(self._next + self.interval, trio.current_time())
        await trio.sleep_until(self._next)


@final
@attrs.define(eq=False)
class _GoAway:
    """The server side of an HTTP/2 GOAWAY, written beside ``h2``'s own state machine."""

    connection: h2.connection.H2Connection
    send: Any  # async (bytes) -> None, under the connection's send lock
    last_stream: int | None = None
    _refused: set[int] = attrs.field(factory=set)
    _ping: bytes = attrs.field(factory=lambda: os.urandom(8))
    _answered: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        receive = self.connection.receive_data

        def receive_data(data: bytes) -> list[h2.events.Event]:
            return self._screen(receive(data))

        self.connection.receive_data = receive_data  # type: ignore[method-assign,assignment]

    def _screen(self, events: list[h2.events.Event]) -> list[h2.events.Event]:
        """Drop the streams opened past the last GOAWAY; notice our PING's answer.

        RFC 9113 §6.8 lets the sender of a GOAWAY discard new streams above its last
        stream id: the GOAWAY itself tells the client they were never processed. No
        ``RST_STREAM`` is sent for them: clients built on ``h2`` (httpx) fail on any frame
        after a GOAWAY, where silence lets them retry the request elsewhere.
        """
        kept = []
        for event in events:
            stream_id = getattr(event, "stream_id", None)
            if isinstance(event, h2.events.PingAckReceived) and event.ping_data == self._ping:
                self._answered.set()
            elif (
                isinstance(event, h2.events.RequestReceived)
                and self.last_stream is not None
                and event.stream_id > self.last_stream
            ):
                self._refused.add(event.stream_id)
                continue
            if stream_id not in self._refused:
                kept.append(event)
        return kept

    async def two_step(self) -> None:
        """RFC 9113 §6.8: announce, wait one round trip, then name the last stream."""
        await self.send(_goaway(_LAST_POSSIBLE_STREAM) + PingFrame(0, self._ping).serialize())
        with trio.move_on_after(LINGER):
            await self._answered.wait()
        await self.one_step()

    async def one_step(self) -> None:
        self.last_stream = self.connection.highest_inbound_stream_id
        await self.send(_goaway(self.last_stream))


def _goaway(last_stream: int) -> bytes:
    frame = GoAwayFrame(0, last_stream_id=last_stream, error_code=h2.errors.ErrorCodes.NO_ERROR)
    data: bytes = frame.serialize()
    return data


@final
@attrs.define(eq=False)
class HTTPConnection:
    """Serve one accepted stream (plain or TLS) with hypercorn's protocol code.

    Call it with the stream, e.g. as the handler of
    :meth:`GracefulRestart.accept_connections`.
    """

    gr: GracefulRestart
    app: Any  # hypercorn's AppWrapper
    config: Config
    context: WorkerContext
    lifespan_state: dict[str, Any]
    pacer: Pacer
    idle_close: IdleClose = "prompt"
    """Once accepting stops, an idle HTTP/1.1 connection is closed: ``"prompt"``ly
    (after ``H1_QUIET``, paced), or ``"on-response"`` (its next answer says
    ``Connection: close``; closed if idle for ``keep_alive_timeout``)."""

    async def __call__(self, stream: trio.abc.Stream) -> None:
        await _Served(self, stream).run()

    async def serve_from(self, stream: trio.abc.Stream, received: bytes) -> None:
        """Serve ``stream`` whose first bytes, ``received``, were already read from it."""
        await _Served(self, stream, received).run()


@final
@attrs.define(eq=False)
class _Served:
    """The life of one connection."""

    server: HTTPConnection
    stream: Any  # trio.SocketStream or trio.SSLStream
    received: bytes = b""  # read before hypercorn's code took the connection
    protocol: ProtocolWrapper = attrs.field(init=False)
    _idle: AsyncValue = attrs.field(factory=lambda: AsyncValue(True))
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _used: trio.Event = attrs.field(factory=trio.Event)
    _reading: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _closing: bool = False
    _h2: H2Protocol | None = None
    _h2_requests: int = 0
    _max_requests: trio.Event = attrs.field(factory=trio.Event)
    _goaway: _GoAway | None = None

    async def run(self) -> None:
        config = self.server.config
        try:
            if isinstance(self.stream, trio.SSLStream):
                try:
                    with trio.fail_after(config.ssl_handshake_timeout):
                        await self.stream.do_handshake()
                except (trio.BrokenResourceError, trio.TooSlowError):
                    return
                alpn, sock, ssl = self.stream.selected_alpn_protocol(), _socket(self.stream), True
            else:
                alpn, sock, ssl = "http/1.1", self.stream.socket, False
            async with TaskGroup() as tasks:
                self.protocol = ProtocolWrapper(
                    self.server.app,
                    config,
                    self.server.context,
                    tasks,
                    ConnectionState(self.server.lifespan_state),
                    ssl,
                    parse_socket_addr(sock.family, sock.getpeername()),
                    parse_socket_addr(sock.family, sock.getsockname()),
                    self._send,
                    alpn,
                )
                await self.protocol.initiate()
                self._adopt_h2()
                if self.received:
                    await self._handle(self.received)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._close_when_due)
                    nursery.start_soon(self._go_away_at_max_requests)
                    await self._read()
                    nursery.cancel_scope.cancel()
        except OSError:
            pass
        finally:
            with trio.move_on_after(LINGER):  # TLS: close_notify
                await self.stream.aclose()

    async def _read(self) -> None:
        with self._reading:
            while True:
                try:
                    with trio.fail_after(self.server.config.read_timeout or inf):
                        data = bytes(await self.stream.receive_some(MAX_RECV))
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
                if not self._closing:  # once closing, what arrives is dropped: RFC 9112 §9.6
                    await self._handle(data)
                if not data:
                    break
        await self._closed()

    async def _handle(self, data: bytes) -> None:
        await self.protocol.handle(RawData(data))
        if self._h2 is None:
            self._adopt_h2()  # h2c: the protocol may have switched

    def _adopt_h2(self) -> None:
        """Own HTTP/2's ``keep_alive_max_requests``: hypercorn's own GOAWAY at the limit
        cuts the streams in flight; this connection sends the graceful one instead."""
        if not isinstance(protocol := self.protocol.protocol, H2Protocol):
            return
        self._h2 = protocol
        protocol.keep_alive_requests = -(2**62)  # hypercorn's count never reaches its limit
        receive = protocol.connection.receive_data
        limit = self.server.config.keep_alive_max_requests

        def receive_data(data: bytes) -> list[h2.events.Event]:
            events = receive(data)
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    self._h2_requests += 1
            if self._h2_requests >= limit:
                self._max_requests.set()
            return events

        protocol.connection.receive_data = receive_data  # type: ignore[method-assign,assignment]

    async def _go_away_at_max_requests(self) -> None:
        """After ``keep_alive_max_requests`` HTTP/2 streams: the GOAWAY of a drain (one
        step once idle, the two-step after 5 s busy), then close once the streams below
        its last stream id are done."""
        await self._max_requests.wait()
        assert self._h2 is not None
        connection = self._h2.connection
        await self._go_away(self._h2)
        while not (self._idle.value and connection.open_inbound_streams == 0):
            await self._idle.wait_transition()
        await self._close()

    async def _send(self, event: Event) -> None:
        """What hypercorn's protocol asks of the connection."""
        if isinstance(event, RawData):
            await self._send_bytes(event.data)
        elif isinstance(event, Closed):
            await self._close()
        elif isinstance(event, Updated):
            self._idle.value = event.idle
            if not event.idle:
                self._used.set()

    async def _send_bytes(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._closed()

    async def _closed(self) -> None:
        """The connection is gone: tell hypercorn, and end HTTP/2 streams' waits.

        hypercorn 0.18's HTTP/2 code closes its streams but not their send buffers, so an
        application blocked sending a body (``StreamBuffer.drain``/``push``) would wait,
        holding its lease, until the drain deadline. Closing the buffers ends the wait;
        what the application sends afterwards is dropped.
        """
        await self.protocol.handle(Closed())
        if isinstance(h2_protocol := self.protocol.protocol, H2Protocol):
            for buffer in list(h2_protocol.stream_buffers.values()):
                await buffer.close()

    async def _close_when_due(self) -> None:
        """Close after ``keep_alive_timeout`` idle; politely and soon once accepting stops."""
        async with move_on_when(self._accepting_stops) as draining:
            await self._until_idle_too_long()
        if draining.cancelled_caught:
            # A connection accepted an instant ago has its first request on the way.
            with trio.move_on_after(self.server.config.keep_alive_timeout):
                await self._used.wait()
            if isinstance(h2_protocol := self.protocol.protocol, H2Protocol):
                await self.server.pacer.wait_turn()
                await self._go_away(h2_protocol)
                await self._idle.wait_value(True)
            elif self.server.idle_close == "on-response":  # its answer closes it
                await self._until_idle_too_long()
            else:  # a request that comes is answered with Connection: close, which closes it
                await self._idle.wait_value(True)
                with trio.move_on_after(H1_QUIET):
                    await self._idle.wait_value(False)
                await self.server.pacer.wait_turn()
                if not self._idle.value or unread(self.stream):
                    return
        await self._close()

    async def _until_idle_too_long(self) -> None:
        while True:
            await self._idle.wait_value(True)
            with trio.move_on_after(self.server.config.keep_alive_timeout) as idle_timer:
                await self._idle.wait_value(False)
            if idle_timer.cancelled_caught:
                return

    async def _accepting_stops(self) -> None:
        await self.server.gr.state_value.wait_value(lambda state: state not in ACCEPTING)

    async def _go_away(self, protocol: H2Protocol) -> None:
        """One GOAWAY per connection: the drain's or the request limit's, whichever first."""
        if self._goaway is not None:
            return
        goaway = self._goaway = _GoAway(protocol.connection, self._send_bytes)

        def idle() -> bool:  # a stream h2 has parsed may not be hypercorn's yet
            return bool(self._idle.value) and protocol.connection.open_inbound_streams == 0

        with trio.move_on_after(_H2_QUIET_WAIT):
            while not idle():
                await self._idle.wait_transition()
        if idle():
            await goaway.one_step()
        else:
            await goaway.two_step()

    async def _close(self) -> None:
        """Half-close, then let the reader drop what still comes, for at most LINGER."""
        if self._closing:
            return
        self._closing = True
        async with self._send_lock:
            if isinstance(self.stream, trio.SocketStream):
                try:
                    await self.stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                else:
                    self._reading.deadline = trio.current_time() + LINGER
                    return
        self._reading.cancel()  # TLS has no half-close: close_notify, then close


def _socket(stream: trio.SSLStream[Any]) -> Any:  # noqa: ANN401 - trio's socket type
    return stream.transport_stream.socket


def unread(stream: trio.abc.Stream) -> bool:
    """Whether bytes from the client wait in the socket's receive queue."""
    sock = _socket(stream) if isinstance(stream, trio.SSLStream) else stream.socket  # type: ignore[attr-defined]
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4)
    except OSError:
        return False
    return int.from_bytes(queued, sys.byteorder) > 0
