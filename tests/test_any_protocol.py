"""Any protocol, not just HTTP: handler errors stay with their connection, a protocol can
tell a handover from a shutdown, and a type checker knows ``open()``'s options.

Real processes (``tests/apps/server.py --kind echo``) and real sockets on loopback.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .conftest import TIMEOUT, Server, converse, echo_line

StartServer = Callable[..., Server]


def test_one_handler_that_raises_cuts_only_its_own_connection(
    start_server: StartServer,
) -> None:
    """Ten clients connected, an eleventh makes its handler raise: the ten are served
    on, the error is logged at ERROR with its traceback, new clients are served."""
    server = start_server("--kind", "echo")
    pid = server.wait_serving()
    clients = [
        socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) for _ in range(10)
    ]
    try:
        assert [converse(client, b"before\n") for client in clients] == [f"{pid} before\n"] * 10
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as breaker:
            breaker.sendall(b"raise\n")
            assert breaker.recv(4096) == b""  # its connection, and only it, is closed
        assert [converse(client, b"after\n") for client in clients] == [f"{pid} after\n"] * 10
    finally:
        for client in clients:
            client.close()
    assert echo_line(server.port, b"new\n") == f"{pid} new\n"
    log = server.log()
    assert (
        f"ERROR graceful_restart_trio [pid {pid}] a connection's handler failed: that "
        "connection is closed, the others are served on"
    ) in log
    assert "RuntimeError: this client's input breaks its handler" in log
    server.signal(signal.SIGTERM, pid)
    assert server.wait_exit(pid) == 0


def test_a_protocol_can_tell_a_handover_from_a_shutdown(start_server: StartServer) -> None:
    """``await gr.wait_draining()`` says why: a client may reconnect at once after a
    handover, and should back off after a shutdown."""
    server = start_server("--kind", "echo")
    old = server.wait_serving()
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as held:
        assert converse(held, b"hi\n") == f"{old} hi\n"  # accepted: it has a handler
        held.sendall(b"wait-drain\n")
        server.signal(signal.SIGHUP, old)
        assert held.recv(4096) == f"{old} draining for a handover\n".encode()
    new = server.wait_serving(other_than=old)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as held:
        assert converse(held, b"hi\n") == f"{new} hi\n"
        held.sendall(b"wait-drain\n")
        server.signal(signal.SIGTERM, new)
        assert held.recv(4096) == f"{new} draining for a shutdown\n".encode()
    assert server.wait_exit(new) == 0


def test_a_misspelt_option_is_a_type_error_for_mypy(tmp_path: Path) -> None:
    """``open()`` has a real signature for type checkers: ``contrl=`` is an error."""
    program = tmp_path / "app.py"
    program.write_text(
        "import graceful_restart_trio as graceful_restart\n"
        "\n"
        "\n"
        "async def main() -> None:\n"
        '    async with graceful_restart.open(control="ok.sock", drain_timeout=5):\n'
        "        pass\n"
        '    async with graceful_restart.open(contrl="typo.sock"):\n'
        "        pass\n"
    )
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(program)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    errors = [line for line in checked.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, checked.stdout
    assert f"{program}:7: error:" in errors[0]
    assert '"contrl"' in errors[0]
