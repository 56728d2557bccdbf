"""The keeper's ``--workers N`` on this machine: throughput, rolls under load, balance.

Usage::

    python benchmarks/workers.py [--only throughput,rolls,balance] [--json out.json]
        [--uvicorn-python PATH] [--granian-python PATH]          # 3 to 4 minutes

Every server runs on 127.0.0.1 and is loaded by wrk (``apt-get install wrk``, required),
one thread (``-t1``). Nothing is pinned but one baseline: on a 2-core machine two workers
and wrk share the two CPUs, so the script measures what each process used (from
``/proc``) as well as what wrk counted. The servers are started with
``python -m graceful_restart_trio.keeper`` (``--workers N --control PATH``), uvicorn
(``--workers 2``) and granian (``--workers 2``).

1. **Throughput** (``throughput``): the hello app of ``server_throughput.py`` on
   ``asgi.serve``'s httptools path (``_hello_server.py --variant asgi``) under three
   keepers, each started once and warmed up: ``--workers 1``; ``--workers 1`` pinned to
   CPU 0 with its wrk pinned to CPU 1 (``taskset``: the load generator apart); and
   ``--workers 2``. Then ``--rounds`` rounds of ``wrk -c --connections -d --duration``
   against each, the order rotating each round. Per run: requests/s, and over the run
   the CPU time of the workers (``/proc/PID/task/*/schedstat``), of the keeper, of wrk
   (``RUSAGE_CHILDREN``) and of the whole machine (``/proc/stat``). Reported, as medians
   of the per-round ratios N=2/N=1: requests/s (wrk takes its CPU out of the two
   workers' two CPUs, but not out of the one worker's CPU: a lower bound), and requests
   per worker-CPU-second, and that times 2 (the CPUs 2 workers can use, against 1): the
   ratio with the load generator elsewhere if each request cost the CPU it cost here.
2. **Rolling restarts under full load** (``rolls``): ``_workers_app.py`` (the same hello
   app plus an ``x-pid`` header and ``/slow?ms=N``) under a keeper with ``--workers 2``
   (and ``--probation``), then uvicorn ``--workers 2`` and granian ``--workers 2`` (with
   ``--respawn-interval`` from ``--granian-respawn-interval``) serving the same app, each
   in turn under the same load: wrk on keep-alive connections (``--roll-connections``),
   wrk with ``Connection: close`` (a new connection per request,
   ``--roll-new-connections``), and ``--slow-clients`` threads sending
   ``GET /slow?ms=<--slow-ms>`` on a new connection each, one after another. After 1 s
   of load, ``--rolls`` times: ``SIGHUP`` to the server's main process, wait until the
   roll is over (keeper: its control status counts one more restart and no old worker
   drains; peers: none of the old workers is left and two new ones run), ``--settle`` s
   of load. Failed requests: wrk's socket errors (connect, read, write, timeout) and
   non-2xx answers, and the slow requests that did not get their 200 and body (refused,
   reset, closed, timed out).
3. **One roll** (during 2): from the signal to the end of the roll, per roll, as this
   script saw it; for the keeper also the phases of its control status
   (``last_restart``, ms after the signal reached it: each worker's spawn, ready,
   commit, drain). Every ``--sample-interval`` s a thread reads ``/proc``: the number of
   processes in the server's tree (its main process and every descendant), how many of
   them are copies of the app (not the keeper, its launchers, uvicorn's resource tracker
   or a master), and the sum of their RSS. Reported: the steady state (median over the
   ``--settle`` s before each signal) and the peak during the rolls.
4. **Balance** (``balance``): a keeper with ``--workers 2`` serving ``_workers_app.py``;
   ``--balance-rounds`` wrk runs of ``--balance-duration`` s, keep-alive
   (``--connections``) and then with a new connection per request
   (``--balance-new-connections``), each run with a Lua ``response`` hook tallying the
   ``x-pid`` header: requests per worker. On keep-alive connections a connection stays
   with the worker that accepted it, so the script also counts, halfway through each
   keep-alive run, the established connections each worker holds (its socket fds matched
   to ``/proc/net/tcp``). Reported: max/min of the requests per worker over all runs,
   and per run.

Every process started is stopped in a ``finally``: SIGTERM to the main process (SIGKILL
after a bound), then SIGKILL to any process of its tree still alive.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    environment,
    environment_lines,
    markdown_table,
    package_version,
    summary,
    write_json,
)
from server_throughput import BenchmarkError, check_hello

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
PARTS = ("throughput", "rolls", "balance")
HELLO_APP = [str(HERE / "_hello_server.py"), "--variant", "asgi"]
PID_APP = str(HERE / "_workers_app.py")
KEEPER = "graceful_restart_trio.keeper"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
ROLL_TIMEOUT = 60.0
"""Seconds one roll may take before the run is abandoned."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
TALLY_LUA = """\
threads = {}
setup = function(thread) table.insert(threads, thread) end
tally = {}
response = function(status, headers, body)
  local pid = headers["x-pid"] or "none"
  tally[pid] = (tally[pid] or 0) + 1
end
done = function(summary, latency, requests)
  for _, t in ipairs(threads) do
    for pid, n in pairs(t:get("tally")) do io.write(string.format("tally %s %d\\n", pid, n)) end
  end
end
"""
"""wrk script: count the answers by the pid in their ``x-pid`` header."""


