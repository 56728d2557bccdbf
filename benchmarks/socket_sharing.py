"""Experiment: how should worker processes share a listening socket?

Usage::

    python benchmarks/socket_sharing.py [--duration 1] [--rounds 3] [--json out.json]   # ~55 s

Two ways for 2 worker processes to accept on one address, both on 127.0.0.1:

- ``shared``: one listening socket; both workers hold a descriptor of it (what the
  keeper's ``--workers N`` does): one accept queue.
- ``reuseport``: an ``SO_REUSEPORT`` group of 2 sockets, one per worker: one accept queue
  per socket, and the kernel picks the socket of a new connection by a hash of its
  addresses and ports.

Each worker is this script run with ``--worker``: a tiny trio server that accepts, reads a
line, answers with its pid, and serves further lines on the same connection (keep-alive)
until EOF. Its accept loop is trio's (``trio.socket``'s ``accept``): try ``accept()``,
and on ``EAGAIN`` wait with ``trio.lowlevel.wait_readable`` (epoll, ``EPOLLONESHOT``) and
try again. It counts *empty wakeups*: the times it was woken but another process had
taken the connection (``EAGAIN`` after the wait), the thundering herd. ``--busy-ms`` makes
its handler spin the CPU that long per request, blocking its event loop, like a
CPU-bound handler. The parent drives the workers over stdin (``accept``, ``stats``,
``exit``), one JSON line back per command.

Balance (``--rounds`` rounds of ``--duration`` s per case, sockets interleaved):

- ``new conns, one at a time``: one client connecting, sending a line, reading the answer
  and closing, again and again: both workers wait in epoll between connections;
- ``new conns, idle``: the same with ``--concurrency`` client tasks (steady load);
- ``new conns, A busy``: the same, with worker A spinning ``--busy-ms`` per request;
- ``keep-alive, opened at once``: ``--keepalive-connections`` connections opened at once
  while both workers are idle (as wrk does at its start), then each sends requests back
  to back on the same connection for the round;
- ``keep-alive, staggered``: the same connections opened one after another over the
  first half of the round, each sending requests as soon as it is open (as a client's
  pool grows with its load).

Reported per case: answers per worker (A, B) and max/min, for keep-alive the
connections per worker, the answers' rate, the median and 99th percentile time per
connection (new connections), empty wakeups per accepted connection, and *sleeps* per
answer: the workers' ``voluntary_ctxt_switches`` (from ``/proc``) over the round, which
counts the herd's wakeups that epoll absorbs in the kernel too (it re-checks readiness
and sleeps again without returning). ``--only CASE`` runs only the named cases.

Loss when a worker goes away: both workers start but do not accept; ``--queued``
clients connect (the kernel completes the handshakes and queues them) and send a line;
worker A exits; worker B starts accepting; each client waits ``--timeout`` s for its
answer: answered, reset, closed or still waiting. Then ``--after`` new clients connect
likewise. Scenarios: the shared socket; the reuseport group with A's socket closed, with
``net.ipv4.tcp_migrate_req`` 0 and 1; and the reuseport group with A's socket kept open
(as the keeper would, for A's successor): there the clients still waiting after the
timeout are given to a successor A' started then.

The loss scenarios set ``tcp_migrate_req``. As root, they run in a private network
namespace (``unshare --net``, its own loopback and sysctls), so the host's setting is
never changed; otherwise they run here, and a scenario that needs another value than
the host's is left out. Every process started is killed and waited for on the way out
(workers also exit when their stdin closes).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
from _common import environment, environment_lines, markdown_table, write_json

MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")
MODES = ("shared", "reuseport")
BACKLOG = 1024
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def progress(*parts: object) -> None:
    """A progress line on stderr."""
    print(*parts, file=sys.stderr, flush=True)


# --- the worker process ---------------------------------------------------------------


@dataclass
class WorkerStats:
    """What a worker counts: its pid, the connections it accepted, its empty wakeups."""

    pid: int
    accepted: int = 0
    empty_wakeups: int = 0
    answered: int = 0


@dataclass
class WorkerServer:
    """The worker's server: its accept loop and its connections."""

    listener: socket.socket
    busy_ms: float
    stats: WorkerStats

    async def accept_loop(self, nursery: trio.Nursery) -> None:
        """trio's accept (``_nonblocking_helper``): try; on EAGAIN, wait and try again."""
        woken = False
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                if woken:
                    self.stats.empty_wakeups += 1
                await trio.lowlevel.wait_readable(self.listener)
                woken = True
                continue
            woken = False
            self.stats.accepted += 1
            nursery.start_soon(self.handle, conn)
            await trio.lowlevel.checkpoint()

    async def handle(self, conn: socket.socket) -> None:
        """Answer every line with the pid until EOF (spinning ``busy_ms`` first)."""
        answer = f"{self.stats.pid}\n".encode()
        buffer = b""
        async with trio.SocketStream(trio.socket.from_stdlib_socket(conn)) as stream:
            try:
                while data := await stream.receive_some(4096):
                    buffer += data
                    while b"\n" in buffer:
                        _, buffer = buffer.split(b"\n", 1)
                        end = time.perf_counter() + self.busy_ms / 1000
                        while time.perf_counter() < end:
                            pass
                        self.stats.answered += 1
                        await stream.send_all(answer)
            except trio.BrokenResourceError:
                pass

    def reply(self, **extra: object) -> None:
        """One JSON line on stdout: the counts and ``extra``."""
        print(json.dumps({**asdict(self.stats), **extra}), flush=True)


