"""systemd integration with real server processes: notify messages, watchdog, socket activation.

A fake notify socket (``AF_UNIX`` datagrams with ``SO_PASSCRED``) records every datagram
together with the pid the kernel says sent it, so the tests check what was said, in which
order, and by whom: with systemd's default ``NotifyAccess=main`` a message from any other
process than the main one is dropped. :func:`protocol_violations` replays a recording the
way systemd would for a ``Type=notify-reload`` service.

Socket activation is done the way systemd does it: the listening socket at fd 3 and the
``LISTEN_*`` variables, with ``LISTEN_PID`` set by a shell that then ``exec``s the server
(so the pid is the server's own). The shell is bash: dash cannot redirect an fd above 9.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, TypeVar

import pytest

from .conftest import (
    SERVER,
    TIMEOUT,
    Server,
    answering_pid,
    converse,
    echo_line,
    http_get,
    is_running,
    wait_until,
)
from .test_control import status

StartServer = Callable[..., Server]
T = TypeVar("T")

CREDENTIALS = struct.Struct("3i")
"""``struct ucred``: pid, uid, gid."""
BASH = "/bin/bash"
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID")


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, the clock of ``MONOTONIC_USEC=``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Datagram(NamedTuple):
    """One notify datagram: who sent it, what it says, and when the test read it."""

    pid: int
    fields: dict[str, str]
    raw: bytes
    received_usec: int

    def says(self, key: str, value: str = "1") -> bool:
        """Whether the datagram carries ``key=value``."""
        return self.fields.get(key) == value


def parse_fields(raw: bytes) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of a datagram (every line must have a ``=``)."""
    fields = {}
    for line in raw.decode().splitlines():
        key, equals, value = line.partition("=")
        assert equals, f"not a KEY=VALUE line: {line!r} in {raw!r}"
        fields[key] = value
    return fields


