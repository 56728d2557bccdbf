"""``graceful-restart``: restart, inspect and stop a running server from a shell.

Synopsis::

    graceful-restart restart --control /run/app/control   # waits for the outcome
    graceful-restart restart --pid-file /run/app.pid      # no control socket: SIGHUP
    graceful-restart status --control /run/app/control [--json | --prometheus]
    graceful-restart stop --control /run/app/control [--immediate]
    graceful-restart keeper [keeper options] -- python -m app   # graceful-restart-keeper

``restart`` prints each phase as it happens and exits 0 with the new pid, or 1 with the
reason (the successor's exit status or signal, the last lines it wrote to stderr when
stderr is a file, the ``ready_timeout``) as soon as the server knows it. With
``--pid-file`` alone it sends ``SIGHUP`` and follows what it can see: the pid file names
a new process (exit 0), or ``--timeout`` passes (exit 1). ``stop`` waits until the
process has drained and exited. Exit status 2: the server cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main"]

CONNECT_TIMEOUT = 10.0


class UnreachableError(Exception):
    """The server cannot be asked (no socket, refused, no pid file)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``graceful-restart``; return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["keeper"]:
        from .keeper import main as keeper  # noqa: PLC0415 - trio only for the keeper

        return keeper(arguments[1:])
    options = _parser().parse_args(arguments)
    try:
        status: int = options.run(options, sys.stdout)
    except UnreachableError as error:
        print(f"graceful-restart: {error}", file=sys.stderr)
        return 2
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graceful-restart", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    restart = commands.add_parser("restart", help="restart the server and wait for the outcome")
    _target(restart)
    restart.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    restart.set_defaults(run=_restart)
    status = commands.add_parser("status", help="state, pid, leases, the last restart")
    status.add_argument("--control", type=Path, required=True, help="the control socket")
    output = status.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="the status as JSON")
    output.add_argument("--prometheus", action="store_true", help="Prometheus text format")
    status.set_defaults(run=_status)
    stop = commands.add_parser("stop", help="stop gracefully and wait for the drain")
    _target(stop)
    stop.add_argument("--immediate", action="store_true", help="cut the drain short")
    stop.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    stop.set_defaults(run=_stop)
    commands.add_parser("keeper", help="run a command under the keeper (see --help there)")
    return parser