def progress(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --- /proc ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """One line of the process table."""

    ppid: int
    start: int
    """Start time in clock ticks since boot: with the pid, names the process."""
    state: str


def process_table() -> dict[int, Proc]:
    """Every process: its parent, start time and state, from ``/proc/PID/stat``."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:  # it just exited
            continue
        fields = stat.rpartition(")")[2].split()
        table[int(entry.name)] = Proc(int(fields[1]), int(fields[19]), fields[0])
    return table


def descendants(root: int, table: dict[int, Proc]) -> list[int]:
    """``root`` and every live process under it (zombies left out)."""
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        if proc.state != "Z":
            children.setdefault(proc.ppid, []).append(pid)
    tree, todo = [], [root] if root in table else []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError):
        return 0


def cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` used so far, all its live threads (``schedstat``, ns)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent not idle so far, all CPUs (``/proc/stat``)."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / CLK_TCK


def children_cpu_seconds() -> float:
    """User + system time of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def connections_per_pid(pids: Sequence[int], port: int) -> dict[int, int]:
    """Established TCP connections on local ``port`` each of ``pids`` holds a socket of;
    pid 0: all of them, held or not yet accepted."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rpartition(":")[2], 16) == port:
                    established.add(fields[9])  # the socket's inode
    counts = {0: len(established)}
    for pid in pids:
        if pid == 0:
            continue
        inodes = set()
        with contextlib.suppress(FileNotFoundError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(FileNotFoundError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
        counts[pid] = len(inodes & established)
    return counts


# --- the servers ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def ask_status(control: Path) -> dict[str, Any]:
    """The keeper's status, from its control socket (one JSON request, JSON lines back)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(control))
        sock.sendall(b'{"command": "status"}\n')
        with sock.makefile("rb") as answers:
            reply: dict[str, Any] = json.loads(answers.readlines()[-1])
    if reply.get("result") != "ok":
        raise BenchmarkError(f"status failed: {reply}")
    status: dict[str, Any] = reply["status"]
    return status


@dataclass
class Service:
    """A running server: its main process, its port, how to find its workers."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    workers_wanted: int
    port: int = 0
    control: Path | None = None
    """The keeper's control socket; None for a peer."""
    seen: set[tuple[int, int]] = field(default_factory=set)
    """Every (pid, start time) seen in its tree: what to kill if left over."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[int]:
        """The main process and its live descendants, now."""
        table = process_table()
        tree = descendants(self.pid, table)
        self.seen.update((pid, table[pid].start) for pid in tree)
        return tree

    def is_app(self, pid: int) -> bool:
        """``pid`` of the tree is a copy of the application: under the keeper, a process
        running the app's script (not the keeper, not a launcher, not a fork of either
        that has not yet run the app); under a peer, any process but the master and
        multiprocessing's resource tracker."""
        if self.control is not None:
            return command_line(pid)[1:2] in ([PID_APP.encode()], [HELLO_APP[0].encode()])
        return pid != self.pid and not is_resource_tracker(pid)

    def workers(self) -> list[int]:
        """The pids of the serving workers."""
        if self.control is not None:
            status = ask_status(self.control)
            return [w["pid"] for w in status["workers"] if w["pid"] and w["state"] == "serving"]
        table = process_table()
        return [
            pid
            for pid, proc in table.items()
            if proc.ppid == self.pid and proc.state != "Z" and not is_resource_tracker(pid)
        ]

    def restarts(self) -> int:
        """The keeper's restarts so far, any outcome."""
        assert self.control is not None
        return sum(ask_status(self.control)["restarts"].values())

    def roll_over(self, old: Sequence[int], restarts_before: int) -> bool:
        """The roll started after ``restarts_before`` restarts, replacing ``old``, is over."""
        if self.control is not None:
            status = ask_status(self.control)
            done = sum(status["restarts"].values()) > restarts_before
            return done and status["roll"] is None and not status["draining"]
        workers = self.workers()
        return not set(old) & set(workers) and len(workers) == self.workers_wanted

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def command_line(pid: int) -> list[bytes]:
    """The arguments of ``pid`` (empty if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def is_resource_tracker(pid: int) -> bool:
    """multiprocessing's resource tracker (uvicorn starts one): not a worker."""
    return any(b"resource_tracker" in arg for arg in command_line(pid))