class NotifyRecorder:
    """A fake ``NOTIFY_SOCKET``: records each datagram with its sender's pid."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self._sock = sock
        self.address = address
        """The ``NOTIFY_SOCKET`` value (a path, or ``@name`` for the abstract namespace)."""
        self.datagrams: list[Datagram] = []

    def drain(self) -> list[Datagram]:
        """Record every datagram waiting now (never blocks); return all recorded so far."""
        while True:
            try:
                raw, ancillary, flags, _ = self._sock.recvmsg(
                    4096, socket.CMSG_SPACE(CREDENTIALS.size)
                )
            except BlockingIOError:
                return self.datagrams
            assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC), f"truncated: {raw!r}"
            pids = [
                CREDENTIALS.unpack(data[: CREDENTIALS.size])[0]
                for level, kind, data in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            ]
            assert len(pids) == 1, f"no sender credentials for {raw!r}"
            self.datagrams.append(Datagram(pids[0], parse_fields(raw), raw, monotonic_usec()))

    def wait_for(
        self, found: Callable[[list[Datagram]], T | None], what: str, timeout: float = TIMEOUT
    ) -> T:
        """Drain until ``found(datagrams)`` is true; return what it returned."""
        return wait_until(lambda: found(self.drain()), f"{what}; got {self.raws()}", timeout)

    def wait_for_datagram(self, says: str, pid: int | None = None, count: int = 1) -> Datagram:
        """Wait for the ``count``-th datagram saying ``says=1`` (from ``pid`` if given)."""

        def found(datagrams: list[Datagram]) -> Datagram | None:
            matching = [d for d in datagrams if d.says(says) and (pid is None or d.pid == pid)]
            return matching[count - 1] if len(matching) >= count else None

        return self.wait_for(found, f"datagram #{count} with {says}=1 from pid {pid}")

    def wait_for_handover(self) -> Datagram:
        """Wait for the first datagram that carries ``MAINPID=``."""
        return self.wait_for(
            lambda datagrams: next((d for d in datagrams if "MAINPID" in d.fields), None),
            "a MAINPID= datagram",
        )

    def saying(self, key: str, value: str = "1") -> list[Datagram]:
        """Every datagram recorded so far that carries ``key=value``."""
        return [d for d in self.datagrams if d.says(key, value)]

    def sent_by(self, pid: int) -> list[Datagram]:
        """Every datagram recorded so far from ``pid``."""
        return [d for d in self.datagrams if d.pid == pid]

    def raws(self) -> list[tuple[int, bytes]]:
        """(pid, raw) of everything recorded: for failure messages."""
        return [(d.pid, d.raw) for d in self.datagrams]


@contextlib.contextmanager
def recording(address: str) -> Iterator[NotifyRecorder]:
    """A bound notify socket at ``address`` (``@name``: abstract), closed afterwards."""
    bind = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(bind)
        sock.setblocking(False)
        yield NotifyRecorder(sock, address)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyRecorder]:
    """A fake systemd notify socket bound to a path in ``tmp_path``."""
    path = str(tmp_path / "notify")
    assert len(path.encode()) < 108, f"{path} is too long for a unix socket address"
    with recording(path) as recorder:
        yield recorder


def protocol_violations(datagrams: list[Datagram], main: int) -> list[str]:
    """What systemd would object to, replaying ``datagrams`` of a ``Type=notify-reload`` unit.

    ``NotifyAccess=main``: only the main pid (``main`` at first, then whatever ``MAINPID=``
    says) may notify. ``RELOADING=1`` needs ``MONOTONIC_USEC=`` and a running service, and
    must be answered by exactly one ``READY=1`` before the next; nothing but ``STATUS=`` or
    ``EXTEND_TIMEOUT_USEC=`` may follow ``STOPPING=1``.
    """
    problems = []
    state = "starting"
    for datagram in datagrams:
        fields, said = datagram.fields, datagram.raw
        if datagram.pid != main:
            problems.append(f"{said!r} from pid {datagram.pid}, the main pid is {main}")
            continue
        if "MAINPID" in fields:
            main = int(fields["MAINPID"])
        if datagram.says("RELOADING"):
            if state != "running":
                problems.append(f"{said!r} while {state}")
            if "MONOTONIC_USEC" not in fields:
                problems.append(f"{said!r} without MONOTONIC_USEC")
            state = "reloading"
        if datagram.says("READY"):
            if state not in ("starting", "reloading"):
                problems.append(f"{said!r} while {state}")
            state = "running"
        if datagram.says("STOPPING"):
            if state == "stopping":
                problems.append(f"{said!r} again")
            state = "stopping"
        elif state == "stopping" and set(fields) - {"STATUS", "EXTEND_TIMEOUT_USEC"}:
            problems.append(f"{said!r} after STOPPING=1")
    return problems


def wait_gone(server: Server, pid: int, recorder: NotifyRecorder | None = None) -> int | None:
    """Wait for ``pid`` to exit, recording its last datagrams first; its status if ours."""
    wait_until(lambda: not is_running(pid), f"pid {pid} to exit\n{server.log()}")
    if recorder is not None:
        recorder.drain()
    return server.wait_exit(pid)


def shell(script: str) -> list[str]:
    """The server's command line, started through ``bash -c script`` (which must exec it)."""
    return [BASH, "-c", script, "bash", sys.executable, str(SERVER)]


def environ_of(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.decode().partition("=") for entry in raw.split(b"\0") if entry)
    return {key: value for key, _, value in pairs}


def socket_inodes(pid: int) -> set[int]:
    """The inodes of every socket ``pid`` has open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
            if match:
                inodes.add(int(match.group(1)))
    return inodes


@contextlib.contextmanager
def systemd_listener() -> Iterator[socket.socket]:
    """A TCP socket bound to a free port on 127.0.0.1 and listening, as systemd makes it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield sock


def activated(sock: socket.socket) -> list[str]:
    """A command line that starts the server with ``sock`` at fd 3 and ``LISTEN_PID`` = its pid."""
    fd = sock.fileno()
    return shell(f'LISTEN_PID=$$ exec "$@" 3<&{fd} {fd}<&-')


# --- readiness -----------------------------------------------------------------------------


def test_first_start_says_ready_once_and_only_when_serving(
    start_server: StartServer, notify: NotifyRecorder
) -> None:
    """A first start sends READY=1+STATUS once, when it accepts and its pid file exists."""
    server = start_server(env={"NOTIFY_SOCKET": notify.address})
    pid = server.first.pid
    ready = notify.wait_for_datagram("READY")
    assert server.serving_pid() == pid, "the pid file is written before READY=1"
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT):
        pass
    assert answering_pid(http_get(server.port)[1]) == pid
    assert ready == notify.datagrams[0]
    assert (ready.pid, ready.fields) == (
        pid,
        {"READY": "1", "STATUS": f"serving: generation 1 (pid {pid})"},
    )
    server.signal(signal.SIGTERM, pid)
    assert wait_gone(server, pid, notify) == 0
    assert len(notify.saying("READY")) == 1
    assert protocol_violations(notify.datagrams, pid) == []


