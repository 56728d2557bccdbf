"""The pid file: which process is serving right now, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ._exceptions import PidFileError

__all__ = ["check_pid_file", "remove_pid_file", "write_pid_file"]


def check_pid_file(path: Path) -> None:
    """Fail early, naming the problem, if ``path`` can never be written.

    Raises:
        PidFileError: its directory is missing or is not a directory, or ``path`` exists
            and is not a regular file.
    """
    if not path.parent.is_dir():
        raise PidFileError(f"pid file {path}: directory {path.parent} does not exist")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        # The file is replaced by a rename: that would replace a device (/dev/null, say),
        # a directory, or a link, rather than write to it.
        raise PidFileError(f"pid file {path} exists and is not a regular file")


def write_pid_file(path: Path, pid: int) -> None:
    """Write ``pid`` to ``path`` atomically: a reader sees the old pid or the new one.

    Raises:
        PidFileError: the file cannot be written; the message says why.
    """
    check_pid_file(path)
    temporary: str | None = None
    try:
        # A random name, created exclusively (O_EXCL, never through a link): whoever can
        # write the directory cannot make us truncate another file.
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            os.fchmod(fd, 0o644)
            file.write(f"{pid}\n")
            file.flush()
            os.fsync(fd)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise PidFileError(f"cannot write pid file {path}: {error}") from error


def remove_pid_file(path: Path, pid: int) -> bool:
    """Remove ``path`` if it still names ``pid``; a successor's file is left alone.

    Returns:
        Whether the file was removed.
    """
    try:
        if path.read_text(encoding="ascii").strip() != str(pid):
            return False
        path.unlink()
    except (OSError, UnicodeDecodeError):
        return False
    return True
