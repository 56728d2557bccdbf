"""Under a real systemd: reloads, stops, crashes, rollbacks, the watchdog and the keeper.

Each test boots systemd as PID 1 of private namespaces (``tests/_real_systemd.py``), runs
the test server as a service of the unit recommended in ``docs/deploy.md``, and drives it
with ``systemctl`` under continuous client load on 127.0.0.1 with slow requests in flight.
What systemd itself does (whom it waits for, whom it kills, what it takes for a failure)
is what these tests are about: a fake notify socket cannot tell.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from ._load import CLIENT_TIMEOUT, HttpKeepAlive, HttpOneShot, Load, LogTail, start_clients
from ._real_systemd import Machine, boot, fetch
from .conftest import ROOT, SERVER, answering_pid, free_port, http_get, wait_until

CAP = 100_000
UNIT = "app.service"
SLOW = 3.0
"""Seconds a slow request takes: long enough to be in flight across a reload or a stop."""


def service(
    port: int,
    directory: Path,
    *,
    extra: str = "",
    keeper: str | None = None,
    kind: str = "notify",
    options: str = "",
    kill: str = "KillMode=mixed\nExitType=cgroup",
    reload: str = "/bin/kill -HUP $MAINPID",
) -> str:
    """The unit of docs/deploy.md, running the test server on ``port``.

    ``keeper``: run it under the keeper, with these keeper options.
    """
    command = (
        f"{sys.executable} {SERVER} --port {port} --pid-file {directory}/app.pid "
        f"--deploy-file {directory}/deploy --drain-timeout 20 --probation 0.5 {options}"
    )
    if keeper is not None:
        command = f"{sys.executable} -m graceful_restart_trio.keeper {keeper} -- {command}"
    return f"""[Unit]
DefaultDependencies=no