def test_abstract_notify_socket_gets_ready(start_server: StartServer) -> None:
    """NOTIFY_SOCKET=@name reaches the abstract namespace: READY=1 then STOPPING=1 arrive."""
    with recording(f"@graceful-test-{secrets.token_hex(8)}") as recorder:
        server = start_server(env={"NOTIFY_SOCKET": recorder.address})
        pid = server.first.pid
        ready = recorder.wait_for_datagram("READY")
        assert (ready.pid, ready.fields) == (
            pid,
            {"READY": "1", "STATUS": f"serving: generation 1 (pid {pid})"},
        )
        server.signal(signal.SIGTERM, pid)
        assert wait_gone(server, pid, recorder) == 0
        assert [d.pid for d in recorder.saying("STOPPING")] == [pid]
        assert protocol_violations(recorder.datagrams, pid) == []


# --- restart -------------------------------------------------------------------------------


def test_restart_hands_main_pid_over_before_the_old_exits(
    start_server: StartServer, notify: NotifyRecorder
) -> None:
    """SIGHUP: RELOADING=1, then MAINPID=new+READY=1 from the still running old; no STOPPING=1."""
    server = start_server("--kind", "echo", env={"NOTIFY_SOCKET": notify.address})
    old = server.first.pid
    notify.wait_for_datagram("READY")
    port = server.port
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as held:
        assert converse(held, b"before\n") == f"{old} before\n"  # a lease: the old must drain it
        signalled = monotonic_usec()
        server.signal(signal.SIGHUP, old)
        handover = notify.wait_for_handover()
        assert is_running(old), "MAINPID= must reach systemd while the old main still runs"
        new = int(handover.fields["MAINPID"])
        status = f"serving: generation 2 (pid {new})"
        assert (handover.pid, handover.fields) == (
            old,
            {"MAINPID": str(new), "READY": "1", "STATUS": status},
        )
        assert server.wait_handover(old) == new
        assert echo_line(port, b"hi\n") == f"{new} hi\n"
        assert converse(held, b"during\n") == f"{old} during\n"
    assert wait_gone(server, old, notify) == 0
    (reloading,) = notify.saying("RELOADING")
    assert reloading.pid == old
    assert notify.datagrams.index(reloading) < notify.datagrams.index(handover)
    assert set(reloading.fields) == {"RELOADING", "MONOTONIC_USEC", "STATUS", "EXTEND_TIMEOUT_USEC"}
    assert signalled <= int(reloading.fields["MONOTONIC_USEC"]) <= reloading.received_usec
    assert reloading.fields["EXTEND_TIMEOUT_USEC"] == "60200000"  # ready_timeout + probation
    assert not [d for d in notify.sent_by(old) if d.says("STOPPING")]
    assert notify.sent_by(new) == [], "the successor must not say READY=1 itself"
    server.signal(signal.SIGTERM, new)
    assert wait_gone(server, new, notify) == 0
    assert [d.pid for d in notify.saying("STOPPING")] == [new]
    assert protocol_violations(notify.datagrams, old) == []


@pytest.mark.parametrize(
    ("deploy", "why"),
    [
        ("crash-at-import", "exited with status 3 before it was ready"),
        ("hang-before-ready", "was not ready within 3s"),
    ],
)
def test_failed_restart_says_ready_again_with_the_failure(
    start_server: StartServer, notify: NotifyRecorder, deploy: str, why: str
) -> None:
    """A failed restart: RELOADING=1, then READY=1 with the failure in STATUS; no MAINPID."""
    server = start_server("--ready-timeout", "3", env={"NOTIFY_SOCKET": notify.address})
    pid = server.first.pid
    notify.wait_for_datagram("READY")
    server.deploy(deploy)
    server.signal(signal.SIGHUP, pid)
    ready_again = notify.wait_for_datagram("READY", count=2)
    reloading, ready = notify.datagrams[1:3]
    assert ready == ready_again
    assert reloading.says("RELOADING")
    assert reloading.fields["EXTEND_TIMEOUT_USEC"] == "3200000"  # ready_timeout + probation
    assert (reloading.pid, ready.pid) == (pid, pid)
    assert set(ready.fields) == {"READY", "STATUS"}
    assert "restart failed" in ready.fields["STATUS"]
    assert why in ready.fields["STATUS"]
    assert answering_pid(http_get(server.port)[1]) == pid
    server.signal(signal.SIGTERM, pid)
    assert wait_gone(server, pid, notify) == 0
    assert not [d for d in notify.datagrams if "MAINPID" in d.fields]
    assert {d.pid for d in notify.datagrams} == {pid}
    assert protocol_violations(notify.datagrams, pid) == []


