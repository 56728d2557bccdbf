"""Restarting a real server process: handover, readiness, rollback, signals mid-restart."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import (
    ROOT,
    SERVER,
    Server,
    answering_pid,
    children,
    echo_line,
    http_get,
    is_running,
    wait_until,
)

StartServer = Callable[..., Server]


def successor_pids(server: Server) -> list[int]:
    """Every successor the log says was started, in order."""
    return [int(pid) for pid in re.findall(r"successor (\d+) started", server.log())]


def test_sighup_hands_over_to_a_new_process(start_server: StartServer) -> None:
    """SIGHUP: a new pid serves on the same port; the pid file changes before the old exits."""
    server = start_server()
    old = server.wait_serving()
    port = server.port  # asked for port 0: the successor must keep it
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(http_get, port, "/sleep?seconds=2")
        wait_until(lambda: "request /sleep started" in server.log(), "the slow request")
        server.signal(signal.SIGHUP)
        new = server.wait_handover(old)
        assert is_running(old), "the pid file must name the successor before the old exits"
        assert answering_pid(http_get(port)[1]) == new
        status, body = slow.result()
    assert (status, answering_pid(body)) == (200, old)
    assert server.wait_exit(old) == 0
    assert f"[pid {new}] listening on tcp 127.0.0.1:{port}" in server.log()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(new) == 0
    assert not server.pid_file.exists()
    assert children() == []


def test_successor_crashing_at_import_leaves_the_old_serving(start_server: StartServer) -> None:
    """A successor that exits before ready is reported; the old copy serves on."""
    server = start_server()
    old = server.wait_serving()
    server.deploy("crash-at-import")
    server.signal(signal.SIGHUP)
    wait_until(lambda: "restart failed, still serving" in server.log(), "the rollback")
    assert "exited with status 3 before it was ready" in server.log()
    assert server.serving_pid() == old
    assert answering_pid(http_get(server.port)[1]) == old
    (crashed,) = successor_pids(server)
    assert not is_running(crashed)
    server.deploy("ok")
    server.signal(signal.SIGHUP)
    new = server.wait_handover(old)
    assert answering_pid(http_get(server.port)[1]) == new
    assert server.wait_exit(old) == 0
    server.signal(signal.SIGTERM)
    assert server.wait_exit(new) == 0


def test_restart_call_returns_the_new_pid_or_raises(start_server: StartServer) -> None:
    """gr.restart() answers synchronously: the error of a failed restart, or the new pid."""
    server = start_server("--kind", "echo")
    old = server.wait_serving()
    server.deploy("crash-at-import")
    answer = echo_line(server.port, b"restart\n")
    assert answer.startswith(f"{old} failed SuccessorExitedError:")
    assert "status 3" in answer
    server.deploy("ok")
    answer = echo_line(server.port, b"restart\n")
    new = server.wait_handover(old)
    assert answer == f"{old} restarted {new}\n"
    assert echo_line(server.port, b"hi\n") == f"{new} hi\n"
    assert server.wait_exit(old) == 0
    server.signal(signal.SIGTERM)
    assert server.wait_exit(new) == 0


def test_successor_never_ready_is_killed_after_ready_timeout(start_server: StartServer) -> None:
    """A successor that hangs before ready is killed at ready_timeout; the old serves on."""
    server = start_server("--ready-timeout", "2")
    old = server.wait_serving()
    server.deploy("hang-before-ready")
    server.signal(signal.SIGHUP)
    wait_until(lambda: "was not ready within 2s: killed it" in server.log(), "the timeout")
    (hung,) = successor_pids(server)
    assert not is_running(hung)
    assert server.serving_pid() == old
    assert answering_pid(http_get(server.port)[1]) == old
    server.signal(signal.SIGTERM)
    assert server.wait_exit(old) == 0
    assert children() == []


def test_sighup_burst_starts_one_restart(start_server: StartServer) -> None:
    """A burst of SIGHUPs to the serving process starts exactly one successor."""
    server = start_server("--ready-timeout", "30")
    old = server.wait_serving()
    for _ in range(20):
        server.signal(signal.SIGHUP, old)
    new = server.wait_handover(old)
    assert server.wait_exit(old) == 0
    assert successor_pids(server) == [new]
    assert answering_pid(http_get(server.port)[1]) == new
    server.signal(signal.SIGTERM)
    assert server.wait_exit(new) == 0


def test_sigterm_during_a_restart_stops_the_successor(start_server: StartServer) -> None:
    """SIGTERM while a successor starts: the successor is killed, the old drains and exits."""
    server = start_server("--ready-timeout", "120")
    old = server.wait_serving()
    server.deploy("hang-before-ready")
    server.signal(signal.SIGHUP)
    wait_until(lambda: successor_pids(server), "the successor to start")
    wait_until(lambda: "taking over from" in server.log(), "the successor to run")
    (successor,) = successor_pids(server)
    server.signal(signal.SIGTERM, old)
    assert server.wait_exit(old) == 0
    wait_until(lambda: not is_running(successor), "the successor to be killed")
    assert "restart abandoned: shutting down" in server.log()
    assert not server.pid_file.exists()
    assert children() == []


def test_successor_comes_up_when_the_old_is_killed_mid_restart(start_server: StartServer) -> None:
    """SIGKILL of the old copy while the successor starts: the successor still serves."""
    server = start_server()
    old = server.wait_serving()
    port = server.port
    server.signal(signal.SIGHUP)
    wait_until(lambda: successor_pids(server), "the successor to start")
    server.signal(signal.SIGKILL, old)
    (successor,) = successor_pids(server)
    assert server.wait_handover(old) == successor
    assert answering_pid(http_get(port)[1]) == successor
    server.signal(signal.SIGTERM)
    assert server.wait_exit(successor) == 0


def test_unclaimed_inherited_listener_is_kept_reported_and_closed_on_request(
    start_server: StartServer,
) -> None:
    """A listener the successor does not open is kept and reported, closed when asked."""
    server = start_server("--kind", "echo")
    old = server.wait_serving()
    port = server.port
    server.deploy("listen-elsewhere")
    server.signal(signal.SIGHUP)
    new = server.wait_handover(old)
    assert server.wait_exit(old) == 0
    kept = "inherited listener tcp:127.0.0.1:0 is not opened (yet): it is kept"
    wait_until(lambda: kept in server.log(), "the report")
    elsewhere = int(re.findall(r"listening on tcp 127\.0\.0\.1:(\d+)", server.log())[-1])
    assert echo_line(elsewhere, b"close-unclaimed\n") == f"{new} closed ['tcp:127.0.0.1:0']\n"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=60).close()
    server.signal(signal.SIGTERM, new)
    assert server.wait_exit(new) == 0


def test_unix_listener_is_handed_over_and_unlinked_on_the_final_stop(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A unix socket survives restarts (same file) and is removed only on the last stop."""
    path = tmp_path / "echo.sock"
    server = start_server("--kind", "echo", "--unix", str(path))
    first = server.wait_serving()
    inode = path.stat().st_ino

    def ask(line: bytes) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            sock.connect(str(path))
            sock.sendall(line)
            return sock.recv(4096).decode()

    with socket.socket(socket.AF_UNIX) as held:  # a connection open across the restart
        held.settimeout(60)
        held.connect(str(path))
        assert ask(b"a\n") == f"{first} a\n"
        server.signal(signal.SIGHUP)
        second = server.wait_handover(first)
        assert path.stat().st_ino == inode
        assert ask(b"b\n") == f"{second} b\n"
        held.sendall(b"c\n")
        assert held.recv(4096).decode() == f"{first} c\n"
    assert server.wait_exit(first) == 0
    assert path.stat().st_ino == inode
    server.signal(signal.SIGTERM)
    assert server.wait_exit(second) == 0
    assert not path.exists()


