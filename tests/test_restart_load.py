"""Acceptance: restarts under continuous client load lose nothing and leave nothing behind.

A real server is restarted again and again with ``kill -HUP`` while client threads
(``tests/_load.py``) keep it busy: new connections, keep-alive connections, long-lived
connections, and slow requests in flight at the moment of each SIGHUP.
"""

from __future__ import annotations

import concurrent.futures
import signal
import socket
from collections.abc import Callable
from functools import partial

from ._load import (
    CLIENT_TIMEOUT,
    EchoLongLived,
    EchoOneShot,
    HttpKeepAlive,
    HttpOneShot,
    LogTail,
    Tally,
    echo,
    echo_connect,
    fds_besides_connections,
    holds_listener,
    listener_inode,
    start_clients,
)
from .conftest import Server, answering_pid, children, http_get, wait_until

StartServer = Callable[..., Server]

RESTARTS = 20
ECHO_RESTARTS = 5
DRAINED_WITHIN = 15.0
"""Seconds an old generation may take to exit once it stopped accepting. Its slowest
request takes 1 s: far more than that means its drain is stuck (until drain_timeout)."""
CAP = 500_000
"""Requests per load client at most: far more than a run makes (a keep-alive client
can pass 50,000 across the twenty restarts and their probations), a bound if one runs away."""


def reached(tail: LogTail, count: int) -> bool:
    return tail.update() >= count


def stopped_accepting(pid: int, inode: str) -> bool:
    return not holds_listener(pid, inode)


def wait_drained(server: Server, pid: int) -> None:
    """Wait (at most DRAINED_WITHIN) for an old generation to exit; reap it if ours."""
    try:
        wait_until(partial(server.exited, pid), f"pid {pid} to drain and exit", DRAINED_WITHIN)
    except AssertionError as error:
        lines = [line for line in server.log().splitlines() if f"[pid {pid}]" in line]
        raise AssertionError(f"{error}; its log:\n" + "\n".join(lines)) from None
    server.wait_exit(pid)


def outcome(request: concurrent.futures.Future[tuple[int, str]]) -> tuple[int, int] | str:
    """(status, answering pid) of a finished ``http_get``, or the error it raised."""
    try:
        status, body = request.result()
    except Exception as error:
        return repr(error)
    return status, answering_pid(body)


def failures(tallies: list[Tally]) -> list[str]:
    return [failure for tally in tallies for failure in tally.failures]


def test_twenty_restarts_under_load_lose_no_request(start_server: StartServer) -> None:
    """20 SIGHUPs under load: every request gets a full 200, no fd or process is left over."""
    server = start_server("--drain-timeout", "30")
    first = server.wait_serving()
    port = server.port
    inode = listener_inode(port)
    pids = [first]
    first_fds = fds_besides_connections(first, inode)
    fds: dict[int, int] = {}  # successor pid -> fds, counted once its predecessor exited
    sleeps = LogTail(server.log_path, "request /sleep started")
    slow: list[tuple[int, concurrent.futures.Future[tuple[int, str]]]] = []
    load = start_clients(
        [
            ("new-connection-1", HttpOneShot),
            ("new-connection-2", HttpOneShot),
            ("new-connection-3", HttpOneShot),
            ("keep-alive-1", HttpKeepAlive),
            ("keep-alive-2", HttpKeepAlive),
        ],
        port,
        CAP,
    )
    with load, concurrent.futures.ThreadPoolExecutor(8) as pool:
        for index in range(RESTARTS):
            old = pids[-1]
            for _ in range(1 + index % 2):
                request = pool.submit(http_get, port, "/sleep?seconds=1", CLIENT_TIMEOUT)
                slow.append((old, request))
            wait_until(partial(reached, sleeps, len(slow)), f"{len(slow)} slow requests started")
            server.signal(signal.SIGHUP, old)
            new = server.wait_serving(other_than=old)
            pids.append(new)
            wait_until(partial(stopped_accepting, old, inode), f"pid {old} to stop accepting")
            if index % 2 == 0 or index == RESTARTS - 1:
                # Half the time, let the old generations finish before the next SIGHUP (the
                # other times they drain side by side), and count the new one's fds.
                for pid in pids[:-1]:
                    wait_drained(server, pid)
                fds[new] = fds_besides_connections(new, inode)
        load.stop()
        slow_outcomes = [(old, outcome(request)) for old, request in slow]
    tallies = load.tallies

    failed = failures(tallies)
    assert not failed, "\n".join(failed)
    assert all(0 < tally.requests < CAP for tally in tallies), tallies
    retries = sum(tally.retries for tally in tallies)
    assert retries <= sum(tally.requests for tally in tallies)
    answered = {pid for tally in tallies for pid in tally.pids}
    assert answered <= set(pids)
    assert [got for old, got in slow_outcomes if got != (200, old)] == []
    assert sleeps.update() == len(slow) == RESTARTS * 3 // 2
    assert len(set(pids)) == RESTARTS + 1
    # Every successor has the same fds; the first start has two less: no handover channel,
    # no pidfd naming a predecessor.
    assert list(fds.values()) == [first_fds + 2] * len(fds), (first_fds, fds)

    last = pids[-1]
    server.signal(signal.SIGTERM, last)
    assert server.wait_exit(last) == 0
    for pid in pids[:-1]:
        wait_drained(server, pid)
    assert set(server.exit_codes.values()) == {0}, server.exit_codes
    log = server.log()
    assert "restart failed" not in log
    assert "deadline passed" not in log
    assert children() == []


def test_long_lived_connections_stay_with_their_generation(start_server: StartServer) -> None:
    """Echo server, 5 SIGHUPs: open connections keep their pid; new ones get the new pid."""
    server = start_server("--kind", "echo", "--drain-timeout", "60")
    first = server.wait_serving()
    port = server.port
    inode = listener_inode(port)
    pids = [first]
    held: list[tuple[int, socket.socket]] = []
    load = start_clients(
        [
            ("new-connection-1", EchoOneShot),
            ("new-connection-2", EchoOneShot),
            ("long-lived-1", EchoLongLived),
            ("long-lived-2", EchoLongLived),
        ],
        port,
        CAP,
    )
    try:
        with load:
            for _ in range(ECHO_RESTARTS):
                old = pids[-1]
                sock = echo_connect(port)
                held.append((echo(sock), sock))
                server.signal(signal.SIGHUP, old)
                new = server.wait_serving(other_than=old)
                pids.append(new)
                wait_until(partial(stopped_accepting, old, inode), f"pid {old} to stop accepting")
                with echo_connect(port) as fresh:
                    assert echo(fresh) == new
                assert [echo(sock) for _, sock in held] == [pid for pid, _ in held]
            assert not any(server.exited(pid) for pid in pids[:-1]), "a drain ended early"
        tallies = load.tallies
        assert [pid for pid, _ in held] == pids[:-1]
    finally:
        for _, sock in held:
            sock.close()

    failed = failures(tallies)
    assert not failed, "\n".join(failed)
    assert all(0 < tally.requests < CAP for tally in tallies), tallies
    assert [set(tally.pids) for tally in tallies[2:]] == [{first}, {first}]
    assert {pid for tally in tallies for pid in tally.pids} <= set(pids)
    for pid in pids[:-1]:  # their last connections closed: the drains end
        server.wait_exit(pid)
    last = pids[-1]
    server.signal(signal.SIGTERM, last)
    assert server.wait_exit(last) == 0
    assert set(server.exit_codes.values()) == {0}, server.exit_codes
    assert len(set(pids)) == ECHO_RESTARTS + 1
    assert "deadline passed" not in server.log()
    assert children() == []
