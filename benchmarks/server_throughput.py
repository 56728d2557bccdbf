"""Whole-server benchmark: hello-world HTTP throughput with and without leases.

Runs ``benchmarks/_hello_server.py`` (trio + h11, HTTP/1.1 keep-alive) in a subprocess in
two variants and loads each in turn from 127.0.0.1:

- ``plain``: ``trio.serve_listeners`` on ``trio.open_tcp_listeners``, no library;
- ``leased``: under ``graceful_restart_trio.open()``, ``gr.open_tcp_listeners`` +
  ``gr.serve_listeners`` (a lease per connection) and ``async with gr.lease():`` around
  each request.

The load generator is ``wrk`` when installed (``apt-get install wrk``), otherwise a trio
client in its own process (``benchmarks/_load_client.py``). Both servers start once and
are warmed up; then short runs alternate between them, the order flipping each round
(ABBA), so that load from elsewhere on a noisy machine hits both alike
(``--fresh-servers``: a new server, warmed up, for every run). Servers are stopped with
SIGTERM and reaped (SIGKILL after a bound). With two or more CPUs the server and the
load generator are pinned to different CPUs (``--no-pin`` to turn off). Reported:
requests/s per variant (median, min, max) and leased/plain as the median of the per-round
ratios. Target: >= 98 %.

``--compare http1`` measures the HTTP layer instead: the same ASGI hello app on
``asgi.serve``'s default path (the library's httptools connection), on its hypercorn
path (``http1="hypercorn"``) and on uvicorn ``[standard]`` with one worker (httptools +
uvloop; ``--uvicorn-python`` names an interpreter that has it), rounds rotating the
order. Reported: each server's requests/s and the per-round ratios of the new path to
uvicorn (target >= 0.6) and to hypercorn's path (target >= 8). ``--new-connections``
makes every request a new connection (wrk with ``Connection: close``).

Usage::

    python benchmarks/server_throughput.py [--pair h11|asgi] [--rounds 8] [--duration 2]
        [--connections 16] [--load-generator auto|wrk|python] [--fresh-servers] [--no-pin]
        [--json out.json]
    python benchmarks/server_throughput.py --compare http1 [--uvicorn-python PATH]
        [--new-connections] [--rounds 6] [--duration 4] [--connections 64]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from _common import (
    environment,
    environment_lines,
    markdown_table,
    package_version,
    summary,
    write_json,
)

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
VARIANTS = ("plain", "leased")
PAIRS = {
    "h11": {"plain": "plain", "leased": "leased"},
    "asgi": {"plain": "hypercorn", "leased": "asgi"},
}
"""``--pair``: the server variant (``_hello_server.py --variant``) playing each role."""
TARGET_RATIO = 0.98
HTTP1_VARIANTS = ("asgi", "asgi-hypercorn", "uvicorn")
"""``--compare http1``: the new path, hypercorn's path, uvicorn."""
HTTP1_TARGETS = {"uvicorn": 0.6, "asgi-hypercorn": 8.0}
"""The new path's throughput over each other server's: the acceptance of issue 21."""
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
SCHEDSTAT = Path("/proc/self/schedstat").exists()  # on-CPU ns per thread


class BenchmarkError(Exception):
    """A server or load generator misbehaved."""