[Service]
Type={kind}
ExecStart={command}
ExecReload={reload}
NotifyAccess=main
{kill}
TimeoutStopSec=40
Restart=on-failure
RestartSec=100ms
WorkingDirectory={ROOT}
Environment=PYTHONUNBUFFERED=1
StandardOutput=append:{directory}/app.log
StandardError=inherit
{extra}
"""


REPORT: list[str] = []
"""One line per test: what it saw (printed at the end of the run, see conftest)."""
LOADS: list[Load] = []


@pytest.fixture
def machine(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Machine]:
    """A real systemd, booted for this test and gone after it; its figures reported."""
    LOADS.clear()
    overlay = (
        request.getfixturevalue("systemd_254") if "notify_reload" in request.node.name else None
    )
    with boot(tmp_path, overlay) as booted:
        booted_version = booted.version()
        yield booted
    tallies = [tally for load in LOADS for tally in load.tallies]
    sent = sum(tally.requests + len(tally.failures) for tally in tallies)
    failed = sum(len(tally.failures) for tally in tallies)
    stops = ", ".join(f"{seconds:.2f} s" for seconds in booted.stops) or "none"
    pids = " -> ".join(map(str, booted.main_pids)) or "-"
    REPORT.append(
        f"{request.node.name} ({booted_version}): MainPID {pids}; "
        f"load requests {sent}, failed {failed}; systemctl stop took {stops}"
    )


def start(machine: Machine, tmp_path: Path, unit: str = UNIT, **options: object) -> int:
    """Write the unit, start it, and return the port it serves on."""
    port = free_port()
    machine.write_unit(unit, service(port, tmp_path, **options))  # type: ignore[arg-type]
    machine.systemctl("daemon-reload")
    machine.systemctl("start", unit)
    wait_until(partial(answers, port), "the service to answer")
    return port


def answers(port: int) -> bool:
    """Whether the service answers a request on ``port`` now."""
    try:
        return http_get(port, "/", 5)[0] == 200
    except OSError:
        return False


def log(tmp_path: Path) -> str:
    path = tmp_path / "app.log"
    return path.read_text(errors="replace") if path.exists() else ""


def slow_requests(
    pool: concurrent.futures.ThreadPoolExecutor, port: int, count: int
) -> list[concurrent.futures.Future[tuple[int, str]]]:
    return [
        pool.submit(http_get, port, f"/sleep?seconds={SLOW}", CLIENT_TIMEOUT) for _ in range(count)
    ]


def wait_started(tail: LogTail, count: int) -> None:
    wait_until(lambda: tail.update() >= count, f"{count} slow requests to start")


def load(port: int) -> Load:
    """Continuous load on ``port``: a client on new connections, one on keep-alive."""
    clients = start_clients(
        [("new-connection", HttpOneShot), ("keep-alive", HttpKeepAlive)], port, CAP
    )
    LOADS.append(clients)
    return clients


def more_requests(traffic: Load, when: str, count: int = 20) -> None:
    """Wait until ``count`` more requests were answered."""
    before = traffic.requests()
    wait_until(lambda: traffic.requests() > before + count, f"{count} requests {when}")


def failures(load: Load) -> list[str]:
    return [failure for tally in load.tallies for failure in tally.failures]


def wait_main_pid(machine: Machine, other_than: int | None, unit: str = UNIT) -> int:
    def moved() -> int | None:
        pid = machine.main_pid(unit)
        return pid if pid is not None and pid != other_than else None

    return wait_until(moved, f"MainPID of {unit} to move from {other_than}\n{machine.console()}")


def state(machine: Machine, unit: str = UNIT) -> dict[str, str]:
    return machine.show(unit, "ActiveState", "SubState", "Result", "NRestarts", "StatusText")


def test_five_reloads_under_load_move_main_pid_and_lose_nothing(
    machine: Machine, tmp_path: Path
) -> None:
    """``systemctl reload`` five times under load: MainPID follows, 0 failed, status serving."""
    port = start(machine, tmp_path)
    pids = [machine.main_pid(UNIT)]
    sleeps = LogTail(tmp_path / "app.log", "request /sleep started")
    traffic = load(port)
    slow = []
    with traffic, concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            slow += [(pids[-1], request) for request in slow_requests(pool, port, 1)]
            wait_started(sleeps, len(slow))
            machine.systemctl("reload", UNIT)
            pids.append(wait_main_pid(machine, pids[-1]))
            wait_until(lambda: state(machine)["StatusText"].startswith("serving"), "status")
        traffic.stop()
        outcomes = [(old, request.result()) for old, request in slow]
    assert failures(traffic) == []
    assert sum(tally.requests for tally in traffic.tallies) > 0
    assert len(set(pids)) == 6
    namespace_pids = [
        int(p) for p in re.findall(r"\[pid (\d+)\] serving \(generation", log(tmp_path))
    ]
    assert [status for _, (status, _) in outcomes] == [200] * 5
    assert [answering_pid(body) for _, (_, body) in outcomes] == namespace_pids[:5]
    current = state(machine)
    assert current["ActiveState"] == "active", current
    assert current["StatusText"] == f"serving: generation 6 (pid {namespace_pids[-1]})"
    assert "not our child" not in machine.console()


def test_stop_after_reloads_drains_a_slow_request(machine: Machine, tmp_path: Path) -> None:
    """After reloads, ``systemctl stop`` drains the request in flight: no SIGKILL."""
    port = start(machine, tmp_path)
    main = machine.main_pid(UNIT)
    for _ in range(2):
        machine.systemctl("reload", UNIT)
        main = wait_main_pid(machine, main)
    sleeps = LogTail(tmp_path / "app.log", "request /sleep started")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        (request,) = slow_requests(pool, port, 1)
        wait_started(sleeps, 1)
        began = time.monotonic()
        machine.systemctl("stop", UNIT)
        took = time.monotonic() - began
        status, _ = request.result()
    assert status == 200
    assert "SIGKILL" not in machine.console()
    assert state(machine)["ActiveState"] == "inactive"
    assert state(machine)["Result"] == "success"
    assert took < 20, took  # the drain, not TimeoutStopSec
    assert "drained" in log(tmp_path)


def test_exec_reload_with_the_cli_returns_the_outcome(machine: Machine, tmp_path: Path) -> None:
    """``ExecReload=graceful-restart restart --control``: ``systemctl reload`` returns once
    the handover committed, and fails when the restart failed (the unit serves on)."""
    control = tmp_path / "control.sock"
    cli = f"{sys.executable} -m graceful_restart_trio.cli restart --control {control}"
    port = start(machine, tmp_path, options=f"--control {control}", reload=cli)
    main = machine.main_pid(UNIT)
    machine.systemctl("reload", UNIT)
    assert wait_main_pid(machine, main) != main
    main = machine.main_pid(UNIT)
    (tmp_path / "deploy").write_text("crash-at-import")
    output = machine.systemctl("reload", UNIT, check=False)
    assert "Job for app.service failed" in output, output
    assert machine.main_pid(UNIT) == main
    assert state(machine)["ActiveState"] == "active"
    assert answers(port)


def test_a_crash_of_the_new_main_fails_the_unit_and_restarts_it(
    machine: Machine, tmp_path: Path
) -> None:
    """The new main dies after a reload: the unit fails and Restart=on-failure brings it back."""
    port = start(machine, tmp_path)
    first = machine.main_pid(UNIT)
    machine.systemctl("reload", UNIT)
    second = wait_main_pid(machine, first)
    wait_until(lambda: state(machine)["StatusText"].startswith("serving"), "the handover")
    os.kill(second, 9)
    wait_until(lambda: state(machine)["NRestarts"] == "1", f"a restart\n{machine.console()}")
    third = wait_main_pid(machine, second)
    assert third not in (first, second)
    wait_until(partial(answers, port), "the restarted service to answer")
    assert state(machine)["ActiveState"] == "active"


def test_a_successor_that_dies_on_probation_is_rolled_back(
    machine: Machine, tmp_path: Path
) -> None:
    """The successor exits just after ready: MainPID stays, the unit stays active, 0 failed."""
    port = start(machine, tmp_path)
    main = machine.main_pid(UNIT)
    (tmp_path / "deploy").write_text("exit-after-ready")
    traffic = load(port)
    with traffic:
        machine.systemctl("reload", UNIT)
        wait_until(lambda: "restart failed, still serving" in log(tmp_path), "the rollback")
        wait_until(lambda: traffic.requests() > 50, "requests after the rollback")
    assert failures(traffic) == []
    assert machine.main_pid(UNIT) == main
    current = state(machine)
    assert current["ActiveState"] == "active", current
    assert "restart failed" in current["StatusText"]
    (tmp_path / "deploy").write_text("ok")
    machine.systemctl("reload", UNIT)
    wait_main_pid(machine, main)


def test_the_watchdog_follows_the_main_pid_across_reloads(machine: Machine, tmp_path: Path) -> None:
    """WatchdogSec= holds across reloads; a stopped main fires it and the unit restarts."""
    start(machine, tmp_path, extra="WatchdogSec=2")
    main = machine.main_pid(UNIT)
    for _ in range(2):
        machine.systemctl("reload", UNIT)
        main = wait_main_pid(machine, main)
    deadline = time.monotonic() + 5  # more than two watchdog periods: it must stay quiet
    while time.monotonic() < deadline:
        assert state(machine)["NRestarts"] == "0", machine.console()
        time.sleep(0.2)
    assert main is not None
    os.kill(main, 19)  # SIGSTOP: no more pings
    wait_until(lambda: "Watchdog timeout" in machine.console(), "the watchdog to fire")
    wait_until(lambda: state(machine)["NRestarts"] == "1", "the restart")


def answered_by_other(port: int, pid: int) -> bool:
    return answering_pid(http_get(port)[1]) != pid


def test_the_keeper_unit_reloads_and_stops_cleanly(machine: Machine, tmp_path: Path) -> None:
    """The keeper as the unit's main process: reloads keep MainPID, stop drains."""
    port = start(machine, tmp_path, keeper="--probation 0.5")
    main = machine.main_pid(UNIT)
    sleeps = LogTail(tmp_path / "app.log", "request /sleep started")
    traffic = load(port)
    keeper_pids = []
    with traffic, concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            answering = answering_pid(http_get(port)[1])
            machine.systemctl("reload", UNIT)
            wait_until(partial(answered_by_other, port, answering), "a new generation")
            keeper_pids.append(machine.main_pid(UNIT))
        (request,) = slow_requests(pool, port, 1)
        wait_started(sleeps, 1)
        traffic.stop()
        machine.systemctl("stop", UNIT)
        status, _ = request.result()
    assert failures(traffic) == []
    assert status == 200
    assert machine.main_pid(UNIT) is None
    assert main is not None
    assert keeper_pids == [main] * 3
    assert state(machine)["Result"] == "success", log(tmp_path) + machine.console()
    assert "SIGKILL" not in machine.console()


