"""Log lines that say which process wrote them: generations share one log."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

__all__ = ["PrefixLog", "surviving"]


class PrefixLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger adapter that starts every message with ``prefix`` (``[pid 4242]``)."""

    def __init__(self, logger: logging.Logger, prefix: str) -> None:
        super().__init__(logger, {})
        self.prefix = prefix

    def process(
        self,
        msg: Any,  # noqa: ANN401 - the signature logging.LoggerAdapter gives
        kwargs: MutableMapping[str, Any],
    ) -> tuple[Any, Any]:
        return f"{self.prefix} {msg}", kwargs


@asynccontextmanager
async def surviving(log: logging.LoggerAdapter, what: str) -> AsyncIterator[None]:  # type: ignore[type-arg]
    """The body of a task the library runs for someone else (a control socket, a channel,
    a retired successor): an unexpected error is logged with its traceback, and ends
    that task only, never the serving process or the keeper."""
    try:
        yield
    except Exception:
        log.exception("%s failed; still serving", what)
