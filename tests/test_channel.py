"""The handover channel: what a reader keeps, and which socket is one.

A line on the channel is at most ``MAX_LINE`` bytes and costs its reader no more than
that; file descriptors that come where none are expected are closed, whoever sends them
(``LineReader`` over a real socket pair; a generation that sends fds during its
probation, under the keeper and alone: ``tests/apps/chatty.py``). The channel a
successor trusts is one end of a socket pair its predecessor made: a socket connected to
one of the predecessor's unix listeners is refused (a forged copy, started by the test).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import sys
import termios
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from graceful_restart_trio import InheritanceError
from graceful_restart_trio._handover import MAX_LINE, LineReader

from .conftest import Server, answering_pid, echo_line, http_get, is_running, open_fds, wait_until
from .test_keeper import exited_with, generation_pids, keeper_pid_file, read_pid, start_keeper

StartServer = Callable[..., Server]
CHATTY = Path(__file__).resolve().parent / "apps" / "chatty.py"
ENV_VAR = "GRACEFUL_RESTART_TRIO"


def own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def steady_fds(pid: int) -> int:
    """The fds ``pid`` holds for good: the fewest of a few looks (a pid file being
    rewritten, say, holds one for a moment)."""
    return min(open_fds(pid) for _ in range(10))


def unread(fd: int) -> int:
    """Bytes waiting in the receive queue of socket ``fd`` (``FIONREAD``)."""
    answer = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(answer, sys.byteorder)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, LineReader]]:
    """A socket pair: our writing end, and a reader on the other end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = LineReader(trio.socket.from_stdlib_socket(theirs))
    with ours, reader.socket:
        yield ours, reader


def send_with_fds(sock: socket.socket, data: bytes, count: int) -> None:
    """Send ``data`` with ``count`` fds (copies of /dev/null), and close our copies."""
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        socket.send_fds(sock, [data], [null] * count)
    finally:
        os.close(null)


# -- the reader -----------------------------------------------------------------------------


async def test_a_line_past_the_limit_is_refused_having_read_no_more_than_it(
    pair: tuple[socket.socket, LineReader],
) -> None:
    """1 MB without a newline: the reader stops past 64 KB, with the fds it got closed."""
    ours, reader = pair
    before = own_fds()
    writer = trio.socket.from_stdlib_socket(ours.dup())
    sent = 0

    async def write() -> None:
        nonlocal sent
        send_with_fds(ours, b"x", 3)
        sent = 1
        while sent < 1 << 20:
            sent += await writer.send(b"x" * min(65536, (1 << 20) - sent))
        writer.shutdown(socket.SHUT_WR)  # a reader still waiting for a newline gets b""

    with writer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            with pytest.raises(InheritanceError, match=f"a line longer than {MAX_LINE} bytes"):
                await reader.receive()
            nursery.cancel_scope.cancel()
    read = sent - unread(reader.socket.fileno())
    assert MAX_LINE < read <= MAX_LINE + 4096, f"sent {sent}, read {read}"
    assert own_fds() == before, "the fds that came with the line are closed"


async def test_a_line_of_the_limit_is_read_and_one_more_byte_is_refused(
    pair: tuple[socket.socket, LineReader],
) -> None:
    """A line of exactly MAX_LINE bytes is read whole; MAX_LINE + 1 is refused."""
    ours, reader = pair
    ours.sendall(b"a" * MAX_LINE + b"\nshort\n")
    assert await reader.receive() == (b"a" * MAX_LINE, [])
    assert await reader.receive() == (b"short", [])
    ours.sendall(b"b" * (MAX_LINE + 1) + b"\n")
    with pytest.raises(InheritanceError, match="a line longer than"):
        await reader.receive()


