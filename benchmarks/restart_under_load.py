"""Restart an HTTP server under continuous loopback load, three ways, and count the damage.

Usage::

    python benchmarks/restart_under_load.py [--restarts 5] [--clients 4] [--json out.json]

The app is ``graceful_restart_trio.demo.app`` on hypercorn's trio worker in every case
(``GET /`` answers ``hello from pid N``, so the client knows which process answered):

(L) graceful_restart_trio: ``python -m graceful_restart_trio.demo``, restarted with
    ``kill -HUP <pid from its pid file>``; the old copy hands its listening socket to the
    successor, waits until it is ready, then stops accepting and drains.
(a) stop-then-start: ``benchmarks/_restart_plain_server.py`` (SO_REUSEADDR), restarted
    by SIGTERM, waiting for the old process to exit, then starting a new one.
(b) SO_REUSEPORT rebinding, what the Rust crate ``graceful_restart`` does: the same
    script with ``--reuseport``; a restart starts the new copy and at once SIGTERMs the
    old one (no readiness handshake).

While a method restarts, ``--clients`` threads make ``GET /`` requests back to back, each
on a new connection to 127.0.0.1 (``Connection: close``, ``--timeout`` per socket
operation, a 5 ms pause after a failure), and classify every request: 200, refused,
reset, timeout, closed without an answer, other status. Per restart the benchmark
records the failed requests and the *handover time*: from sending the restart signal
(for (a): from sending SIGTERM to the old process) to the first 200 answered by a new
pid, both read with ``time.monotonic`` in this process. Each (a) restart also gives the
*bare start-up time* of the app: from spawning the process to its first 200. Handover
times are reported as a ratio to the median bare start-up. Methods take turns restart
by restart (and the order rotates), so machine noise hits them alike; each has its own
port.

Every process started is stopped in a ``finally`` (SIGTERM, SIGKILL after a bound),
including the library's successors, which the old copy starts in a session of their own:
the pid file names the one serving.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import itertools
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Protocol

HOST = "127.0.0.1"
PLAIN_SERVER = Path(__file__).resolve().with_name("_restart_plain_server.py")
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
PID_RE = re.compile(rb"hello from pid (\d+)")

WARMUP = 0.3
"""Seconds of load before each restart: the old process must be serving it."""
SETTLE = 0.3
"""Seconds of load after the first 200 from the new process (and the old one is gone)."""
PHASE_CAP = 15.0
"""Seconds a restart may take, signal to end, before it is recorded as failed."""
START_CAP = 20.0
"""Seconds a first start may take."""
STOP_GRACE = 5.0
"""Seconds a process gets to exit after SIGTERM before SIGKILL."""
FAILURE_PAUSE = 0.005
"""Seconds a client thread waits after a failed request (a refused connect is instant)."""
DRAIN_TIMEOUT = 5.0
"""The library demo's --drain-timeout."""
PORT_RANGE = (20000, 32000)
"""Below Linux's ephemeral range (32768+), so no client connection ever holds our port."""


# -- the client ------------------------------------------------------------------------


_ERRORS: dict[type[OSError], str] = {
    ConnectionRefusedError: "refused",
    ConnectionResetError: "reset",
    BrokenPipeError: "reset",
    ConnectionAbortedError: "reset",
    TimeoutError: "timeout",
}


def request(port: int, timeout: float) -> tuple[str, int | None]:
    """One ``GET /`` on a new connection: (outcome, pid that answered or None).

    Outcomes: ``ok``; ``refused``, ``reset``, ``timeout`` (no progress for ``timeout``
    seconds), ``error <errno>``; ``closed`` (closed without a byte of answer);
    ``status N`` (not 200); ``truncated`` (a 200 without the body naming the pid).
    """
    chunks: list[bytes] = []
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(REQUEST)
            while data := sock.recv(4096):
                chunks.append(data)
    except OSError as error:
        kind = _ERRORS.get(type(error))
        return kind or f"error {errno.errorcode.get(error.errno or 0, error.errno)}", None
    response = b"".join(chunks)
    status = response.split(b" ", 2)[1:2]
    match = PID_RE.search(response)
    if not response:
        outcome = "closed"
    elif status != [b"200"]:
        outcome = f"status {status[0].decode(errors='replace') if status else '?'}"
    elif match is None:
        outcome = "truncated"
    else:
        return "ok", int(match[1])
    return outcome, None