def test_the_keeper_unit_with_two_workers_rolls_and_stops_cleanly(
    machine: Machine, tmp_path: Path
) -> None:
    """``--workers 2`` as the unit's main process: each reload rolls both workers under
    load (MainPID stays the keeper), stop drains both."""
    port = start(machine, tmp_path, keeper="--probation 0.5 --workers 2")
    main = machine.main_pid(UNIT)
    app_log = tmp_path / "app.log"
    sleeps = LogTail(app_log, "request /sleep started")
    traffic = load(port)
    with traffic, concurrent.futures.ThreadPoolExecutor(4) as pool:
        for roll in (1, 2, 3):
            machine.systemctl("reload", UNIT)
            wait_until(
                lambda: app_log.read_text().count("handed over from worker 1 ") == roll,  # noqa: B023
                f"roll {roll} to replace both workers",
            )
            assert machine.main_pid(UNIT) == main
        requests = slow_requests(pool, port, 2)
        wait_started(sleeps, 2)
        traffic.stop()
        machine.systemctl("stop", UNIT)
        statuses = [request.result()[0] for request in requests]
    assert failures(traffic) == []
    assert statuses == [200, 200]
    assert app_log.read_text().count("handed over from worker 0 ") == 3
    assert state(machine)["Result"] == "success", log(tmp_path) + machine.console()
    assert "SIGKILL" not in machine.console()


