"""The keeper: a process with a stable pid runs the demo app and restarts it on SIGHUP.

Every test starts ``python -m graceful_restart_trio.keeper --pid-file <keeper.pid> --
python tests/apps/server.py --pid-file <app.pid> ...``: the keeper's own pid file must
never change, the application's follows the serving generation.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from ._load import Client, EchoOneShot, HttpOneShot, start_clients
from .conftest import (
    SERVER,
    Server,
    answering_pid,
    children,
    http_get,
    is_running,
    open_fds,
    wait_until,
)

StartServer = Callable[..., Server]

RESTARTS = 10
CAP = 100_000
"""Requests per load client at most: far more than a run makes, a bound if one runs away."""


def start_keeper(
    start_server: StartServer,
    tmp_path: Path,
    *args: str,
    keeper_options: Sequence[str] = (),
    app: Sequence[str] = (sys.executable, str(SERVER)),
    **kwargs: object,
) -> Server:
    """The keeper running the test server; ``args`` go to the server, after its own."""
    pid_file = keeper_pid_file(tmp_path)
    command = [
        sys.executable,
        "-m",
        "graceful_restart_trio.keeper",
        "--pid-file",
        str(pid_file),
        *keeper_options,
        "--",
        *app,
    ]
    server = start_server(*args, command=command, **kwargs)
    wait_until(
        lambda: read_pid(pid_file) == server.first.pid, f"the keeper's pid file\n{server.log()}"
    )
    return server


def keeper_pid_file(tmp_path: Path) -> Path:
    return tmp_path / "keeper.pid"


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state, ppid, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def children_of(pid: int, *, zombies: bool) -> list[int]:
    """The children of ``pid``: only the zombies, or only the live ones."""
    found = []
    for entry in os.listdir("/proc"):
        fields = _stat(int(entry)) if entry.isdigit() else None
        if fields and int(fields[1]) == pid and (fields[0] == "Z") == zombies:
            found.append(int(entry))
    return found


def generation_pids(server: Server, number: int) -> list[int]:
    """The pids the keeper says it started as generation ``number``."""
    return [int(pid) for pid in re.findall(rf"generation {number} pid (\d+) started", server.log())]


def exited_with(server: Server, pid: int, status: int) -> bool:
    return f"pid {pid} exited with status {status}" in server.log()


@pytest.mark.parametrize(("kind", "client"), [("http", HttpOneShot), ("echo", EchoOneShot)])
def test_restarts_under_load_lose_no_request(
    start_server: StartServer, tmp_path: Path, kind: str, client: type[Client]
) -> None:
    """10 SIGHUPs to the keeper under load: all answered, a new app pid each, same keeper."""
    server = start_keeper(
        start_server, tmp_path, "--kind", kind, keeper_options=["--probation", "0.5"]
    )
    keeper = server.first.pid
    pids = [server.wait_serving()]
    port = server.port
    serving = f"generation 1 pid {pids[0]} serving"  # it holds the listener from now on
    wait_until(lambda: serving in server.log(), "the keeper to take the listener")
    keeper_fds = open_fds(keeper)
    load = start_clients([(f"new-connection-{n}", client) for n in (1, 2, 3)], port, CAP)
    with load:
        for _ in range(RESTARTS):
            old, answered = pids[-1], load.requests()
            wait_until(lambda: load.requests() > answered + 5, "requests before the restart")  # noqa: B023
            os.kill(keeper, signal.SIGHUP)
            new = server.wait_serving(other_than=old)
            assert parent(new) == keeper
            assert read_pid(keeper_pid_file(tmp_path)) == keeper
            pids.append(new)
        answered = load.requests()
        wait_until(lambda: load.requests() > answered + 5, "requests after the last restart")
    failed = [failure for tally in load.tallies for failure in tally.failures]
    assert not failed, "\n".join(failed)
    assert {pid for tally in load.tallies for pid in tally.pids} <= set(pids)
    assert len(set(pids)) == RESTARTS + 1
    for old in pids[:-1]:
        wait_until(lambda: exited_with(server, old, 0), f"pid {old} to drain")  # noqa: B023
    wait_until(lambda: not children_of(keeper, zombies=True), "the keeper to reap")
    assert children_of(keeper, zombies=False) == [pids[-1]]
    assert open_fds(keeper) == keeper_fds, "the keeper's fds grew"
    assert "restart failed" not in server.log()
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0
    assert not keeper_pid_file(tmp_path).exists()
    assert not server.pid_file.exists()
    assert children() == []


def test_sigterm_to_the_keeper_drains_and_exits_with_the_app_status(
    start_server: StartServer, tmp_path: Path
) -> None:
    """SIGTERM to the keeper: the app drains a request in flight, the keeper exits 0."""
    server = start_keeper(start_server, tmp_path)
    keeper = server.first.pid
    app = server.wait_serving()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(http_get, server.port, "/sleep?seconds=1")
        wait_until(lambda: "request /sleep started" in server.log(), "the slow request")
        os.kill(keeper, signal.SIGTERM)
        status, body = slow.result()
    assert (status, answering_pid(body)) == (200, app)
    assert server.wait_exit(keeper) == 0
    log = server.log()
    assert f"passing SIGTERM on to generation 1 pid {app}" in log
    assert f"pid {app} exited with status 0" in log
    assert not server.pid_file.exists()
    assert not keeper_pid_file(tmp_path).exists()
    assert children() == []


@pytest.mark.parametrize(
    ("deploy", "status"),
    [("crash-at-import", 3), ("exit-after-ready", 4)],
)
def test_the_keeper_exits_with_the_status_of_an_app_that_exits_by_itself(
    start_server: StartServer, tmp_path: Path, deploy: str, status: int
) -> None:
    """The first generation never ready, or the serving one exiting: the keeper exits too."""
    server = start_keeper(start_server, tmp_path, deploy=deploy)
    assert server.wait_exit(server.first.pid) == status
    assert f"exited with status {status}" in server.log()
    assert not keeper_pid_file(tmp_path).exists()
    assert children() == []


def test_crashing_new_generation_leaves_the_old_serving(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A new generation that crashes at import: the old serves on; the next deploy works."""
    server = start_keeper(start_server, tmp_path)
    keeper = server.first.pid
    old = server.wait_serving()
    server.deploy("crash-at-import")
    os.kill(keeper, signal.SIGHUP)
    wait_until(
        lambda: f"restart failed: generation 1 pid {old} serves on" in server.log(), "rollback"
    )
    (crashed,) = generation_pids(server, 2)
    assert f"successor {crashed} exited with status 3 before it was ready" in server.log()
    assert not Path(f"/proc/{crashed}").exists(), "the keeper reaps it"
    assert server.serving_pid() == old
    assert answering_pid(http_get(server.port)[1]) == old
    server.deploy("ok")
    os.kill(keeper, signal.SIGHUP)
    new = server.wait_handover(old)
    assert generation_pids(server, 3) == [new]
    assert answering_pid(http_get(server.port)[1]) == new
    wait_until(lambda: exited_with(server, old, 0), "the old generation to drain")
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0
    assert children() == []