def read_port(proc: subprocess.Popen[bytes], stderr: IO[bytes]) -> int:
    """The port the server prints once listening (bounded wait)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line.strip().isdigit():
                return int(line)
            break
        if proc.poll() is not None:
            break
    stderr.seek(0)
    raise BenchmarkError(f"the server did not print its port:\n{stderr.read().decode()[-2000:]}")


def check_hello(port: int, timeout: float = START_TIMEOUT) -> None:
    """One request by hand: the server answers 200 "hello" (retried while it cannot
    connect, at most ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read()
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            conn.close()
    if response.status != 200 or body != b"hello":
        raise BenchmarkError(f"unexpected answer {response.status} {body!r}")


@dataclass(frozen=True)
class Server:
    """A running hello server."""

    variant: str
    port: int
    pid: int

    def cpu_ns(self) -> int:
        """CPU time the server has used so far, all its live threads, in ns."""
        if not SCHEDSTAT:  # clock ticks from /proc/PID/stat: coarser (10 ms)
            fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
            ticks = int(fields[11]) + int(fields[12])  # utime, stime
            return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        total = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
        return total


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, wait (bounded), SIGKILL if needed; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def server_command(variant: str, pair: str, uvicorn_python: str | None) -> list[str]:
    """How to start the server playing ``variant``."""
    if variant == "uvicorn":
        assert uvicorn_python is not None
        return [uvicorn_python, str(HERE / "_uvicorn_server.py")]
    server = PAIRS[pair].get(variant, variant)
    return [sys.executable, str(HERE / "_hello_server.py"), "--variant", server]


@contextlib.contextmanager
def running_server(
    variant: str, cpu: int | None, pair: str, uvicorn_python: str | None = None
) -> Iterator[Server]:
    """A fresh server of ``variant``; always stopped and reaped."""
    command = server_command(variant, pair, uvicorn_python)
    if cpu is not None:
        command += ["--cpu", str(cpu)]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        try:
            port = read_port(proc, stderr)
            check_hello(port)
            yield Server(variant, port, proc.pid)
        finally:
            status = stop(proc)
            assert proc.stdout is not None
            proc.stdout.close()
        # uvicorn re-raises the SIGTERM it handled once it has shut down
        if status != 0 and not (variant == "uvicorn" and status == -signal.SIGTERM):
            stderr.seek(0)
            raise BenchmarkError(
                f"{variant} server exited with {status}:\n{stderr.read().decode()[-2000:]}"
            )


def run_wrk(
    port: int, connections: int, duration: int, cpu: int | None, new_connections: bool = False
) -> dict[str, float]:
    """Requests/s and errors as wrk reports them."""
    taskset = shutil.which("taskset")
    pin = [taskset, "-c", str(cpu)] if cpu is not None and taskset else []
    close = ["-H", "Connection: close"] if new_connections else []
    result = subprocess.run(
        [
            *pin,
            "wrk",
            *close,
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "5s",
            f"http://{HOST}:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    )
    out = result.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise BenchmarkError(f"cannot read wrk's output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    return {
        "requests_per_second": float(rps.group(1)),
        "requests": float(done.group(1)) if done else float("nan"),
        "errors": float(errors + (int(non_2xx.group(1)) if non_2xx else 0)),
    }


def run_python_client(
    port: int, connections: int, duration: int, cpu: int | None
) -> dict[str, float]:
    """Requests/s and errors from the trio load generator, run in its own process."""
    pin = ["--cpu", str(cpu)] if cpu is not None else []
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "_load_client.py"),
            *pin,
            "--port",
            str(port),
            "--connections",
            str(connections),
            "--duration",
            str(duration),
        ],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    )
    data = json.loads(result.stdout)
    return {
        "requests_per_second": float(data["requests_per_second"]),
        "requests": float(data["ok"]),
        "errors": float(data["errors"] + data["other"]),
    }


def wrk_version() -> str:
    result = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (result.stdout or result.stderr).splitlines()[0].strip()


def pinning(pin: bool) -> tuple[int | None, int | None]:
    """The CPUs for the server and the load generator: two different ones, or no pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if pin and len(cpus) >= 2:
        return cpus[0], cpus[1]
    return None, None


Load = Callable[[int, int, int, "int | None"], dict[str, float]]


def timed_load(
    server: Server, load: Load, args: argparse.Namespace, cpu: int | None
) -> dict[str, float]:
    """One measured run against ``server``, with the server's CPU time per request."""
    before = server.cpu_ns()
    measured = load(server.port, args.connections, args.duration, cpu)
    used = server.cpu_ns() - before
    measured["server_cpu_us_per_request"] = used / 1000 / max(measured["requests"], 1.0)
    return measured


def measure(args: argparse.Namespace, generator: str) -> list[dict[str, object]]:
    """One record per round: each variant's requests/s, errors and CPU per request."""
    load: Load = run_wrk if generator == "wrk" else run_python_client
    server_cpu, client_cpu = pinning(args.pin)
    rounds: list[dict[str, object]] = []
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        if not args.fresh_servers:
            for variant in VARIANTS:
                servers[variant] = stack.enter_context(
                    running_server(variant, server_cpu, args.pair)
                )
                if args.warmup:
                    load(servers[variant].port, args.connections, args.warmup, client_cpu)
        for number in range(args.rounds):
            order = VARIANTS if number % 2 == 0 else VARIANTS[::-1]
            record: dict[str, object] = {"round": number + 1, "order": "/".join(order)}
            for variant in order:
                if args.fresh_servers:
                    with running_server(variant, server_cpu, args.pair) as server:
                        if args.warmup:
                            load(server.port, args.connections, args.warmup, client_cpu)
                        measured = timed_load(server, load, args, client_cpu)
                else:
                    measured = timed_load(servers[variant], load, args, client_cpu)
                record[variant] = measured
                print(
                    f"round {number + 1}/{args.rounds} {variant}: "
                    f"{measured['requests_per_second']:.0f} req/s, "
                    f"{measured['server_cpu_us_per_request']:.1f} server CPU-µs/request",
                    file=sys.stderr,
                    flush=True,
                )
            rounds.append(record)
    return rounds


