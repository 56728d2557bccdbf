"""``graceful-restart`` with a pid file: the pid file's record, who gets the signal, the outcome.

The commands run the real console script (``python -m graceful_restart_trio.cli``) against
real processes: the test server (direct mode and under the keeper), a stand-in server that
writes the record the way the library does, and a ``sleep`` that got a dead server's pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from graceful_restart_trio import PidFileError
from graceful_restart_trio._pidfile import (
    read_record,
    record_path,
    remove_pid_file,
    start_ticks,
    write_pid_file,
)
from graceful_restart_trio.cli import main as cli_main

from .conftest import TIMEOUT, Server, http_get, is_running, wait_until
from .test_control import cli
from .test_keeper import keeper_pid_file, read_pid, start_keeper

StartServer = Callable[..., Server]

READY_TIMEOUT = 5.0
PROBATION = 0.2
BOUND = READY_TIMEOUT + PROBATION + 2
"""How soon ``restart --pid-file`` must tell a restart's outcome (issue 14's acceptance)."""

STAND_IN = r"""
import os, signal, sys, time
from pathlib import Path
from graceful_restart_trio._pidfile import write_pid_file

path, outcome = Path(sys.argv[1]), sys.argv[2]


def timeline(outcome, requested_at, reason):
    return {
        "trigger": "SIGHUP", "requested_at": requested_at, "phases": {"spawned": 3},
        "outcome": outcome, "reason": reason, "successor": 4243,
        "stderr_tail": ["Traceback (most recent call last):", "ImportError: app.views"],
    }


def on_sighup(signum, frame):
    if outcome == "exit":
        os._exit(0)
    reason = "successor 4243 exited with status 3 before it was ready"
    write_pid_file(path, os.getpid(), timeline(outcome, time.time(), reason))


signal.signal(signal.SIGHUP, on_sighup)
write_pid_file(path, os.getpid(), timeline("failed", time.time() - 60, "an earlier failure"))
while True:
    signal.pause()
