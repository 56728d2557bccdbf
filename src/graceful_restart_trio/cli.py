"""``graceful-restart``: restart, inspect and stop a running server from a shell.

Synopsis::

    graceful-restart restart --control /run/app/control   # waits for the outcome
    graceful-restart restart --pid-file /run/app.pid      # no control socket: SIGHUP
    graceful-restart status --control /run/app/control [--json | --prometheus]
    graceful-restart stop --control /run/app/control [--immediate]
    graceful-restart stop --pid-file /run/app.pid [--immediate]     # SIGTERM
    graceful-restart keeper [keeper options] -- python -m app   # graceful-restart-keeper

``restart`` prints each phase as it happens and exits 0 with the new pid, or 1 with the
reason (the successor's exit status or signal, the last lines it wrote to stderr when
stderr is a file, the ``ready_timeout``) as soon as the server knows it.

With ``--pid-file`` instead of ``--control``, ``restart`` and ``stop`` signal the pid the
file names, once sure it is the server: the process's start time must be the one in the
pid file's record (``<pid file>.json``, which the library writes), or, without a record,
not later than the pid file's last write. A pid reused by another process after the
server died is refused (exit 2). The signal goes through a pidfd opened before the check,
so it reaches the process that was checked. ``restart`` then sends ``SIGHUP`` and
watches the pid file and its record: the restart failed (the server writes the outcome
into the record: exit 1, with the reason and the stderr lines), the pid file names a new
process (direct mode: exit 0 with its pid), the record says committed (a keeper, whose
pid stays: exit 0 with the new generation's pid), the process exited with nothing in its
place (exit 1), or ``--timeout`` passed (exit 1).

``stop`` waits until the process has drained and exited (a server gone by the time the
CLI looks counts as exited). Exit status 2: the server cannot be reached, or the pid file
names a process that is not the server.
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
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from ._pidfile import read_record, record_path, start_ticks
from ._status import Status

__all__ = ["main"]

CONNECT_TIMEOUT = 10.0
CLOCK_SLACK = 0.005
"""Seconds a restart's ``requested_at`` may lie before the CLI sent its signal (the two
clocks are the same, read a few microseconds apart)."""
BOOT_TIME_SLACK = 1.0
"""Seconds a process may seem to have started after the pid file was written: ``btime``
is rounded to whole seconds."""


class UnreachableError(Exception):
    """The server cannot be asked (no socket, refused, no pid file)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``graceful-restart``; return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["keeper"]:
        from .keeper import main as keeper  # noqa: PLC0415 - trio only for the keeper

        return keeper(arguments[1:], prog="graceful-restart keeper")
    options = _parser().parse_args(arguments)
    try:
        status: int = options.run(options, sys.stdout)
    except UnreachableError as error:
        print(f"graceful-restart: {error}", file=sys.stderr)
        return 2
    return status


