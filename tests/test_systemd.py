"""Specification of the systemd client: notify, socket activation, watchdog."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from graceful_restart_trio import _systemd
from graceful_restart_trio._exceptions import InheritanceError, SocketActivationError
from graceful_restart_trio._systemd import (
    InheritedSocket,
    Notifier,
    listen_fds,
    monotonic_usec,
    run_watchdog,
    watchdog_interval,
)

PID = 4242


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound to a path, as systemd's notify socket would be."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(5)
        yield path, receiver


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound to an abstract address, returned in ``@name`` form."""
    name = f"graceful-restart-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        yield "@" + name, receiver


def drain(receiver: socket.socket) -> list[bytes]:
    """Return every datagram waiting on ``receiver`` without blocking."""
    receiver.setblocking(False)
    datagrams = []
    while True:
        try:
            datagrams.append(receiver.recv(4096))
        except BlockingIOError:
            return datagrams


# --- monotonic_usec ------------------------------------------------------------------------


def test_monotonic_usec_is_the_kernel_monotonic_clock_in_microseconds() -> None:
    """monotonic_usec reads CLOCK_MONOTONIC, in microseconds."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    now = monotonic_usec()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= now <= after


# --- Notifier ------------------------------------------------------------------------------


def test_send_to_a_path_delivers_one_datagram_of_lines_in_order(
    path_receiver: tuple[str, socket.socket],
) -> None:
    """A message arrives as one UTF-8 datagram of KEY=VALUE lines in insertion order."""
    path, receiver = path_receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier is not None
    try:
        notifier.send({"READY": 1, "STATUS": "serving €", "MAINPID": 17})
        assert receiver.recv(4096) == "READY=1\nSTATUS=serving €\nMAINPID=17\n".encode()
    finally:
        notifier.close()


def test_send_to_an_abstract_address_delivers_the_datagram(
    abstract_receiver: tuple[str, socket.socket],
) -> None:
    """A leading '@' in NOTIFY_SOCKET means the abstract namespace."""
    address, receiver = abstract_receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier is not None
    try:
        assert notifier.address == address
        notifier.send({"RELOADING": 1, "MONOTONIC_USEC": 123})
        notifier.send({"READY": True})
        assert receiver.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=123\n"
        assert receiver.recv(4096) == b"READY=1\n"
    finally:
        notifier.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_from_environ_without_notify_socket_is_none(environ: dict[str, str]) -> None:
    """No notifier when NOTIFY_SOCKET is unset or empty."""
    assert Notifier.from_environ(environ) is None


def test_from_environ_leaves_notify_socket_for_the_successor() -> None:
    """Reading NOTIFY_SOCKET does not remove it from the environment."""
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    notifier = Notifier.from_environ(environ)
    assert notifier is not None
    assert notifier.address == "/run/systemd/notify"
    assert environ == {"NOTIFY_SOCKET": "/run/systemd/notify"}


@pytest.mark.parametrize("address", ["run/notify", "./notify", "@", "vsock:2:1234"])
def test_from_environ_rejects_a_relative_path(address: str) -> None:
    """NOTIFY_SOCKET must be absolute or '@abstract'; the error names the variable."""
    with pytest.raises(InheritanceError, match="NOTIFY_SOCKET"):
        Notifier.from_environ({"NOTIFY_SOCKET": address})


@pytest.mark.parametrize(
    "message",
    [{"STATUS": "two\nlines"}, {"READY\n": 1}, {"A=B": 1}, {"": 1}],
)
def test_send_rejects_a_field_that_would_change_the_datagram(
    path_receiver: tuple[str, socket.socket], message: dict[str, str | int]
) -> None:
    """A newline in a key or value, '=' in a key, or an empty key raises ValueError."""
    path, receiver = path_receiver
    notifier = Notifier(path)
    try:
        with pytest.raises(ValueError, match="systemd"):
            notifier.send(message)
        assert drain(receiver) == []
    finally:
        notifier.close()


@pytest.mark.parametrize("where", ["path", "abstract"])
def test_send_to_nobody_logs_a_warning_and_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """A missing systemd is logged as a warning naming the socket, never raised."""
    if where == "path":
        address = str(tmp_path / "nobody")
    else:
        address = f"@graceful-restart-test-{secrets.token_hex(8)}"
    notifier = Notifier(address)
    try:
        with caplog.at_level(logging.WARNING, logger="graceful_restart_trio"):
            notifier.send({"READY": 1})
    finally:
        notifier.close()
    [record] = caplog.records
    assert record.name == "graceful_restart_trio"
    assert record.levelno == logging.WARNING
    assert address in record.getMessage()


def test_send_never_blocks_on_a_full_socket(
    path_receiver: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """When the receiver's queue is full, send logs a warning instead of blocking."""
    path, receiver = path_receiver
    notifier = Notifier(path)
    try:
        with caplog.at_level(logging.WARNING, logger="graceful_restart_trio"):
            for _ in range(100_000):
                notifier.send({"STATUS": "x" * 1000})
                if caplog.records:
                    break
    finally:
        notifier.close()
    assert caplog.records, "the queue never filled up"
    assert drain(receiver)