@contextlib.contextmanager
def running(
    name: str,
    command: list[str],
    workdir: Path,
    workers: int,
    *,
    port: int = 0,
    keeper: bool = False,
) -> Iterator[Service]:
    """Start ``command``, wait until ``workers`` workers serve; always stop it."""
    log = workdir / f"{name}.log"
    control = workdir / f"{name}.control" if keeper else None
    if control is not None:
        at = command.index(KEEPER) + 1
        command = [*command[:at], "--control", str(control), *command[at:]]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=HERE
        )
    service = Service(name, proc, log, workers, port, control)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise BenchmarkError(f"{name} exited with {proc.returncode}:\n{service.log_tail()}")
            with contextlib.suppress(OSError):
                if len(service.workers()) == workers:
                    break
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"{name} did not start {workers} workers:\n{service.log_tail()}"
                )
            time.sleep(0.1)
        if control is not None:
            address = ask_status(control)["listeners"][0]["address"]
            service.port = int(address.rpartition(":")[2])
        check_hello(service.port, START_TIMEOUT)
        service.tree()
        yield service
    finally:
        stop(service)


def stop(service: Service) -> None:
    """SIGTERM, wait (SIGKILL after a bound), then SIGKILL whatever of its tree is left."""
    with contextlib.suppress(OSError):
        service.tree()
    proc = service.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            progress(f"{service.name}: still running {STOP_TIMEOUT:g} s after SIGTERM: SIGKILL")
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 5
    while True:
        table = process_table()
        left = [
            pid
            for pid, start in service.seen
            if pid != proc.pid and pid in table and table[pid].start == start
        ]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in left:
        progress(f"{service.name}: pid {pid} outlived its main process: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def keeper_command(workers: int, app: list[str], probation: float) -> list[str]:
    """The keeper (``running`` adds ``--control``)."""
    return [
        sys.executable,
        "-m",
        KEEPER,
        "--workers",
        str(workers),
        "--probation",
        str(probation),
        "--log-level",
        "WARNING",
        "--",
        sys.executable,
        *app,
    ]


# --- load ----------------------------------------------------------------------------


@dataclass
class WrkResult:
    """What wrk reported."""

    requests: int
    seconds: float
    errors: dict[str, int]
    """Socket errors by kind (connect, read, write, timeout) and non-2xx answers."""
    tally: dict[str, int]
    """Answers per ``x-pid`` (with the tally script)."""

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_wrk(out: str) -> WrkResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", out)
    if done is None:
        raise BenchmarkError(f"cannot read wrk's output:\n{out}")
    errors = {kind: int(n) for kind, n in re.findall(r"(connect|read|write|timeout) (\d+)", out)}
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors["non-2xx"] = int(non_2xx.group(1)) if non_2xx else 0
    tally = {pid: int(n) for pid, n in re.findall(r"^tally (\S+) (\d+)$", out, re.MULTILINE)}
    seconds = float(done.group(2)) * UNITS[done.group(3)]
    return WrkResult(int(done.group(1)), seconds, errors, tally)


class Wrk:
    """``wrk -t1`` against ``/`` in its own process; SIGINT makes it stop and report."""

    def __init__(
        self,
        port: int,
        connections: int,
        seconds: float = 3600,
        *,
        new_connections: bool = False,
        script: Path | None = None,
        cpu: int | None = None,
    ) -> None:
        command = [] if cpu is None else ["taskset", "-c", str(cpu)]
        command += ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "5s"]
        if new_connections:
            command += ["-H", "Connection: close"]
        if script is not None:
            command += ["-s", str(script)]
        self.seconds = seconds
        self.proc = subprocess.Popen(
            [*command, f"http://{HOST}:{port}/"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self, interrupt: bool = False) -> WrkResult:
        """Wait for wrk's report (``interrupt``: stop it now)."""
        if interrupt and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=self.seconds + 30)
        if self.proc.returncode != 0:
            raise BenchmarkError(f"wrk exited with {self.proc.returncode}: {err}")
        return parse_wrk(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


FAILURES = {
    ConnectionRefusedError: "refused",
    ConnectionResetError: "reset",
    TimeoutError: "timeout",
}


class SlowClients:
    """Threads sending ``GET /slow?ms=N`` one after another, each on a new connection."""

    def __init__(self, port: int, count: int, ms: int) -> None:
        self.request = (
            f"GET /slow?ms={ms} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
        )
        self.port = port
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: Counter[str] = Counter()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            failure = self.once()
            with self.lock:
                if failure is None:
                    self.ok += 1
                else:
                    self.failures[failure] += 1
            if failure is not None:
                time.sleep(0.01)  # a refused connect is instant

    def once(self) -> str | None:
        """One request: None if answered 200 ``hello``, else what went wrong."""
        try:
            with socket.create_connection((HOST, self.port), timeout=10) as sock:
                sock.sendall(self.request)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError as error:
            return FAILURES.get(type(error), f"{type(error).__name__} {error.errno}")
        if not data:
            return "closed without an answer"
        if data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"hello"):
            return None
        return f"answered {data[:40]!r}"

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)