def test_every_reload_is_answered_by_one_ready_from_the_same_pid(
    start_server: StartServer, notify: NotifyRecorder
) -> None:
    """Type=notify-reload: each RELOADING=1 is followed by exactly one READY=1 from its sender."""
    server = start_server(env={"NOTIFY_SOCKET": notify.address})
    first = main = server.first.pid
    notify.wait_for_datagram("READY")
    for restart, deploy in enumerate(["ok", "crash-at-import", "ok", "ok"], start=2):
        server.deploy(deploy)
        server.signal(signal.SIGHUP, main)
        ready = notify.wait_for_datagram("READY", count=restart)
        if deploy == "ok":
            new = int(ready.fields["MAINPID"])
            assert server.wait_serving(other_than=main) == new
            assert wait_gone(server, main, notify) == 0
            main = new
    assert answering_pid(http_get(server.port)[1]) == main
    server.signal(signal.SIGTERM, main)
    assert wait_gone(server, main, notify) == 0
    events = [d for d in notify.datagrams if d.says("READY") or d.says("RELOADING")]
    kinds = ["RELOADING" if d.says("RELOADING") else "READY" for d in events]
    assert kinds == ["READY"] + ["RELOADING", "READY"] * 4
    for reloading, ready in zip(events[1::2], events[2::2], strict=True):
        assert ready.pid == reloading.pid
    assert protocol_violations(notify.datagrams, first) == []


# --- shutdown ------------------------------------------------------------------------------


def test_sigterm_says_stopping_once(start_server: StartServer, notify: NotifyRecorder) -> None:
    """SIGTERM: STOPPING=1 (with EXTEND_TIMEOUT_USEC) from the serving pid, once, even twice."""
    server = start_server("--kind", "echo", env={"NOTIFY_SOCKET": notify.address})
    pid = server.first.pid
    notify.wait_for_datagram("READY")
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as held:
        assert converse(held, b"hi\n") == f"{pid} hi\n"  # a lease: the drain waits for it
        server.signal(signal.SIGTERM, pid)
        stopping = notify.wait_for_datagram("STOPPING")
        assert is_running(pid)
        assert stopping.pid == pid
        assert set(stopping.fields) == {"STOPPING", "STATUS", "EXTEND_TIMEOUT_USEC"}
        assert re.fullmatch(r"draining \d+ lease\(s\)", stopping.fields["STATUS"])
        assert stopping.fields["EXTEND_TIMEOUT_USEC"] == "35000000"  # drain timeout + grace
        server.signal(signal.SIGTERM, pid)  # again: cut the drain short
        assert wait_gone(server, pid, notify) == 0
    assert notify.saying("STOPPING") == [stopping]
    assert notify.datagrams[-1] == stopping
    assert protocol_violations(notify.datagrams, pid) == []


def test_sigterm_during_a_restart_says_stopping_and_never_ready(
    start_server: StartServer, notify: NotifyRecorder
) -> None:
    """SIGTERM while a successor starts: STOPPING=1 once from the old, no READY=1, no MAINPID."""
    server = start_server("--ready-timeout", "120", env={"NOTIFY_SOCKET": notify.address})
    pid = server.first.pid
    notify.wait_for_datagram("READY")
    server.deploy("hang-before-ready")
    server.signal(signal.SIGHUP, pid)
    notify.wait_for_datagram("RELOADING")
    wait_until(lambda: "taking over from" in server.log(), f"the successor to run\n{server.log()}")
    server.signal(signal.SIGTERM, pid)
    assert wait_gone(server, pid, notify) == 0
    kinds = [next(iter(d.fields)) for d in notify.datagrams]
    assert kinds == ["READY", "RELOADING", "STOPPING"]
    assert {d.pid for d in notify.datagrams} == {pid}
    assert protocol_violations(notify.datagrams, pid) == []