async def worker_main(fd: int, busy_ms: float) -> None:
    """Serve on the listening socket ``fd`` as told on stdin; answer on stdout."""
    listener = socket.socket(fileno=fd)
    listener.setblocking(False)
    server = WorkerServer(listener, busy_ms, WorkerStats(pid=os.getpid()))
    control = trio.lowlevel.FdStream(os.dup(0))
    try:
        async with control, trio.open_nursery() as nursery:
            server.reply(state="ready")
            lines = Lines(control)
            while True:
                try:
                    command = (await lines.readline()).decode().strip()
                except EOFError:
                    command = "exit"
                if command == "accept":
                    nursery.start_soon(server.accept_loop, nursery)
                    server.reply(state="accepting")
                elif command == "stats":
                    server.reply()
                elif command == "exit":
                    server.reply(state="exiting")
                    nursery.cancel_scope.cancel()
                    break
    finally:
        listener.close()


# --- the parent's side ----------------------------------------------------------------


class Lines:
    """Lines read from a trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def readline(self) -> bytes:
        """The next line, without its newline; ``EOFError`` at the end of the stream."""
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line


@dataclass
class Worker:
    """A worker process and its control pipes."""

    process: trio.Process
    lines: Lines

    @property
    def pid(self) -> int:
        return self.process.pid

    async def command(self, command: str) -> dict[str, Any]:
        """Send ``command`` and return the worker's JSON answer."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(command.encode() + b"\n")
        answer: dict[str, Any] = json.loads(await self.lines.readline())
        return answer

    async def exit(self) -> dict[str, Any]:
        """Tell the worker to exit (closing its socket) and wait until it has."""
        answer = await self.command("exit")
        with trio.fail_after(10):
            await self.process.wait()
        return answer


@contextlib.asynccontextmanager
async def start_worker(fd: int, busy_ms: float = 0.0) -> AsyncIterator[Worker]:
    """A worker serving the listening socket ``fd``; killed and waited for on exit."""
    argv = [sys.executable, __file__, "--worker", "--fd", str(fd), "--busy-ms", str(busy_ms)]
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(fd,)
    )
    try:
        assert process.stdout is not None
        worker = Worker(process, Lines(process.stdout))
        with trio.fail_after(30):
            ready = json.loads(await worker.lines.readline())
        assert ready["state"] == "ready", ready
        yield worker
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    await pipe.aclose()


def listening_sockets(mode: str, port: int = 0) -> list[socket.socket]:
    """One socket per worker: the same shared socket twice, or a reuseport group of 2."""
    if mode == "shared":
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(BACKLOG)
        return [sock, sock]
    group: list[socket.socket] = []
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        port = sock.getsockname()[1]
        sock.listen(BACKLOG)
        group.append(sock)
    return group