DESCRIPTION = "Restart, inspect and stop a running graceful_restart_trio server from a shell."
EPILOG = """\
examples:
  graceful-restart restart --control /run/app/control   # waits for the outcome
  graceful-restart restart --pid-file /run/app.pid      # no control socket: SIGHUP
  graceful-restart status --control /run/app/control [--json | --prometheus]
  graceful-restart stop --control /run/app/control [--immediate]
  graceful-restart stop --pid-file /run/app.pid [--immediate]   # SIGTERM
  graceful-restart keeper [keeper options] -- python -m app

restart prints each phase as it happens and ends with the new pid, or with the reason it
failed. stop waits until the server has drained and exited.

exit status: 0 done; 1 the command failed (a failed restart, or --timeout passed);
2 the server cannot be reached, or the pid file names a process that is not the server.
"""
"""``--help``'s text: plain text, where the module docstring is reStructuredText."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graceful-restart",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
                pids = ", ".join(str(pid) for pid in event.get("workers") or ())
                serving = f"workers serve as pids {pids}" if pids else ""
                single = f"pid {event.get('successor')} serves"
                print(f"restarted: {serving or single}", file=out)
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
        "draining": (
            f"old copy draining {event['leases']} lease(s)"
            if event.get("leases") is not None
            else f"old generation {event.get('generation')} (pid {event.get('pid')}) draining"
        ),
    }.get(name, name)
    return f"{text} ({ms} ms)" if ms is not None else text


def _restart_by_signal(pid_file: Path, timeout: float, out: TextIO) -> int:
    old = _read_pid(pid_file)
    with _open_service(pid_file, old) as pidfd:
        print(f"sending SIGHUP to pid {old} (from {pid_file})", file=out, flush=True)
        since = time.time() - CLOCK_SLACK
        _send(pidfd, old, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            outcome = _restart_outcome(pid_file, old, since)
            if outcome is None and _has_exited(pidfd):
                outcome = _restart_outcome(pid_file, old, since) or (
                    1,
                    [f"restart failed: pid {old} exited and no new process took over"],
                )
            if outcome is not None:
                status, lines = outcome
                print("\n".join(lines), file=out)
                return status
            time.sleep(0.05)
    print(
        f"restart failed: {pid_file} still names pid {old} after {timeout:g}s "
        "(see the server's log; --control reports why)",
        file=out,
    )
    return 1


def _restart_outcome(pid_file: Path, old: int, since: float) -> tuple[int, list[str]] | None:
    """The exit status and the lines to print, if the pid file or its record tell the
    outcome of a restart asked for at ``since`` (``time.time()``); None: not yet."""
    try:
        pid = _read_pid(pid_file)
    except UnreachableError:  # between a removal and a rewrite, say
        return None
    record = read_record(pid_file)
    last = record.get("last_restart") if record is not None and record["pid"] == pid else None
    requested_at = last.get("requested_at") if last is not None else None
    if last is None or not isinstance(requested_at, float | int) or requested_at < since:
        last = {}  # no record (an older server), or one from before the signal
    if last.get("outcome") == "failed":
        tail = [f"  | {line}" for line in last.get("stderr_tail") or []]
        return 1, [f"restart failed: {last.get('reason')}", *tail]
    if pid != old:  # direct mode: the new process in charge wrote the pid file
        return 0, [f"restarted: pid {pid} serves"]
    if last.get("outcome") == "committed":  # a keeper: its pid stays, a generation follows
        return 0, [f"restarted: pid {last.get('successor')} serves"]
    return None


def _status(options: argparse.Namespace, out: TextIO) -> int:
    reply = list(_ask(options.control, {"command": "status"}, CONNECT_TIMEOUT))[-1]
    if reply.get("result") != "ok":
        print(f"status failed: {reply.get('reason')}", file=out)
        return 1
    status = Status.from_json(reply["status"])
    if options.json:
        json.dump(status.as_json(), out, indent=2)
        print(file=out)
    elif options.prometheus:
        from ._metrics import exposition  # noqa: PLC0415 - prometheus-client, if installed

        out.write(exposition(status))
    else:
        out.write(status.text())
    return 0


def _stop(options: argparse.Namespace, out: TextIO) -> int:
    if options.control is None:
        pid = _read_pid(options.pid_file)
        with _open_service(options.pid_file, pid) as pidfd:
            _send(pidfd, pid, signal.SIGTERM)
            if options.immediate:  # the second shutdown signal cuts the drain short
                _send(pidfd, pid, signal.SIGTERM)
            return _wait_exit(pidfd, pid, options.timeout, out)
    request = {"command": "stop", "immediate": options.immediate}
    with contextlib.closing(_ask(options.control, request, CONNECT_TIMEOUT)) as answers:
        answer: dict[str, Any] = next(answers, {"reason": "no answer"})
    if answer.get("event") != "stopping":
        print(f"stop failed: {answer.get('reason')}", file=out)
        return 1
    pid, leases = answer["pid"], answer["leases"]
    draining = "" if leases is None else f": draining {leases} lease(s)"
    print(f"pid {pid} stopping{draining}", file=out)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # it has already exited (and been reaped)
        print(f"pid {pid} drained and exited", file=out)
        return 0
    try:
        return _wait_exit(pidfd, pid, options.timeout, out)
    finally:
        os.close(pidfd)


def _wait_exit(pidfd: int, pid: int, timeout: float, out: TextIO) -> int:
    if not select.select([pidfd], [], [], timeout)[0]:
        print(f"pid {pid} still runs after {timeout:g}s", file=out)
        return 1
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
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # Refused before it read (too many connections): the answer is there to read.
            sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as answers:
            for line in answers:
                yield json.loads(line)


def _read_pid(pid_file: Path) -> int:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError) as error:
        raise UnreachableError(f"cannot read a pid from {pid_file}: {error}") from None


@contextlib.contextmanager
def _open_service(pid_file: Path, pid: int) -> Iterator[int]:
    """A pidfd for ``pid``, once sure it is the server that wrote ``pid_file``.

    The pidfd is opened first and the check made after, so that the check and every
    signal sent through the pidfd name the same process.

    Raises:
        UnreachableError: ``pid`` is not running, or is another process (see
            :func:`_check_is_service`).
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise UnreachableError(f"{pid_file} names pid {pid}, which is not running") from None
    try:
        _check_is_service(pid_file, pid)
        yield pidfd
    finally:
        os.close(pidfd)


def _check_is_service(pid_file: Path, pid: int) -> None:
    """Make sure ``pid`` is the process that wrote ``pid_file``, not one that got its pid
    after the server died (a SIGKILL or an OOM kill leaves the pid file behind).

    With a record that names ``pid`` (``<pid file>.json``), the process's start time
    must be the one recorded; without one, the process must have started before the pid
    file was last written (1 s allowed for the rounding of the boot time).

    Raises:
        UnreachableError: it is not, or it is not running.
    """
    try:
        ticks = start_ticks(pid)
        written = pid_file.stat().st_mtime
        booted = _boot_time()
    except (OSError, ValueError, IndexError) as error:
        raise UnreachableError(f"cannot check pid {pid} (from {pid_file}): {error}") from None
    record = read_record(pid_file)
    if record is not None and record["pid"] == pid and record["starttime"] is not None:
        if record["starttime"] == ticks:
            return
        why = f"it is not the process {record_path(pid_file)} describes"
    else:
        started = booted + ticks / os.sysconf("SC_CLK_TCK")
        if started <= written + BOOT_TIME_SLACK:
            return
        why = f"it started {started - written:.1f}s after {pid_file} was written"
    raise UnreachableError(
        f"pid {pid} from {pid_file} is not the server: {why} (the server is gone and its "
        "pid was reused?); not signalling it. --control reaches a server reliably"
    )


def _boot_time() -> float:
    """When the machine booted (``btime`` of /proc/stat, whole seconds since the epoch)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def _send(pidfd: int, pid: int, sig: signal.Signals) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        raise UnreachableError(f"pid {pid} exited before it got {sig.name}") from None


def _has_exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


if __name__ == "__main__":
    sys.exit(main())