def test_close_is_idempotent_and_send_reopens(path_receiver: tuple[str, socket.socket]) -> None:
    """close() can be called twice; a later send opens a fresh socket."""
    path, receiver = path_receiver
    notifier = Notifier(path)
    notifier.close()
    notifier.send({"READY": 1})
    notifier.close()
    notifier.close()
    notifier.send({"STOPPING": 1})
    notifier.close()
    assert drain(receiver) == [b"READY=1\n", b"STOPPING=1\n"]


# --- listen_fds: parsing, in this process --------------------------------------------------


def test_listen_fds_without_listen_pid_ignores_everything() -> None:
    """Without LISTEN_PID there is no socket activation, whatever LISTEN_FDS says."""
    environ = {"LISTEN_FDS": "garbage", "LISTEN_FDNAMES": "::"}
    assert listen_fds(environ, PID) == []
    assert environ == {"LISTEN_FDS": "garbage", "LISTEN_FDNAMES": "::"}


def test_listen_fds_for_another_pid_is_ignored_and_kept(caplog: pytest.LogCaptureFixture) -> None:
    """Variables meant for another process are left in place, logged at debug level."""
    environ = {"LISTEN_PID": str(PID + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    with caplog.at_level(logging.DEBUG, logger="graceful_restart_trio"):
        assert listen_fds(environ, PID) == []
    assert environ == {"LISTEN_PID": str(PID + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert [record.levelno for record in caplog.records] == [logging.DEBUG]


def test_listen_fds_with_zero_fds_cleans_the_environment() -> None:
    """LISTEN_FDS=0 yields nothing and removes every LISTEN_* variable, and only those."""
    environ = {
        "LISTEN_PID": str(PID),
        "LISTEN_FDS": "0",
        "LISTEN_FDNAMES": "",
        "LISTEN_PIDFDID": "77",
        "PATH": "/bin",
    }
    assert listen_fds(environ, PID) == []
    assert environ == {"PATH": "/bin"}


@pytest.mark.parametrize(
    "value", ["", "0", "-1", "+4242", " 4242", "4242 ", "0x10", "\u0664", "pid"]
)
def test_listen_fds_rejects_a_malformed_listen_pid(value: str) -> None:
    """LISTEN_PID must be a positive decimal integer; the error names it and the value."""
    environ = {"LISTEN_PID": value, "LISTEN_FDS": "0"}
    with pytest.raises(SocketActivationError, match="LISTEN_PID") as info:
        listen_fds(environ, PID)
    assert repr(value) in str(info.value)
    assert environ == {"LISTEN_PID": value, "LISTEN_FDS": "0"}


@pytest.mark.parametrize("value", ["", "-1", "+1", " 1", "1 ", "0x1", "1.0", "\u0661", "two"])
def test_listen_fds_rejects_a_malformed_listen_fds(value: str) -> None:
    """LISTEN_FDS must be a non-negative decimal integer; the error names it and the value."""
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": value}
    with pytest.raises(SocketActivationError, match="LISTEN_FDS") as info:
        listen_fds(environ, PID)
    assert repr(value) in str(info.value)
    assert environ == {"LISTEN_PID": str(PID), "LISTEN_FDS": value}


@pytest.mark.parametrize(("count", "names"), [("0", "a"), ("1", ""), ("1", "a:b"), ("3", "a:b")])
def test_listen_fds_rejects_a_name_count_mismatch(count: str, names: str) -> None:
    """LISTEN_FDNAMES must hold exactly LISTEN_FDS names; the error gives both counts."""
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": count, "LISTEN_FDNAMES": names}
    expected = len(names.split(":")) if names else 0
    with pytest.raises(SocketActivationError, match="LISTEN_FDNAMES") as info:
        listen_fds(environ, PID)
    assert f"{expected} names" in str(info.value)
    assert f"LISTEN_FDS is {count}" in str(info.value)


@pytest.mark.parametrize("bad", ["", "x" * 256, "tab\there", "nul\0", "é"])
def test_listen_fds_rejects_an_invalid_name(bad: str) -> None:
    """Each name is 1-255 printable ASCII characters."""
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": f"ok:{bad}"}
    with pytest.raises(SocketActivationError, match="LISTEN_FDNAMES"):
        listen_fds(environ, PID)


_VARIABLE_VALUES = {
    "LISTEN_PID": st.one_of(
        st.none(),
        st.sampled_from([str(PID), str(PID + 1), "0", "-1", "+4242", " 4242", "0x10", ""]),
        st.text(max_size=6),
    ),
    # Digits only as "0" or a count far beyond the open fds: never touch this process's fds.
    "LISTEN_FDS": st.one_of(
        st.none(),
        st.sampled_from(["0", "1048576", "-1", "+0", " 0", "0x0", "", "\u0663"]),
        st.text(max_size=6).filter(lambda text: not (text.isascii() and text.isdecimal())),
    ),
    "LISTEN_FDNAMES": st.one_of(
        st.none(),
        st.sampled_from(["", "a", "a:b", "::", "x" * 256, "é", "a\tb"]),
        st.text(max_size=12),
    ),
    "LISTEN_PIDFDID": st.one_of(st.none(), st.just("123")),
}


@settings(database=None)
@given(
    st.fixed_dictionaries(_VARIABLE_VALUES).map(
        lambda drawn: {key: value for key, value in drawn.items() if value is not None}
    )
)
def test_listen_fds_never_half_applies(environ: dict[str, str]) -> None:
    """On error the environment is untouched; on success only LISTEN_* variables go."""
    environ["PATH"] = "/bin"
    before = dict(environ)
    try:
        result = listen_fds(environ, PID)
    except SocketActivationError:
        assert environ == before
    else:
        assert result == []
        assert environ in (before, {"PATH": "/bin"})


# --- listen_fds: real fds at 3, 4, ... in a child process ----------------------------------

_CHILD = """
import fcntl, json, os, sys

# Lay the passed sockets out at 3, 4, ... before anything else opens a file.
sources = json.loads(sys.argv[1])
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for fd in sources:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)

from graceful_restart_trio._exceptions import SocketActivationError
from graceful_restart_trio._systemd import listen_fds

report = {}
try:
    inherited = listen_fds(os.environ, 4242)
except SocketActivationError as exc:
    report["error"] = str(exc)
else:
    report["inherited"] = [[item.name, item.fd] for item in inherited]
    report["inheritable"] = [os.get_inheritable(item.fd) for item in inherited]
    report["files"] = [os.readlink(f"/proc/self/fd/{item.fd}") for item in inherited]
report["environ"] = sorted(key for key in os.environ if key.startswith("LISTEN_"))
print(json.dumps(report))
"""


def run_child(sockets: list[socket.socket], listen: dict[str, str]) -> dict[str, object]:
    """Run _CHILD with ``sockets`` at fds 3, 4, ... and ``listen`` in its environment."""
    fds = [sock.fileno() for sock in sockets]
    src = str(Path(_systemd.__file__).resolve().parents[1])
    env = {"PYTHONPATH": src, "PATH": os.environ.get("PATH", "/bin"), **listen}
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(fds)],
        pass_fds=fds,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    report: dict[str, object] = json.loads(completed.stdout)
    return report


@pytest.fixture
def two_sockets() -> Iterator[list[socket.socket]]:
    """Two distinct sockets to hand to a child process."""
    first, second = socket.socketpair()
    with first, second:
        yield [first, second]


def test_listen_fds_takes_real_sockets_at_3_and_up(two_sockets: list[socket.socket]) -> None:
    """The fds 3.. come back named, non-inheritable, and LISTEN_* leave the environment."""
    report = run_child(
        two_sockets,
        {
            "LISTEN_PID": "4242",
            "LISTEN_FDS": "2",
            "LISTEN_FDNAMES": "http:admin socket",
            "LISTEN_PIDFDID": "9",
        },
    )
    assert report["inherited"] == [["http", 3], ["admin socket", 4]]
    assert report["inheritable"] == [False, False]
    assert report["files"] == [os.readlink(f"/proc/self/fd/{s.fileno()}") for s in two_sockets]
    assert report["environ"] == []


def test_listen_fds_accepts_a_name_of_255_characters(two_sockets: list[socket.socket]) -> None:
    """The longest valid name is 255 characters."""
    name = "x" * 255
    report = run_child(
        two_sockets[:1], {"LISTEN_PID": "4242", "LISTEN_FDS": "1", "LISTEN_FDNAMES": name}
    )
    assert report["inherited"] == [[name, 3]]


def test_listen_fds_names_default_to_unknown(two_sockets: list[socket.socket]) -> None:
    """Without LISTEN_FDNAMES every fd is named "unknown", as systemd does."""
    report = run_child(two_sockets, {"LISTEN_PID": "4242", "LISTEN_FDS": "2"})
    assert report["inherited"] == [["unknown", 3], ["unknown", 4]]


def test_listen_fds_rejects_a_closed_fd(two_sockets: list[socket.socket]) -> None:
    """Announcing more fds than are open fails, names the fd, and changes nothing."""
    report = run_child(two_sockets, {"LISTEN_PID": "4242", "LISTEN_FDS": "3"})
    assert "fd 5" in str(report["error"])
    assert report["environ"] == ["LISTEN_FDS", "LISTEN_PID"]


def test_inherited_socket_is_a_frozen_value() -> None:
    """InheritedSocket compares by value and cannot be changed."""
    inherited = InheritedSocket("http", 3)
    assert inherited == InheritedSocket(name="http", fd=3)
    with pytest.raises(AttributeError):
        inherited.fd = 4  # type: ignore[misc]


# --- watchdog ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "1500", "WATCHDOG_PID": str(PID)}, 0.0015),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(PID + 1)}, None),
        ({"WATCHDOG_PID": str(PID)}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    """WATCHDOG_USEC in seconds, or None when unset or meant for another pid."""
    assert watchdog_interval(environ, PID) == expected


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"WATCHDOG_USEC": ""}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "0"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "-5"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "1.5"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "0x10"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "10", "WATCHDOG_PID": ""}, "WATCHDOG_PID"),
        ({"WATCHDOG_USEC": "10", "WATCHDOG_PID": "0"}, "WATCHDOG_PID"),
        ({"WATCHDOG_USEC": "10", "WATCHDOG_PID": "-4242"}, "WATCHDOG_PID"),
        ({"WATCHDOG_USEC": "10", "WATCHDOG_PID": "me"}, "WATCHDOG_PID"),
    ],
)
def test_watchdog_interval_rejects_malformed_variables(
    environ: dict[str, str], variable: str
) -> None:
    """A malformed WATCHDOG_USEC or WATCHDOG_PID raises InheritanceError naming it."""
    with pytest.raises(InheritanceError, match=variable):
        watchdog_interval(environ, PID)


async def test_run_watchdog_pings_now_and_every_half_interval(
    autojump_clock: trio.testing.MockClock, path_receiver: tuple[str, socket.socket]
) -> None:
    """run_watchdog sends WATCHDOG=1 at once, then every interval / 2 seconds."""
    path, receiver = path_receiver
    notifier = Notifier(path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_watchdog, notifier, 2.0)
            await trio.sleep(0.5)
            assert drain(receiver) == [b"WATCHDOG=1\n"]
            await trio.sleep(2.0)  # t = 2.5: pings at 1 and 2
            assert drain(receiver) == [b"WATCHDOG=1\n"] * 2
            nursery.cancel_scope.cancel()
    finally:
        notifier.close()


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
async def test_run_watchdog_rejects_a_non_positive_interval(interval: float) -> None:
    """The interval must be positive."""
    notifier = Notifier("/run/nowhere")
    with pytest.raises(ValueError, match="interval"):
        await run_watchdog(notifier, interval)