class Sampler(threading.Thread):
    """Every ``interval`` s: (time, processes in the tree, copies of the app among them,
    RSS summed over the tree)."""

    def __init__(self, service: Service, interval: float) -> None:
        super().__init__(daemon=True)
        self.service = service
        self.interval = interval
        self.stopping = threading.Event()
        self.samples: list[tuple[float, int, int, int]] = []

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            now = time.monotonic()
            tree = self.service.tree()
            apps = [p for p in tree if self.service.is_app(p)]
            rss = sum(rss_bytes(pid) for pid in tree)
            self.samples.append((now, len(tree), len(apps), rss))

    def between(self, start: float, end: float) -> list[tuple[float, int, int, int]]:
        return [s for s in self.samples if start <= s[0] <= end]

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


# --- 1. throughput -------------------------------------------------------------------


def timed_run(service: Service, args: argparse.Namespace, cpu: int | None) -> dict[str, Any]:
    """One wrk run (on ``cpu``) against ``service``, with the CPU each party used meanwhile."""
    workers = service.workers()
    before = {pid: cpu_seconds(pid) for pid in workers}
    keeper_before = cpu_seconds(service.pid)
    wrk_before = children_cpu_seconds()
    busy_before = machine_busy_seconds()
    started = time.monotonic()
    result = Wrk(service.port, args.connections, args.duration, cpu=cpu).result()
    elapsed = time.monotonic() - started
    busy = machine_busy_seconds() - busy_before
    wrk_cpu = children_cpu_seconds() - wrk_before
    keeper_cpu = cpu_seconds(service.pid) - keeper_before
    per_worker = [cpu_seconds(pid) - before[pid] for pid in workers]
    if sorted(service.workers()) != sorted(workers):
        raise BenchmarkError(f"{service.name}: the workers changed during a run")
    worker_cpu = sum(per_worker)
    return {
        "requests_per_second": result.per_second,
        "requests": result.requests,
        "errors": result.failed,
        "seconds": elapsed,
        "worker_cpu_s": worker_cpu,
        "per_worker_cpu_s": per_worker,
        "keeper_cpu_s": keeper_cpu,
        "wrk_cpu_s": wrk_cpu,
        "machine_busy_cpu_s": busy,
        "requests_per_worker_cpu_s": result.requests / worker_cpu,
    }


THROUGHPUT = {
    "N=1": (1, None),
    "N=1 pinned": (1, (0, 1)),
    "N=2": (2, None),
}
"""Part 1's configurations: workers, and (the keeper's CPU, wrk's CPU) when pinned."""


