"""The probation only ever makes a restart safer: it never turns a healthy one into an outage.

A server in 0.1's plainest style (``tests/apps/plain.py``: its accept loop under
``gr.accepting()``, its ``open()`` body ending with the loop) stops serving for good the
moment it stops accepting for a successor's probation. Stopping that successor would
leave nobody serving, so the handover commits at once. Each test restarts a real server
under load with the default probation (5 s) and asserts on the timeline each old copy
recorded (``last_restart`` in the pid file's record), the exit statuses, and every
request's answer.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ._load import CLIENT_TIMEOUT, HttpKeepAlive, HttpOneShot, LogTail, start_clients
from .conftest import Server, answering_pid, children, http_get, wait_until
from .test_keeper import start_keeper

StartServer = Callable[..., Server]

PLAIN = [sys.executable, str(Path(__file__).parent / "apps" / "plain.py")]
CAP = 200_000
LOAD = [
    ("new-connection-1", HttpOneShot),
    ("new-connection-2", HttpOneShot),
    ("new-connection-3", HttpOneShot),
    ("new-connection-4", HttpOneShot),
    ("keep-alive-1", HttpKeepAlive),
    ("keep-alive-2", HttpKeepAlive),
]


def reached(tail: LogTail, count: int) -> bool:
    return tail.update() >= count


def last_restart(pid_file: Path) -> dict[str, Any]:
    """The last restart's timeline, from the record beside the pid file."""
    record = json.loads(pid_file.with_name(pid_file.name + ".json").read_text())
    last: dict[str, Any] = record["last_restart"]
    return last


def restart_under_load(server: Server, restarts: int) -> tuple[list[int], list[dict[str, Any]]]:
    """SIGHUP the serving copy ``restarts`` times under load, a slow request in flight at
    each; return the pids that served and each restart's timeline. Asserts that no request
    failed and that every slow request was answered by the copy it started on."""
    pids = [server.wait_serving()]
    timelines = []
    sleeps = LogTail(server.log_path, "request /sleep started")
    slow = []
    load = start_clients(LOAD, server.port, CAP)
    with load, concurrent.futures.ThreadPoolExecutor(2) as pool:
        for index in range(restarts):
            old = pids[-1]
            slow.append(
                (old, pool.submit(http_get, server.port, "/sleep?seconds=1", CLIENT_TIMEOUT))
            )
            wait_until(partial(reached, sleeps, index + 1), "the slow request to start")
            server.signal(signal.SIGHUP, old)
            pids.append(server.wait_serving(other_than=old))
            assert server.wait_exit(old) == 0, server.log()
            timelines.append(last_restart(server.pid_file))
        load.stop()
        answers = [(old, request.result()) for old, request in slow]
    failed = [failure for tally in load.tallies for failure in tally.failures]
    assert failed == [], "\n".join(failed)
    assert all(tally.requests > 0 for tally in load.tallies), load.tallies
    assert [(status, answering_pid(body)) for _, (status, body) in answers] == [
        (200, old) for old, _ in answers
    ]
    return pids, timelines


def test_the_plain_style_restarts_ten_times_under_load_with_the_default_probation(
    start_server: StartServer,
) -> None:
    server = start_server(command=PLAIN)
    pids, timelines = restart_under_load(server, 10)
    assert len(set(pids)) == 11
    for old, new, timeline in zip(pids[:-1], pids[1:], timelines, strict=True):
        assert (timeline["outcome"], timeline["successor"]) == ("committed", new)
        # Committed early, because the old copy stopped serving: not after 5 s.
        assert list(timeline["phases"]) == [
            "spawned",
            "ready",
            "stopped accepting",
            "probation cut short",
            "committed",
            "draining",
        ], timeline
        assert timeline["probation"] == 5.0
        own = [line for line in server.log().splitlines() if f"[pid {old}]" in line]
        assert any(
            "stopped serving during the probation: committing early; no fallback" in line
            for line in own
        ), "\n".join(own)
    last = pids[-1]
    server.signal(signal.SIGTERM, last)
    assert server.wait_exit(last) == 0
    assert children() == []


def test_a_body_that_raises_during_the_probation_commits_and_raises(
    start_server: StartServer,
) -> None:
    """The body's exception still propagates (exit 1, its traceback logged), but only
    after the handover committed: the successor serves on."""
    server = start_server("--raise-when-done", command=PLAIN)
    old = server.wait_serving()
    server.signal(signal.SIGHUP, old)
    new = server.wait_serving(other_than=old)
    assert server.wait_exit(old) == 1
    assert "BodyError: the body failed after its accept loop ended" in server.log()
    timeline = last_restart(server.pid_file)
    assert (timeline["outcome"], timeline["successor"]) == ("committed", new)
    assert "probation cut short" in timeline["phases"]
    status, body = http_get(server.port)
    assert (status, answering_pid(body)) == (200, new)
    server.signal(signal.SIGTERM, new)
    assert server.wait_exit(new) == 1  # the same app: its body raises once it is done


def test_under_the_keeper_a_generation_that_stops_during_the_probation_commits_early(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_keeper(start_server, tmp_path, app=PLAIN)
    keeper = server.first.pid
    first = server.wait_serving()
    load = start_clients(LOAD, server.port, CAP)
    generations = [first]
    with load:
        for _ in range(3):
            old = generations[-1]
            server.signal(signal.SIGHUP, keeper)
            generations.append(server.wait_serving(other_than=old))
            wait_until(partial(server.exited, old), f"generation pid {old} to exit")
        load.stop()
    failed = [failure for tally in load.tallies for failure in tally.failures]
    assert failed == [], "\n".join(failed)
    timeline = last_restart(tmp_path / "keeper.pid")
    assert timeline["outcome"] == "committed"
    assert "probation cut short" in timeline["phases"], timeline
    keeper_log = [line for line in server.log().splitlines() if f"[keeper {keeper}]" in line]
    early = [line for line in keeper_log if "during the probation: committing early" in line]
    assert len(early) == 3, "\n".join(keeper_log)
    server.signal(signal.SIGTERM, keeper)
    assert server.wait_exit(keeper) == 0
    assert children() == []


def test_a_body_that_ends_while_the_successor_starts_waits_and_commits(
    start_server: StartServer,
) -> None:
    """The old copy stops serving as the restart begins, 1 s before its successor is
    ready: it waits for it and commits the moment it is ready, rather than kill it."""
    server = start_server("--end-on-restart", "--ready-delay", "1", command=PLAIN)
    old = server.wait_serving()
    server.signal(signal.SIGHUP, old)
    new = server.wait_serving(other_than=old)
    assert server.wait_exit(old) == 0
    timeline = last_restart(server.pid_file)
    assert (timeline["outcome"], timeline["successor"]) == ("committed", new)
    assert list(timeline["phases"])[:5] == [
        "spawned",
        "ready",
        "stopped accepting",
        "probation cut short",
        "committed",
    ]
    assert (
        f"[pid {old}] this process stopped serving while its successor starts: committing "
        "as soon as it is ready; no fallback"
    ) in server.log()
    status, body = http_get(server.port)
    assert (status, answering_pid(body)) == (200, new)
    server.signal(signal.SIGTERM, new)
    assert server.wait_exit(new) == 0