@dataclass
class Sample:
    """One request as the client saw it."""

    start: float
    end: float
    outcome: str
    pid: int | None


class Load:
    """Client threads requesting back to back until stopped or ``max_requests`` are done."""

    def __init__(self, port: int, *, clients: int, timeout: float, max_requests: int) -> None:
        self._port = port
        self._timeout = timeout
        self._tickets = itertools.count()  # next() is atomic under the GIL
        self._max_requests = max_requests
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.samples: list[Sample] = []
        self.first_ok: dict[int, float] = {}  # pid -> time its first 200 arrived
        self._threads = [
            threading.Thread(target=self._run, name=f"client-{i}", daemon=True)
            for i in range(clients)
        ]

    def start(self) -> None:
        """Start the client threads."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the client threads; each finishes the request it is making."""
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        while not self._stop.is_set() and next(self._tickets) < self._max_requests:
            start = time.monotonic()
            outcome, pid = request(self._port, self._timeout)
            end = time.monotonic()
            with self._lock:
                self.samples.append(Sample(start, end, outcome, pid))
                if pid is not None and pid not in self.first_ok:
                    self.first_ok[pid] = end
            if outcome != "ok":
                self._stop.wait(FAILURE_PAUSE)

    @property
    def exhausted(self) -> bool:
        """Whether ``max_requests`` requests have been made."""
        return len(self.samples) >= self._max_requests

    def first_ok_from_new(self, old: set[int]) -> tuple[int, float] | None:
        """The (pid, time) of the first 200 from a pid not in ``old``."""
        with self._lock:
            new = [(t, pid) for pid, t in self.first_ok.items() if pid not in old]
        if not new:
            return None
        t, pid = min(new)
        return pid, t


# -- processes -------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def is_demo(pid: int) -> bool:
    """Whether ``pid`` is a library demo server (guards against a reused pid)."""
    try:
        return b"graceful_restart_trio.demo" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, SIGKILL (its whole session) after ``STOP_GRACE``, and reap."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def stop_pid(pid: int) -> None:
    """Stop a process that is not our child: SIGTERM, then SIGKILL its session."""
    if not (alive(pid) and is_demo(pid)):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: not alive(pid), STOP_GRACE):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # it leads its own session
        wait_until(lambda: not alive(pid), STOP_GRACE)


