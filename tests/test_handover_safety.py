"""The handover after "ready": probation, the commit point, and the faults a review found.

Each test pins one behaviour with real server processes (``tests/apps/server.py``), real
signals and clients on 127.0.0.1: a successor that dies on probation is rolled back with
nothing refused; a shutdown at any point of a restart leaves one consistent story; an
error on the restart path never kills a serving process; processes are named by pidfd;
a listener opened late keeps its socket; what a rollback kills, and what a stranger
cannot make a process do.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from ._load import EchoOneShot, HttpKeepAlive, HttpOneShot, start_clients
from .conftest import (
    SERVER,
    Server,
    answering_pid,
    children,
    echo_line,
    http_get,
    is_running,
    wait_until,
)
from .test_control import status
from .test_keeper import keeper_pid_file, read_pid, start_keeper
from .test_systemd_integration import NotifyRecorder, notify

StartServer = Callable[..., Server]
CAP = 100_000

__all__ = ["notify"]  # the fixture, used by name


def failures(load: object) -> list[str]:
    return [failure for tally in load.tallies for failure in tally.failures]  # type: ignore[attr-defined]


def successor_of(server: Server, old: int) -> int:
    """The pid of the successor ``old`` started (from its log)."""
    found = wait_until(
        lambda: re.search(rf"\[pid {old}\] successor (\d+) started", server.log()),
        f"pid {old} to start a successor",
    )
    return int(found.group(1))


# -- 1. probation -------------------------------------------------------------------------


def test_successor_exiting_on_probation_is_rolled_back_under_load(
    start_server: StartServer,
) -> None:
    """Successor exits 0.2 s after ready: 0 failed requests, the old serves again."""
    server = start_server("--probation", "3")
    old = server.wait_serving()
    load = start_clients(
        [("new-connection", HttpOneShot), ("keep-alive", HttpKeepAlive)], server.port, CAP
    )
    with load:
        wait_until(lambda: load.requests() > 20, "requests before the restart")
        server.deploy("quit-after-ready")
        server.signal(signal.SIGHUP, old)
        wait_until(lambda: "accepting again" in server.log(), f"the rollback\n{server.log()}")
        before = load.requests()
        wait_until(lambda: load.requests() > before + 50, "requests after the rollback")
    assert failures(load) == []
    assert "stopped serving during its probation" in server.log()
    assert server.serving_pid() == old, "the pid file named the old copy all along"
    assert answering_pid(http_get(server.port)[1]) == old
    server.deploy("ok")
    server.signal(signal.SIGHUP, old)
    assert server.wait_handover(old) != old


def test_restart_call_raises_when_the_successor_dies_on_probation(
    start_server: StartServer,
) -> None:
    """``await gr.restart()`` raises SuccessorExitedError naming the signal; serving goes on."""
    server = start_server("--kind", "echo", "--probation", "3")
    old = server.wait_serving()
    server.deploy("die-after-ready")
    answer = echo_line(server.port, b"restart\n")
    assert answer.startswith(f"{old} failed SuccessorExitedError: successor "), answer
    assert "exited with signal SIGKILL during its probation" in answer
    assert echo_line(server.port, b"still\n") == f"{old} still\n"


def test_successor_killed_on_probation_refuses_nothing(start_server: StartServer) -> None:
    """Successor SIGKILLed on probation: only what it held is lost; no connection refused."""
    server = start_server("--probation", "3")
    old = server.wait_serving()
    load = start_clients([("new-connection", HttpOneShot)], server.port, CAP)
    with load:
        server.deploy("die-after-ready")
        server.signal(signal.SIGHUP, old)
        wait_until(lambda: "accepting again" in server.log(), f"the rollback\n{server.log()}")
        before = load.requests()
        wait_until(lambda: load.requests() > before + 50, "requests after the rollback")
    assert [f for f in failures(load) if "Refused" in f] == []
    assert answering_pid(http_get(server.port)[1]) == old


def test_no_main_pid_before_the_probation_ends(
    start_server: StartServer, notify: NotifyRecorder
) -> None:
    """systemd hears MAINPID= only once the probation is over, never while it runs."""
    server = start_server(
        "--kind", "echo", "--probation", "2", env={"NOTIFY_SOCKET": notify.address}
    )
    old = server.first.pid
    notify.wait_for_datagram("READY")
    server.signal(signal.SIGHUP, old)
    wait_until(lambda: "is on probation" in server.log(), "the probation")
    assert not [d for d in notify.drain() if "MAINPID" in d.fields]
    handover = notify.wait_for_handover()
    log = server.log()
    assert log.index("is on probation") < log.index("handed over to successor")
    assert handover.pid == old
    server.signal(signal.SIGTERM, int(handover.fields["MAINPID"]))


def test_the_keeper_rolls_back_a_generation_dying_on_probation(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Under the keeper: the old generation resumes, 0 failed requests, same keeper."""
    server = start_keeper(start_server, tmp_path, keeper_options=["--probation", "3"])
    keeper = server.first.pid
    old = server.wait_serving()
    load = start_clients(
        [("new-connection", HttpOneShot), ("keep-alive", HttpKeepAlive)], server.port, CAP
    )
    with load:
        wait_until(lambda: load.requests() > 20, "requests before the restart")
        server.deploy("quit-after-ready")
        os.kill(keeper, signal.SIGHUP)
        wait_until(lambda: "the keeper's new generation died" in server.log(), "the resume")
        before = load.requests()
        wait_until(lambda: load.requests() > before + 50, "requests after the resume")
    assert failures(load) == []
    assert f"restart failed: generation 1 pid {old} serves on" in server.log()
    assert answering_pid(http_get(server.port)[1]) == old
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0
    assert children() == []


