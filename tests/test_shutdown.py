"""Graceful shutdown of a real server process: SIGTERM, the drain, its deadline, SIGHUP.

The lease counts in the log are the requests in flight (the drain also waits for the
``open()`` body, where ``asgi.serve`` returns after its last connection).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import signal
import socket
from collections.abc import Callable

import pytest

from .conftest import Server, answering_pid, children, http_get, wait_until

StartServer = Callable[..., Server]


def refused(port: int) -> bool:
    """Whether a connection to ``port`` is refused (one that is accepted is closed again)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


def started_requests(server: Server, path: str) -> int:
    return server.log().count(f"request {path} started")


def test_sigterm_drains_requests_in_flight(start_server: StartServer) -> None:
    """SIGTERM: in-flight requests complete, new connections are refused, exit 0."""
    server = start_server("--drain-timeout", "60")
    pid = server.wait_serving()
    port = server.port
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(http_get, port, "/sleep?seconds=1.5") for _ in range(3)]
        wait_until(lambda: started_requests(server, "/sleep") == 3, "3 requests in flight")
        server.signal(signal.SIGTERM)
        wait_until(lambda: "stopped accepting" in server.log(), "the drain to begin")
        # The accept loop closes its listener as it sees the cancellation, an instant
        # after that line: from then on a new connection is refused, not left hanging.
        wait_until(lambda: refused(port), "new connections to be refused")
        results = [future.result() for future in slow]
    assert all(status == 200 for status, _ in results)
    assert {answering_pid(body) for _, body in results} == {pid}
    assert server.wait_exit(pid) == 0
    assert "drained" in server.log()
    assert "deadline passed" not in server.log()
    assert not server.pid_file.exists()
    assert children() == []


def test_request_outliving_the_drain_deadline_is_cancelled(start_server: StartServer) -> None:
    """A request still running at drain_timeout is cancelled; the process exits 0."""
    server = start_server("--drain-timeout", "1")
    pid = server.wait_serving()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(http_get, server.port, "/sleep?seconds=600")
        wait_until(lambda: started_requests(server, "/sleep") == 1, "the request in flight")
        server.signal(signal.SIGTERM)
        assert server.wait_exit(pid, timeout=30) == 0
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            stuck.result()
    assert "drain deadline passed: cancelling 1 lease(s) and the open() body" in server.log()


def test_second_sigterm_cuts_the_drain_short(start_server: StartServer) -> None:
    """A second SIGTERM during the drain ends it at once, long before drain_timeout."""
    server = start_server("--drain-timeout", "600")
    pid = server.wait_serving()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(http_get, server.port, "/sleep?seconds=600")
        wait_until(lambda: started_requests(server, "/sleep") == 1, "the request in flight")
        server.signal(signal.SIGTERM)
        wait_until(lambda: "draining 1 lease(s)" in server.log(), "the drain to begin")
        server.signal(signal.SIGTERM)
        assert server.wait_exit(pid, timeout=30) == 0
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            stuck.result()
    assert "cutting the drain short: cancelling 1 lease(s)" in server.log()


def test_sigint_shuts_down_like_sigterm(start_server: StartServer) -> None:
    """SIGINT (Ctrl-C) is a graceful shutdown too, and exits 0."""
    server = start_server()
    pid = server.wait_serving()
    server.signal(signal.SIGINT)
    assert server.wait_exit(pid) == 0
    assert "SIGINT received" in server.log()


def test_sighup_while_draining_is_ignored(start_server: StartServer) -> None:
    """SIGHUP reaching a draining process neither kills it nor starts a restart."""
    server = start_server("--drain-timeout", "60")
    pid = server.wait_serving()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(http_get, server.port, "/sleep?seconds=1")
        wait_until(lambda: started_requests(server, "/sleep") == 1, "the request in flight")
        server.signal(signal.SIGTERM)
        wait_until(lambda: "draining 1 lease(s)" in server.log(), "the drain to begin")
        for _ in range(5):
            server.signal(signal.SIGHUP, pid)
        assert slow.result()[0] == 200
    assert server.wait_exit(pid) == 0
    assert "SIGHUP ignored: cannot restart while draining" in server.log()
    assert "successor" not in server.log()


def test_sighup_before_ready_does_not_kill(start_server: StartServer) -> None:
    """SIGHUP while the process is still starting is ignored; it goes on to serve."""
    server = start_server(deploy="hang-before-ready")
    wait_until(lambda: "listening on tcp" in server.log(), "the listener")
    for _ in range(5):
        server.signal(signal.SIGHUP, server.first.pid)
    wait_until(
        lambda: "SIGHUP ignored: cannot restart while starting" in server.log(),
        "the signal to be seen",
    )
    assert server.first.poll() is None
    server.signal(signal.SIGTERM, server.first.pid)
    assert server.wait_exit(server.first.pid) == 0


def test_answers_come_from_the_serving_pid(start_server: StartServer) -> None:
    """The demo answers 200 with the pid of the process that served the request."""
    server = start_server()
    pid = server.wait_serving()
    status, body = http_get(server.port)
    assert status == 200
    assert answering_pid(body) == pid
    assert http_get(server.port, "/nowhere")[0] == 404
    assert http_get(server.port, "/sleep?seconds=x")[0] == 400
    server.signal(signal.SIGTERM)
    assert server.wait_exit(pid) == 0
