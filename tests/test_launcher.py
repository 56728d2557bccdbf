"""The launcher, seen from outside: a short command line that names it, and a text that a
deploy cannot take away from a restart under way (see ``_launcher``'s docstring)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .conftest import ROOT, SERVER, Server, echo_line, wait_until

StartServer = Callable[..., Server]


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(entry))
    return found


def parent_of(pid: int) -> int:
    """The parent pid of ``pid``, from ``/proc/<pid>/stat``."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def command_line(pid: int) -> list[str]:
    """The argv of ``pid``, from ``/proc/<pid>/cmdline`` (empty once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def test_ps_shows_a_short_command_line_that_names_the_launcher(
    start_server: StartServer,
) -> None:
    """During a restart the launcher's argv is the label, the directory, the fd count and
    the successor's command: under 1 KiB, not the launcher's source."""
    server = start_server("--kind", "echo", "--probation", "5")
    old = server.wait_serving()
    server.signal(signal.SIGHUP)

    def successor_started() -> int | None:
        """The old copy's grandchild (until the handover commits), once it runs the app."""
        for pid in (pid for child in children_of(old) for pid in children_of(child)):
            if command_line(pid)[:2] == [sys.executable, str(SERVER)]:
                return pid
        return None

    successor = wait_until(successor_started, f"a successor\n{server.log()}")
    launcher = parent_of(successor)
    argv = command_line(launcher)
    raw = Path(f"/proc/{launcher}/cmdline").read_bytes()
    assert len(raw) < 1024, raw[:200]
    assert argv[:3] == [sys.executable, "-I", "-S"]
    assert argv[3].startswith("/proc/self/fd/")
    assert argv[4] == "graceful-restart-launcher"
    assert Path(argv[5]).samefile(ROOT)  # the successor's working directory
    assert int(argv[6]) >= 2  # the successor's fds: the channel and the listener at least
    assert argv[7:] == command_line(successor)
    new = server.wait_handover(old)
    assert new == successor
    assert echo_line(server.port, b"hi\n") == f"{new} hi\n"
    assert server.wait_exit(old) == 0
    server.signal(signal.SIGTERM)
    assert server.wait_exit(new) == 0


def test_a_deploy_that_replaced_the_launcher_file_cannot_break_a_restart(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A copy of the library whose ``_launcher.py`` is replaced after the server started:
    the restart runs the text read at import; the next copy, which imported the new
    text, runs that."""
    library = tmp_path / "library"
    shutil.copytree(
        ROOT / "src" / "graceful_restart_trio",
        library / "graceful_restart_trio",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    server = start_server("--kind", "echo", env={"PYTHONPATH": str(library)})
    old = server.wait_serving()
    ran = tmp_path / "replaced-launcher-ran"
    (library / "graceful_restart_trio" / "_launcher.py").write_text(
        f"open({str(ran)!r}, 'w').close()\nraise SystemExit(9)\n"
    )
    answer = echo_line(server.port, b"restart\n")
    new = server.wait_handover(old)
    assert answer == f"{old} restarted {new}\n"
    assert not ran.exists()
    assert server.wait_exit(old) == 0
    answer = echo_line(server.port, b"restart\n")  # this copy read the replaced text
    assert answer.startswith(f"{new} failed SuccessorStartError:"), answer
    assert ran.exists()
    assert echo_line(server.port, b"hi\n") == f"{new} hi\n"
    server.signal(signal.SIGTERM)
    assert server.wait_exit(new) == 0