def wait_serving(port: int, timeout: float) -> int:
    """Wait until ``port`` answers 200; return the pid that answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome, pid = request(port, 1.0)
        if outcome == "ok" and pid is not None:
            return pid
        time.sleep(0.02)
    raise RuntimeError(f"nothing answered 200 on port {port} within {timeout:g}s")


@dataclass
class Restart:
    """What a method reports about the restart it just began."""

    signalled: float
    """time.monotonic() when the restart began (signal sent)."""
    old: set[int]
    """The pid(s) serving before."""
    spawned: float | None = None
    """For (a): time.monotonic() when the new process was spawned."""


class Method(Protocol):
    """A way of running and restarting the server."""

    key: str
    title: str
    port: int

    def start(self) -> None:
        """Start the server and wait until it serves."""

    def restart(self) -> Restart:
        """Begin a restart."""

    def old_gone(self, restart: Restart) -> bool:
        """Whether the process(es) serving before the restart have exited."""

    def stop(self) -> None:
        """Stop every process this method started (idempotent)."""


class LibraryMethod:
    """(L): the library's demo server, restarted by SIGHUP to the pid in its pid file."""

    key = "L"
    title = "(L) graceful_restart_trio, SIGHUP"

    def __init__(self, port: int, workdir: Path, log: IO[bytes]) -> None:
        self.port = port
        self._pid_file = workdir / "demo.pid"
        self._log = log
        self._first: subprocess.Popen[bytes] | None = None
        self._pids: set[int] = set()  # every demo process we know of

    def _serving_pid(self) -> int | None:
        try:
            return int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "graceful_restart_trio.demo",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--pid-file",
            str(self._pid_file),
            "--drain-timeout",
            str(DRAIN_TIMEOUT),
        ]
        self._first = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        self._pids.add(self._first.pid)
        pid = wait_serving(self.port, START_CAP)
        if not wait_until(lambda: self._serving_pid() == pid, START_CAP):
            raise RuntimeError(f"the demo's pid file does not name {pid}")

    def restart(self) -> Restart:
        pid = self._serving_pid()
        if pid is None:
            raise RuntimeError("the demo's pid file is missing")
        self._pids.add(pid)
        signalled = time.monotonic()
        os.kill(pid, signal.SIGHUP)
        return Restart(signalled, {pid})

    def old_gone(self, restart: Restart) -> bool:
        if self._first is not None:
            self._first.poll()  # reap the first copy once it has exited
        new = self._serving_pid()
        if new is not None:
            self._pids.add(new)
        return not any(alive(pid) for pid in restart.old)

    def stop(self) -> None:
        serving = self._serving_pid()
        if serving is not None:
            self._pids.add(serving)
        for pid in sorted(self._pids):
            if self._first is not None and pid == self._first.pid:
                stop_process(self._first)
            else:
                stop_pid(pid)
        self._pids.clear()


class PlainMethod:
    """(a) and (b): ``_restart_plain_server.py``, restarted without the library."""

    def __init__(self, port: int, log: IO[bytes], *, reuseport: bool) -> None:
        self.port = port
        self.reuseport = reuseport
        self.key = "b" if reuseport else "a"
        self.title = (
            "(b) SO_REUSEPORT rebind, old stops at once"
            if reuseport
            else "(a) stop-then-start, SO_REUSEADDR"
        )
        self._log = log
        self._processes: list[subprocess.Popen[bytes]] = []

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, str(PLAIN_SERVER), "--host", HOST, "--port", str(self.port)]
        if self.reuseport:
            command.append("--reuseport")
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        self._processes.append(process)
        return process

    def start(self) -> None:
        self._spawn()
        wait_serving(self.port, START_CAP)

    def restart(self) -> Restart:
        old = self._processes[-1]
        if self.reuseport:
            signalled = time.monotonic()
            self._spawn()
            old.send_signal(signal.SIGTERM)
            return Restart(signalled, {old.pid})
        signalled = time.monotonic()
        old.send_signal(signal.SIGTERM)
        try:
            old.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(old.pid, signal.SIGKILL)
            old.wait()
        spawned = time.monotonic()
        self._spawn()
        return Restart(signalled, {old.pid}, spawned)

    def old_gone(self, restart: Restart) -> bool:
        return all(p.poll() is not None for p in self._processes if p.pid in restart.old)

    def stop(self) -> None:
        for process in self._processes:
            stop_process(process)
        self._processes = [p for p in self._processes if p.returncode is None]


# -- one restart under load ------------------------------------------------------------


@dataclass
class Phase:
    """The record of one restart under load."""

    method: str
    index: int
    requests: int
    failed: int
    outcomes: dict[str, int]
    handover: float | None
    """Seconds from the restart signal to the first 200 from a new pid (None: never)."""
    bare_startup: float | None
    """For (a): seconds from spawning the new process to its first 200."""
    longest_gap: float
    """Longest time between two consecutive 200s during the phase, in seconds."""
    old_pids: list[int]
    new_pid: int | None
    failures: list[dict[str, object]] = field(default_factory=list)
    """The failed requests (times relative to the signal), at most 20."""


