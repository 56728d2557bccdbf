"""Nothing the file system or an unexpected error does may kill or wedge a serving process.

Each test provokes one fault against real processes (a pid file on a full tmpfs, a
socket file on a read-only mount, an error injected into a restart, a stop signal in the
instant between a generation's ready and the keeper's commit) and asserts on what the
processes then do: who serves, the status the control socket answers, the timeline in
the pid file's record, the exit statuses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Server, children, echo_line, wait_until
from .test_keeper import keeper_pid_file, start_keeper

StartServer = Callable[..., Server]
BUGGY_KEEPER = Path(__file__).parent / "apps" / "buggy_keeper.py"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "graceful_restart_trio.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def control_status(control: Path) -> dict[str, Any]:
    answer = cli("status", "--control", str(control), "--json")
    assert answer.returncode == 0, answer
    status: dict[str, Any] = json.loads(answer.stdout)
    return status


def last_restart(pid_file: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(pid_file.with_name(pid_file.name + ".json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    last: dict[str, Any] | None = record["last_restart"]
    return last


def failed_restart(pid_file: Path) -> dict[str, Any] | None:
    last = last_restart(pid_file)
    return last if last is not None and last["outcome"] == "failed" else None


@contextlib.contextmanager
def mounted(target: Path, *mount: str) -> Iterator[Path]:
    """``mount ARGS target`` for the test's duration (the tests run as root)."""
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", *mount, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def fill(directory: Path) -> None:
    """Fill the file system of ``directory`` to the last byte."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)


# -- the pid file -----------------------------------------------------------------------


def test_a_successor_that_cannot_write_the_pid_file_takes_charge_all_the_same(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Finding 2: the control socket, the watchdog and the next restart all work; the
    status says what went wrong with the pid file."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(60)
    control = tmp_path / "control.sock"
    with notify, mounted(tmp_path / "run", "-t", "tmpfs", "-o", "size=64k", "tmpfs") as run:
        server = start_server(
            "--kind",
            "echo",
            "--control",
            str(control),
            "--pid-file",
            str(run / "server.pid"),
            env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"},
        )
        server.pid_file = run / "server.pid"
        old = server.wait_serving()
        fill(run)
        server.signal(signal.SIGHUP, old)
        new = wait_until(
            lambda: (status := control_status(control))["pid"] != old and status["pid"],
            "the successor to answer on the control socket",
        )
        status = control_status(control)
        assert "No space left on device" in status["pid_file_error"], status
        text = cli("status", "--control", str(control)).stdout
        assert f"  pid file: {status['pid_file_error']}\n" in text
        assert status["in_charge"] is True
        assert server.wait_exit(old) == 0
        # The watchdog is the successor's now: it pings systemd.
        wait_until(lambda: watchdog_pings(notify) == new, f"WATCHDOG=1 from pid {new}")
        assert server.serving_pid() == old  # the file still names the old pid: it is full
        (run / "filler").unlink()
        assert cli("restart", "--control", str(control)).returncode == 0
        newest = server.wait_serving(other_than=old)
        assert control_status(control)["pid_file_error"] is None
        server.signal(signal.SIGTERM, newest)
        assert server.wait_exit(newest) == 0
    assert children() == []


def watchdog_pings(notify: socket.socket) -> int:
    """The pid of the next sender of ``WATCHDOG=1`` (0 for other messages)."""
    data, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
    for level, kind, payload in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
            pid = int.from_bytes(payload[:4], sys.byteorder)
            return pid if b"WATCHDOG=1" in data.split(b"\n") else 0
    return 0


# -- the socket files -------------------------------------------------------------------


@pytest.mark.parametrize("keeper", [False, True], ids=["direct", "keeper"])
def test_a_shutdown_that_cannot_remove_a_socket_file_still_drains(
    start_server: StartServer, tmp_path: Path, keeper: bool
) -> None:
    """Finding 3: the drain starts first; the removal fails, is logged, and the process
    (or the keeper) exits 0 all the same, its pid file removed."""
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    path = sockets / "app.sock"
    args = ("--kind", "echo", "--unix", str(path))
    if keeper:
        server = start_keeper(
            start_server, tmp_path, *args, keeper_options=["--control", str(sockets / "ctl")]
        )
        main = server.first.pid
        server.wait_serving()
    else:
        server = start_server(*args)
        main = server.wait_serving()
    wait_until(path.exists, "the socket file")
    with mounted(sockets, "--bind", str(sockets)):
        subprocess.run(["mount", "-o", "remount,ro,bind", str(sockets)], check=True)
        server.signal(signal.SIGTERM, main)
        assert server.wait_exit(main) == 0
        assert path.exists()  # it could not be removed, and that was all
    log = server.log()
    assert f"cannot remove the socket file {path}" in log
    pid_file = keeper_pid_file(tmp_path) if keeper else server.pid_file
    assert not pid_file.exists()
    assert children() == []


# -- an unexpected error in a restart ---------------------------------------------------


def test_an_unexpected_error_in_a_restart_leaves_the_old_copy_serving(
    start_server: StartServer,
) -> None:
    """Finding 7: an OSError right after the successor said ready (where only a
    RestartError was expected): the old copy accepts again, the successor is stopped, the
    next SIGHUP works."""
    server = start_server("--kind", "echo", deploy="bug-in-restart")
    old = server.wait_serving()
    server.deploy("ok")
    server.signal(signal.SIGHUP, old)
    failed = wait_until(lambda: failed_restart(server.pid_file), "the failed restart's record")
    assert "unexpected error: OSError(24, 'Too many open files" in failed["reason"], failed
    successor = failed["successor"]
    server.wait_exit(successor)
    assert echo_line(server.port, b"hello\n") == f"{old} hello\n"
    server.signal(signal.SIGHUP, old)
    new = server.wait_serving(other_than=old)
    assert last_restart(server.pid_file)["outcome"] == "committed"  # type: ignore[index]
    assert server.wait_exit(old) == 0
    server.signal(signal.SIGTERM, new)
    assert server.wait_exit(new) == 0


def test_an_unexpected_error_in_the_keepers_restart_leaves_the_old_generation_serving(
    start_server: StartServer, tmp_path: Path
) -> None:
    pid_file = keeper_pid_file(tmp_path)
    server = start_server(
        "--kind",
        "echo",
        command=[
            sys.executable,
            str(BUGGY_KEEPER),
            "--pid-file",
            str(pid_file),
            "--probation",
            "0.2",
            "--",
            sys.executable,
            str(Path(__file__).parent / "apps" / "server.py"),
        ],
    )
    keeper = server.first.pid
    old = server.wait_serving()
    server.signal(signal.SIGHUP, keeper)
    failed = wait_until(lambda: failed_restart(pid_file), "the failed restart's record")
    assert "unexpected error: OSError(24" in failed["reason"]
    wait_until(lambda: not _running(failed["successor"]), "the new generation to exit")
    assert echo_line(server.port, b"hello\n") == f"{old} hello\n"
    server.signal(signal.SIGHUP, keeper)
    new = server.wait_serving(other_than=old)
    # The keeper records the restart once it is over: a moment after the new generation
    # hears it is in charge (and writes the application's pid file).
    wait_until(lambda: (last_restart(pid_file) or {}).get("outcome") == "committed", "the record")
    assert echo_line(server.port, b"hello\n") == f"{new} hello\n"
    server.signal(signal.SIGTERM, keeper)
    assert server.wait_exit(keeper) == 0
    assert children() == []


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


# -- a stop at the worst moment ---------------------------------------------------------


def test_a_stop_between_the_first_ready_and_the_keepers_commit_exits_cleanly(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Finding 11: generation 1 sends the keeper SIGTERM the instant it says ready. Five
    times: the keeper drains it and exits 0 every time."""
    for attempt in range(5):
        directory = tmp_path / str(attempt)
        directory.mkdir()
        server = start_server(
            "--kind",
            "echo",
            deploy="stop-keeper-at-ready",
            command=[
                sys.executable,
                "-m",
                "graceful_restart_trio.keeper",
                "--pid-file",
                str(keeper_pid_file(directory)),
                "--",
                sys.executable,
                str(Path(__file__).parent / "apps" / "server.py"),
            ],
        )
        assert server.wait_exit(server.first.pid) == 0, server.log()
        assert children() == []


# -- a restart() caller that stops waiting ----------------------------------------------


def test_a_restart_call_cancelled_by_its_caller_goes_on(start_server: StartServer) -> None:
    """The caller's cancel scope only ends its wait: the restart commits all the same."""
    server = start_server("--kind", "echo")
    old = server.wait_serving()
    assert echo_line(server.port, b"restart-and-leave\n") == f"{old} left\n"
    new = server.wait_serving(other_than=old)
    assert last_restart(server.pid_file)["outcome"] == "committed"  # type: ignore[index]
    assert server.wait_exit(old) == 0
    server.signal(signal.SIGTERM, new)
    assert server.wait_exit(new) == 0
