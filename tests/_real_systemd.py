"""A real systemd for the tests: PID 1 of private pid, mount, cgroup and uts namespaces.

The machines that run this suite are root, have systemd installed but not running, and a
writable cgroup2 hierarchy. :func:`boot` starts systemd as it would run in a container:

* a cgroup made for the test (under the host's cgroup2 mount) becomes the root of a new
  cgroup namespace, and a fresh cgroup2 mount on ``/sys/fs/cgroup`` shows only it;
* ``/run`` is a fresh tmpfs, with the test's unit directory bind-mounted on
  ``/run/systemd/system``; ``/proc`` is remounted for the new pid namespace;
* ``/dev/console`` is a bind-mounted pty, which the test reads (PID 1 logs there, and
  blocks if nobody reads);
* the network is the host's, so the test's clients reach the services on 127.0.0.1.

Every unit the tests write has ``DefaultDependencies=no``, and the units of the host's
early boot are masked: a service with default dependencies would pull in
``sysinit.target``, whose ``systemd-tmpfiles-setup.service`` empties the host's ``/tmp``
(the mount namespace shares it). :meth:`Machine.shutdown` leaves nothing behind: the
namespaces end with their PID 1, every process left in the test's cgroup is killed, and
the cgroups are removed.

``systemctl`` runs inside the namespaces (``nsenter -t PID -m -p``); pids it prints are the
namespace's, which :meth:`Machine.host_pid` translates.

Another systemd version runs the same way (:func:`fetch`): its Debian packages are
unpacked (``dpkg-deb -x``, nothing is installed) and bind-mounted over the installed
systemd inside the private mount namespace only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

CGROUP2 = Path("/sys/fs/cgroup/unified")
"""The host's cgroup2 mount (a hybrid host); ``/sys/fs/cgroup`` where it is pure cgroup2."""
SYSTEMD = Path("/lib/systemd/systemd")
TARGET = "graceful-test.target"
BOOT_TIMEOUT = 30.0
MASKED = (
    "sysinit.target",
    "basic.target",
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
    "systemd-udevd.service",
    "systemd-sysctl.service",
    "systemd-modules-load.service",
    "systemd-remount-fs.service",
)


def fetch(suite: str, directory: Path) -> Path:
    """Unpack systemd and libsystemd-shared from Debian's ``suite`` into ``directory``.

    The mirror is the one this machine's apt already uses; apt's state goes to a
    directory of its own, so the machine's package lists and sources are left alone.
    Returns the root to give :func:`boot` as ``overlay``.
    """
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    mirror = next(
        line.split()[1] for line in sources.read_text().splitlines() if line.startswith("URIs:")
    )
    state = directory / "apt"
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text(f"deb {mirror} {suite} main\n")
    apt = [
        "apt-get",
        "-q",
        f"-oDir::Etc::SourceList={state}/sources.list",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={state}/lists",
        f"-oDir::Cache={state}/cache",
        "-oAPT::Sandbox::User=root",
    ]
    subprocess.run([*apt, "update"], cwd=state, check=True, capture_output=True, timeout=300)
    packages = [f"systemd/{suite}", f"libsystemd-shared/{suite}"]
    subprocess.run(
        [*apt, "download", *packages], cwd=state, check=True, capture_output=True, timeout=300
    )
    root = directory / "root"
    for deb in state.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=300)
    return root


def cgroup2_root() -> Path:
    """Where the host's writable cgroup2 hierarchy is mounted."""
    if (CGROUP2 / "cgroup.procs").exists():
        return CGROUP2
    return Path("/sys/fs/cgroup")


@attrs.define
class Machine:
    """A running systemd, and what it takes to talk to it and to clean up after it."""

    process: subprocess.Popen[bytes]
    pid: int
    """PID 1 of the namespaces, as the host sees it."""
    unit_dir: Path
    cgroup: Path
    console_log: Path
    _console: int
    _reader: threading.Thread
    main_pids: list[int] = attrs.field(factory=list)
    """Every MainPID seen (host pids), in order: the figures a test run reports."""
    stops: list[float] = attrs.field(factory=list)
    """How long each ``systemctl stop`` took, in seconds."""

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        """Run ``systemctl ARGS`` inside the namespaces; its output (with ``check=False``,
        its error output too)."""
        began = time.monotonic()
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "systemctl", "--no-pager", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if args[:1] == ("stop",):
            self.stops.append(time.monotonic() - began)
        if check and result.returncode != 0:
            raise AssertionError(
                f"systemctl {' '.join(args)} exited {result.returncode}: "
                f"{result.stdout}{result.stderr}\n{self.console()[-4000:]}"
            )
        return result.stdout if check else result.stdout + result.stderr

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show`` of ``unit``: the properties asked for."""
        output = self.systemctl("show", unit, *(f"--property={name}" for name in properties))
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def host_pid(self, namespace_pid: int) -> int | None:
        """The host's pid of the process that is ``namespace_pid`` inside the namespaces."""
        ours = os.readlink(f"/proc/{self.pid}/ns/pid")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != ours:
                    continue
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == namespace_pid:
                    return int(entry)
        return None

    def main_pid(self, unit: str) -> int | None:
        """The unit's main process, as a host pid (None when it has none)."""
        pid = int(self.show(unit, "MainPID")["MainPID"])
        host = self.host_pid(pid) if pid else None
        if host is not None and host not in self.main_pids:
            self.main_pids.append(host)
        return host

    def version(self) -> str:
        """``systemd 252 (252.38-1~deb12u1)``: what runs inside the namespaces."""
        return self.systemctl("--version").splitlines()[0]

    def console(self) -> str:
        """What PID 1 wrote on the console so far."""
        return self.console_log.read_text(errors="replace")

    def write_unit(self, name: str, text: str) -> None:
        """Add or replace a unit file; call :meth:`reload` to make systemd read it."""
        (self.unit_dir / name).write_text(text)

    def shutdown(self) -> None:
        """Stop systemd and remove everything it made: processes, mounts, cgroups."""
        if self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self.systemctl("exit", check=False, timeout=30)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()  # unshare: its child, PID 1, goes with the namespace
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        _remove_cgroup(self.cgroup)
        os.close(self._console)
        self._reader.join(timeout=10)