async def test_receive_line_closes_the_fds_that_came_with_it(
    pair: tuple[socket.socket, LineReader],
) -> None:
    """Fds sent with a line to ``receive_line`` are closed; the next line reads as usual."""
    ours, reader = pair
    before = own_fds()
    send_with_fds(ours, b"main\n", 10)
    ours.sendall(b"drain 42\n")
    assert await reader.receive_line() == b"main"
    assert own_fds() == before
    assert await reader.receive_line() == b"drain 42"
    ours.shutdown(socket.SHUT_WR)
    assert await reader.receive_line() == b""


async def test_dropping_until_closed_keeps_neither_bytes_nor_fds(
    pair: tuple[socket.socket, LineReader],
) -> None:
    """``drop_until_closed``: fds and an endless line are dropped until the other end closes."""
    ours, reader = pair
    before = own_fds()
    for _ in range(5):
        send_with_fds(ours, b"chatter", 20)
    ours.sendall(b"x" * (2 * MAX_LINE))
    ours.shutdown(socket.SHUT_WR)
    await reader.drop_until_closed()
    assert own_fds() == before


async def test_the_fds_of_each_line_come_with_it(pair: tuple[socket.socket, LineReader]) -> None:
    """``receive`` hands each line the fds sent with it, and only those."""
    ours, reader = pair
    send_with_fds(ours, b"ready []\n", 2)
    ours.sendall(b"main\n")
    line, fds = await reader.receive()
    try:
        assert (line, len(fds)) == (b"ready []", 2)
    finally:
        for fd in fds:
            os.close(fd)
    assert await reader.receive() == (b"main", [])


# -- a generation that says too much ------------------------------------------------------