def field(record: dict[str, object], variant: str, key: str) -> float:
    """One measured value of one variant in one round's record."""
    value = record[variant]
    assert isinstance(value, dict)
    return float(value[key])


def analyse(rounds: list[dict[str, object]]) -> dict[str, object]:
    """Per-variant summaries and the leased/plain ratios, paired by round."""
    rps = "requests_per_second"
    cpu = "server_cpu_us_per_request"
    ratios = [field(r, "leased", rps) / field(r, "plain", rps) for r in rounds]
    # Equivalent throughput from CPU cost: plain's CPU per request over leased's.
    cpu_ratios = [field(r, "plain", cpu) / field(r, "leased", cpu) for r in rounds]
    per_variant = {v: summary([field(r, v, rps) for r in rounds]) for v in VARIANTS}
    cpu_per_variant = {v: summary([field(r, v, cpu) for r in rounds]) for v in VARIANTS}
    errors = sum(field(r, v, "errors") for r in rounds for v in VARIANTS)
    ratio = statistics.median(ratios)
    return {
        "requests_per_second": per_variant,
        "server_cpu_us_per_request": cpu_per_variant,
        "ratio_leased_to_plain": {
            "median_of_round_ratios": ratio,
            "min_of_round_ratios": min(ratios),
            "max_of_round_ratios": max(ratios),
            "ratio_of_medians": per_variant["leased"]["median"] / per_variant["plain"]["median"],
            "per_round": ratios,
        },
        "cpu_efficiency_leased_to_plain": {
            "median_of_round_ratios": statistics.median(cpu_ratios),
            "min_of_round_ratios": min(cpu_ratios),
            "max_of_round_ratios": max(cpu_ratios),
            "per_round": cpu_ratios,
        },
        "errors": errors,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
    }


def report(rounds: list[dict[str, object]], result: dict[str, object]) -> str:
    """The two Markdown tables and the verdict."""
    ratio = result["ratio_leased_to_plain"]
    cpu_ratio = result["cpu_efficiency_leased_to_plain"]
    per_variant = result["requests_per_second"]
    cpu_per_variant = result["server_cpu_us_per_request"]
    assert isinstance(ratio, dict)
    assert isinstance(cpu_ratio, dict)
    assert isinstance(per_variant, dict)
    assert isinstance(cpu_per_variant, dict)
    rps = "requests_per_second"
    cpu = "server_cpu_us_per_request"
    summary_table = markdown_table(
        [
            "variant",
            "median req/s",
            "min req/s",
            "max req/s",
            "median server CPU µs/request",
        ],
        [
            [
                v,
                round(s["median"]),
                round(s["min"]),
                round(s["max"]),
                round(cpu_per_variant[v]["median"], 1),
            ]
            for v, s in per_variant.items()
        ],
    )
    rounds_table = markdown_table(
        [
            "round",
            "order",
            "plain req/s",
            "leased req/s",
            "leased/plain req/s",
            "plain CPU µs/req",
            "leased CPU µs/req",
            "plain/leased CPU",
        ],
        [
            [
                r["round"],
                r["order"],
                round(field(r, "plain", rps)),
                round(field(r, "leased", rps)),
                round(q, 3),
                round(field(r, "plain", cpu), 1),
                round(field(r, "leased", cpu), 1),
                round(c, 3),
            ]
            for r, q, c in zip(rounds, ratio["per_round"], cpu_ratio["per_round"], strict=True)
        ],
    )
    verdict = (
        f"- Throughput leased/plain: median of per-round ratios "
        f"**{ratio['median_of_round_ratios']:.3f}** (min {ratio['min_of_round_ratios']:.3f}, "
        f"max {ratio['max_of_round_ratios']:.3f}; ratio of medians "
        f"{ratio['ratio_of_medians']:.3f}). Target >= {TARGET_RATIO:.2f}: "
        f"{'met' if result['target_met'] else 'NOT met'}.\n"
        f"- Server CPU per request, plain/leased (the throughput ratio a CPU-bound server "
        f"would see, less sensitive to other load on the machine): median "
        f"**{cpu_ratio['median_of_round_ratios']:.3f}** (min "
        f"{cpu_ratio['min_of_round_ratios']:.3f}, max {cpu_ratio['max_of_round_ratios']:.3f}).\n"
        f"- Errors (socket errors + non-2xx) over all runs: {result['errors']:.0f}."
    )
    return f"{summary_table}\n\n{rounds_table}\n\n{verdict}"


