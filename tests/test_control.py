"""The control socket and ``graceful-restart``: restart, status, stop, from a shell.

Every command runs the real console script (``python -m graceful_restart_trio.cli``), or a
raw client, against a real server process with ``--control``; only a command that fails
inside the server is simulated, in this process, by a stand-in for the server.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from graceful_restart_trio._control import MAX_CONNECTIONS, serve
from graceful_restart_trio._logging import PrefixLog
from graceful_restart_trio._status import Status
from graceful_restart_trio._timeline import Timeline

from .conftest import TIMEOUT, Server, converse, http_get, wait_until
from .test_keeper import start_keeper

StartServer = Callable[..., Server]
NOBODY = 65534


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``graceful-restart ARGS``; its output and status."""
    return subprocess.run(
        [sys.executable, "-m", "graceful_restart_trio.cli", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        check=False,
    )


def start(start_server: StartServer, tmp_path: Path, *args: str) -> tuple[Server, Path, int]:
    control = tmp_path / "control.sock"
    server = start_server("--control", str(control), *args)
    pid = server.wait_serving()
    wait_until(control.exists, "the control socket")
    return server, control, pid


def status(control: Path) -> dict[str, Any]:
    answer = cli("status", "--control", str(control), "--json")
    assert answer.returncode == 0, answer
    result: dict[str, Any] = json.loads(answer.stdout)
    return result


def test_restart_prints_the_phases_and_exits_0_with_the_new_pid(
    start_server: StartServer, tmp_path: Path
) -> None:
    server, control, old = start(start_server, tmp_path)
    answer = cli("restart", "--control", str(control))
    assert answer.returncode == 0, answer
    new = server.wait_serving(other_than=old)
    lines = answer.stdout.splitlines()
    assert lines[0] == f"restart requested: pid {old}, generation 1"
    assert lines[1].startswith(f"successor {new} started (")
    assert [line.split(" (")[0] for line in lines[2:-1]] == [
        "successor ready",
        "old copy stopped accepting: probation 0.2s",
        "handover committed",
        "old copy draining 0 lease(s)",
    ]
    assert lines[-1] == f"restarted: pid {new} serves"
    assert server.wait_exit(old) in (0, None)
    # The control socket moved on with the service: the new copy answers on the same path.
    after = status(control)
    assert (after["pid"], after["generation"]) == (new, 2)
    last = after["last_restart"]
    assert isinstance(last, dict)
    assert (last["trigger"], last["outcome"]) == ("control", "committed")
    assert list(last["phases"]) == [
        "spawned",
        "ready",
        "stopped accepting",
        "committed",
        "draining",
        "old copy exited",
    ]
    assert after["restarts"] == {"committed": 1}


def test_restart_reports_a_crash_at_import_with_its_status_and_stderr(
    start_server: StartServer, tmp_path: Path
) -> None:
    server, control, old = start(start_server, tmp_path)
    server.deploy("crash-at-import")
    answer = cli("restart", "--control", str(control))
    assert answer.returncode == 1, answer
    assert "restart failed: successor " in answer.stdout
    assert "exited with status 3 before it was ready" in answer.stdout
    assert "  | ModuleNotFoundError: No module named 'app.views'" in answer.stdout
    assert server.serving_pid() == old
    assert http_get(server.port)[0] == 200  # still serving
    assert status(control)["restarts"] == {"failed": 1}


def test_restart_reports_a_hung_successor_at_the_ready_timeout(
    start_server: StartServer, tmp_path: Path
) -> None:
    server, control, old = start(start_server, tmp_path, "--ready-timeout", "1")
    server.deploy("hang-before-ready")
    answer = cli("restart", "--control", str(control))
    assert answer.returncode == 1, answer
    assert "was not ready within 1s: killed it" in answer.stdout
    assert server.serving_pid() == old


def test_status_shows_leases_in_flight_and_an_old_copy_draining(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A connection held open keeps the old copy draining for as long as the test says:
    the status names it, whatever the machine's speed."""
    server, control, old = start(start_server, tmp_path, "--kind", "echo")
    port = server.port
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as held:
        assert converse(held, b"hi\n") == f"{old} hi\n"  # accepted: under its lease
        during = status(control)
        # The server's own lease (gr.serve_listeners) and the connection's.
        assert (during["pid"], during["state"], during["leases"]) == (old, "serving", 2)
        assert during["listeners"] == [
            {"name": "graceful-restart-control", "address": str(control)},
            {"name": "tcp:127.0.0.1:0", "address": f"127.0.0.1:{port}"},  # asked for port 0
        ]
        assert cli("restart", "--control", str(control)).returncode == 0
        new = server.wait_serving(other_than=old)
        draining = status(control)
        assert draining["pid"] == new
        assert draining["draining"] == [{"pid": old, "role": "predecessor"}]
        assert converse(held, b"still\n") == f"{old} still\n"
    assert server.wait_exit(old) in (0, None)
    wait_until(lambda: status(control)["draining"] == [], "the old copy to be gone")
    text = cli("status", "--control", str(control))
    assert text.returncode == 0
    assert f"pid {new}: serving, generation 2" in text.stdout
    assert "last restart (control): committed" in text.stdout


def test_status_in_the_prometheus_format(start_server: StartServer, tmp_path: Path) -> None:
    server, control, old = start(start_server, tmp_path)
    assert cli("restart", "--control", str(control)).returncode == 0
    server.wait_serving(other_than=old)
    answer = cli("status", "--control", str(control), "--prometheus")
    assert answer.returncode == 0, answer
    metrics = answer.stdout.splitlines()
    assert 'graceful_restart_state{state="serving"} 1.0' in metrics
    assert "graceful_restart_generation 2.0" in metrics
    assert 'graceful_restart_restarts_total{outcome="committed"} 1.0' in metrics
    ready = 'graceful_restart_last_restart_phase_seconds{phase="ready"}'
    assert any(metric.startswith(ready) for metric in metrics)


def test_stop_waits_for_the_drain(start_server: StartServer, tmp_path: Path) -> None:
    server, control, pid = start(start_server, tmp_path)
    with concurrent.futures.ThreadPoolExecutor() as pool:
        slow = pool.submit(http_get, server.port, "/sleep?seconds=2")
        wait_until(lambda: "request /sleep started" in server.log(), "the slow request")
        answer = cli("stop", "--control", str(control))
        assert answer.returncode == 0, answer
        assert not os.path.exists(f"/proc/{pid}/status") or server.exited(pid)
        assert slow.done()  # the drain waited for it
        assert slow.result() == (200, f"hello from pid {pid}\n")
    assert answer.stdout.splitlines() == [
        f"pid {pid} stopping: draining 1 lease(s)",
        f"pid {pid} drained and exited",
    ]
    assert not control.exists()
    assert f"[pid {pid}] stop asked for on the control socket\n" in server.log()


def test_restart_and_stop_with_only_a_pid_file(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    old = server.wait_serving()
    answer = cli("restart", "--pid-file", str(server.pid_file), "--timeout", str(TIMEOUT))
    assert answer.returncode == 0, answer
    new = server.wait_serving(other_than=old)
    assert answer.stdout.splitlines()[-1] == f"restarted: pid {new} serves"
    assert cli("stop", "--pid-file", str(server.pid_file)).returncode == 0
    assert server.wait_exit(new) in (0, None)


def test_a_peer_with_another_uid_is_refused(start_server: StartServer) -> None:
    """Mode 0600 keeps other users out; SO_PEERCRED refuses them even where it does not."""
    with tempfile.TemporaryDirectory() as directory:  # one that other users may enter
        shared = Path(directory)
        shared.chmod(0o755)
        server, control, pid = start(start_server, shared)
        assert os.stat(control).st_mode & 0o777 == 0o600
        assert ask_as(NOBODY, control) == "PermissionError"
        control.chmod(0o666)  # as if an operator loosened it
        answer = json.loads(ask_as(NOBODY, control))
        assert answer == {"result": "failed", "reason": f"uid {NOBODY} may not control this"}
        assert f"control: refused a peer with uid {NOBODY}" in server.log()
        assert cli("stop", "--control", str(control)).returncode == 0  # root may
        assert server.wait_exit(pid) in (0, None)


def ask_as(uid: int, control: Path, request: bytes = b'{"command": "status"}\n') -> str:
    """Send ``request`` as ``uid`` (a forked child); the answer up to the server's close, or
    the name of the error that cut it."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect(str(control))
                sock.sendall(request)
                with sock.makefile("rb") as answers:
                    answer = answers.read().strip()
        except OSError as error:
            answer = type(error).__name__.encode()
        os.write(write, answer)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer_bytes = pipe.read()
    os.waitpid(child, 0)
    return answer_bytes.decode()


def test_a_refused_peer_is_refused_before_its_request_is_read(start_server: StartServer) -> None:
    """The peer is checked first: one that never sends a byte gets its refusal, then an EOF."""
    with tempfile.TemporaryDirectory() as directory:
        shared = Path(directory)
        shared.chmod(0o755)
        _, control, pid = start(start_server, shared)
        control.chmod(0o666)
        refusal = json.dumps({"result": "failed", "reason": f"uid {NOBODY} may not control this"})
        assert ask_as(NOBODY, control, request=b"") == refusal  # not a reset: the whole answer
        # Its request is never parsed: a line that would break the parser is not even read.
        assert ask_as(NOBODY, control, request=b"[" * 2000 + b"\n") == refusal
        assert status(control)["pid"] == pid


def ask(control: Path, line: bytes) -> list[dict[str, object]]:
    """Send ``line`` on a new control connection; every answer line up to the server's close."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(control))
        return ask_on(sock, line)


def ask_on(sock: socket.socket, line: bytes) -> list[dict[str, object]]:
    """Send ``line`` on a connected control socket; every answer line up to the server's close."""
    sock.sendall(line)
    with sock.makefile("rb") as answers:
        return [json.loads(answer) for answer in answers]


def test_a_request_that_breaks_the_parser_is_a_bad_request(
    start_server: StartServer, tmp_path: Path
) -> None:
    """2,000 ``[`` make json.loads raise RecursionError: answered, and the server serves on."""
    server, control, pid = start(start_server, tmp_path)
    [answer] = ask(control, b"[" * 2000 + b"\n")
    assert answer["result"] == "failed"
    assert str(answer["reason"]).startswith("bad request: RecursionError("), answer
    after = status(control)
    assert (after["pid"], after["state"]) == (pid, "serving")
    assert http_get(server.port) == (200, f"hello from pid {pid}\n")


def test_connections_over_the_cap_are_refused_at_once(
    start_server: StartServer, tmp_path: Path
) -> None:
    """With MAX_CONNECTIONS idle connections open, one more is answered at once and closed;
    refused ones hold no place: closing one idle connection lets ``status`` in again."""
    _, control, pid = start(start_server, tmp_path)
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX)
            idle.append(sock)
            sock.connect(str(control))
        too_many = {
            "result": "failed",
            "reason": f"too many control connections ({MAX_CONNECTIONS})",
        }
        for _ in range(3):
            assert ask(control, b"") == [too_many]  # before it sends a byte
        idle.pop().close()

        def answered() -> dict[str, object] | None:
            [answer] = ask(control, b'{"command": "status"}\n')
            return answer if answer["result"] == "ok" else None

        served = wait_until(answered, "a place for a status request")["status"]
        assert isinstance(served, dict)
        assert served["pid"] == pid
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.parametrize(
    ("request_line", "reason"),
    [
        (b'{"command": "dance"}\n', "unknown command 'dance' (known: restart, status, stop)"),
        (b"[1, 2]\n", "bad request: ValueError('not a JSON object')"),
    ],
)
def test_a_bad_request_gets_a_clear_answer(
    start_server: StartServer, tmp_path: Path, request_line: bytes, reason: str
) -> None:
    _, control, _ = start(start_server, tmp_path)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(control))
        sock.sendall(request_line)
        answer = json.loads(sock.makefile("rb").readline())
    assert answer == {"result": "failed", "reason": reason}


def test_a_connection_accepted_before_a_shutdown_is_answered(
    start_server: StartServer, tmp_path: Path
) -> None:
    """``status`` sent once the drain has begun, on a connection accepted while serving,
    is answered with the state of that moment."""
    server, control, pid = start(start_server, tmp_path, "--kind", "echo")
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as client,
        socket.socket(socket.AF_UNIX) as early,
    ):
        assert converse(client, b"hi\n") == f"{pid} hi\n"  # a lease: the drain waits for it
        early.settimeout(TIMEOUT)
        early.connect(str(control))
        # Accepted in order: once a later connection is answered, `early` is accepted too.
        assert ask(control, b'{"command": "status"}\n')[0]["result"] == "ok"
        server.signal(signal.SIGTERM)
        wait_until(lambda: "stopped accepting; draining" in server.log(), "the drain")
        [answer] = ask_on(early, b'{"command": "status"}\n')
        assert answer["result"] == "ok", answer
        during = answer["status"]
        assert isinstance(during, dict)
        # The leases: the echo server's own and its connection's.
        assert (during["pid"], during["state"], during["leases"]) == (pid, "draining", 2)
    assert server.wait_exit(pid) == 0