def test_fds_sent_during_the_probation_are_closed_by_the_keeper(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Under the keeper: 10 x 50 fds sent during the probation leave its fd count as it was."""
    server = start_keeper(
        start_server,
        tmp_path,
        "--talk",
        "fds",
        keeper_options=["--probation", "30"],
        app=[sys.executable, str(CHATTY)],
    )
    keeper = server.first.pid
    old = server.wait_serving()
    wait_until(lambda: f"generation 1 pid {old} serving" in server.log(), "the keeper's sockets")
    before = steady_fds(keeper)
    os.kill(keeper, signal.SIGHUP)
    (new,) = wait_until(lambda: generation_pids(server, 2), "generation 2 to start")
    wait_until(lambda: f"[pid {new}] the other end read 500 fds" in server.log(), "500 fds")
    wait_until(lambda: exited_with(server, new, 0), f"generation 2 to exit\n{server.log()}")
    assert f"restart failed: generation 1 pid {old} serves on" in server.log()
    wait_until(lambda: open_fds(keeper) == before, f"the keeper to have {before} fds again")
    assert echo_line(server.port, b"hi\n") == f"{old} hi\n"
    assert read_pid(keeper_pid_file(tmp_path)) == keeper


def test_fds_sent_during_the_probation_are_closed_by_the_predecessor(
    start_server: StartServer,
) -> None:
    """Alone: 10 x 50 fds a successor sends during its probation leave the old copy's fds."""
    server = start_server("--talk", "fds", command=[sys.executable, str(CHATTY)])
    old = server.wait_serving()
    wait_until(lambda: f"[pid {old}] serving" in server.log(), "the first copy to serve")
    before = steady_fds(old)
    server.signal(signal.SIGHUP, old)
    started = wait_until(
        lambda: re.search(rf"\[pid {old}\] successor (\d+) started", server.log()),
        "the successor",
    )
    new = int(started.group(1))
    wait_until(lambda: f"[pid {new}] the other end read 500 fds" in server.log(), "500 fds")
    wait_until(lambda: "accepting again" in server.log(), f"the rollback\n{server.log()}")
    wait_until(lambda: not is_running(new), "the successor to exit")
    wait_until(lambda: open_fds(old) == before, f"pid {old} to have {before} fds again")
    assert echo_line(server.port, b"hi\n") == f"{old} hi\n"
    assert server.serving_pid() == old


def test_a_generation_writing_without_a_newline_fails_at_once(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A new generation writes bytes and no newline: refused past 64 KB, not at the timeout."""
    server = start_keeper(
        start_server,
        tmp_path,
        "--talk",
        "endless-line",
        keeper_options=["--ready-timeout", "120"],
        app=[sys.executable, str(CHATTY)],
    )
    keeper = server.first.pid
    old = server.wait_serving()
    wait_until(lambda: f"generation 1 pid {old} serving" in server.log(), "the keeper's sockets")
    before = steady_fds(keeper)
    os.kill(keeper, signal.SIGHUP)
    wait_until(lambda: "restart failed" in server.log(), f"the restart to fail\n{server.log()}")
    (new,) = generation_pids(server, 2)
    assert f"a line longer than {MAX_LINE} bytes" in server.log()
    wait_until(lambda: not is_running(new), "generation 2 to be killed")
    wait_until(lambda: open_fds(keeper) == before, f"the keeper to have {before} fds again")
    assert echo_line(server.port, b"hi\n") == f"{old} hi\n"


# -- which socket is a channel ----------------------------------------------------------------


def forge(
    start_server: StartServer, listener: str, variable: dict[str, object], *args: str
) -> Server:
    """Start the test server as a forged successor: ``variable`` names fd 200, a socket
    connected to the unix socket ``listener``, as its channel, and fd 201, a pidfd of
    the process it names, as its pidfd."""
    target = variable.get("keeper") or variable["predecessor"]
    assert isinstance(target, int)
    pidfd = os.pidfd_open(target)
    with socket.socket(socket.AF_UNIX) as connected:
        connected.connect(listener)
        os.dup2(connected.fileno(), 200)
        os.dup2(pidfd, 201)
        os.close(pidfd)
        full = {"version": 1, "channel": 200, "pidfd": 201, "listeners": [], "socket_files": []}
        try:
            return start_server(
                *args, env={ENV_VAR: json.dumps({**full, **variable})}, pass_fds=(200, 201)
            )
        finally:
            os.close(200)
            os.close(201)


def refused(forged: Server, watched: Server, pid: int) -> int:
    """Wait until the forged copy exits or the pid file stops naming ``pid``; its status."""
    wait_until(
        lambda: forged.exited(forged.first.pid) or watched.serving_pid() != pid,
        f"the forged copy to exit\n{forged.log()}",
    )
    assert watched.serving_pid() == pid, f"the forged copy took over\n{forged.log()}"
    status = forged.wait_exit(forged.first.pid)
    assert status is not None
    return status


def test_a_socket_connected_to_the_predecessors_listener_is_not_a_channel(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A forged copy whose channel is connected to the server's unix listener is refused."""
    path = tmp_path / "app.sock"
    server = start_server("--unix", str(path))
    pid = server.wait_serving()
    variable: dict[str, object] = {"generation": 2, "predecessor": pid}
    forged = forge(start_server, str(path), variable, "--pid-file", str(server.pid_file))
    assert refused(forged, server, pid) == 1
    assert f"fd 200 is a connection ('' to '{path}'), not one end of a socket pair" in (
        forged.log()
    )
    assert "InheritanceError" in forged.log()
    assert is_running(pid)


def test_a_socket_connected_to_the_keepers_control_socket_is_not_a_channel(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Under the keeper: a forged generation connected to its control socket is refused."""
    control = tmp_path / "control.sock"
    server = start_keeper(start_server, tmp_path, keeper_options=["--control", str(control)])
    keeper = server.first.pid
    app = server.wait_serving()
    wait_until(control.exists, "the control socket")
    variable: dict[str, object] = {"generation": 2, "predecessor": None, "keeper": keeper}
    forged = forge(start_server, str(control), variable, "--pid-file", str(server.pid_file))
    assert refused(forged, server, app) == 1
    assert "not one end of a socket pair: not handed over by our predecessor" in forged.log()
    assert read_pid(keeper_pid_file(tmp_path)) == keeper
    assert answering_pid(http_get(server.port)[1]) == app