def run_phase(method: Method, index: int, args: argparse.Namespace) -> Phase:
    """Restart ``method`` once under load and record what the client saw."""
    load = Load(
        method.port, clients=args.clients, timeout=args.timeout, max_requests=args.max_requests
    )
    load.start()
    try:
        time.sleep(WARMUP)
        restart = method.restart()
        deadline = restart.signalled + PHASE_CAP
        while time.monotonic() < deadline and not load.exhausted:
            first = load.first_ok_from_new(restart.old)
            if (
                first is not None
                and method.old_gone(restart)
                and time.monotonic() >= first[1] + SETTLE
            ):
                break
            time.sleep(0.01)
    finally:
        load.stop()
    samples = sorted(load.samples, key=lambda s: s.end)
    failures = [s for s in samples if s.outcome != "ok"]
    ok_ends = [restart.signalled - WARMUP, *(s.end for s in samples if s.outcome == "ok")]
    ok_ends.append(samples[-1].end if samples else ok_ends[-1])
    first = load.first_ok_from_new(restart.old)
    return Phase(
        method=method.key,
        index=index,
        requests=len(samples),
        failed=len(failures),
        outcomes=dict(Counter(s.outcome for s in samples)),
        handover=None if first is None else first[1] - restart.signalled,
        bare_startup=(
            None if first is None or restart.spawned is None else first[1] - restart.spawned
        ),
        longest_gap=max(b - a for a, b in itertools.pairwise(ok_ends)),
        old_pids=sorted(restart.old),
        new_pid=None if first is None else first[0],
        failures=[
            {
                "outcome": s.outcome,
                "start": round(s.start - restart.signalled, 4),
                "end": round(s.end - restart.signalled, 4),
            }
            for s in failures[:20]
        ],
    )


# -- the run ---------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nobody listens on, below the ephemeral range."""
    ports: list[int] = []
    candidates = list(range(*PORT_RANGE))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free ports")


def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def summarize(phases: list[Phase], methods: Sequence[Method]) -> dict[str, object]:
    """Per-method figures, and the bare start-up median they are compared with."""
    bare = [p.bare_startup for p in phases if p.bare_startup is not None]
    bare_median = median(bare)
    summary: dict[str, object] = {
        "bare_startup_median": bare_median,
        "bare_startup_all": bare,
    }
    for method in methods:
        mine = [p for p in phases if p.method == method.key]
        handovers = [p.handover for p in mine if p.handover is not None]
        handover_median = median(handovers)
        outcomes: Counter[str] = Counter()
        for p in mine:
            outcomes.update({k: v for k, v in p.outcomes.items() if k != "ok"})
        summary[method.key] = {
            "title": method.title,
            "restarts": len(mine),
            "completed": len(handovers),
            "requests": sum(p.requests for p in mine),
            "failed": sum(p.failed for p in mine),
            "failed_per_restart": [p.failed for p in mine],
            "failure_outcomes": dict(outcomes),
            "handover_median": handover_median,
            "handover_max": max(handovers) if handovers else None,
            "handover_ratio": (
                handover_median / bare_median if handover_median and bare_median else None
            ),
            "longest_gap_median": median([p.longest_gap for p in mine]),
        }
    return summary


def _ms(seconds: object) -> str:
    return f"{seconds * 1000:.0f}" if isinstance(seconds, float) else "n/a"