def test_a_restart_asked_for_during_the_probation_follows_it(start_server: StartServer) -> None:
    """SIGHUP while a successor is on probation: carried out by that successor afterwards."""
    server = start_server("--kind", "echo", "--probation", "2")
    first = server.wait_serving()
    server.signal(signal.SIGHUP, first)
    wait_until(lambda: "is on probation" in server.log(), "the probation")
    server.signal(signal.SIGHUP, first)
    second = server.wait_handover(first)
    third = server.wait_handover(second)
    assert len({first, second, third}) == 3
    assert "a restart will follow the one under way" in server.log()
    assert echo_line(server.port, b"hi\n") == f"{third} hi\n"


# -- 2. the commit is atomic ------------------------------------------------------------


def test_shutdown_during_the_probation_stops_the_successor_gracefully(
    start_server: StartServer, notify: NotifyRecorder
) -> None:
    """SIGTERM to the old copy on probation: no MAINPID=, the successor drains, both exit 0."""
    server = start_server(
        "--kind", "echo", "--probation", "30", env={"NOTIFY_SOCKET": notify.address}
    )
    old = server.first.pid
    notify.wait_for_datagram("READY")
    server.signal(signal.SIGHUP, old)
    wait_until(lambda: "is on probation" in server.log(), "the probation")
    new = successor_of(server, old)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as held:
        held.sendall(b"x\n")
        assert held.recv(100) == f"{new} x\n".encode()  # the successor holds a connection
        server.signal(signal.SIGTERM, old)
        wait_until(lambda: f"[pid {new}] SIGTERM received" in server.log(), "the successor told")
        held.sendall(b"y\n")
        assert held.recv(100) == f"{new} y\n".encode(), "its connection is drained, not cut"
    assert server.wait_exit(old) == 0
    wait_until(lambda: not is_running(new), "the successor to exit")
    assert not [d for d in notify.drain() if "MAINPID" in d.fields]
    assert "illegal state transition" not in server.log()
    assert [d.pid for d in notify.saying("STOPPING")] == [old]
    assert not server.pid_file.exists()


# -- 3. errors are isolated -------------------------------------------------------------


def test_running_out_of_fds_fails_the_restart_not_the_server(start_server: StartServer) -> None:
    """EMFILE on the restart path is a SuccessorStartError; the server answers on."""
    server = start_server("--kind", "echo")
    pid = server.wait_serving()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"fill-fds\n")
        assert sock.recv(100).startswith(f"{pid} filled".encode())
        sock.sendall(b"restart\n")
        answer = sock.recv(1000).decode()
        assert answer.startswith(f"{pid} failed SuccessorStartError"), answer
        os.kill(pid, signal.SIGHUP)  # the signal path too
        wait_until(lambda: server.log().count("restart failed, still serving") == 2, "failure")
        sock.sendall(b"free-fds\n")
        assert sock.recv(100) == f"{pid} freed\n".encode()
    assert echo_line(server.port, b"alive\n") == f"{pid} alive\n"


