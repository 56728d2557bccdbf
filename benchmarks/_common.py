"""Helpers the benchmark scripts share: statistics, a Markdown table, the environment, JSON.

Not a benchmark itself. The scripts import it as ``_common`` (they run as
``python benchmarks/X.py``, which puts this directory first on ``sys.path``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "environment",
    "environment_lines",
    "markdown_table",
    "package_version",
    "summary",
    "write_json",
]


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``values`` (which must not be empty)."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; numbers are right-aligned."""

    def right(column: int) -> bool:
        return bool(rows) and all(isinstance(row[column], int | float) for row in rows)

    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if right(i) else ("-" * (w + 2)) for i, w in enumerate(widths)
        )
        + "|",
    ]
    for row in cells:
        lines.append(
            "| "
            + " | ".join(
                cell.rjust(w) if right(i) else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            + " |"
        )
    return "\n".join(lines)


def package_version(name: str, python: str | None = None) -> str:
    """The installed version of ``name``, in this interpreter or in ``python``."""
    if python is None or python == sys.executable:
        from importlib import metadata  # noqa: PLC0415 - only needed here

        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"
    code = (
        "import importlib.metadata as m, sys\n"
        "try: print(m.version(sys.argv[1]))\n"
        "except m.PackageNotFoundError: print('not installed')\n"
    )
    result = subprocess.run(
        [python, "-c", code, name], capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.strip()


def environment() -> dict[str, object]:
    """What a reader needs to compare a result: date, command line, machine, versions."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.orig_argv[1:]]),
        "nproc": len(os.sched_getaffinity(0)),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "trio": package_version("trio"),
        "graceful_restart_trio": package_version("graceful-restart-trio"),
    }


def environment_lines(env: dict[str, object]) -> str:
    """The environment as Markdown bullet lines."""
    return "\n".join(f"- {key}: `{value}`" for key, value in env.items())


def write_json(path: str | Path, data: object) -> None:
    """Write ``data`` as indented JSON to ``path``."""
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
