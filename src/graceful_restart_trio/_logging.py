"""Log lines that say which process wrote them: generations share one log."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

__all__ = ["PrefixLog"]


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