def table(summary: dict[str, object], methods: Sequence[Method]) -> str:
    """The Markdown table of ``summary``."""
    lines = [
        "| method | failed requests per restart: mean (each) | failures by kind"
        " | handover ms: median (max) | handover / bare start-up | longest gap"
        " between 200s, ms (median) | requests |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        s = summary[method.key]
        assert isinstance(s, dict)
        per = s["failed_per_restart"]
        mean = statistics.mean(per) if per else 0.0
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(s["failure_outcomes"].items())) or "-"
        ratio = s["handover_ratio"]
        done = "" if s["completed"] == s["restarts"] else f" ({s['completed']} completed)"
        lines.append(
            f"| {s['title']} | {mean:.1f} ({', '.join(map(str, per))}) | {kinds}"
            f" | {_ms(s['handover_median'])} ({_ms(s['handover_max'])}){done}"
            f" | {f'{ratio:.2f}x' if isinstance(ratio, float) else 'n/a'}"
            f" | {_ms(s['longest_gap_median'])} | {s['requests']} |"
        )
    bare = summary["bare_startup_all"]
    assert isinstance(bare, list)
    lines.append("")
    lines.append(
        f"Bare start-up of the app (spawn to first 200, from (a)): median "
        f"{_ms(summary['bare_startup_median'])} ms"
        + (f" (min {_ms(min(bare))}, max {_ms(max(bare))})" if bare else "")
        + "."
    )
    return "\n".join(lines)


def environment() -> dict[str, object]:
    """What the numbers were measured on."""

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "nproc": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": version("trio"),
        "hypercorn": version("hypercorn"),
        "graceful_restart_trio": version("graceful-restart-trio"),
        "loadavg_at_start": os.getloadavg(),
    }


def rounds(methods: Sequence[Method], restarts: int) -> Iterator[tuple[int, Method]]:
    """Round-robin: every method once per round, the order rotating from round to round."""
    for index in range(restarts):
        shift = index % len(methods)
        for method in [*methods[shift:], *methods[:shift]]:
            yield index, method


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=5, help="per method (default 5)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--timeout", type=float, default=2.0, help="per socket operation, s")
    parser.add_argument(
        "--max-requests", type=int, default=50_000, help="cap per restart (default 50000)"
    )
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    args = parser.parse_args(argv)
    if args.restarts < 1 or args.clients < 1:
        parser.error("--restarts and --clients must be at least 1")
    return args


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that the finally below stops every server.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    env = environment()
    began = time.monotonic()
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="restart-bench-") as tmp:
        workdir = Path(tmp)
        logs = {key: (workdir / f"{key}.log").open("wb") for key in ("L", "a", "b")}
        ports = free_ports(3)
        methods: list[Method] = [
            LibraryMethod(ports[0], workdir, logs["L"]),
            PlainMethod(ports[1], logs["a"], reuseport=False),
            PlainMethod(ports[2], logs["b"], reuseport=True),
        ]
        try:
            for method in methods:
                method.start()
            for index, method in rounds(methods, args.restarts):
                phase = run_phase(method, index, args)
                phases.append(phase)
                print(
                    f"restart {index + 1} {method.key}: {phase.failed} failed of "
                    f"{phase.requests}, handover {_ms(phase.handover)} ms",
                    file=sys.stderr,
                )
        except BaseException:
            for key, log in logs.items():
                log.flush()
                tail = (workdir / f"{key}.log").read_text(errors="replace").splitlines()[-15:]
                print(f"--- server log ({key}), last lines:", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            for method in methods:
                method.stop()
            for log in logs.values():
                log.close()
    summary = summarize(phases, methods)
    env["seconds"] = round(time.monotonic() - began, 1)
    print(table(summary, methods))
    print(
        f"\n{env['date']}, {env['seconds']}s; nproc {env['nproc']}, Python {env['python']}, "
        f"trio {env['trio']}, hypercorn {env['hypercorn']}; "
        f"{args.restarts} restarts per method, {args.clients} client threads"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "settings": {
                        "restarts": args.restarts,
                        "clients": args.clients,
                        "timeout": args.timeout,
                        "max_requests": args.max_requests,
                        "warmup": WARMUP,
                        "settle": SETTLE,
                        "failure_pause": FAILURE_PAUSE,
                        "drain_timeout": DRAIN_TIMEOUT,
                        "ports": {m.key: m.port for m in methods},
                    },
                    "summary": summary,
                    "phases": [asdict(p) for p in phases],
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