def measure_http1(args: argparse.Namespace) -> list[dict[str, object]]:
    """``--compare http1``: one record per round, each server measured once, the order
    rotating each round; wrk with ``Connection: close`` under ``--new-connections``."""
    server_cpu, client_cpu = pinning(args.pin)
    variants = [v for v in HTTP1_VARIANTS if v != "uvicorn" or args.uvicorn_python]

    def load(port: int, connections: int, duration: int, cpu: int | None) -> dict[str, float]:
        return run_wrk(port, connections, duration, cpu, args.new_connections)

    rounds: list[dict[str, object]] = []
    with contextlib.ExitStack() as stack:
        servers = {}
        for variant in variants:
            servers[variant] = stack.enter_context(
                running_server(variant, server_cpu, "asgi", args.uvicorn_python)
            )
            if args.warmup:
                load(servers[variant].port, args.connections, args.warmup, client_cpu)
        for number in range(args.rounds):
            shift = number % len(variants)
            order = variants[shift:] + variants[:shift]
            record: dict[str, object] = {"round": number + 1, "order": "/".join(order)}
            for variant in order:
                measured = timed_load(servers[variant], load, args, client_cpu)
                record[variant] = measured
                print(
                    f"round {number + 1}/{args.rounds} {variant}: "
                    f"{measured['requests_per_second']:.0f} req/s, "
                    f"{measured['server_cpu_us_per_request']:.1f} server CPU-µs/request",
                    file=sys.stderr,
                    flush=True,
                )
            rounds.append(record)
    return rounds


def report_http1(rounds: list[dict[str, object]]) -> tuple[str, dict[str, object]]:
    """The per-server table, the per-round ratios of the new path, and the verdicts."""
    rps, cpu = "requests_per_second", "server_cpu_us_per_request"
    variants = [v for v in HTTP1_VARIANTS if v in rounds[0]]
    per_variant = {v: summary([field(r, v, rps) for r in rounds]) for v in variants}
    cpu_per_variant = {v: summary([field(r, v, cpu) for r in rounds]) for v in variants}
    ratios = {
        other: [field(r, "asgi", rps) / field(r, other, rps) for r in rounds]
        for other in variants
        if other != "asgi"
    }
    names = {
        "asgi": "asgi.serve, httptools path (default)",
        "asgi-hypercorn": 'asgi.serve, http1="hypercorn"',
        "uvicorn": "uvicorn [standard], 1 worker",
    }
    table = markdown_table(
        ["server", "median req/s", "min req/s", "max req/s", "median server CPU µs/request"],
        [
            [
                names[v],
                round(s["median"]),
                round(s["min"]),
                round(s["max"]),
                round(cpu_per_variant[v]["median"], 1),
            ]
            for v, s in per_variant.items()
        ],
    )
    lines = []
    for other, values in ratios.items():
        target = HTTP1_TARGETS[other]
        median = statistics.median(values)
        lines.append(
            f"- New path / {names[other]}: median of per-round ratios **{median:.2f}** "
            f"(min {min(values):.2f}, max {max(values):.2f}); target >= {target:g}: "
            f"{'met' if median >= target else 'NOT met'}."
        )
    errors = sum(field(r, v, "errors") for r in rounds for v in variants)
    lines.append(f"- Errors (socket errors + non-2xx) over all runs: {errors:.0f}.")
    result: dict[str, object] = {
        "requests_per_second": per_variant,
        "server_cpu_us_per_request": cpu_per_variant,
        "ratios_of_new_path": dict(ratios),
        "errors": errors,
    }
    return f"{table}\n\n" + "\n".join(lines), result