"""
"""A server that answers SIGHUP the way the library does in the pid file's record: the
restart's outcome (``failed`` or ``committed``, with a successor), or exits (``exit``).
Its record starts with an earlier failed restart, which the CLI must not take for the
outcome of its own."""


@contextlib.contextmanager
def running(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """A process for the test; killed and reaped at the end."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def pending_signals(pid: int) -> int:
    """The signals sent to ``pid`` and not yet handled (thread and process masks)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    return int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)


# -- the record ---------------------------------------------------------------------------


def test_the_record_names_the_pid_its_start_time_and_the_last_restart(tmp_path: Path) -> None:
    pid_file, me = tmp_path / "app.pid", os.getpid()
    last = {"trigger": "SIGHUP", "requested_at": 1.5, "outcome": "failed", "reason": "boom"}
    write_pid_file(pid_file, me, last)
    assert pid_file.read_text() == f"{me}\n"
    assert record_path(pid_file) == tmp_path / "app.pid.json"
    assert read_record(pid_file) == {"pid": me, "starttime": start_ticks(me), "last_restart": last}
    assert oct(record_path(pid_file).stat().st_mode & 0o777) == oct(0o600)
    write_pid_file(pid_file, me)  # the same pid again: both rewritten
    assert read_record(pid_file) == {"pid": me, "starttime": start_ticks(me), "last_restart": None}
    assert not remove_pid_file(pid_file, me + 1)  # another pid's: left alone
    assert remove_pid_file(pid_file, me)
    assert sorted(tmp_path.iterdir()) == []


def test_removing_leaves_a_successors_record(tmp_path: Path) -> None:
    """A successor writes its record before the pid file: that record stays."""
    pid_file, me = tmp_path / "app.pid", os.getpid()
    write_pid_file(pid_file, me)
    successor = {"pid": me + 1, "starttime": 7, "last_restart": None}
    record_path(pid_file).write_text(json.dumps(successor))
    assert remove_pid_file(pid_file, me)
    assert not pid_file.exists()
    assert read_record(pid_file) == successor
    record_path(pid_file).unlink()


def test_a_link_at_the_records_path_is_refused_and_never_followed(tmp_path: Path) -> None:
    pid_file, victim = tmp_path / "app.pid", tmp_path / "victim"
    text = json.dumps({"pid": os.getpid(), "starttime": 1, "last_restart": None})
    victim.write_text(text)
    record_path(pid_file).symlink_to(victim)
    with pytest.raises(PidFileError, match=r"app\.pid\.json exists and is not a regular file"):
        write_pid_file(pid_file, os.getpid())
    assert victim.read_text() == text
    assert not pid_file.exists()
    assert read_record(pid_file) is None


# -- who gets the signal --------------------------------------------------------------------


@pytest.mark.parametrize("command", ["restart", "stop"])
@pytest.mark.parametrize("evidence", ["pid file older", "record of another process"])
def test_a_pid_reused_by_another_process_is_refused(
    tmp_path: Path, command: str, evidence: str
) -> None:
    """The server died by SIGKILL; a ``sleep`` got its pid: no signal reaches the sleep."""
    pid_file = tmp_path / "app.pid"
    with running(["sleep", "300"]) as sleeper:
        pid_file.write_text(f"{sleeper.pid}\n")
        if evidence == "pid file older":  # an older server's, without a record
            an_hour_ago = time.time() - 3600
            os.utime(pid_file, (an_hour_ago, an_hour_ago))
        else:  # the record of the server that had the pid, started at another time
            died = {"pid": sleeper.pid, "starttime": start_ticks(sleeper.pid) - 1}
            record_path(pid_file).write_text(json.dumps({**died, "last_restart": None}))
        answer = cli(command, "--pid-file", str(pid_file), "--timeout", "5")
        assert answer.returncode == 2, answer
        assert f"pid {sleeper.pid} from {pid_file} is not the server" in answer.stderr
        assert "not signalling it. --control reaches a server reliably" in answer.stderr
        assert answer.stdout == ""
        assert sleeper.poll() is None
        assert pending_signals(sleeper.pid) == 0


def test_a_process_older_than_its_pid_file_is_signalled_without_a_record(
    tmp_path: Path,
) -> None:
    """An older server writes no record: a process started before the file is the server."""
    pid_file = tmp_path / "app.pid"
    with running(["sleep", "300"]) as sleeper:
        pid_file.write_text(f"{sleeper.pid}\n")
        answer = cli("stop", "--pid-file", str(pid_file), "--timeout", str(TIMEOUT))
        assert answer.returncode == 0, answer
        assert answer.stdout.splitlines() == [f"pid {sleeper.pid} drained and exited"]
        assert sleeper.wait(TIMEOUT) == -signal.SIGTERM


def test_a_pid_file_naming_no_process_is_an_error(tmp_path: Path) -> None:
    pid_file = tmp_path / "app.pid"
    with running([sys.executable, "-c", "pass"]) as gone:
        gone.wait()
    pid_file.write_text(f"{gone.pid}\n")
    answer = cli("restart", "--pid-file", str(pid_file))
    assert answer.returncode == 2, answer
    said = f"graceful-restart: {pid_file} names pid {gone.pid}, which is not running\n"
    assert answer.stderr == said


# -- what restart --pid-file reports --------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "status", "said"),
    [
        (
            "failed",
            1,
            [
                "restart failed: successor 4243 exited with status 3 before it was ready",
                "  | Traceback (most recent call last):",
                "  | ImportError: app.views",
            ],
        ),
        ("committed", 0, ["restarted: pid 4243 serves"]),
        ("exit", 1, ["restart failed: pid {pid} exited and no new process took over"]),
    ],
)
def test_restart_by_pid_file_reports_what_the_record_says(
    tmp_path: Path, outcome: str, status: int, said: list[str]
) -> None:
    """The outcome written after the signal counts; the earlier failure in the record not."""
    pid_file = tmp_path / "app.pid"
    with running([sys.executable, "-c", STAND_IN, str(pid_file), outcome]) as server:
        wait_until(lambda: read_pid(pid_file) == server.pid, "the stand-in's pid file")
        answer = cli("restart", "--pid-file", str(pid_file), "--timeout", str(TIMEOUT))
        assert answer.returncode == status, answer
        assert answer.stdout.splitlines() == [
            f"sending SIGHUP to pid {server.pid} (from {pid_file})",
            *(line.format(pid=server.pid) for line in said),
        ]


def start_direct(start_server: StartServer, tmp_path: Path) -> tuple[Server, Path]:
    """The test server on its own: restart by its pid file."""
    server = start_server("--ready-timeout", str(READY_TIMEOUT), "--probation", str(PROBATION))
    server.wait_serving()
    return server, server.pid_file


def start_kept(start_server: StartServer, tmp_path: Path) -> tuple[Server, Path]:
    """The test server under the keeper: restart by the keeper's pid file."""
    options = ["--ready-timeout", str(READY_TIMEOUT), "--probation", str(PROBATION)]
    server = start_keeper(start_server, tmp_path, keeper_options=options)
    server.wait_serving()
    return server, keeper_pid_file(tmp_path)