def test_new_generation_never_ready_is_killed_after_the_ready_timeout(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A new generation that hangs before ready: its session is killed, the old serves on."""
    server = start_keeper(start_server, tmp_path, keeper_options=["--ready-timeout", "2"])
    keeper = server.first.pid
    old = server.wait_serving()
    server.deploy("hang-before-ready")
    os.kill(keeper, signal.SIGHUP)
    wait_until(lambda: "was not ready within 2s: killed it" in server.log(), "timeout")
    wait_until(lambda: "restart failed" in server.log(), "the rollback")
    assert children_of(keeper, zombies=False) == [old]
    assert server.serving_pid() == old
    assert answering_pid(http_get(server.port)[1]) == old
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0
    assert children() == []


def test_sigterm_during_a_restart_stops_both_generations(
    start_server: StartServer, tmp_path: Path
) -> None:
    """SIGTERM while a new generation starts: it is killed, no handover, the old drains."""
    server = start_keeper(start_server, tmp_path)
    keeper = server.first.pid
    old = server.wait_serving()
    server.deploy("hang-before-ready")
    os.kill(keeper, signal.SIGHUP)
    wait_until(lambda: generation_pids(server, 2), "the new generation to start")
    (new,) = generation_pids(server, 2)
    wait_until(lambda: f"[pid {new}] listening on" in server.log(), "it to open its listeners")
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0
    assert exited_with(server, old, 0)
    assert not is_running(new)
    assert "abandoning the restart under way" in server.log()
    assert "handed over" not in server.log()
    assert not server.pid_file.exists()
    assert children() == []


def test_new_generation_serves_when_the_old_is_killed_mid_restart(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The serving generation SIGKILLed during a restart: the new one still takes over."""
    server = start_keeper(start_server, tmp_path)
    keeper = server.first.pid
    old = server.wait_serving()
    os.kill(keeper, signal.SIGHUP)
    wait_until(lambda: generation_pids(server, 2), "the new generation to start")
    os.kill(old, signal.SIGKILL)
    (new,) = generation_pids(server, 2)
    assert server.wait_handover(old) == new
    assert answering_pid(http_get(server.port)[1]) == new
    assert exited_with(server, old, -9)
    assert read_pid(keeper_pid_file(tmp_path)) == keeper
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0
    assert children() == []


def test_sighup_to_the_app_is_passed_on_to_the_keeper(
    start_server: StartServer, tmp_path: Path
) -> None:
    """SIGHUP sent to the app itself restarts through the keeper."""
    server = start_keeper(start_server, tmp_path)
    keeper = server.first.pid
    old = server.wait_serving()
    server.signal(signal.SIGHUP, old)
    new = server.wait_handover(old)
    assert parent(new) == keeper
    assert f"[pid {old}] SIGHUP: passing it on to the keeper {keeper}" in server.log()
    assert answering_pid(http_get(server.port)[1]) == new
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0
    assert children() == []


def test_the_keeper_adopts_and_reaps_orphans(start_server: StartServer, tmp_path: Path) -> None:
    """A process the app orphans becomes the keeper's child and is reaped when it exits."""
    app = ["/bin/sh", "-c", '(sleep 300 &); exec "$@"', "sh", sys.executable, str(SERVER)]
    server = start_keeper(start_server, tmp_path, keeper_options=["--log-level", "debug"], app=app)
    keeper = server.first.pid
    serving = server.wait_serving()

    def orphans() -> list[int]:
        return [pid for pid in children_of(keeper, zombies=False) if pid != serving]

    (orphan,) = wait_until(orphans, "the orphan to be adopted")
    assert Path(f"/proc/{orphan}/comm").read_text().strip() == "sleep"
    os.kill(orphan, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{orphan}").exists(), "the orphan to be reaped")
    assert f"reaped {orphan} (status -15)" in server.log()
    assert not children_of(keeper, zombies=True)
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0
    assert children() == []


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """systemd's notify socket, telling the sender's pid of each datagram."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        receiver.setblocking(False)
        yield path, receiver


def notifications(receiver: socket.socket) -> list[tuple[int, dict[str, str]]]:
    """Every datagram waiting: (sender pid, fields)."""
    received: list[tuple[int, dict[str, str]]] = []
    while True:
        try:
            data, ancillary, _, _ = receiver.recvmsg(4096, socket.CMSG_SPACE(12))
        except BlockingIOError:
            return received
        (pid,) = [struct.unpack("iII", d)[0] for _, kind, d in ancillary if kind == 2]
        lines = data.decode().splitlines()
        received.append((pid, dict(line.split("=", 1) for line in lines)))


def test_the_keeper_is_the_systemd_main_process(
    start_server: StartServer, tmp_path: Path, notify_socket: tuple[str, socket.socket]
) -> None:
    """Under systemd only the keeper notifies: READY, RELOADING then READY, STOPPING."""
    path, receiver = notify_socket
    server = start_keeper(start_server, tmp_path, env={"NOTIFY_SOCKET": path})
    keeper = server.first.pid
    old = server.wait_serving()
    assert b"NOTIFY_SOCKET" not in Path(f"/proc/{old}/environ").read_bytes()
    os.kill(keeper, signal.SIGHUP)
    server.wait_serving(other_than=old)
    wait_until(lambda: "handed over" in server.log(), "the handover")
    os.kill(keeper, signal.SIGTERM)
    assert server.wait_exit(keeper) == 0
    received = notifications(receiver)
    assert {pid for pid, _ in received} == {keeper}
    kinds = [next(iter(fields)) for _, fields in received]
    assert kinds == ["READY", "RELOADING", "READY", "STOPPING"], received
    reloading = received[1][1]
    assert int(reloading["MONOTONIC_USEC"]) > 0


@pytest.mark.parametrize(
    ("command", "status"), [("missing", 127), ("not-executable", 126)], ids=["127", "126"]
)
def test_a_command_that_cannot_start_exits_as_a_shell_would(
    tmp_path: Path, command: str, status: int
) -> None:
    """127: not found (ENOENT, as the launcher reports it); 126: found but not runnable."""
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    keeper = subprocess.run(
        [sys.executable, "-m", "graceful_restart_trio.keeper", "--", str(tmp_path / command)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert keeper.returncode == status, keeper.stderr


def test_a_generation_inherits_the_environment_but_the_keepers_systemd_variables(
    start_server: StartServer, tmp_path: Path
) -> None:
    """NOTIFY_SOCKET and socket activation's LISTEN_* are the keeper's own; the
    application's own variables (LISTEN_PORT, say) pass."""
    server = start_keeper(
        start_server,
        tmp_path,
        env={"LISTEN_PORT": "8080", "WATCHDOG_USEC": "30000000", "NOTIFY_SOCKET": "@nowhere"},
    )
    generation = server.wait_serving()
    environ = Path(f"/proc/{generation}/environ").read_bytes().split(b"\0")
    assert b"LISTEN_PORT=8080" in environ
    assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_USEC="))]
    server.signal(signal.SIGTERM, server.first.pid)
    assert server.wait_exit(server.first.pid) == 0