def close_all(sockets: Sequence[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def queue_length(sock: socket.socket) -> int:
    """The connections waiting in a listening socket's accept queue (``TCP_INFO``)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    # struct tcp_info: 8 bytes of u8 fields, then u32 rto, ato, snd_mss, rcv_mss, unacked;
    # for a listener, tcpi_unacked is sk_ack_backlog.
    (unacked,) = struct.unpack_from("I", info, 24)
    return int(unacked)


async def connect(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    try:
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def read_line(sock: trio.socket.SocketType) -> bytes:
    """One answer line; ``b""`` if the server closed without one."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = await sock.recv(64)
        if not chunk:
            return b""
        data += chunk
    return data


# --- balance --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str
    busy: bool = False
    keepalive: bool = False
    one_client: bool = False
    staggered: bool = False


CASES = (
    Case("new conns, one at a time", one_client=True),
    Case("new conns, idle"),
    Case("new conns, A busy", busy=True),
    Case("keep-alive, opened at once", keepalive=True),
    Case("keep-alive, staggered", keepalive=True, staggered=True),
)


@dataclass
class BalanceRun:
    """One round of one case with one way of sharing."""

    case: str
    mode: str
    answers: list[int]
    connections: list[int]
    accepted: list[int]
    empty_wakeups: list[int]
    sleeps: list[int]
    seconds: float
    errors: int
    latencies_ms: list[float] = field(repr=False)


async def new_connections_load(
    port: int, seconds: float, concurrency: int
) -> tuple[Counter[int], list[float], int]:
    """Clients connecting, asking once and closing, back to back: answers by pid."""
    answers: Counter[int] = Counter()
    latencies: list[float] = []
    errors = 0
    deadline = trio.current_time() + seconds

    async def client() -> None:
        nonlocal errors
        while trio.current_time() < deadline:
            start = time.perf_counter()
            try:
                sock = await connect(port)
                with sock:
                    await sock.send(b"hi\n")
                    line = await read_line(sock)
            except OSError:
                line = b""
            if line:
                answers[int(line)] += 1
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                errors += 1

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(client)
    return answers, latencies, errors


async def keepalive_load(
    port: int, seconds: float, connections: int, *, staggered: bool
) -> tuple[Counter[int], Counter[int], int]:
    """Keep-alive connections sending requests back to back: answers and connections by pid.

    The connections open at once before any request, or ``staggered``: one after another
    over the first half of the round, each sending requests as soon as it is open.
    """
    answers: Counter[int] = Counter()
    owners: Counter[int] = Counter()
    errors = 0
    opened = [] if staggered else [await connect(port) for _ in range(connections)]
    start = trio.current_time()
    deadline = start + seconds

    async def client(index: int) -> None:
        nonlocal errors
        first = True
        if staggered:
            await trio.sleep_until(start + index * seconds / 2 / connections)
            try:
                sock = await connect(port)
            except OSError:
                errors += 1
                return
        else:
            sock = opened[index]
        with sock:
            while trio.current_time() < deadline:
                try:
                    await sock.send(b"hi\n")
                    line = await read_line(sock)
                except OSError:
                    line = b""
                if not line:
                    errors += 1
                    return
                answers[int(line)] += 1
                if first:
                    owners[int(line)] += 1
                    first = False

    async with trio.open_nursery() as nursery:
        for index in range(connections):
            nursery.start_soon(client, index)
    return answers, owners, errors


async def balance_run(case: Case, mode: str, args: argparse.Namespace) -> BalanceRun:
    sockets = listening_sockets(mode)
    port = sockets[0].getsockname()[1]
    try:
        async with contextlib.AsyncExitStack() as stack:
            workers = [
                await stack.enter_async_context(
                    start_worker(sock.fileno(), args.busy_ms if case.busy and i == 0 else 0.0)
                )
                for i, sock in enumerate(sockets)
            ]
            for worker in workers:
                await worker.command("accept")
            sleeps_before = [voluntary_switches(worker.pid) for worker in workers]
            start = time.perf_counter()
            latencies: list[float] = []
            if case.keepalive:
                answers, owners, errors = await keepalive_load(
                    port, args.duration, args.keepalive_connections, staggered=case.staggered
                )
            else:
                answers, latencies, errors = await new_connections_load(
                    port, args.duration, 1 if case.one_client else args.concurrency
                )
                owners = answers
            seconds = time.perf_counter() - start
            sleeps_after = [voluntary_switches(worker.pid) for worker in workers]
            stats = [await worker.command("stats") for worker in workers]
    finally:
        close_all(sockets[:1] if mode == "shared" else sockets)
    pids = [worker.pid for worker in workers]
    return BalanceRun(
        case=case.key,
        mode=mode,
        answers=[answers[pid] for pid in pids],
        connections=[owners[pid] for pid in pids],
        accepted=[s["accepted"] for s in stats],
        empty_wakeups=[s["empty_wakeups"] for s in stats],
        sleeps=[after - before for before, after in zip(sleeps_before, sleeps_after, strict=True)],
        seconds=seconds,
        errors=errors,
        latencies_ms=latencies,
    )


def voluntary_switches(pid: int) -> int:
    """How many times the process has slept (``voluntary_ctxt_switches``): its wakeups."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def max_min(values: Sequence[int]) -> float:
    return max(values) / min(values) if min(values) else math.inf


def balance_rows(runs: Sequence[BalanceRun]) -> list[list[object]]:
    rows: list[list[object]] = []
    for case in CASES:
        for mode in MODES:
            mine = [r for r in runs if r.case == case.key and r.mode == mode]
            if not mine:
                continue
            answers = [sum(r.answers[i] for r in mine) for i in range(2)]
            connections = [sum(r.connections[i] for r in mine) for i in range(2)]
            accepted = sum(sum(r.accepted) for r in mine)
            empty = sum(sum(r.empty_wakeups) for r in mine)
            sleeps = sum(sum(r.sleeps) for r in mine)
            seconds = sum(r.seconds for r in mine)
            latencies = [x for r in mine for x in r.latencies_ms]
            p50 = p99 = "-"
            if len(latencies) >= 100:
                p50 = f"{statistics.median(latencies):.2f}"
                p99 = f"{statistics.quantiles(latencies, n=100)[98]:.2f}"
            rounds = ", ".join(f"{max_min(r.answers):.2f}" for r in mine)
            conns = ", ".join(f"{r.connections[0]}/{r.connections[1]}" for r in mine)
            rows.append(
                [
                    case.key,
                    mode,
                    f"{answers[0]} / {answers[1]}",
                    f"{max_min(answers):.2f} ({rounds})",
                    f"{connections[0]} / {connections[1]} ({conns})" if case.keepalive else "-",
                    round(sum(answers) / seconds) if seconds else 0,
                    p50,
                    p99,
                    round(empty / accepted, 2) if accepted else 0,
                    round(sleeps / sum(answers), 2) if sum(answers) else 0,
                    sum(r.errors for r in mine),
                ]
            )
    return rows


BALANCE_HEADERS = (
    "case",
    "sockets",
    "answers A / B",
    "max/min (per round)",
    "keep-alive conns A / B (per round)",
    "answers/s",
    "p50 ms",
    "p99 ms",
    "empty wakeups / accept",
    "sleeps / answer",
    "errors",
)


async def balance_section(args: argparse.Namespace) -> list[BalanceRun]:
    runs: list[BalanceRun] = []
    cases = [c for c in CASES if not args.only or c.key in args.only]
    for round_ in range(args.rounds):
        for case in cases:
            modes = MODES if round_ % 2 == 0 else MODES[::-1]
            for mode in modes:
                run = await balance_run(case, mode, args)
                progress(
                    f"balance round {round_ + 1} {case.key} {mode}: answers A/B "
                    f"{run.answers[0]}/{run.answers[1]}, empty wakeups {run.empty_wakeups}"
                )
                runs.append(run)
    return runs


# --- loss -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    mode: str
    migrate: int | None  # tcp_migrate_req; None: any (the socket is not closed)
    keep_socket: bool = False  # the parent (the keeper) keeps A's socket for a successor


SCENARIOS = (
    Scenario("shared socket", "shared", None),
    Scenario("reuseport, A's socket closed, tcp_migrate_req=0", "reuseport", 0),
    Scenario("reuseport, A's socket closed, tcp_migrate_req=1", "reuseport", 1),
    Scenario("reuseport, A's socket kept for a successor", "reuseport", None, keep_socket=True),
)


@dataclass
class LossResult:
    scenario: str
    migrate: int | None
    queued_on_a: int
    queued: dict[str, int]
    after: dict[str, int]
    successor_seconds: float | None = None


async def outcome(sock: trio.socket.SocketType, timeout: float) -> tuple[str, int]:
    """How a client that sent its line fares within ``timeout``, and the answering pid."""
    try:
        with trio.move_on_after(timeout):
            line = await read_line(sock)
            return ("answered", int(line)) if line else ("closed", 0)
    except ConnectionResetError:
        return "reset", 0
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, "error"), 0
    return "waiting", 0


async def settle(
    clients: Sequence[trio.socket.SocketType], timeout: float, tally: Counter[str]
) -> list[trio.socket.SocketType]:
    """Wait for every client's outcome (concurrently); return those still waiting."""
    results: list[tuple[str, int]] = [("", 0)] * len(clients)

    async def one(i: int) -> None:
        results[i] = await outcome(clients[i], timeout)

    async with trio.open_nursery() as nursery:
        for i in range(len(clients)):
            nursery.start_soon(one, i)
    waiting = []
    for sock, (kind, _) in zip(clients, results, strict=True):
        if kind == "waiting":
            waiting.append(sock)
        else:
            tally[kind] += 1
    return waiting


async def connect_and_send(
    port: int, count: int, tally: Counter[str]
) -> list[trio.socket.SocketType]:
    clients: list[trio.socket.SocketType] = []
    for _ in range(count):
        try:
            sock = await connect(port)
            await sock.send(b"hi\n")
        except OSError as error:
            tally[errno.errorcode.get(error.errno or 0, "error")] += 1
            continue
        clients.append(sock)
    return clients


async def loss_scenario(scenario: Scenario, args: argparse.Namespace) -> LossResult:
    if scenario.migrate is not None:
        set_migrate(scenario.migrate)
    sockets = listening_sockets(scenario.mode)
    port = sockets[0].getsockname()[1]
    kept = list(dict.fromkeys(sockets))  # the parent's copies, each socket once
    queued: Counter[str] = Counter()
    after: Counter[str] = Counter()
    clients: list[trio.socket.SocketType] = []
    successor_seconds = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            a, b = [await stack.enter_async_context(start_worker(s.fileno())) for s in sockets]
            clients = await connect_and_send(port, args.queued, queued)
            queued_on_a = queue_length(sockets[0])
            if not scenario.keep_socket:
                close_all(kept)  # only the workers hold the sockets now
                kept = []
            await a.exit()
            await b.command("accept")
            waiting = await settle(clients, args.timeout, queued)
            new = await connect_and_send(port, args.after, after)
            clients += new
            waiting_after = await settle(new, args.timeout, after)
            if scenario.keep_socket and (waiting or waiting_after):
                # A's successor takes over A's socket, as the keeper would start it.
                start = time.perf_counter()
                successor = await stack.enter_async_context(start_worker(sockets[0].fileno()))
                await successor.command("accept")
                for group, tally in ((waiting, queued), (waiting_after, after)):
                    late: Counter[str] = Counter()
                    await settle(group, 10.0, late)
                    tally["answered by the successor"] += late.pop("answered", 0)
                    tally.update(late)
                successor_seconds = time.perf_counter() - start
            else:
                queued.update(waiting=len(waiting))
                after.update(waiting=len(waiting_after))
    finally:
        for sock in clients:
            sock.close()
        close_all(kept)
    return LossResult(
        scenario.key, scenario.migrate, queued_on_a, dict(queued), dict(after), successor_seconds
    )


async def loss_section(args: argparse.Namespace, migrate_values: Sequence[int]) -> list[LossResult]:
    results = []
    for scenario in SCENARIOS:
        if scenario.migrate is not None and scenario.migrate not in migrate_values:
            progress(f"loss: {scenario.key}: left out (tcp_migrate_req cannot be set here)")
            continue
        result = await loss_scenario(scenario, args)
        progress(f"loss: {scenario.key}: queued {dict(result.queued)}, after {dict(result.after)}")
        results.append(result)
    return results


def migrate_setting() -> str | None:
    """``net.ipv4.tcp_migrate_req`` here, or None if the kernel has none (< 5.14)."""
    return MIGRATE_SYSCTL.read_text().strip() if MIGRATE_SYSCTL.exists() else None


def set_migrate(value: int) -> None:
    """Set ``tcp_migrate_req`` if it differs: only done in a private network namespace."""
    if migrate_setting() != str(value):
        MIGRATE_SYSCTL.write_text(f"{value}\n")


def loopback_up() -> None:
    """Bring ``lo`` up (a new network namespace starts with it down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def describe(tally: Mapping[str, int]) -> str:
    """``64 answered, 3 reset``: the outcomes, most frequent first."""
    ranked = sorted(tally.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{n} {kind}" for kind, n in ranked if n)


def loss_rows(results: Sequence[LossResult]) -> list[list[object]]:
    rows: list[list[object]] = []
    for r in results:
        lost = sum(
            n for kind, n in (Counter(r.queued) + Counter(r.after)).items() if kind != "answered"
        )
        rows.append(
            [
                r.scenario,
                r.queued_on_a,
                describe(r.queued),
                describe(r.after),
                lost,
                f"{r.successor_seconds:.2f}" if r.successor_seconds is not None else "-",
            ]
        )
    return rows


LOSS_HEADERS = (
    "scenario",
    "queued on A's socket",
    "queued clients",
    "clients after A exited",
    "not answered at once",
    "successor: start to answers, s",
)


# --- main -----------------------------------------------------------------------------


async def run_loss(args: argparse.Namespace) -> tuple[list[LossResult], str]:
    """The loss section: in a private network namespace if we can make one."""
    host = migrate_setting()
    if host is None:
        progress("loss: no net.ipv4.tcp_migrate_req (Linux < 5.14)")
        return await loss_section(args, []), "absent"
    unshare = shutil.which("unshare")
    if os.geteuid() == 0 and unshare:
        argv = [unshare, "--net", "--", sys.executable, __file__, "--loss-child"]
        argv += ["--queued", str(args.queued), "--after", str(args.after)]
        argv += ["--timeout", str(args.timeout)]
        done = await trio.run_process(argv, capture_stdout=True, check=False)
        if done.returncode == 0:
            results = [LossResult(**r) for r in json.loads(done.stdout)]
            return results, f"{host} on the host; 0 and 1 in a private network namespace"
        progress(f"loss: unshare --net failed (status {done.returncode}): running here")
    return await loss_section(args, [int(host)]), f"{host} (the host's, left unchanged)"


async def loss_child(args: argparse.Namespace) -> None:
    """In a private network namespace: its loopback up, then every loss scenario."""
    loopback_up()
    results = await loss_section(args, [0, 1])
    print(json.dumps([asdict(r) for r in results]))


async def main_async(args: argparse.Namespace) -> None:
    env = environment()
    runs = await balance_section(args) if not args.skip_balance else []
    loss, migrate_note = await run_loss(args) if not args.skip_loss else ([], "-")
    print("# Socket sharing between 2 worker processes\n")
    print(environment_lines({**env, "tcp_migrate_req": migrate_note}))
    if runs:
        print(
            f"\n## Balance ({args.rounds} rounds of {args.duration} s per case; "
            f"A busy: {args.busy_ms} ms of CPU per request; "
            f"{args.concurrency} clients for new connections, "
            f"{args.keepalive_connections} keep-alive connections)\n"
        )
        print(markdown_table(BALANCE_HEADERS, balance_rows(runs)))
    if loss:
        print(
            f"\n## Loss when worker A exits ({args.queued} clients queued while neither "
            f"worker accepts, then {args.after} new ones; each waits {args.timeout} s)\n"
        )
        print(markdown_table(LOSS_HEADERS, loss_rows(loss)))
    if args.json:
        write_json(
            args.json,
            {
                "environment": env,
                "tcp_migrate_req": migrate_note,
                "balance": [asdict(r) for r in runs],
                "loss": [asdict(r) for r in loss],
            },
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per balance round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8, help="new-connection clients")
    parser.add_argument("--keepalive-connections", type=int, default=16)
    parser.add_argument("--busy-ms", type=float, default=2.0, help="worker A's CPU per request")
    parser.add_argument("--queued", type=int, default=64, help="clients queued before A exits")
    parser.add_argument("--after", type=int, default=32, help="clients after A exited")
    parser.add_argument("--timeout", type=float, default=1.0, help="a client's wait, s")
    parser.add_argument(
        "--only", action="append", choices=[c.key for c in CASES], help="balance case (repeat)"
    )
    parser.add_argument("--skip-balance", action="store_true")
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--loss-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        trio.run(worker_main, args.fd, args.busy_ms)
    elif args.loss_child:
        trio.run(loss_child, args)
    else:
        trio.run(main_async, args)


if __name__ == "__main__":
    main()