def measure_throughput(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Part 1: keeper --workers 1 (also pinned apart from wrk) and 2, rotating rounds."""
    rounds: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        services = {}
        for config, (n, pins) in THROUGHPUT.items():
            command = keeper_command(n, HELLO_APP, args.probation)
            if pins is not None:
                command = ["taskset", "-c", str(pins[0]), *command]
            name = "keeper-" + config.replace("=", "").replace(" ", "-")
            services[config] = stack.enter_context(running(name, command, workdir, n, keeper=True))
            wrk_cpu = None if pins is None else pins[1]
            Wrk(services[config].port, args.connections, args.warmup, cpu=wrk_cpu).result()
        configs = list(THROUGHPUT)
        for number in range(args.rounds):
            shift = number % len(configs)
            record: dict[str, Any] = {"round": number + 1}
            for config in configs[shift:] + configs[:shift]:
                pins = THROUGHPUT[config][1]
                run = timed_run(services[config], args, None if pins is None else pins[1])
                record[config] = run
                progress(
                    f"throughput round {number + 1}/{args.rounds} {config}: "
                    f"{run['requests_per_second']:.0f} req/s, workers "
                    f"{run['worker_cpu_s'] / run['seconds']:.2f} cores, wrk "
                    f"{run['wrk_cpu_s'] / run['seconds']:.2f}"
                )
            rounds.append(record)

    def ratios(key: str, baseline: str, factor: float = 1.0) -> dict[str, float]:
        return summary([factor * r["N=2"][key] / r[baseline][key] for r in rounds])

    rps, per_cpu = "requests_per_second", "requests_per_worker_cpu_s"
    return {
        "rounds": rounds,
        "ratios": {
            "raw": ratios(rps, "N=1"),
            "raw, N=1 pinned": ratios(rps, "N=1 pinned"),
            "per worker-CPU-second": ratios(per_cpu, "N=1"),
            "by worker CPU x2": ratios(per_cpu, "N=1", 2),
            "by worker CPU x2, N=1 pinned": ratios(per_cpu, "N=1 pinned", 2),
        },
    }


def report_throughput(result: dict[str, Any]) -> str:
    rounds = result["rounds"]

    def cores(config: str, key: str) -> float:
        return float(statistics.median(r[config][key] / r[config]["seconds"] for r in rounds))

    names = {
        "N=1": "keeper --workers 1",
        "N=1 pinned": "keeper --workers 1, on CPU 0, wrk on CPU 1",
        "N=2": "keeper --workers 2",
    }
    rows = []
    for config, name in names.items():
        rps = summary([r[config]["requests_per_second"] for r in rounds])
        rows.append(
            [
                name,
                round(rps["median"]),
                round(rps["min"]),
                round(rps["max"]),
                round(cores(config, "worker_cpu_s"), 2),
                round(cores(config, "wrk_cpu_s"), 2),
                round(cores(config, "machine_busy_cpu_s"), 2),
                round(statistics.median(r[config]["requests_per_worker_cpu_s"] for r in rounds)),
            ]
        )
    table = markdown_table(
        [
            "server",
            "median req/s",
            "min",
            "max",
            "workers' CPU (cores)",
            "wrk's CPU (cores)",
            "machine busy (cores)",
            "req per worker-CPU-second",
        ],
        rows,
    )
    ratio = result["ratios"]

    def line(key: str) -> str:
        s = ratio[key]
        return f"**{s['median']:.2f}** (min {s['min']:.2f}, max {s['max']:.2f})"

    errors = sum(r[config]["errors"] for r in rounds for config in names)
    return (
        f"{table}\n\n"
        f"Medians of the per-round ratios, N=2 over N=1:\n\n"
        f"- requests/s, raw (wrk shares the 2 CPUs with the workers): {line('raw')}; "
        f"against the pinned N=1 (one whole CPU for its worker, wrk on the other): "
        f"{line('raw, N=1 pinned')}.\n"
        f"- requests per worker-CPU-second: {line('per worker-CPU-second')}. Times 2 "
        f"(2 workers can use 2 CPUs, 1 worker one), the ratio with wrk elsewhere: "
        f"{line('by worker CPU x2')}; against the pinned N=1: "
        f"{line('by worker CPU x2, N=1 pinned')}. Target >= 1.8.\n"
        f"- Errors (socket errors + non-2xx) over all runs: {errors}."
    )


# --- 2 and 3. rolls ------------------------------------------------------------------


def peer_commands(args: argparse.Namespace, port: int) -> dict[str, list[str]]:
    """uvicorn and granian, two workers each, serving ``_workers_app:app`` on ``port``."""
    commands = {}
    common = ["--host", HOST, "--port", str(port), "--workers", "2", "--log-level", "warning"]
    if args.uvicorn_python:
        commands["uvicorn --workers 2"] = [
            *(args.uvicorn_python, "-m", "uvicorn", *common, "--app-dir", str(HERE)),
            *("--no-access-log", "_workers_app:app"),
        ]
    if args.granian_python:
        commands["granian --workers 2"] = [
            *(args.granian_python, "-m", "granian", *common, "--working-dir", str(HERE)),
            *("--interface", "asgi", "--no-access-log", "_workers_app:app"),
            *("--respawn-interval", str(args.granian_respawn_interval)),
        ]
    return commands


def roll_series(service: Service, args: argparse.Namespace) -> dict[str, Any]:
    """Part 2 for one server: ``--rolls`` rolls under the load mix; part 3 on the way."""
    rolls: list[dict[str, Any]] = []
    sampler = Sampler(service, args.sample_interval)
    with contextlib.ExitStack() as stack:
        keep_alive = Wrk(service.port, args.roll_connections)
        stack.callback(keep_alive.kill)
        new_conns = Wrk(service.port, args.roll_new_connections, new_connections=True)
        stack.callback(new_conns.kill)
        slow = SlowClients(service.port, args.slow_clients, args.slow_ms)
        stack.callback(slow.stop)
        sampler.start()
        stack.callback(sampler.stop)
        time.sleep(1.0)
        for number in range(args.rolls):
            old = service.workers()
            restarts = service.restarts() if service.control else 0
            signalled = time.monotonic()
            os.kill(service.pid, signal.SIGHUP)
            while not service.roll_over(old, restarts):
                if time.monotonic() - signalled > ROLL_TIMEOUT or service.proc.poll() is not None:
                    raise BenchmarkError(f"{service.name}: roll {number + 1} did not end")
                time.sleep(0.05)
            ended = time.monotonic()
            roll: dict[str, Any] = {"seconds": ended - signalled}
            if service.control is not None:
                last = ask_status(service.control)["last_restart"]
                roll["outcome"], roll["phases_ms"] = last["outcome"], last["phases"]
            roll["steady"] = sampler.between(signalled - args.settle, signalled)
            roll["during"] = sampler.between(signalled, ended)
            rolls.append(roll)
            progress(f"{service.name}: roll {number + 1}/{args.rolls} in {roll['seconds']:.2f} s")
            time.sleep(args.settle)
        sampler.stop()
        slow.stop()
        results = {
            "keep-alive": keep_alive.result(interrupt=True),
            "new connection": new_conns.result(interrupt=True),
        }
    steady = [s for r in rolls for s in r["steady"]]
    during = [s for r in rolls for s in r["during"]]
    return {
        "rolls": rolls,
        "wrk": {k: asdict(v) for k, v in results.items()},
        "slow": {"ok": slow.ok, "failures": dict(slow.failures)},
        "roll_seconds": summary([r["seconds"] for r in rolls]),
        "processes": {
            "steady": statistics.median(s[1] for s in steady),
            "peak": max(s[1] for s in during),
        },
        "app_processes": {
            "steady": statistics.median(s[2] for s in steady),
            "peak": max(s[2] for s in during),
        },
        "rss_mib": {
            "steady": statistics.median(s[3] for s in steady) / 2**20,
            "peak": max(s[3] for s in during) / 2**20,
        },
        "outcomes": dict(Counter(r.get("outcome", "n/a") for r in rolls)),
    }


def measure_rolls(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Parts 2 and 3: the keeper, then each peer, each rolled ``--rolls`` times."""
    servers: dict[str, Any] = {}
    port = free_port()
    command = keeper_command(2, [PID_APP, "--port", str(port)], args.probation)
    with running("keeper", command, workdir, 2, port=port, keeper=True) as service:
        servers["keeper --workers 2"] = roll_series(service, args)
    for name in peer_commands(args, 0):
        port = free_port()
        command = peer_commands(args, port)[name]
        with running(name.split()[0], command, workdir, 2, port=port) as service:
            servers[name] = roll_series(service, args)
    return servers


def report_rolls(servers: dict[str, Any]) -> str:
    rows = []
    for name, s in servers.items():
        wrk = s["wrk"]
        requests = f"{wrk['keep-alive']['requests']:,} / {wrk['new connection']['requests']:,}"
        requests += f" / {s['slow']['ok'] + sum(s['slow']['failures'].values()):,}"
        failed = [
            sum(wrk["keep-alive"]["errors"].values()),
            sum(wrk["new connection"]["errors"].values()),
            sum(s["slow"]["failures"].values()),
        ]
        roll = s["roll_seconds"]
        rows.append(
            [
                name,
                len(s["rolls"]),
                requests,
                " / ".join(str(n) for n in failed),
                f"{roll['median']:.2f} ({roll['min']:.2f}-{roll['max']:.2f})",
                f"{s['processes']['steady']:g} -> {s['processes']['peak']}",
                f"{s['app_processes']['steady']:g} -> {s['app_processes']['peak']}",
                f"{s['rss_mib']['steady']:.0f} -> {s['rss_mib']['peak']:.0f}",
            ]
        )
    table = markdown_table(
        [
            "server",
            "rolls",
            "requests: keep-alive / new conn. / slow",
            "failed: keep-alive / new conn. / slow",
            "roll s, median (min-max)",
            "processes: steady -> peak",
            "app processes: steady -> peak",
            "RSS MiB: steady -> peak",
        ],
        rows,
    )
    lines = []
    for name, s in servers.items():
        kinds = [
            f"{load} {kind} {n}"
            for load, result in s["wrk"].items()
            for kind, n in result["errors"].items()
            if n
        ]
        kinds += [f"slow: {reason} {n}" for reason, n in s["slow"]["failures"].items()]
        lines.append(f"- {name}: failed requests by kind: {', '.join(kinds) or 'none'}.")
    return table + "\n\n" + "\n".join(lines)


def report_roll_phases(keeper: dict[str, Any]) -> str:
    """Part 3: the keeper's phases, ms after the signal, over the rolls."""
    phases: dict[str, list[int]] = {}
    for roll in keeper["rolls"]:
        for phase, ms in roll.get("phases_ms", {}).items():
            phases.setdefault(phase, []).append(ms)
    rows = [[phase, *(round(v) for v in summary(ms).values())] for phase, ms in phases.items()]
    table = markdown_table(["phase (keeper's control status)", "median ms", "min", "max"], rows)
    outcomes = ", ".join(f"{n} {k}" for k, n in keeper["outcomes"].items())
    return f"{table}\n\nOutcomes: {outcomes}."


# --- 4. balance ----------------------------------------------------------------------


def measure_balance(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Part 4: requests (and keep-alive connections) per worker of ``--workers 2``."""
    script = workdir / "tally.lua"
    script.write_text(TALLY_LUA)
    port = free_port()
    command = keeper_command(2, [PID_APP, "--port", str(port)], args.probation)
    cases: dict[str, Any] = {}
    with running("keeper-balance", command, workdir, 2, port=port, keeper=True) as service:
        workers = sorted(service.workers())
        Wrk(port, args.connections, args.warmup).result()
        loads = {
            "keep-alive": (args.connections, False),
            "new connection per request": (args.balance_new_connections, True),
        }
        for case, (connections, new) in loads.items():
            runs: list[dict[str, Any]] = []
            for number in range(args.balance_rounds):
                cpu_before = [cpu_seconds(pid) for pid in workers]
                wrk = Wrk(
                    port, connections, args.balance_duration, new_connections=new, script=script
                )
                time.sleep(args.balance_duration / 2)
                held = connections_per_pid([*workers, 0], port)
                result = wrk.result()
                cpu = [cpu_seconds(pid) - b for pid, b in zip(workers, cpu_before, strict=True)]
                per_worker = [result.tally.get(str(pid), 0) for pid in workers]
                runs.append(
                    {
                        "requests_per_worker": per_worker,
                        "other": result.requests - sum(per_worker),
                        "errors": result.failed,
                        "connections_per_worker": [held[pid] for pid in workers],
                        "connections_established": held[0],
                        "cpu_s_per_worker": cpu,
                    }
                )
                progress(
                    f"balance {case} {number + 1}/{args.balance_rounds}: requests {per_worker}, "
                    f"connections held {runs[-1]['connections_per_worker']}, "
                    f"CPU s {[round(c, 2) for c in cpu]}"
                )
            totals = [sum(r["requests_per_worker"][i] for r in runs) for i in range(len(workers))]
            cases[case] = {
                "connections": connections,
                "runs": runs,
                "requests_per_worker": totals,
                "max_over_min": max(totals) / max(min(totals), 1),
            }
        if sorted(service.workers()) != workers:
            raise BenchmarkError("the workers changed during the balance runs")
    return {"workers": workers, "cases": cases}


def report_balance(result: dict[str, Any]) -> str:
    rows = []
    for case, c in result["cases"].items():
        per_run = [
            max(r["requests_per_worker"]) / max(min(r["requests_per_worker"]), 1) for r in c["runs"]
        ]
        held = (
            ", ".join(
                "/".join(str(n) for n in r["connections_per_worker"])
                + f" of {r['connections_established']}"
                for r in c["runs"]
            )
            if case == "keep-alive"
            else "one per request"
        )
        rows.append(
            [
                f"{case} (wrk -c{c['connections']})",
                " / ".join(f"{n:,}" for n in c["requests_per_worker"]),
                round(c["max_over_min"], 2),
                ", ".join(f"{q:.2f}" for q in per_run),
                held,
                " / ".join(
                    f"{sum(r['cpu_s_per_worker'][i] for r in c['runs']):.1f}" for i in (0, 1)
                ),
            ]
        )
    table = markdown_table(
        [
            "load",
            "requests: worker A / B",
            "max/min",
            "max/min per run",
            "keep-alive connections held A/B per run",
            "CPU s: A / B",
        ],
        rows,
    )
    errors = sum(r["errors"] + r["other"] for c in result["cases"].values() for r in c["runs"])
    return f"{table}\n\nErrors and answers without a worker's pid: {errors}."


# --- main ----------------------------------------------------------------------------


def python_with(module: str) -> str | None:
    """This interpreter if it can import ``module``, else None (that peer is left out)."""
    found = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, check=False, timeout=30
    )
    return sys.executable if found.returncode == 0 else None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--only", default=",".join(PARTS), help="the parts to run, comma-separated")
    add("--rounds", type=int, default=3, help="throughput: rounds, the order rotating")
    add("--duration", type=int, default=3, help="throughput: seconds per run")
    add("--warmup", type=int, default=1, help="seconds of unmeasured load first")
    add("--connections", type=int, default=64, help="throughput, balance: keep-alive wrk -c")
    add("--probation", type=float, default=0.5, help="the keeper's --probation")
    add("--rolls", type=int, default=10, help="rolls: rolls per server")
    add("--settle", type=float, default=0.5, help="rolls: seconds of load between rolls")
    add("--roll-connections", type=int, default=32, help="rolls: keep-alive wrk -c")
    add("--roll-new-connections", type=int, default=8, help="rolls: Connection: close wrk -c")
    add("--slow-clients", type=int, default=4, help="rolls: slow-request threads")
    add("--slow-ms", type=int, default=300, help="rolls: ms each slow request takes")
    add("--sample-interval", type=float, default=0.05, help="rolls: seconds between samples")
    add(
        "--uvicorn-python",
        metavar="PATH",
        help="a Python with uvicorn[standard] (default: "
        "this one if it has it, else uvicorn is left out)",
    )
    add(
        "--granian-python",
        metavar="PATH",
        help="a Python with granian (default: this one if it has it, else granian is left out)",
    )
    add("--granian-respawn-interval", type=float, default=3.5, help="granian's own default")
    add("--no-peers", action="store_true", help="rolls: the keeper only")
    add("--balance-rounds", type=int, default=3, help="balance: wrk runs per load")
    add("--balance-duration", type=int, default=3, help="balance: seconds per run")
    add("--balance-new-connections", type=int, default=16, help="balance: Connection: close -c")
    add("--json", metavar="PATH", help="also write every sample as JSON")
    args = parser.parse_args()
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if not set(args.parts) <= set(PARTS):
        parser.error(f"--only takes some of {', '.join(PARTS)}")
    if min(args.rounds, args.duration, args.rolls, args.balance_rounds, args.balance_duration) < 1:
        parser.error("--rounds, --duration, --rolls and the --balance-* need to be at least 1")
    if not 0 < args.sample_interval < args.settle:
        parser.error("--sample-interval must be more than 0 and less than --settle")
    if not shutil.which("wrk"):
        parser.error("wrk is required (apt-get install wrk)")
    if args.no_peers:
        args.uvicorn_python = args.granian_python = None
    else:
        args.uvicorn_python = args.uvicorn_python or python_with("uvicorn, httptools, uvloop")
        args.granian_python = args.granian_python or python_with("granian")
    return args


def main() -> None:
    args = parse_args()
    env = environment()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    version = (wrk_version.stdout or wrk_version.stderr).split("\n", 1)[0].strip()
    env["load_generator"] = f"{version} (-t1), nothing pinned"
    env["httptools"] = package_version("httptools")
    for peer in ("uvicorn", "granian"):
        python = getattr(args, f"{peer}_python")
        if python and "rolls" in args.parts:
            env[peer] = f"{package_version(peer, python)} ({python})"
    env["keeper"] = f"--probation {args.probation:g}"
    started = time.monotonic()
    results: dict[str, Any] = {}
    sections = []
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as tmp:
        workdir = Path(tmp)
        if "throughput" in args.parts:
            results["throughput"] = measure_throughput(args, workdir)
            sections.append(
                f"### Throughput: --workers 2 against --workers 1 (wrk -c{args.connections}, "
                f"{args.rounds} rotating rounds x {args.duration} s)\n\n"
                + report_throughput(results["throughput"])
            )
        if "rolls" in args.parts:
            if not (args.uvicorn_python and args.granian_python) and not args.no_peers:
                progress("uvicorn or granian not found: give --uvicorn-python/--granian-python")
            results["rolls"] = measure_rolls(args, workdir)
            sections.append(
                f"### {args.rolls} rolls under load (wrk -c{args.roll_connections} keep-alive, "
                f"wrk -c{args.roll_new_connections} Connection: close, {args.slow_clients} "
                f"slow clients x {args.slow_ms} ms)\n\n" + report_rolls(results["rolls"])
            )
            sections.append(
                "### One roll of the keeper's 2 workers (ms after the SIGHUP)\n\n"
                + report_roll_phases(results["rolls"]["keeper --workers 2"])
            )
        if "balance" in args.parts:
            results["balance"] = measure_balance(args, workdir)
            sections.append(
                f"### Balance: requests per worker, --workers 2 ({args.balance_rounds} runs x "
                f"{args.balance_duration} s per load)\n\n" + report_balance(results["balance"])
            )
    env["wall_seconds"] = round(time.monotonic() - started)
    print(f"## Workers\n\n{environment_lines(env)}\n")
    print("\n\n".join(sections))
    if args.json:
        write_json(args.json, {"benchmark": "workers", "environment": env, **results})


if __name__ == "__main__":
    main()