@attrs.define
class FailingTarget:
    """A process in charge whose command ``failing`` raises ``error``."""

    failing: str
    error: Exception

    def _control_status(self) -> Status:
        if self.failing == "status":
            raise self.error
        pid = os.getpid()
        return Status(pid, pid, "serving", 1, True, 0.0, leases=0, keeper=None, successor=None)

    def _control_restart(self, timeline: Timeline) -> float:
        raise NotImplementedError

    def _control_stop(self, immediate: bool) -> None:
        if self.failing == "stop":
            raise self.error


async def ask_async(path: Path, request: dict[str, object]) -> list[dict[str, object]]:
    """Send ``request`` on a new control connection; every answer line up to its close."""
    with trio.fail_after(TIMEOUT):
        async with await trio.open_unix_socket(str(path)) as stream:
            await stream.send_all(json.dumps(request).encode() + b"\n")
            data = b"".join([chunk async for chunk in stream])
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize(
    ("command", "error"),
    [("stop", PermissionError(13, "Permission denied")), ("status", RuntimeError("a bug"))],
)
async def test_a_command_that_fails_is_logged_and_answered_as_an_internal_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, command: str, error: Exception
) -> None:
    """An error of the command (an OSError too) is not the operator going away: it is
    logged with its traceback and answered, and the control socket serves on."""
    path = tmp_path / "control.sock"
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen()
    log = PrefixLog(logging.getLogger("graceful_restart_trio"), "[test]")
    async with trio.SocketListener(sock) as listener, trio.open_nursery() as nursery:
        nursery.start_soon(serve, listener, FailingTarget(command, error), log, nursery)
        answers = await ask_async(path, {"command": command})
        assert answers[-1] == {"result": "failed", "reason": f"internal error: {error!r}"}
        [failure] = [r for r in caplog.records if r.exc_info and r.exc_info[1] is error]
        assert failure.getMessage() == f"[test] control: the {command} command failed"
        assert await ask_async(path, {"command": "dance"}) == [
            {"result": "failed", "reason": "unknown command 'dance' (known: restart, status, stop)"}
        ]
        nursery.cancel_scope.cancel()