# --- watchdog ------------------------------------------------------------------------------


@pytest.mark.parametrize("watchdog_pid", [False, True], ids=["no-WATCHDOG_PID", "WATCHDOG_PID"])
def test_watchdog_pings_come_from_the_serving_pid(
    start_server: StartServer, notify: NotifyRecorder, watchdog_pid: bool
) -> None:
    """WATCHDOG=1 comes repeatedly from the serving pid; after a handover only from the new one."""
    server = start_server(
        "--kind",
        "echo",
        env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"},
        command=shell('WATCHDOG_PID=$$ exec "$@"') if watchdog_pid else None,
    )
    old = server.first.pid
    notify.wait_for_datagram("WATCHDOG", pid=old, count=3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as held:
        assert converse(held, b"hi\n") == f"{old} hi\n"  # keeps the old alive after handover
        server.signal(signal.SIGHUP, old)
        handover = notify.wait_for_handover()
        new = int(handover.fields["MAINPID"])
        after = notify.datagrams.index(handover) + 1
        notify.wait_for(
            lambda datagrams: len([d for d in datagrams[after:] if d.pid == new]) >= 3,
            f"3 pings from {new} after the handover",
        )
        assert is_running(old)
        late = [d for d in notify.datagrams[after:] if d.pid != new]
        assert late == [], "the old pid must stop pinging once it handed over"
        assert {d.raw for d in notify.datagrams[after:]} == {b"WATCHDOG=1\n"}
    assert wait_gone(server, old, notify) == 0
    server.signal(signal.SIGTERM, new)
    assert wait_gone(server, new, notify) == 0
    said = [d for d in notify.datagrams if not d.says("WATCHDOG")]
    assert protocol_violations(said, old) == []


def test_successor_pings_only_once_it_is_the_main_pid(
    start_server: StartServer, notify: NotifyRecorder
) -> None:
    """A ready successor sends no WATCHDOG=1 before its predecessor has sent MAINPID= for it."""
    server = start_server(
        "--kind", "echo", env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"}
    )
    old = server.first.pid
    notify.wait_for_datagram("READY")
    server.signal(signal.SIGHUP, old)
    notify.wait_for_datagram("RELOADING")
    os.kill(old, signal.SIGSTOP)  # the old cannot hand over: the successor is not main yet
    try:
        assert not [d for d in notify.drain() if "MAINPID" in d.fields]
        ready = wait_until(
            lambda: re.search(r"\[pid (\d+)\] serving \(generation 2\)", server.log()),
            "the successor to serve",
        )
        new = int(ready.group(1))
        assert echo_line(server.port, b"hi\n") == f"{new} hi\n"  # its loop ran after ready
        assert notify.drain()[-1].pid == old
        assert notify.sent_by(new) == []
    finally:
        os.kill(old, signal.SIGCONT)
    assert notify.wait_for_handover().fields["MAINPID"] == str(new)
    assert wait_gone(server, old, notify) == 0
    server.signal(signal.SIGTERM, new)
    assert wait_gone(server, new, notify) == 0
    assert protocol_violations(notify.datagrams, old) == []


def test_watchdog_for_another_pid_sends_no_pings(
    start_server: StartServer, notify: NotifyRecorder
) -> None:
    """WATCHDOG_PID naming another process: this one never sends WATCHDOG=1."""
    server = start_server(
        env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}
    )
    pid = server.first.pid
    notify.wait_for_datagram("READY")
    assert answering_pid(http_get(server.port)[1]) == pid
    server.signal(signal.SIGTERM, pid)
    assert wait_gone(server, pid, notify) == 0
    assert notify.saying("WATCHDOG") == []


def test_watchdog_for_another_pid_sends_no_pings_after_a_restart(
    start_server: StartServer, notify: NotifyRecorder
) -> None:
    """WATCHDOG_PID naming another process: no generation sends WATCHDOG=1, successors included."""
    server = start_server(
        env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}
    )
    old = server.first.pid
    notify.wait_for_datagram("READY")
    server.signal(signal.SIGHUP, old)
    new = server.wait_serving(other_than=old)
    assert wait_gone(server, old, notify) == 0
    assert answering_pid(http_get(server.port)[1]) == new
    server.signal(signal.SIGTERM, new)
    assert wait_gone(server, new, notify) == 0
    assert notify.saying("WATCHDOG") == []