def test_sighup_with_the_keeper_gone_keeps_the_app_serving(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The keeper SIGKILLed: a SIGHUP to the app is reported, never kills it."""
    server = start_keeper(start_server, tmp_path)
    keeper = server.first.pid
    app = server.wait_serving()
    os.kill(keeper, signal.SIGKILL)
    server.wait_exit(keeper)
    server.signal(signal.SIGHUP, app)
    wait_until(lambda: f"the keeper {keeper} is gone" in server.log(), "the report")
    assert answering_pid(http_get(server.port)[1]) == app
    server.signal(signal.SIGTERM, app)
    server.wait_exit(app)


def test_the_keeper_refuses_a_ready_with_a_non_socket(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A generation that passes a pipe with ready is not ready: killed, the old serves on."""
    server = start_keeper(start_server, tmp_path)
    keeper = server.first.pid
    old = server.wait_serving()
    server.deploy("ready-with-a-pipe")
    os.kill(keeper, signal.SIGHUP)
    wait_until(lambda: "restart failed" in server.log(), f"the rollback\n{server.log()}")
    assert "is not a socket" in server.log()
    assert answering_pid(http_get(server.port)[1]) == old
    assert is_running(keeper)
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0
    assert children() == []


def test_the_keeper_passes_other_signals_on(start_server: StartServer, tmp_path: Path) -> None:
    """SIGUSR1 to the keeper reaches the serving generation; the keeper lives on."""
    server = start_keeper(start_server, tmp_path)
    keeper = server.first.pid
    app = server.wait_serving()
    os.kill(keeper, signal.SIGUSR1)
    wait_until(lambda: f"[pid {app}] SIGUSR1 received" in server.log(), "the app to get it")
    assert is_running(keeper)
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0


# -- 4. pidfds ------------------------------------------------------------------------------


def test_a_successor_that_never_served_does_not_wait_for_its_predecessor(
    start_server: StartServer,
) -> None:
    """A successor leaving open() before ready fails the restart at once, not at its deadline."""
    server = start_server("--drain-timeout", "600")
    old = server.wait_serving()
    server.deploy("return-before-ready")
    server.signal(signal.SIGHUP, old)
    wait_until(lambda: "restart failed, still serving" in server.log(), "the failure")
    new = successor_of(server, old)
    assert f"[pid {new}] waiting for predecessor" not in server.log()
    assert answering_pid(http_get(server.port)[1]) == old


# -- 5. listeners opened late ---------------------------------------------------------------


def test_a_listener_opened_late_keeps_its_socket(start_server: StartServer, tmp_path: Path) -> None:
    """A listener opened after the first one serves is inherited, never rebound."""
    control = tmp_path / "control.sock"
    server = start_server("--kind", "echo", "--late-port", "0", "--control", str(control))
    old = server.wait_serving()
    late = int(
        wait_until(
            lambda: re.findall(r"listening on tcp 127\.0\.0\.1:(\d+)", server.log())[1:],
            "the late listener",
        )[0]
    )
    load = start_clients([("late-1", EchoOneShot), ("late-2", EchoOneShot)], late, CAP)
    pids = [old]
    with load:
        for _ in range(3):
            server.signal(signal.SIGHUP, pids[-1])
            pids.append(server.wait_handover(pids[-1]))
        server.wait_exit(pids[-2])
    # The copy in charge opened "late" at the port the first copy bound: a socket held
    # there throughout, so it can only be the inherited one, never a new bind.
    now = status(control)
    assert now["pid"] == pids[-1]
    assert now["listeners"] == [
        {"name": "graceful-restart-control", "address": str(control)},
        {"name": "tcp:127.0.0.1:0", "address": f"127.0.0.1:{server.port}"},
        {"name": "late", "address": f"127.0.0.1:{late}"},
    ]
    assert failures(load) == []
    assert echo_line(late, b"hi\n") == f"{pids[-1]} hi\n"
    assert f"listening on tcp 127.0.0.1:{late}" in server.log()


# -- 6. the smaller findings ----------------------------------------------------------------


def test_a_rollback_kills_helpers_in_sessions_of_their_own(start_server: StartServer) -> None:
    """What a failed successor started in another session dies with it."""
    server = start_server()
    old = server.wait_serving()
    server.deploy("helper-then-crash")
    server.signal(signal.SIGHUP, old)
    wait_until(lambda: "restart failed, still serving" in server.log(), "the rollback")
    helper = int(Path(f"{server.deploy_file}.helper").read_text())
    wait_until(lambda: not is_running(helper), f"helper {helper} to be killed")


def test_a_unix_socket_file_removed_by_hand_does_not_break_restarts(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Someone removed the socket file by hand: restarts still work."""
    path = tmp_path / "echo.sock"
    server = start_server("--kind", "echo", "--unix", str(path))
    old = server.wait_serving()
    path.unlink()
    server.signal(signal.SIGHUP, old)
    new = server.wait_handover(old)
    assert new != old
    assert "restart failed" not in server.log()


def test_an_abstract_unix_listener_restarts(start_server: StartServer) -> None:
    """A listener in the abstract namespace is handed over like any other."""
    name = f"\0graceful-test-{os.getpid()}"
    server = start_server("--kind", "echo", "--unix", "@" + name[1:])
    old = server.wait_serving()

    def ask() -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            sock.connect(name)
            sock.sendall(b"hi\n")
            return sock.recv(100).decode()

    assert ask() == f"{old} hi\n"
    server.signal(signal.SIGHUP, old)
    new = server.wait_handover(old)
    assert ask() == f"{new} hi\n"


def test_a_stranger_cannot_hand_sockets_over(start_server: StartServer, tmp_path: Path) -> None:
    """A handover variable whose channel and pidfd lead elsewhere is refused, naming why."""
    ours, theirs = socket.socketpair()
    pidfd = os.pidfd_open(os.getpid())
    with ours, theirs:
        os.dup2(theirs.fileno(), 200)
        os.dup2(pidfd, 201)
        os.close(pidfd)
        variable = (
            '{"version":1,"generation":2,"predecessor":1,"channel":200,"pidfd":201,'
            '"listeners":[],"socket_files":[]}'
        )
        server = start_server(env={"GRACEFUL_RESTART_TRIO": variable}, pass_fds=(200, 201))
        os.close(200)
        os.close(201)
        assert server.wait_exit(server.first.pid) == 1
    assert "not handed over by our predecessor" in server.log()


def test_the_keeper_leaves_no_pid_file_when_notify_socket_is_malformed(tmp_path: Path) -> None:
    """A bad NOTIFY_SOCKET stops the keeper before it writes its pid file."""
    import subprocess  # noqa: PLC0415 - only here

    pid_file = keeper_pid_file(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "graceful_restart_trio.keeper",
            "--pid-file",
            str(pid_file),
            "--",
            sys.executable,
            str(SERVER),
            "--pid-file",
            str(tmp_path / "app.pid"),
        ],
        env={**os.environ, "NOTIFY_SOCKET": "relative/path"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "NOTIFY_SOCKET must be an absolute path" in result.stderr
    assert read_pid(pid_file) is None
    assert not pid_file.exists()


def test_keeper_stop_during_a_probation_tells_each_generation_once(
    start_server: StartServer, tmp_path: Path
) -> None:
    """SIGTERM to the keeper during a probation: each generation drains, none is cut short."""
    server = start_keeper(start_server, tmp_path, keeper_options=["--probation", "30"])
    keeper = server.first.pid
    old = server.wait_serving()
    os.kill(keeper, signal.SIGHUP)
    wait_until(lambda: "is on probation" in server.log(), "the probation")
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0
    log = server.log()
    assert f"[pid {old}] SIGTERM received" in log
    assert "SIGTERM received again" not in log
    assert "cutting the drain short" not in log
    assert children() == []


def test_the_keeper_leaves_no_unix_socket_file_behind(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Under the keeper, a generation's unix socket file is removed on the final stop."""
    path = tmp_path / "echo.sock"
    server = start_keeper(start_server, tmp_path, "--kind", "echo", "--unix", str(path))
    keeper = server.first.pid
    old = server.wait_serving()
    os.kill(keeper, signal.SIGHUP)
    server.wait_handover(old)
    assert path.exists()
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0
    assert not path.exists()


def test_a_fifo_from_systemd_is_a_socket_activation_error(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A ListenFIFO= fd passed as LISTEN_FDS: SocketActivationError naming the fd."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR)
    try:
        command = ["/bin/bash", "-c", f'LISTEN_PID=$$ exec "$@" 3<&{fd} {fd}<&-', "bash"]
        command += [sys.executable, str(SERVER)]
        server = start_server(command=command, env={"LISTEN_FDS": "1"}, pass_fds=(fd,))
    finally:
        os.close(fd)
    assert server.wait_exit(server.first.pid) == 1
    assert "SocketActivationError: systemd passed fd 3" in server.log()
    assert "not a socket" in server.log()