def test_reexec_keeps_dash_m_working_directory_and_environment(start_server: StartServer) -> None:
    """The successor runs ``python -m`` the same way, in the same directory and environment."""
    server = start_server(
        command=[sys.executable, "-m", "tests.apps.server"],
        cwd=ROOT,
        env={"GRACEFUL_TEST_MARK": "kept"},
    )
    old = server.wait_serving()
    server.signal(signal.SIGHUP)
    new = server.wait_handover(old)
    cmdline = Path(f"/proc/{new}/cmdline").read_bytes().split(b"\0")
    assert cmdline[:3] == [sys.executable.encode(), b"-m", b"tests.apps.server"]
    assert os.readlink(f"/proc/{new}/cwd") == str(ROOT)
    environ = Path(f"/proc/{new}/environ").read_bytes().split(b"\0")
    assert b"GRACEFUL_TEST_MARK=kept" in environ
    assert server.wait_exit(old) == 0
    server.signal(signal.SIGTERM, new)
    assert server.wait_exit(new) == 0


def _signal_set(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.MULTILINE)
    assert match
    return int(match.group(1), 16)


def _bit(sig: signal.Signals) -> int:
    return 1 << (sig - 1)


def test_successor_gets_only_its_fds_and_default_signals(
    start_server: StartServer, tmp_path: Path
) -> None:
    """No stray inherited fd reaches the successor; ignored signals are reset, mask empty."""
    marker = tmp_path / "leaked-marker"
    marker.touch()
    leaked = os.open(marker, os.O_RDONLY)  # inheritable in the first generation
    os.set_inheritable(leaked, True)
    try:
        # The first generation starts with SIGUSR2 ignored and the marker fd open, as a
        # careless parent process would leave them.
        server = start_server(
            command=["/bin/sh", "-c", 'trap "" USR2; exec "$@"', "sh", sys.executable, SERVER],
            pass_fds=(leaked,),
        )
    finally:
        os.close(leaked)
    old = server.wait_serving()
    assert _signal_set(old, "SigIgn") & _bit(signal.SIGUSR2)
    assert any(
        os.path.realpath(f"/proc/{old}/fd/{fd}") == str(marker)
        for fd in os.listdir(f"/proc/{old}/fd")
    )
    server.signal(signal.SIGHUP)
    new = server.wait_handover(old)
    targets = [os.path.realpath(f"/proc/{new}/fd/{fd}") for fd in os.listdir(f"/proc/{new}/fd")]
    assert str(marker) not in targets
    assert not _signal_set(new, "SigIgn") & _bit(signal.SIGUSR2)
    assert _signal_set(new, "SigBlk") == 0
    assert _signal_set(new, "SigCgt") & _bit(signal.SIGHUP)  # handled, not default
    assert server.wait_exit(old) == 0
    server.signal(signal.SIGTERM, new)
    assert server.wait_exit(new) == 0


@pytest.mark.parametrize("generations", [3])
def test_each_generation_knows_its_number_and_predecessor(
    start_server: StartServer, generations: int
) -> None:
    """Generation numbers count up and each successor names its predecessor in the log."""
    server = start_server()
    pids = [server.wait_serving()]
    for _ in range(generations - 1):
        server.signal(signal.SIGHUP)
        pids.append(server.wait_handover(pids[-1]))
        server.wait_exit(pids[-2])
    log = server.log()
    for number, (before, after) in enumerate(itertools.pairwise(pids), start=2):
        assert f"[pid {after}] generation {number}, taking over from {before}" in log
    server.signal(signal.SIGTERM)
    assert server.wait_exit(pids[-1]) == 0