def test_the_fd_store_keeps_the_queue_across_systemctl_restart(
    machine: Machine, tmp_path: Path
) -> None:
    """With the fd store, ``systemctl restart`` under load refuses no connection."""
    port = start(machine, tmp_path, extra="FileDescriptorStoreMax=4", options="--fd-store")
    first = machine.main_pid(UNIT)
    machine.systemctl("reload", UNIT)
    main = wait_main_pid(machine, first)
    traffic = load(port)
    with traffic:
        wait_until(lambda: traffic.requests() > 20, "requests before the restart")
        for _ in range(2):
            machine.systemctl("restart", UNIT)
            main = wait_main_pid(machine, main)
            more_requests(traffic, "after the restart")
    assert failures(traffic) == []
    assert int(machine.show(UNIT, "NFileDescriptorStore")["NFileDescriptorStore"]) == 1
    assert "Address already in use" not in log(tmp_path)


def test_socket_activation_then_reload_then_restart(machine: Machine, tmp_path: Path) -> None:
    """A socket-activated service: reloads hand the socket over, restarts get it from systemd."""
    port = free_port()
    machine.write_unit(
        "app.socket",
        f"[Unit]\nDefaultDependencies=no\n[Socket]\nListenStream=127.0.0.1:{port}\n"
        "FileDescriptorName=web\nService=app.service\n",
    )
    machine.write_unit(UNIT, service(port, tmp_path, extra="Requires=app.socket"))
    machine.systemctl("daemon-reload")
    machine.systemctl("start", "app.socket")
    traffic = load(port)  # the first request starts the service
    with traffic:
        wait_until(lambda: traffic.requests() > 20, f"the service to answer\n{machine.console()}")
        main = machine.main_pid(UNIT)
        machine.systemctl("reload", UNIT)
        main = wait_main_pid(machine, main)
        more_requests(traffic, "after the reload")
        machine.systemctl("restart", UNIT)
        wait_main_pid(machine, main)
        more_requests(traffic, "after the restart")
    assert failures(traffic) == []
    assert "generation 2, taking over" in log(tmp_path)
    assert state(machine, "app.socket")["ActiveState"] == "active"


def answering(traffic: Load) -> set[int]:
    return {pid for tally in traffic.tallies for pid in tally.pids}