def _remove_cgroup(cgroup: Path) -> None:
    """Kill whatever is left in ``cgroup`` and remove it with every cgroup below it."""
    if not cgroup.exists():
        return
    kill = cgroup / "cgroup.kill"
    deadline = time.monotonic() + 30
    while True:
        if kill.exists():
            kill.write_text("1")
        busy = [procs for procs in cgroup.rglob("cgroup.procs") if procs.read_text().strip()]
        if not busy:
            break
        assert time.monotonic() < deadline, f"processes left in {cgroup}: {busy}"
        time.sleep(0.01)
    for directory in sorted(
        (path for path in cgroup.rglob("*") if path.is_dir()), key=lambda p: -len(p.parts)
    ):
        directory.rmdir()
    cgroup.rmdir()


def _drain_console(console: int, log: Path) -> None:
    with log.open("ab", buffering=0) as out:
        while True:
            try:
                data = os.read(console, 65536)
            except OSError:  # the last writer is gone (EIO) or we closed it
                return
            if not data:
                return
            out.write(data)


@contextlib.contextmanager
def boot(directory: Path, overlay: Path | None = None) -> Iterator[Machine]:
    """Boot a systemd whose unit directory is ``directory/units``; shut it down after.

    ``overlay``: the root :func:`fetch` unpacked another systemd into, to run instead.
    """
    unit_dir = directory / "units"
    unit_dir.mkdir(exist_ok=True)
    (unit_dir / TARGET).write_text(
        "[Unit]\nDescription=graceful-restart tests\nDefaultDependencies=no\n"
    )
    for name in MASKED:
        link = unit_dir / name
        if not link.is_symlink():
            link.symlink_to("/dev/null")
    cgroup = cgroup2_root() / f"graceful-test-{secrets.token_hex(4)}"
    cgroup.mkdir()
    console, pty = os.openpty()
    console_log = directory / "console.log"
    versioned = []
    if overlay is not None:
        versioned = [
            f"mount --bind {overlay}/lib/systemd /usr/lib/systemd",
            f"mount --bind {overlay}/usr/lib/x86_64-linux-gnu/systemd "
            "/usr/lib/x86_64-linux-gnu/systemd",
            f"mount --bind {overlay}/bin/systemctl /usr/bin/systemctl",
        ]
    inner = " && ".join(
        [
            *versioned,
            "mount -t proc proc /proc",
            "mount -t tmpfs tmpfs /run",
            "mkdir -p /run/systemd/system",
            f"mount --bind {unit_dir} /run/systemd/system",
            f"mount --bind {os.ttyname(pty)} /dev/console",
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup",
            f"exec env -i {SYSTEMD} --system --unit={TARGET} --log-target=console",
        ]
    )
    outer = (
        f"echo $$ > {cgroup}/cgroup.procs && exec unshare --pid --fork --mount --uts --cgroup "
        f"--propagation private /bin/sh -c '{inner}'"
    )
    process = subprocess.Popen(
        ["/bin/sh", "-c", outer], stdin=subprocess.DEVNULL, stdout=pty, stderr=pty
    )
    os.close(pty)
    reader = threading.Thread(target=_drain_console, args=(console, console_log), daemon=True)
    reader.start()
    machine: Machine | None = None
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        pid = None
        while pid is None:
            assert process.poll() is None, f"systemd did not start:\n{_read(console_log)}"
            assert time.monotonic() < deadline, f"systemd did not start:\n{_read(console_log)}"
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
                pid = int(children.split()[0]) if children.split() else None
            time.sleep(0.01)
        machine = Machine(process, pid, unit_dir, cgroup, console_log, console, reader)
        while machine.systemctl("is-system-running", check=False).strip() not in (
            "running",
            "degraded",
        ):
            assert time.monotonic() < deadline, f"systemd did not come up:\n{machine.console()}"
            time.sleep(0.02)
        yield machine
    finally:
        if machine is not None:
            machine.shutdown()
        else:
            process.kill()
            process.wait(timeout=30)
            _remove_cgroup(cgroup)
            os.close(console)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
