"""A small HTTP/1.1 keep-alive load generator on trio: server_throughput.py's fallback for wrk.

Opens ``--connections`` keep-alive connections to 127.0.0.1:``--port``, then, for
``--duration`` seconds, each connection sends ``GET /`` and waits for the whole response
before sending the next. Prints one JSON line: completed 200 responses, other
responses, errors, and the measured seconds.

Usage::

    python benchmarks/_load_client.py --port PORT [--connections 16] [--duration 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import trio

HOST = "127.0.0.1"
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n\r\n"
MAX_RECV = 65536


class Counts:
    """Responses and errors, summed over the connections."""

    def __init__(self) -> None:
        self.ok = 0
        self.other = 0
        self.errors = 0


def content_length(head: bytes) -> int:
    """The Content-Length of a response head (0 if absent)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


async def one_connection(port: int, counts: Counts) -> None:
    """Send requests one after another on one connection until cancelled."""
    try:
        stream = await trio.open_tcp_stream(HOST, port)
    except OSError:
        counts.errors += 1
        return
    async with stream:
        buffer = b""
        try:
            while True:
                await stream.send_all(REQUEST)
                while (end := buffer.find(b"\r\n\r\n")) < 0:
                    data = await stream.receive_some(MAX_RECV)
                    if not data:
                        counts.errors += 1
                        return
                    buffer += data
                head = buffer[:end]
                total = end + 4 + content_length(head)
                while len(buffer) < total:
                    data = await stream.receive_some(MAX_RECV)
                    if not data:
                        counts.errors += 1
                        return
                    buffer += data
                buffer = buffer[total:]
                if head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                    counts.ok += 1
                else:
                    counts.other += 1
        except (trio.BrokenResourceError, ValueError):
            counts.errors += 1


async def run(port: int, connections: int, duration: float) -> dict[str, float]:
    counts = Counts()
    start = time.perf_counter()
    with trio.move_on_after(duration):
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(one_connection, port, counts)
    seconds = time.perf_counter() - start
    return {
        "ok": counts.ok,
        "other": counts.other,
        "errors": counts.errors,
        "seconds": seconds,
        "requests_per_second": counts.ok / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="HTTP/1.1 keep-alive load generator (trio)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds (default 3)")
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    print(json.dumps(trio.run(run, args.port, args.connections, args.duration)), flush=True)


if __name__ == "__main__":
    main()