def _target(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--control", type=Path, help="the server's control socket")
    target.add_argument("--pid-file", type=Path, help="the server's pid file (signals only)")


# -- the commands ------------------------------------------------------------------------


def _restart(options: argparse.Namespace, out: TextIO) -> int:
    if options.control is None:
        return _restart_by_signal(options.pid_file, options.timeout, out)
    for event in _ask(options.control, {"command": "restart"}, options.timeout):
        if "result" in event:
            if event["result"] == "ok":
                print(f"restarted: pid {event.get('successor')} serves", file=out)
                return 0
            print(f"restart failed: {event.get('reason')}", file=out)
            for line in event.get("stderr_tail") or []:
                print(f"  | {line}", file=out)
            return 1
        print(_describe_event(event), file=out, flush=True)
    print("restart failed: the server closed the control connection", file=out)
    return 1


def _describe_event(event: dict[str, Any]) -> str:
    name, ms = event["event"], event.get("ms")
    if name == "requested":
        return f"restart requested: pid {event['pid']}, generation {event['generation']}"
    text = {
        "spawned": f"successor {event.get('successor')} started",
        "ready": "successor ready",
        "stopped accepting": f"old copy stopped accepting: probation {event.get('probation')}s",
        "committed": "handover committed",
        "draining": f"old copy draining {event.get('leases')} lease(s)",
    }.get(name, name)
    return f"{text} ({ms} ms)" if ms is not None else text


def _restart_by_signal(pid_file: Path, timeout: float, out: TextIO) -> int:
    old = _read_pid(pid_file)
    print(f"sending SIGHUP to pid {old} (from {pid_file})", file=out, flush=True)
    os.kill(old, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(UnreachableError):
            new = _read_pid(pid_file)
            if new != old:
                print(f"restarted: pid {new} serves", file=out)
                return 0
        time.sleep(0.05)
    print(
        f"restart failed: {pid_file} still names pid {old} after {timeout:g}s "
        "(see the server's log; --control reports why)",
        file=out,
    )
    return 1


def _status(options: argparse.Namespace, out: TextIO) -> int:
    reply = list(_ask(options.control, {"command": "status"}, CONNECT_TIMEOUT))[-1]
    if reply.get("result") != "ok":
        print(f"status failed: {reply.get('reason')}", file=out)
        return 1
    status = reply["status"]
    if options.json:
        json.dump(status, out, indent=2)
        print(file=out)
    elif options.prometheus:
        from ._metrics import exposition  # noqa: PLC0415 - prometheus-client, if installed

        out.write(exposition(status))
    else:
        _print_status(status, out)
    return 0


def _print_status(status: dict[str, Any], out: TextIO) -> None:
    keeper = f", under keeper {status['keeper']}" if status.get("keeper") else ""
    leases = "" if status["leases"] is None else f", {status['leases']} lease(s) in flight"
    print(
        f"pid {status['pid']}: {status['state']}, generation {status['generation']}"
        f"{keeper}, up {status['uptime_s']:.0f}s{leases}",
        file=out,
    )
    for listener in status.get("listeners", []):
        print(f"  listener {listener['name']}: {listener['address']}", file=out)
    for process in status.get("draining", []):
        leases = process.get("leases")
        held = f", {leases} lease(s)" if leases is not None else ""
        print(f"  draining: pid {process['pid']} ({process['role']}{held})", file=out)
    counts = status.get("restarts") or {}
    if counts:
        print("  restarts: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), file=out)
    last = status.get("last_restart")
    if last:
        reason = f": {last['reason']}" if last.get("reason") else ""
        phases = " -> ".join(f"{k} {v} ms" for k, v in last.get("phases", {}).items())
        print(f"  last restart ({last['trigger']}): {last['outcome']}{reason}", file=out)
        print(f"    {phases or 'no phase reached'}", file=out)


def _stop(options: argparse.Namespace, out: TextIO) -> int:
    if options.control is None:
        pid = _read_pid(options.pid_file)
        pidfd = os.pidfd_open(pid)
        os.kill(pid, signal.SIGTERM)
        if options.immediate:
            os.kill(pid, signal.SIGTERM)  # the second shutdown signal cuts the drain short
    else:
        request = {"command": "stop", "immediate": options.immediate}
        with contextlib.closing(_ask(options.control, request, CONNECT_TIMEOUT)) as answers:
            answer: dict[str, Any] = next(answers, {"reason": "no answer"})
        if answer.get("event") != "stopping":
            print(f"stop failed: {answer.get('reason')}", file=out)
            return 1
        pid, pidfd = answer["pid"], os.pidfd_open(answer["pid"])
        leases = answer["leases"]
        draining = "" if leases is None else f": draining {leases} lease(s)"
        print(f"pid {pid} stopping{draining}", file=out)
    try:
        if not select.select([pidfd], [], [], options.timeout)[0]:
            print(f"pid {pid} still runs after {options.timeout:g}s", file=out)
            return 1
    finally:
        os.close(pidfd)
    print(f"pid {pid} drained and exited", file=out)
    return 0


# -- talking to the server ---------------------------------------------------------------


def _ask(
    path: Path, request: dict[str, Any], timeout: float = 300.0
) -> Generator[dict[str, Any], None, None]:
    """Send ``request`` on the control socket; yield each JSON line of the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(str(path))
        except OSError as error:
            raise UnreachableError(
                f"cannot connect to the control socket {path}: {error}"
            ) from None
        sock.settimeout(timeout)
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as answers:
            for line in answers:
                yield json.loads(line)


def _read_pid(pid_file: Path) -> int:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError) as error:
        raise UnreachableError(f"cannot read a pid from {pid_file}: {error}") from None


if __name__ == "__main__":
    sys.exit(main())