@pytest.mark.parametrize("start", [start_direct, start_kept], ids=["direct", "keeper"])
def test_restart_by_pid_file_reports_a_crash_at_import_at_once(
    start_server: StartServer,
    tmp_path: Path,
    start: Callable[[StartServer, Path], tuple[Server, Path]],
) -> None:
    server, pid_file = start(start_server, tmp_path)
    old, signalled = server.serving_pid(), read_pid(pid_file)
    server.deploy("crash-at-import")
    began = time.monotonic()
    answer = cli("restart", "--pid-file", str(pid_file), "--timeout", str(BOUND + 3))
    took = time.monotonic() - began
    assert answer.returncode == 1, answer
    lines = answer.stdout.splitlines()
    assert lines[0] == f"sending SIGHUP to pid {signalled} (from {pid_file})"
    assert lines[1].startswith("restart failed: successor "), answer.stdout
    assert lines[1].endswith("exited with status 3 before it was ready"), answer.stdout
    assert "  | ModuleNotFoundError: No module named 'app.views'" in lines[2:]
    assert took < BOUND, f"the failure took {took:.1f}s to tell"
    assert server.serving_pid() == old
    assert read_pid(pid_file) == signalled
    assert http_get(server.port)[0] == 200  # the old copy serves on


@pytest.mark.parametrize("start", [start_direct, start_kept], ids=["direct", "keeper"])
def test_restart_by_pid_file_exits_0_with_the_new_pid(
    start_server: StartServer,
    tmp_path: Path,
    start: Callable[[StartServer, Path], tuple[Server, Path]],
) -> None:
    server, pid_file = start(start_server, tmp_path)
    old, signalled = server.serving_pid(), read_pid(pid_file)
    assert old is not None
    answer = cli("restart", "--pid-file", str(pid_file), "--timeout", str(TIMEOUT))
    assert answer.returncode == 0, answer
    new = server.wait_serving(other_than=old)
    assert answer.stdout.splitlines() == [
        f"sending SIGHUP to pid {signalled} (from {pid_file})",
        f"restarted: pid {new} serves",
    ]
    record = read_record(pid_file)
    assert record is not None
    in_charge = new if pid_file == server.pid_file else signalled  # a keeper keeps its pid
    assert (record["pid"], record["last_restart"]["outcome"]) == (in_charge, "committed")
    assert record["starttime"] == start_ticks(record["pid"])
    stop = cli("stop", "--pid-file", str(pid_file), "--timeout", str(TIMEOUT))
    assert stop.returncode == 0, stop
    assert stop.stdout.splitlines() == [f"pid {in_charge} drained and exited"]
    assert not pid_file.exists()
    assert not record_path(pid_file).exists()


# -- stop, and the keeper's name --------------------------------------------------------------


def test_stop_by_control_socket_counts_a_server_already_gone_as_exited(
    start_server: StartServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The server exits and is reaped before the CLI opens its pidfd: a stop that worked."""
    control = tmp_path / "control.sock"
    server = start_server("--control", str(control))
    pid = server.wait_serving()
    wait_until(control.exists, "the control socket")
    pidfd_open = os.pidfd_open

    def pidfd_open_once_reaped(target: int, flags: int = 0) -> int:
        server.wait_exit(target)  # exited and reaped: its pid names nobody now
        return pidfd_open(target, flags)

    monkeypatch.setattr(os, "pidfd_open", pidfd_open_once_reaped)
    assert cli_main(["stop", "--control", str(control)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"pid {pid} stopping")
    assert lines[1:] == [f"pid {pid} drained and exited"]
    assert server.exit_codes[pid] == 0
    assert not is_running(pid)


def test_the_keepers_help_names_the_command_it_was_run_as() -> None:
    through_cli = cli("keeper", "--help")
    assert through_cli.returncode == 0, through_cli
    assert through_cli.stdout.startswith("usage: graceful-restart keeper [--pid-file F]")
    no_command = cli("keeper")
    assert no_command.returncode == 2
    assert "graceful-restart keeper: error: no command to run" in no_command.stderr
    alone = subprocess.run(
        [sys.executable, "-m", "graceful_restart_trio.keeper", "--help"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert alone.stdout.startswith("usage: graceful-restart-keeper [--pid-file F]")


def test_the_help_is_plain_text_with_an_example_of_each_command() -> None:
    """``graceful-restart --help`` has no reStructuredText markup, and shows each command."""
    answer = cli("--help")
    assert answer.returncode == 0, answer
    assert "``" not in answer.stdout
    assert "::" not in answer.stdout
    description = answer.stdout.split("\n\n")[1]
    assert (
        description
        == "Restart, inspect and stop a running graceful_restart_trio server from a shell."
    )
    for command in ("restart", "status", "stop", "keeper"):
        assert f"\n  graceful-restart {command} " in answer.stdout
