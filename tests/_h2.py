"""A spec-following HTTP/2 load client (h2c prior knowledge) for the tests and benchmarks.

It keeps ``streams`` requests in flight on one connection, as h2load does, and follows
RFC 9113 §6.8 and §8.7 to the letter: after a GOAWAY it opens no new stream there; the
streams above the GOAWAY's last stream id, and streams reset with ``REFUSED_STREAM``,
were never processed and are retried on a new connection; every other stream must
complete. A stream that ends any other way, or a connection that closes under streams
still owed, is a failure.

It is built on the ``h2`` library, but handles GOAWAY frames itself: ``h2`` closes its
whole state machine on a GOAWAY and then refuses the frames of the streams the server
still completes (a PING, DATA), which is also why httpx, built on it, fails the
requests in flight on any GOAWAY. httpx is tested as it is, too.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.events
from hyperframe.frame import Frame, GoAwayFrame

TIMEOUT: Final = 60.0
"""Socket timeout: a hang is a failure, not a stuck run."""
PAUSE: Final = 0.002
"""Seconds between a response and the next request on a stream slot: load, not a flood."""


class H2Load(threading.Thread):
    """Requests ``path`` with ``streams`` in flight until ``stop`` is set."""

    def __init__(self, port: int, stop: threading.Event, streams: int = 2, path: str = "/") -> None:
        super().__init__(name=f"h2-{port}", daemon=True)
        self.port, self.stop, self.streams, self.path = port, stop, streams, path
        self.completed = 0
        self.retried = 0
        self.goaways = 0
        self.connections = 0
        self.failures: list[str] = []
        self.pids: collections.Counter[str] = collections.Counter()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._one_connection()
            except OSError as error:
                self.failures.append(f"connection: {error!r}")
                time.sleep(0.05)

    def _one_connection(self) -> None:
        self.connections += 1
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
            config = h2.config.H2Configuration(client_side=True)
            conn = h2.connection.H2Connection(config=config)
            conn.initiate_connection()
            bodies: dict[int, bytearray] = {}
            unread = bytearray()
            going_away = False
            while True:
                while not going_away and not self.stop.is_set() and len(bodies) < self.streams:
                    bodies[self._request(conn)] = bytearray()
                sock.sendall(conn.data_to_send())
                if not bodies:
                    return
                data = sock.recv(65536)
                if not data:
                    self.failures.extend(f"stream {sid}: connection closed" for sid in bodies)
                    return
                unread += data
                for raw in _whole_frames(unread):
                    if isinstance(goaway := _goaway(raw), GoAwayFrame):
                        self._go_away(goaway.last_stream_id, bodies)
                        going_away = True
                        continue
                    for event in conn.receive_data(raw):
                        self._on(conn, event, bodies)

    def _request(self, conn: h2.connection.H2Connection) -> int:
        stream_id: int = conn.get_next_available_stream_id()
        headers = [
            (b":method", b"GET"),
            (b":path", self.path.encode()),
            (b":scheme", b"http"),
            (b":authority", f"127.0.0.1:{self.port}".encode()),
        ]
        conn.send_headers(stream_id, headers, end_stream=True)
        return stream_id

    def _on(
        self, conn: h2.connection.H2Connection, event: h2.events.Event, bodies: dict[int, bytearray]
    ) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            status = dict(event.headers or []).get(b":status")
            if status != b"200":
                self.failures.append(f"stream {event.stream_id}: status {status!r}")
        elif isinstance(event, h2.events.DataReceived) and event.stream_id in bodies:
            bodies[event.stream_id] += event.data or b""
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id in bodies:
            body = bytes(bodies.pop(event.stream_id)).decode()
            self.completed += 1
            self.pids[body.rsplit(" ", 1)[-1].strip()] += 1
            time.sleep(PAUSE)
        elif isinstance(event, h2.events.StreamReset) and event.stream_id in bodies:
            del bodies[event.stream_id]
            if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                self.retried += 1  # never processed: the next connection asks again
            else:
                self.failures.append(f"stream {event.stream_id}: reset {event.error_code!r}")

    def _go_away(self, last_stream: int, bodies: dict[int, bytearray]) -> None:
        self.goaways += 1
        for stream_id in [sid for sid in bodies if sid > last_stream]:
            del bodies[stream_id]  # never processed: the next connection asks again
            self.retried += 1


def _whole_frames(unread: bytearray) -> list[bytes]:
    """Take the complete frames off the front of ``unread``."""
    frames = []
    while len(unread) >= 9:
        length = int.from_bytes(unread[:3], "big")
        if len(unread) < 9 + length:
            break
        frames.append(bytes(unread[: 9 + length]))
        del unread[: 9 + length]
    return frames


def _goaway(raw: bytes) -> Frame:
    frame, _ = Frame.parse_frame_header(memoryview(raw[:9]))
    if isinstance(frame, GoAwayFrame):
        frame.parse_body(memoryview(raw[9:]))
    return frame
