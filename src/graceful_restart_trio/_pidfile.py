"""The pid file and its record: which process is serving right now, written atomically.

Next to the pid file (``app.pid``) lies its *record* (``app.pid.json``)::

    {"pid": 4242, "starttime": 123456, "last_restart": {"outcome": "failed", ...}}

``starttime`` is when that process started (field 22 of ``/proc/<pid>/stat``, clock
ticks since boot): with it ``graceful-restart --pid-file`` can tell the server from an
unrelated process that got its pid after a crash. ``last_restart`` is the last restart's
timeline (:meth:`Timeline.as_dict`), or None: a CLI that sent ``SIGHUP`` reads the
outcome there. The record is written before the pid file, so a reader that sees a pid
in the pid file finds that pid's record (or a newer one). The pid file is mode 0644,
the record 0600 (it may hold lines of the server's stderr): whoever may signal the
server may read it.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, TypeGuard

from ._exceptions import PidFileError

__all__ = [
    "check_pid_file",
    "read_record",
    "record_path",
    "remove_pid_file",
    "start_ticks",
    "write_pid_file",
]


def record_path(path: Path) -> Path:
    """Where the record of the pid file ``path`` lies: ``path`` + ``.json``."""
    return path.with_name(f"{path.name}.json")


def start_ticks(pid: int) -> int:
    """When ``pid`` started: clock ticks since boot (field 22 of ``/proc/<pid>/stat``).

    Raises:
        OSError: there is no such process (or /proc cannot be read).
    """
    line = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    # The command name (field 2) may hold spaces and parentheses: count after the last ")".
    fields = line.rsplit(")", 1)[1].split()
    return int(fields[19])  # fields[0] is field 3 (the state)


def check_pid_file(path: Path) -> None:
    """Fail early, naming the problem, if ``path`` or its record can never be written.

    Raises:
        PidFileError: its directory is missing or is not a directory, or ``path`` or its
            record exists and is not a regular file.
    """
    try:
        if not path.parent.is_dir():
            raise PidFileError(f"pid file {path}: directory {path.parent} does not exist")
        for file in (path, record_path(path)):
            if file.is_symlink() or (file.exists() and not file.is_file()):
                # The file is replaced by a rename: that would replace a device (/dev/null,
                # say), a directory, or a link, rather than write to it.
                raise PidFileError(f"pid file {file} exists and is not a regular file")
    except OSError as error:  # a directory we may not search, say
        raise PidFileError(f"pid file {path}: {error}") from error


def write_pid_file(path: Path, pid: int, last_restart: dict[str, Any] | None = None) -> None:
    """Write the record of ``pid``, then ``pid`` to ``path``, each atomically.

    A reader sees the old content or the new one, never a mix; the record comes first,
    so the pid file never names a pid whose record is older than it. Called again for
    the same pid, it rewrites both (a failed restart's outcome, say).

    Args:
        path: the pid file.
        pid: the process in charge.
        last_restart: the last restart's timeline (:meth:`Timeline.as_dict`), or None.

    Raises:
        PidFileError: a file cannot be written; the message names the file and says why.
    """
    check_pid_file(path)
    try:
        starttime: int | None = start_ticks(pid)
    except (OSError, ValueError, IndexError):  # no /proc: readers fall back to the mtime
        starttime = None
    content = {"pid": pid, "starttime": starttime, "last_restart": last_restart}
    _write_atomically(record_path(path), json.dumps(content, default=str) + "\n", 0o600)
    _write_atomically(path, f"{pid}\n", 0o644)


def _write_atomically(path: Path, text: str, mode: int) -> None:
    temporary: str | None = None
    try:
        # A random name, created exclusively (O_EXCL, never through a link): whoever can
        # write the directory cannot make us truncate another file.
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(fd, mode)
            file.write(text)
            file.flush()
            os.fsync(fd)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise PidFileError(f"cannot write pid file {path}: {error}") from error


def read_record(path: Path) -> dict[str, Any] | None:
    """The record of the pid file ``path``; None if there is none or it cannot be read.

    A symlink, a file that is not JSON, or JSON that is not an object with an integer
    ``pid`` count as none. ``starttime`` is None when the writer could not read /proc.
    """
    try:
        fd = os.open(record_path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as file:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            record = json.loads(file.read(1 << 20)) if regular else None
    except (OSError, ValueError, RecursionError):
        return None
    return record if _is_record(record) else None


def _is_record(record: object) -> TypeGuard[dict[str, Any]]:
    if not isinstance(record, dict):
        return False
    pid, starttime, last = record.get("pid"), record.get("starttime"), record.get("last_restart")
    return (
        type(pid) is int
        and (starttime is None or type(starttime) is int)
        and (last is None or isinstance(last, dict))
    )


def remove_pid_file(path: Path, pid: int) -> bool:
    """Remove ``path`` and its record if ``path`` still names ``pid``.

    A successor's files are left alone: the record goes only if it names ``pid`` too
    (a successor writes its record first).

    Returns:
        Whether the pid file was removed.
    """
    try:
        if path.read_text(encoding="ascii").strip() != str(pid):
            return False
        path.unlink()
    except (OSError, UnicodeDecodeError):
        return False
    record = read_record(path)
    if record is not None and record["pid"] == pid:
        record_path(path).unlink(missing_ok=True)
    return True