def default_uvicorn_python() -> str | None:
    """This interpreter if it has uvicorn, else None (uvicorn is then left out)."""
    found = subprocess.run(
        [sys.executable, "-c", "import uvicorn, httptools, uvloop"],
        capture_output=True,
        check=False,
        timeout=30,
    )
    return sys.executable if found.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=8, help="rounds, ABBA order (default 8)")
    parser.add_argument(
        "--duration", type=int, default=2, help="seconds measured per run (default 2)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="seconds of unmeasured load first (default 1)"
    )
    parser.add_argument(
        "--connections", type=int, default=16, help="keep-alive connections (default 16)"
    )
    parser.add_argument(
        "--load-generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="auto: wrk if installed, else the trio client (default auto)",
    )
    parser.add_argument(
        "--fresh-servers",
        action="store_true",
        help="start a new server (and warm it up) for every run instead of one per variant",
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pin the server and the load generator to two different CPUs (default: on)",
    )
    parser.add_argument(
        "--pair",
        choices=sorted(PAIRS),
        default="h11",
        help="h11: the trio + h11 handler, plain vs leased; asgi: the same ASGI app on "
        "hypercorn.trio.serve (as 'plain') vs graceful_restart_trio.asgi.serve (as 'leased')",
    )
    parser.add_argument(
        "--compare",
        choices=["http1"],
        help="http1: the new HTTP/1.1 path vs hypercorn's path vs uvicorn (needs wrk)",
    )
    parser.add_argument(
        "--uvicorn-python",
        metavar="PATH",
        help="--compare http1: a Python with uvicorn[standard] (default: this one if it "
        "has it, else uvicorn is left out)",
    )
    parser.add_argument(
        "--new-connections",
        action="store_true",
        help="--compare http1: a new connection per request (Connection: close)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0 or args.connections < 1:
        parser.error("need --rounds >= 1, --duration >= 1, --warmup >= 0, --connections >= 1")
    generator = args.load_generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    elif generator == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk), use --load-generator python")

    if args.compare == "http1":
        compare_http1(args, parser)
        return
    env = environment()
    env["load_generator"] = (
        f"{wrk_version()} (-t1)" if generator == "wrk" else "benchmarks/_load_client.py (trio)"
    )
    env["h11"] = package_version("h11")
    env["settings"] = (
        f"{args.rounds} rounds x {args.duration} s per variant, {args.warmup} s warm-up, "
        f"{args.connections} connections, "
        + ("a fresh server per run" if args.fresh_servers else "one server per variant")
    )
    server_cpu, client_cpu = pinning(args.pin)
    env["pinning"] = (
        f"server on CPU {server_cpu}, load generator on CPU {client_cpu}"
        if server_cpu is not None
        else "none"
    )
    rounds = measure(args, generator)
    result = analyse(rounds)
    print(f"## Server throughput\n\n{environment_lines(env)}\n")
    print(report(rounds, result))
    if args.json:
        write_json(
            args.json,
            {"benchmark": "server_throughput", "environment": env, "rounds": rounds, **result},
        )


def compare_http1(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--compare http1``: measure, print the report, write the JSON."""
    if not shutil.which("wrk"):
        parser.error("--compare http1 needs wrk (apt-get install wrk)")
    args.uvicorn_python = args.uvicorn_python or default_uvicorn_python()
    env = environment()
    env["load_generator"] = f"{wrk_version()} (-t1)"
    env["httptools"] = package_version("httptools")
    env["hypercorn"] = package_version("hypercorn")
    if args.uvicorn_python:
        env["uvicorn"] = package_version("uvicorn", args.uvicorn_python)
    env["settings"] = (
        f"{args.rounds} rounds x {args.duration} s per server, {args.warmup} s warm-up, "
        f"{args.connections} connections, "
        + ("a new connection per request" if args.new_connections else "keep-alive")
    )
    server_cpu, client_cpu = pinning(args.pin)
    env["pinning"] = (
        f"server on CPU {server_cpu}, wrk on CPU {client_cpu}" if server_cpu is not None else "none"
    )
    rounds = measure_http1(args)
    text, result = report_http1(rounds)
    print(f"## HTTP/1.1 layer throughput\n\n{environment_lines(env)}\n")
    print(text)
    if args.json:
        write_json(
            args.json,
            {"benchmark": "http1_throughput", "environment": env, "rounds": rounds, **result},
        )


if __name__ == "__main__":
    main()
