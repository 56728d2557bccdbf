"""Shared machinery for the tests: real server processes, real signals, loopback clients.

The test process makes itself a *child subreaper*: a server generation whose parent
(the previous generation) has exited is re-parented to the test process instead of to
init, so every process a test starts stays visible, can be waited for, and is stopped
at teardown: no test leaves a process behind.

Nothing here sleeps for a fixed time: :func:`wait_until` polls a condition (a pid file
appears, a port answers, a process exits) with a generous upper bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import attrs
import pytest

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
SERVER = Path(__file__).resolve().parent / "apps" / "server.py"
PR_SET_CHILD_SUBREAPER = 36
TIMEOUT = 60.0
"""Upper bound for anything a test waits for. Generous: the machines are small and noisy."""


def pytest_configure(config: pytest.Config) -> None:
    """Adopt orphaned server generations (see the module docstring)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:  # pragma: no cover
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """What the tests under a real systemd saw: MainPIDs, requests, stop times."""
    from . import test_real_systemd  # noqa: PLC0415 - only once the run is over

    if test_real_systemd.REPORT:
        terminalreporter.section("under a real systemd")
        for line in test_real_systemd.REPORT:
            terminalreporter.line(line)


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = TIMEOUT) -> T:
    """Poll ``condition`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


def children() -> list[int]:
    """The pids of every live (not zombie) child of the test process."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[1] == me and fields[0] != "Z":
            found.append(int(entry))
    return found


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def open_fds(pid: int) -> int:
    """How many file descriptors ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def http_get(port: int, path: str = "/", timeout: float = TIMEOUT) -> tuple[int, str]:
    """One request on a new connection: (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def converse(sock: socket.socket, line: bytes) -> str:
    """Send ``line`` to the echo server on ``sock``; return the answer line."""
    sock.sendall(line)
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {answer!r}"
        answer += chunk
    return answer.decode()


def echo_line(port: int, line: bytes) -> str:
    """One line to the echo server on a new connection: its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        return converse(sock, line)


def answering_pid(body: str) -> int:
    """The pid in a demo answer (``hello from pid N``)."""
    match = re.search(r"pid (\d+)", body)
    assert match, f"no pid in {body!r}"
    return int(match.group(1))


@attrs.define
class Server:
    """A server started by a test, followed across its generations.

    Attributes:
        first: the first generation, started by the test.
        pid_file: the file the serving generation writes its pid to.
        log_path: where every generation writes its log (they share stderr).
        deploy_file: what the next generation does at start-up (see tests/apps/server.py).
    """

    first: subprocess.Popen[bytes]
    pid_file: Path
    log_path: Path
    deploy_file: Path
    exit_codes: dict[int, int] = attrs.field(factory=dict)

    def log(self) -> str:
        """Everything every generation logged so far."""
        return self.log_path.read_text(errors="replace")

    def serving_pid(self) -> int | None:
        """The pid in the pid file, or None while there is none."""
        try:
            text = self.pid_file.read_text()
        except FileNotFoundError:
            return None
        return int(text) if text.strip() else None

    def wait_serving(self, other_than: int | None = None) -> int:
        """Wait until a generation (other than ``other_than``) serves; return its pid."""

        def serving() -> int | None:
            pid = self.serving_pid()
            return pid if pid is not None and pid != other_than else None

        return wait_until(serving, f"a serving pid other than {other_than}\n{self.log()}")

    def wait_handover(self, old: int) -> int:
        """Wait until a successor serves and ``old`` stopped accepting; return the new pid.

        The successor writes the pid file as it says ready, a moment before the old copy
        stops accepting: until then either may answer a new connection.
        """
        new = self.wait_serving(other_than=old)
        wait_until(
            lambda: f"[pid {old}] stopped accepting" in self.log() or not is_running(old),
            f"pid {old} to stop accepting\n{self.log()}",
        )
        return new

    @property
    def port(self) -> int:
        """The TCP port the server listens on (it asked for port 0)."""
        match = re.search(r"listening on tcp 127\.0\.0\.1:(\d+)", self.log())
        assert match, f"no listening line in the log:\n{self.log()}"
        return int(match.group(1))

    def signal(self, sig: signal.Signals, pid: int | None = None) -> int:
        """Send ``sig`` to ``pid`` (default: the serving generation); return the pid."""
        target = pid if pid is not None else self.serving_pid()
        assert target is not None, "no serving pid"
        os.kill(target, sig)
        return target

    def exited(self, pid: int) -> bool:
        """Whether ``pid`` has exited; reap it if it is our child and remember its status."""
        if pid in self.exit_codes:
            return True
        if pid == self.first.pid:
            code = self.first.poll()
            if code is None:
                return False
            self.exit_codes[pid] = code
            return True
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (yet): its parent will reap it
            return not is_running(pid)
        if reaped == 0:
            return False
        self.exit_codes[pid] = os.waitstatus_to_exitcode(status)
        return True

    def wait_exit(self, pid: int, timeout: float = TIMEOUT) -> int | None:
        """Wait for ``pid`` to exit; return its status if we could reap it.

        A generation whose parent (the previous generation) is still alive when it exits
        is reaped by that parent, not by us: its status is then None here.
        """
        wait_until(lambda: self.exited(pid), f"pid {pid} to exit\n{self.log()}", timeout)
        if pid not in self.exit_codes:  # its parent reaped it: it has been re-parented to us
            with contextlib.suppress(ChildProcessError):
                self.exited(pid)
        return self.exit_codes.get(pid)

    def deploy(self, behaviour: str) -> None:
        """What the next generation does at start-up."""
        self.deploy_file.write_text(behaviour)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers (``tests/apps/server.py``) and stop every process they leave."""
    started: list[Server] = []

    def start(
        *args: str,
        cwd: Path | None = None,
        command: list[str] | None = None,
        deploy: str = "ok",
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> Server:
        """Start the test server with ``args``; ``deploy`` is how the first copy behaves."""
        index = len(started)
        pid_file = tmp_path / f"server{index}.pid"
        log_path = tmp_path / f"server{index}.log"
        deploy_file = tmp_path / f"server{index}.deploy"
        deploy_file.write_text(deploy)
        argv = [*(command or [sys.executable, str(SERVER)]), "--pid-file", str(pid_file)]
        if str(SERVER) in argv:  # the test server reads what to do from a deploy file
            argv += ["--deploy-file", str(deploy_file)]
        argv += args
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd or ROOT,
                env=environment,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        server = Server(process, pid_file, log_path, deploy_file)
        started.append(server)
        return server

    yield start
    stop_everything(started)


def stop_everything(servers: list[Server]) -> None:
    """SIGKILL every process our servers left (each in a session of its own), and reap them."""

    def kill_and_reap() -> bool:
        for server in servers:
            if server.first.poll() is None:
                server.first.kill()
        for pid in children():
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError):
                    kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        return all(server.first.poll() is not None for server in servers) and not children()

    wait_until(kill_and_reap, "every server process to be gone")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