# -- under the keeper: the keeper owns the control socket ----------------------------------


def start_kept(start_server: StartServer, tmp_path: Path, *args: str) -> tuple[Server, Path]:
    control = tmp_path / "keeper-control.sock"
    server = start_keeper(
        start_server,
        tmp_path,
        *args,
        keeper_options=["--control", str(control), "--probation", "0.2"],
    )
    server.wait_serving()
    wait_until(control.exists, "the keeper's control socket")
    return server, control


def test_under_the_keeper_restart_status_and_stop(
    start_server: StartServer, tmp_path: Path
) -> None:
    server, control = start_kept(start_server, tmp_path)
    keeper, first = server.first.pid, server.wait_serving()
    before = status(control)
    assert (before["pid"], before["keeper"], before["generation"], before["leases"]) == (
        first,
        keeper,
        1,
        None,
    )
    with concurrent.futures.ThreadPoolExecutor() as pool:
        slow = pool.submit(http_get, server.port, "/sleep?seconds=2")
        wait_until(lambda: "request /sleep started" in server.log(), "the slow request")
        answer = cli("restart", "--control", str(control))
        assert answer.returncode == 0, answer
        second = server.wait_serving(other_than=first)
        assert answer.stdout.splitlines()[-1] == f"restarted: pid {second} serves"
        draining = status(control)
        assert draining["pid"] == second
        assert draining["draining"] == [{"pid": first, "role": "generation 1"}]
        assert slow.result(timeout=TIMEOUT) == (200, f"hello from pid {first}\n")
    server.deploy("crash-at-import")
    failed = cli("restart", "--control", str(control))
    assert failed.returncode == 1
    assert "exited with status 3 before it was ready" in failed.stdout
    assert "  | ModuleNotFoundError: No module named 'app.views'" in failed.stdout
    assert status(control)["restarts"] == {"committed": 1, "failed": 1}
    stopped = cli("stop", "--control", str(control))
    assert stopped.returncode == 0, stopped
    assert stopped.stdout.splitlines()[-1] == f"pid {keeper} drained and exited"
    assert server.wait_exit(keeper) == 0
    assert not control.exists()


