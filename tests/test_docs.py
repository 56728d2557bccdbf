"""The documentation says what the code does: every Python block in README.md and docs/
is type-checked against the package (mypy), as a fragment of an application.

A block is checked inside an ``async def`` (so that ``async with`` and ``await`` at its
top level are fine), after a prelude that declares what the prose around it has already
introduced (``gr``, ``app``, a handler...). A name the prose never introduced, an
attribute the package does not have, or a call with the wrong arguments fails the test,
naming the file and line of the block.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from mypy import api

from .conftest import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)

PRELUDE = """\
from __future__ import annotations
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import trio
import graceful_restart_trio
import graceful_restart_trio as graceful_restart
from graceful_restart_trio import asgi
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from trio_util import move_on_when
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer

gr: graceful_restart.GracefulRestart
app: Any
listeners: list[trio.SocketListener]
lifespan: Any
async def handle_connection(stream: trio.SocketStream) -> None: ...
async def handler(stream: trio.SocketStream) -> None: ...
async def hello(request: Request) -> Response: ...
async def do_the_work() -> None: ...
async def my_accept_loop(listeners: Any, handler_nursery: trio.Nursery) -> None: ...
log = logging.getLogger("app")
"""
HEADER = len(PRELUDE.splitlines()) + 3  # the blank lines and the async def


def blocks() -> list[tuple[str, int, str]]:
    """(document, line, code) of every Python block."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 2
            found.append((str(document.relative_to(ROOT)), line, match.group(1)))
    return found


def test_every_python_block_in_the_docs_type_checks(tmp_path: Path) -> None:
    found = blocks()
    assert len(found) > 10, "the extraction found too few blocks"
    origins: dict[str, tuple[str, int]] = {}
    for number, (document, line, code) in enumerate(found):
        module = tmp_path / f"block_{number}.py"
        body = textwrap.indent(code, "    ")
        module.write_text(f"{PRELUDE}\n\nasync def _block() -> None:\n{body}    pass\n")
        origins[module.name] = (document, line)
    stdout, stderr, status = api.run(
        [
            *("--config-file", "/dev/null", "--ignore-missing-imports", "--no-error-summary"),
            *("--cache-dir", str(tmp_path / ".mypy"), "--disable-error-code", "empty-body"),
            str(tmp_path),
        ]
    )

    def where(match: re.Match[str]) -> str:
        document, line = origins[match[1]]
        return f"{document}:{line + int(match[2]) - HEADER}"

    errors = [re.sub(r"^.*?(block_\d+\.py):(\d+)", where, line) for line in stdout.splitlines()]
    assert status == 0, "\n".join(errors) + stderr
