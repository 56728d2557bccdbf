"""The launcher: the successor's parent until the handover commits. Standard library only.

Theory of operation
-------------------

A successor must be two things that one process cannot give it at once. Until it is
trusted it must be a *child* of someone who can report why it died (its exit status) and
kill everything it started, helpers in sessions of their own included. Once it is trusted
it must be the service manager's to supervise: systemd only waits for, drains and reports
the crash of a ``MAINPID=`` that is its own child (re-parented to it), never a child of
the old main process.

So the predecessor does not start the successor itself: it starts this launcher, which is
a *child subreaper* and starts the successor. The launcher stays until the predecessor
tells it how the handover ended:

* ``release``: it exits at once, and the kernel re-parents the successor (and anything it
  orphaned) to the nearest subreaper above, or PID 1: systemd, the keeper, a container's
  init. This is the commit point.
* ``kill``: it kills the successor's session, then everything else it adopted, reaps it
  all, and exits.
* the channel closes: the predecessor is gone, and the successor must go on serving: the
  launcher releases it.

It says ``started <pid>`` with a pidfd of the successor (``SCM_RIGHTS``), or ``failed
<errno> <message>`` if it could not start it; and ``exited <status>`` (as
:func:`os.waitstatus_to_exitcode` gives it) when the successor exits first. Then it kills
whatever the successor left and exits.

It runs as ``python -I -S /proc/self/fd/<N> graceful-restart-launcher <cwd> <fds>
<command>...``, ``<N>`` being a memfd that holds this file's text, read when the library
was imported: a deploy which replaced or removed the library's files cannot break a
restart, and ``ps`` shows a short line that names the launcher and the command it starts.

Arguments: the label ``graceful-restart-launcher`` (for people reading ``ps``), the
successor's working directory, ``fds`` (how many file descriptors the successor gets), and
the successor's command. File descriptors: 3 is the channel to the predecessor; 4, 5, ...
become the successor's 3, 4, ... ; the last, ``4 + fds``, is the memfd this file was read
from, kept open (close-on-exec) so that a traceback can quote its lines. The environment
is the successor's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import sys
import time

CONTROL_FD = 3
KILL_GRACE = 5.0
"""Seconds the launcher spends killing and reaping what the successor left, at most."""

_PR_SET_CHILD_SUBREAPER = 36


def _spawn(cwd: str, command: list[str], fds: int) -> int:
    """Start ``command`` in a new session with our fds 4.. at 3.. and defaults for signals."""
    for fd in range(CONTROL_FD, CONTROL_FD + 2 + fds):  # the channel, theirs, our text
        os.set_inheritable(fd, False)
    # Shifting down by one in ascending order never overwrites a source not yet copied;
    # dup2 clears close-on-exec on its target.
    actions = [(os.POSIX_SPAWN_DUP2, fd + 1, fd) for fd in range(CONTROL_FD, CONTROL_FD + fds)]
    os.chdir(cwd)
    # SIGHUP stays ignored (inherited from us, see main) until the successor handles it.
    everything = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP, signal.SIGHUP}
    return os.posix_spawnp(
        command[0],
        command,
        os.environ,
        file_actions=actions,
        setsid=True,
        setsigmask=(),
        setsigdef=everything,
    )


def _children() -> list[int]:
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                found.append(int(entry))
    return found


def _kill_everything(pid: int) -> None:
    """SIGKILL the successor's session and everything we adopted; reap it all.

    The successor is not reaped yet, so its pid (and session id) still names it.
    """
    deadline = time.monotonic() + KILL_GRACE
    targets = [pid]
    while time.monotonic() < deadline:
        for target in targets:
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(OSError):
                    kill(target, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return  # nothing left
        targets = _children()  # what the dead left to us since
        time.sleep(0.001)


def _exit_status(pid: int) -> int:
    """The successor's status as :func:`os.waitstatus_to_exitcode` says it, without reaping."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    assert info is not None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _say(control: socket.socket, line: str, fds: list[int] | None = None) -> None:
    with contextlib.suppress(OSError):  # the predecessor is gone: nobody to tell
        socket.send_fds(control, [line.encode() + b"\n"], fds or [])


def main() -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # first: a restart signal must not kill us
    _label, cwd, count, *command = sys.argv[1:]
    fds = int(count)
    control = socket.socket(fileno=CONTROL_FD)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        pid = _spawn(cwd, command, fds)
    except OSError as error:
        _say(control, f"failed {error.errno} {error.strerror}: {command[0]}")
        return 1
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as error:  # it must not live on, unfollowed: it would take charge
        _kill_everything(pid)
        _say(control, f"failed {error.errno} {error.strerror}: {command[0]}")
        return 1
    _say(control, f"started {pid}", [pidfd])
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if pidfd in ready:
            _say(control, f"exited {_exit_status(pid)}")
            _kill_everything(pid)
            return 0
        try:
            word = control.recv(64).strip()
        except OSError:
            word = b""
        if word == b"kill":
            _kill_everything(pid)
            return 0
        if word in (b"release", b""):
            return 0


if __name__ == "__main__":
    sys.exit(main())
