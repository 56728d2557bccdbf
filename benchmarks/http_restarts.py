"""Restart a Starlette app 10 times under mixed HTTP/1.1 and HTTP/2 load.

Usage::

    python benchmarks/http_restarts.py [--restarts 10] [--interval 1.5] [--json out.json]

The server is ``benchmarks/_starlette_server.py`` (Starlette through
``graceful_restart_trio.asgi.serve``, probation 0.2 s), restarted with ``kill -HUP``
every ``--interval`` seconds while these loopback clients run through every restart:

- HTTP/1.1: two keep-alive clients (``http.client``; a request sent on a reused
  connection that meets the server's close before any byte of an answer is retried
  once, as RFC 9112 §9.3.1 allows, and counted as a retry), two clients that open a
  new connection per request, and one httpx client (no retry of any kind);
- HTTP/2 on persistent connections: two httpx clients (h2c prior knowledge, as httpx
  is: it fails a request in flight on any GOAWAY), and two spec-following h2 clients
  (``tests/_h2.py``) with 4 streams in flight each, half of them 50 ms requests.

It reports the failed requests per protocol, and for each old copy the time from the
end of its last request to its exit: the server logs, when its drain is over, how long
after the last lease was released that was (with the Unix time of the log line); this
process learns of the exit through a pidfd. Every process started is stopped in a
``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import environment, environment_lines, markdown_table, summary, write_json

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests._h2 import H2Load  # noqa: E402 - the tests' clients, shared
from tests._load import Client, HttpKeepAlive, HttpOneShot, Httpx  # noqa: E402

SERVER = ROOT / "benchmarks" / "_starlette_server.py"
CAP = 10_000_000
BOUND = 60.0
DRAINED = re.compile(r"^([\d.]+) \S+ \[pid (\d+)\] drained \((\d+) ms after the last lease")


class Http1Httpx(Httpx):
    http2 = False


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def watch_exit(pid: int, exits: dict[int, float]) -> None:
    """Record the Unix time at which ``pid`` exits (its pidfd becomes readable)."""
    fd = os.pidfd_open(pid)

    def wait() -> None:
        try:
            select.select([fd], [], [], BOUND * 2)
            exits[pid] = time.time()
        finally:
            os.close(fd)

    threading.Thread(target=wait, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--interval", type=float, default=1.5)
    parser.add_argument("--json")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = Path(tempfile.mkdtemp(prefix="http-restarts-"))
    pid_file, log_file = workdir / "app.pid", workdir / "app.log"
    stop = threading.Event()
    h1: list[Client] = [
        HttpKeepAlive("h1-keep-alive-1", port, stop, CAP),
        HttpKeepAlive("h1-keep-alive-2", port, stop, CAP),
        HttpOneShot("h1-new-connection-1", port, stop, CAP),
        HttpOneShot("h1-new-connection-2", port, stop, CAP),
        Http1Httpx("h1-httpx", port, stop, CAP),
    ]
    h2_httpx: list[Client] = [Httpx(f"h2c-httpx-{n}", port, stop, CAP) for n in (1, 2)]
    h2_spec = [H2Load(port, stop, streams=4, path=path) for path in ("/", "/?seconds=0.05")]
    exits: dict[int, float] = {}
    olds: list[int] = []
    with log_file.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, str(SERVER), "--port", str(port), "--pid-file", str(pid_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: read_pid(pid_file), "the server")
        for client in [*h1, *h2_httpx, *h2_spec]:
            client.start()
        for _ in range(args.restarts):
            started = time.monotonic()
            old = read_pid(pid_file)
            assert old is not None
            watch_exit(old, exits)
            olds.append(old)
            os.kill(old, signal.SIGHUP)
            wait_for(lambda: read_pid(pid_file) not in (None, old), "the successor")  # noqa: B023
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
        wait_for(lambda: all(pid in exits for pid in olds), "the old copies to exit")
    finally:
        stop.set()
        for client in [*h1, *h2_httpx, *h2_spec]:
            client.join(BOUND)
        for pid in {*olds, read_pid(pid_file) or server.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        server.wait(BOUND)
    released = {
        int(m[2]): float(m[1]) - int(m[3]) / 1000
        for line in log_file.read_text().splitlines()
        if (m := DRAINED.match(line))
    }
    after_ms = [(exits[pid] - released[pid]) * 1000 for pid in olds]

    def count(clients: list[Client]) -> tuple[int, int]:
        return sum(c.tally.requests for c in clients), sum(len(c.tally.failures) for c in clients)

    rows = [
        ["HTTP/1.1", *count(h1), sum(c.tally.retries for c in h1)],
        ["HTTP/2, httpx", *count(h2_httpx), 0],
        [
            "HTTP/2, spec-following",
            sum(c.completed for c in h2_spec),
            sum(len(c.failures) for c in h2_spec),
            sum(c.retried for c in h2_spec),
        ],
    ]
    exit_summary = summary(after_ms)
    print(f"# {args.restarts} restarts of a Starlette app under HTTP/1.1 and HTTP/2 load\n")
    print(environment_lines(environment()) + "\n")
    print(markdown_table(["protocol", "requests", "failed", "retried"], rows) + "\n")
    print(
        "old copy's exit after its last request ended: "
        f"median {exit_summary['median']:.0f} ms, min {exit_summary['min']:.0f}, "
        f"max {exit_summary['max']:.0f} ({len(after_ms)} restarts)"
    )
    for client in [*h1, *h2_httpx]:
        for failure in client.tally.failures[:3]:
            print(f"  {failure}")
    for spec in h2_spec:
        for failure in spec.failures[:3]:
            print(f"  {failure}")
    if args.json:
        write_json(
            args.json,
            {
                "environment": environment(),
                "protocols": [
                    dict(zip(["protocol", "requests", "failed", "retried"], row, strict=True))
                    for row in rows
                ],
                "exit_after_last_request_ms": after_ms,
            },
        )


if __name__ == "__main__":
    main()