def test_socket_activation_with_two_workers(machine: Machine, tmp_path: Path) -> None:
    """A socket-activated keeper with ``--workers 2``: both workers accept on systemd's
    socket, and a reload rolls them under load."""
    port = free_port()
    machine.write_unit(
        "app.socket",
        f"[Unit]\nDefaultDependencies=no\n[Socket]\nListenStream=127.0.0.1:{port}\n"
        "FileDescriptorName=web\nService=app.service\n",
    )
    keeper = "--probation 0.5 --workers 2"
    machine.write_unit(UNIT, service(port, tmp_path, keeper=keeper, extra="Requires=app.socket"))
    machine.systemctl("daemon-reload")
    machine.systemctl("start", "app.socket")
    traffic = load(port)  # the first request starts the service
    with traffic:
        wait_until(lambda: traffic.requests() > 20, f"the service to answer\n{machine.console()}")
        both = wait_until(
            lambda: answering(traffic) if len(answering(traffic)) == 2 else None,
            "both workers to answer on systemd's socket",
        )
        machine.systemctl("reload", UNIT)
        wait_until(
            lambda: log(tmp_path).count("handed over from worker 1 ") == 1, "the roll to finish"
        )
        more_requests(traffic, "after the reload")
    assert failures(traffic) == []
    assert len(answering(traffic) - both) >= 2, "both new workers answered too"
    machine.systemctl("stop", UNIT)
    assert state(machine)["Result"] == "success", log(tmp_path) + machine.console()


@pytest.mark.parametrize(
    "kill",
    [
        "KillMode=mixed\nExitType=cgroup",
        "KillMode=mixed\nExitType=main",
        "KillMode=control-group\nExitType=main",
    ],
    ids=["mixed-cgroup", "mixed-main", "control-group-main"],
)
def test_stop_drains_every_generation(machine: Machine, tmp_path: Path, kill: str) -> None:
    """``systemctl stop`` with a slow request on each of three generations: all complete."""
    port = start(machine, tmp_path, kill=kill)
    main = machine.main_pid(UNIT)
    sleeps = LogTail(tmp_path / "app.log", "request /sleep started")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        slow = []
        for generation in range(3):
            slow += slow_requests(pool, port, 1)
            wait_started(sleeps, len(slow))
            if generation < 2:
                machine.systemctl("reload", UNIT)
                main = wait_main_pid(machine, main)
        machine.systemctl("stop", UNIT)
        outcomes = [request.result()[0] for request in slow]
    assert outcomes == [200, 200, 200], machine.console()
    assert "SIGKILL" not in machine.console()
    assert state(machine)["Result"] == "success"


@pytest.fixture(scope="session")
def systemd_254(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """systemd 254 from Debian's bookworm-backports, unpacked (not installed)."""
    return fetch("bookworm-backports", tmp_path_factory.mktemp("systemd-254"))


def test_notify_reload_returns_once_the_successor_is_main(machine: Machine, tmp_path: Path) -> None:
    """Type=notify-reload (systemd 254): reload returns with MainPID moved, or rolled back."""
    assert machine.version().startswith("systemd 254"), machine.version()
    port = start(machine, tmp_path, kind="notify-reload", extra="ExecReload=")
    main = machine.main_pid(UNIT)
    traffic = load(port)
    with traffic:
        for _ in range(3):
            machine.systemctl("reload", UNIT)  # returns once READY=1 came: the commit
            moved = machine.main_pid(UNIT)
            assert moved not in (None, main), machine.console()
            assert state(machine)["StatusText"].startswith("serving: generation")
            main = moved
        (tmp_path / "deploy").write_text("quit-after-ready")
        machine.systemctl("reload", UNIT)  # the rollback answers it too
        assert machine.main_pid(UNIT) == main
        assert "restart failed" in state(machine)["StatusText"]
        more_requests(traffic, "after the rollback")
    assert failures(traffic) == []
    assert state(machine)["ActiveState"] == "active"


@pytest.mark.parametrize("workers", [1, 2])
def test_the_keeper_keeps_the_queue_across_systemctl_restart(
    machine: Machine, tmp_path: Path, workers: int
) -> None:
    """The keeper with the fd store (and its workers): ``systemctl restart`` under load
    refuses nothing."""
    keeper = f"--probation 0.5 --fd-store --workers {workers}"
    port = start(machine, tmp_path, keeper=keeper, extra="FileDescriptorStoreMax=4")
    main = machine.main_pid(UNIT)
    traffic = load(port)
    with traffic:
        more_requests(traffic, "before the restarts")
        machine.systemctl("reload", UNIT)
        more_requests(traffic, "after the reload")
        for _ in range(2):
            machine.systemctl("restart", UNIT)
            main = wait_main_pid(machine, main)
            more_requests(traffic, "after the restart")
    assert failures(traffic) == []
    assert int(machine.show(UNIT, "NFileDescriptorStore")["NFileDescriptorStore"]) == 1
