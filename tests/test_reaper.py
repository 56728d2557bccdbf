"""``_reaper``: what a PID 1 or a subreaper does, on real children of the test process.

The test process is a child subreaper already (see ``conftest``). :func:`reap` reaps
every child that has exited, so each test looks only at the pids it started. Nothing
sleeps: a child's exit is waited for on its pidfd, which does not reap it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

import pytest
import trio

from graceful_restart_trio._reaper import FORWARDED, become_subreaper, exit_code, reap

from .conftest import TIMEOUT

SH = "/bin/sh"


def spawn_sh(script: str, fds: dict[int, int] | None = None) -> int:
    """Start ``sh -c script`` as our child, with ``fds`` (target: ours) besides 0, 1, 2."""
    actions = [(os.POSIX_SPAWN_DUP2, ours, target) for target, ours in (fds or {}).items()]
    return os.posix_spawn(SH, [SH, "-c", script], os.environ, file_actions=actions)


def wait_exited(pid: int) -> None:
    """Wait until ``pid`` has exited, leaving it to be reaped."""
    pidfd = os.pidfd_open(pid)
    try:
        readable, _, _ = select.select([pidfd], [], [], TIMEOUT)
    finally:
        os.close(pidfd)
    assert readable, f"pid {pid} did not exit within {TIMEOUT}s"


def test_reap_reports_each_exited_child_and_leaves_the_live_ones() -> None:
    expected = {
        spawn_sh("exit 0"): 0,
        spawn_sh("exit 3"): 3,
        spawn_sh("kill -TERM $$"): -signal.SIGTERM,
    }
    read_end, write_end = os.pipe()
    live = spawn_sh("read line <&3; exit 5", {3: read_end})
    os.close(read_end)
    for pid in expected:
        wait_exited(pid)
    reported: dict[int, int] = {}
    reap(reported.__setitem__)  # returns at once: a child still runs
    assert {pid: reported.get(pid) for pid in expected} == expected
    assert live not in reported
    for pid in expected:
        with pytest.raises(ChildProcessError):  # reaped: no longer ours to wait for
            os.waitpid(pid, os.WNOHANG)

    os.close(write_end)  # it reads the end of the pipe, and exits
    wait_exited(live)
    reap(reported.__setitem__)
    assert reported[live] == 5


def test_reap_reports_an_orphan_the_subreaper_adopted() -> None:
    """A grandchild whose parent exited is ours to reap, with its status."""
    become_subreaper()
    read_end, write_end = os.pipe()
    out_read, out_write = os.pipe()
    middle = spawn_sh("sh -c 'read line <&3; exit 7' & echo $!", {3: read_end, 1: out_write})
    os.close(read_end)
    os.close(out_write)
    try:
        orphan = int(os.read(out_read, 100))
    finally:
        os.close(out_read)
    wait_exited(middle)
    reported: dict[int, int] = {}
    reap(reported.__setitem__)
    assert reported.get(middle) == 0
    assert orphan not in reported

    os.close(write_end)
    wait_exited(orphan)
    reap(reported.__setitem__)
    assert reported.get(orphan) == 7


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT], ids=lambda sig: sig.name
)
def test_exit_code_is_what_a_shell_reports(sig: signal.Signals) -> None:
    name = sig.name.removeprefix("SIG")
    shell = subprocess.run(
        [SH, "-c", f"sh -c 'kill -{name} $$'; echo $?"],
        capture_output=True,
        text=True,
        check=True,
        timeout=TIMEOUT,
    )
    child = spawn_sh(f"kill -{name} $$")
    wait_exited(child)
    reported: dict[int, int] = {}
    reap(reported.__setitem__)
    assert exit_code(reported[child]) == int(shell.stdout) == 128 + sig
    assert [exit_code(status) for status in (0, 1, 127)] == [0, 1, 127]


def test_become_subreaper_makes_the_process_a_child_subreaper() -> None:
    """In a new process (the flag is not inherited; the test process has it already)."""
    script = """if True:
        import ctypes
        from graceful_restart_trio._reaper import become_subreaper

        libc = ctypes.CDLL(None, use_errno=True)
        flag = ctypes.c_int(-1)

        def subreaper() -> int:
            assert libc.prctl(37, ctypes.byref(flag), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
            return flag.value

        before = subreaper()
        become_subreaper()
        print(before, subreaper())
    """
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=TIMEOUT
    )
    assert result.stdout.split() == ["0", "1"]


async def test_forwarded_signals_are_catchable_and_leave_out_the_reapers_own() -> None:
    assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGWINCH} <= (
        FORWARDED
    )
    assert not {signal.SIGCHLD, signal.SIGKILL, signal.SIGSTOP, signal.SIGSEGV} & FORWARDED
    assert not {signal.SIGPIPE, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU} & FORWARDED
    with trio.open_signal_receiver(*FORWARDED) as received:  # each can have a handler
        os.kill(os.getpid(), signal.SIGUSR1)
        async for signum in received:
            assert signum == signal.SIGUSR1
            break
