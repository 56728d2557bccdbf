"""What the probation costs a restart: the successor's serving, and the commit.

Usage::

    python benchmarks/probation_cost.py [--restarts 10] [--probation 2] [--json out.json]

Two copies of the demo server (``python -m graceful_restart_trio.demo``) run side by side,
one with ``--probation 0`` (the baseline: the handover commits at "ready") and one with
``--probation P``. They are restarted in turns with ``kill -HUP`` while a client thread
per server makes ``GET /`` requests back to back on new connections. Per restart, read
with ``time.monotonic`` in this process:

* **serving**: from the signal to the first 200 answered by a new pid: when clients start
  reaching the new code. The probation must not delay it: the ratio P / baseline should
  be 1.
* **commit**: from the signal to the pid file naming the new pid, which the successor
  writes when the handover commits. It should exceed the baseline by about P.

Failed requests are counted too: both should have none. Every process started is
stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from _common import environment, environment_lines, write_json

HOST = "127.0.0.1"
CAP = 60.0
"""Seconds any one wait may take at most."""
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def get(port: int) -> int | None:
    """The pid answering ``GET /`` on a new connection, or None on any failure."""
    try:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return None
    if not data.startswith(b"HTTP/1.1 200"):
        return None
    return int(data.rsplit(b"pid ", 1)[1].split()[0])


class Server:
    """A demo server with a given probation, and a client hammering it."""

    def __init__(self, probation: float, directory: Path) -> None:
        self.probation = probation
        self.port = free_port()
        self.pid_file = directory / f"demo-{probation:g}.pid"
        self.failures = 0
        self.requests = 0
        self.last_pid: int | None = None
        self._stop = threading.Event()
        command = [
            sys.executable,
            "-m",
            "graceful_restart_trio.demo",
            "--port",
            str(self.port),
            "--pid-file",
            str(self.pid_file),
            "--probation",
            str(probation),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait(lambda: True if self.pid() == self.process.pid else None, "the first start")
        self._client = threading.Thread(target=self._hammer, daemon=True)
        self._client.start()

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None

    def _hammer(self) -> None:
        while not self._stop.is_set():
            pid = get(self.port)
            self.requests += 1
            if pid is None:
                self.failures += 1
            else:
                self.last_pid = pid

    def restart(self) -> tuple[float, float]:
        """SIGHUP; (seconds until a new pid answers, seconds until the pid file names it)."""
        old = self.pid()
        assert old is not None
        signalled = time.monotonic()
        os.kill(old, signal.SIGHUP)
        wait(lambda: True if self.last_pid not in (None, old) else None, "a new pid to answer")
        serving = time.monotonic() - signalled
        new = wait(lambda: self.pid() if self.pid() != old else None, "the commit")
        committed = time.monotonic() - signalled
        wait(lambda: None if _alive(old) else True, "the old copy to exit")
        assert new != old
        return serving, committed

    def stop(self) -> None:
        self._stop.set()
        self._client.join(10)
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            wait(lambda: None if _alive(pid) else True, "the last copy to exit")
        self.process.wait(CAP)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return status != "Z"


def wait(condition: Callable[[], T | None], what: str) -> T:
    """Poll ``condition`` every millisecond until it returns something; at most CAP s."""
    deadline = time.monotonic() + CAP
    while (result := condition()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {CAP:g}s for {what}")
        time.sleep(0.001)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=10, help="per server (default 10)")
    parser.add_argument("--probation", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        servers = [Server(0.0, Path(directory)), Server(args.probation, Path(directory))]
        times: dict[float, list[tuple[float, float]]] = {s.probation: [] for s in servers}
        try:
            for index in range(args.restarts):
                for server in servers if index % 2 == 0 else reversed(servers):
                    times[server.probation].append(server.restart())
        finally:
            for server in servers:
                server.stop()
    baseline, probation = (times[s.probation] for s in servers)
    serving = [statistics.median(t[0] for t in runs) for runs in (baseline, probation)]
    commit = [statistics.median(t[1] for t in runs) for runs in (baseline, probation)]
    result = {
        "environment": environment(),
        "probation": args.probation,
        "restarts": args.restarts,
        "serving_ms": {"baseline": serving[0] * 1000, "probation": serving[1] * 1000},
        "serving_ratio": serving[1] / serving[0],
        "commit_ms": {"baseline": commit[0] * 1000, "probation": commit[1] * 1000},
        "commit_added_ms": (commit[1] - commit[0]) * 1000,
        "failed_requests": {f"{s.probation:g}": s.failures for s in servers},
        "requests": {f"{s.probation:g}": s.requests for s in servers},
    }
    print(environment_lines(result["environment"]))
    print(
        f"successor serving after the signal, median: {serving[0] * 1000:.0f} ms without "
        f"probation, {serving[1] * 1000:.0f} ms with {args.probation:g} s: "
        f"ratio {result['serving_ratio']:.2f}"
    )
    print(
        f"handover committed after the signal, median: {commit[0] * 1000:.0f} ms without, "
        f"{commit[1] * 1000:.0f} ms with: +{result['commit_added_ms']:.0f} ms"
    )
    print(f"failed requests: {result['failed_requests']} of {result['requests']}")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