# --- socket activation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "deploy", "names"),
    [
        ("by-name", "listen-elsewhere", "elsewhere"),
        ("by-address", "ok", "web.socket"),
        ("by-address-unnamed", "ok", None),
    ],
)
def test_socket_activation_serves_the_passed_socket(
    start_server: StartServer, tmp_path: Path, how: str, deploy: str, names: str | None
) -> None:
    """The socket at fd 3 is served by both generations, no new bind; LISTEN_* not passed on."""
    control = tmp_path / "control.sock"
    with systemd_listener() as sock:
        port = sock.getsockname()[1]
        env = {"LISTEN_FDS": "1"} | ({"LISTEN_FDNAMES": names} if names else {})
        asked = "0" if how == "by-name" else str(port)
        server = start_server(
            "--port",
            asked,
            "--control",
            str(control),
            command=activated(sock),
            deploy=deploy,
            env=env,
            pass_fds=(sock.fileno(),),
        )
        old = server.wait_serving()
        assert old == server.first.pid
        assert server.port == port
        assert server.log().count("listening on tcp") == 1
        assert os.fstat(sock.fileno()).st_ino in socket_inodes(old)
        assert environ_of(old)["LISTEN_PID"] == str(old)
        assert answering_pid(http_get(port)[1]) == old
        server.signal(signal.SIGHUP, old)
        new = server.wait_serving(other_than=old)
        # The new copy opened again what it inherited: the passed socket, by the name the
        # first copy gave it (no other socket can listen on that port).
        name = "elsewhere" if how == "by-name" else f"tcp:127.0.0.1:{port}"
        now = status(control)
        assert now["pid"] == new
        assert now["listeners"] == [
            {"name": "graceful-restart-control", "address": str(control)},
            {"name": name, "address": f"127.0.0.1:{port}"},
        ]
        stopped = f"[pid {old}] stopped accepting"  # the pid file names the new one earlier
        wait_until(lambda: stopped in server.log(), f"{stopped}\n{server.log()}")
        assert answering_pid(http_get(port)[1]) == new
        assert f"[pid {new}] listening on tcp 127.0.0.1:{port}" in server.log()
        assert os.fstat(sock.fileno()).st_ino in socket_inodes(new)
        assert not set(LISTEN_VARIABLES) & set(environ_of(new))
        assert wait_gone(server, old) == 0
        server.signal(signal.SIGTERM, new)
        assert wait_gone(server, new) == 0


def test_socket_activation_for_another_pid_is_ignored(
    start_server: StartServer, tmp_path: Path
) -> None:
    """LISTEN_PID naming another process: the variables are ignored; the server binds a port."""
    control = tmp_path / "control.sock"
    with systemd_listener() as sock:
        port = sock.getsockname()[1]
        fd = sock.fileno()
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "elsewhere"}
        server = start_server(
            "--control",
            str(control),
            command=shell(f'exec "$@" 3<&{fd} {fd}<&-'),
            deploy="listen-elsewhere",
            env=env,
            pass_fds=(fd,),
        )
        pid = server.wait_serving()
        # Its listener "elsewhere" is the one it bound, on a port of its own: the passed
        # socket (which LISTEN_FDNAMES also calls "elsewhere") was not taken.
        assert status(control)["listeners"] == [
            {"name": "graceful-restart-control", "address": str(control)},
            {"name": "elsewhere", "address": f"127.0.0.1:{server.port}"},
        ]
        assert server.port != port
        assert answering_pid(http_get(server.port)[1]) == pid
        server.signal(signal.SIGTERM, pid)
        assert wait_gone(server, pid) == 0


def test_malformed_listen_fds_stops_the_server(start_server: StartServer) -> None:
    """A malformed LISTEN_FDS for this pid: the server exits non-zero, its log names it."""
    server = start_server(
        command=shell('LISTEN_PID=$$ exec "$@"'), env={"LISTEN_FDS": "x", "LISTEN_FDNAMES": "web"}
    )
    status = server.wait_exit(server.first.pid)
    assert status not in (None, 0)
    assert "LISTEN_FDS" in server.log()
    assert "listening on" not in server.log()
    assert server.serving_pid() is None
