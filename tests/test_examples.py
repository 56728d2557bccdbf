"""``examples/echo_server.py``, run as its README says (the other examples have their
own tests: ``test_websocket.py``, ``test_http.py``)."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable

from .conftest import ROOT, TIMEOUT, Server, converse

StartServer = Callable[..., Server]
ECHO = ROOT / "examples" / "echo_server.py"


def test_echo_server_restarts_with_a_connection_open(start_server: StartServer) -> None:
    server = start_server("--port", "0", command=[sys.executable, str(ECHO)])
    old = server.wait_serving()
    port = server.port
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as first:
        assert converse(first, b"hello\n") == f"{old} hello\n"
        server.signal(signal.SIGHUP, old)
        new = server.wait_handover(old)
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as second:
            assert converse(second, b"hi\n") == f"{new} hi\n"
        assert converse(first, b"again\n") == f"{old} again\n"  # the old copy keeps it
    assert server.wait_exit(old) in (0, None)
    server.signal(signal.SIGTERM, new)
    assert server.wait_exit(new) in (0, None)