def test_under_the_keeper_a_hung_generation_is_reported(
    start_server: StartServer, tmp_path: Path
) -> None:
    control = tmp_path / "keeper-control.sock"
    options = ["--control", str(control), "--ready-timeout", "1"]
    server = start_keeper(start_server, tmp_path, keeper_options=options)
    first = server.wait_serving()
    wait_until(control.exists, "the keeper's control socket")
    server.deploy("hang-before-ready")
    answer = cli("restart", "--control", str(control))
    assert answer.returncode == 1, answer
    assert "was not ready within 1s: killed it" in answer.stdout
    assert status(control)["pid"] == first


def test_a_keeper_with_another_uid_peer_refuses_it(start_server: StartServer) -> None:
    with tempfile.TemporaryDirectory() as directory:
        shared = Path(directory)
        shared.chmod(0o755)
        server, control = start_kept(start_server, shared)
        control.chmod(0o666)
        answer = json.loads(ask_as(NOBODY, control))
        assert answer == {"result": "failed", "reason": f"uid {NOBODY} may not control this"}
        assert cli("stop", "--control", str(control)).returncode == 0
        assert server.wait_exit(server.first.pid) == 0


def test_under_the_keeper_a_request_that_breaks_the_parser_is_a_bad_request(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The keeper answers 2,000 ``[`` as a bad request and keeps the service up."""
    server, control = start_kept(start_server, tmp_path)
    first = server.wait_serving()
    [answer] = ask(control, b"[" * 2000 + b"\n")
    assert answer["result"] == "failed"
    assert str(answer["reason"]).startswith("bad request: RecursionError("), answer
    after = status(control)
    assert (after["pid"], after["keeper"], after["state"]) == (first, server.first.pid, "serving")
    assert http_get(server.port) == (200, f"hello from pid {first}\n")
