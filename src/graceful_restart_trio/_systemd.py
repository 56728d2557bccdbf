"""The systemd client: notifications, socket activation, and the watchdog.

Three small protocols, each read from the environment systemd gives the process:

* ``NOTIFY_SOCKET``: where :class:`Notifier` sends ``KEY=VALUE`` datagrams
  (``READY=1``, ``MAINPID=...``, ``WATCHDOG=1``, ``FDSTORE=1`` with the sockets, ...).
* ``LISTEN_PID`` / ``LISTEN_FDS`` / ``LISTEN_FDNAMES``: the sockets systemd opened for us,
  on fds 3, 4, ... (:func:`listen_fds`).
* ``WATCHDOG_USEC`` / ``WATCHDOG_PID``: how often systemd wants to hear from us
  (:func:`watchdog_interval`, :func:`run_watchdog`).

Nothing here knows about restarts, and nothing needs libsystemd. Sending never raises: a
missing or broken systemd must not take the service down, so failures are logged instead.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
import time
import typing
from collections.abc import Mapping, MutableMapping, Sequence

import attrs
import trio

from ._exceptions import InheritanceError, SocketActivationError

__all__ = [
    "ACTIVATION_VARIABLES",
    "WATCHDOG_VARIABLES",
    "InheritedSocket",
    "Notifier",
    "listen_fds",
    "listen_sockets",
    "monotonic_usec",
    "remove_stored_fds",
    "run_watchdog",
    "store_fds",
    "stored_name",
    "watchdog_interval",
]

_logger = logging.getLogger("graceful_restart_trio")

_LISTEN_FDS_START = 3
ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID")
"""Socket activation's variables: meant for one pid, never passed on."""
WATCHDOG_VARIABLES = ("WATCHDOG_USEC", "WATCHDOG_PID")
_MAX_FD_NAME_LENGTH = 255


def monotonic_usec() -> int:
    """Return ``CLOCK_MONOTONIC`` in microseconds, as systemd's ``MONOTONIC_USEC=`` wants it.

    This is the kernel's clock, comparable across processes; :func:`trio.current_time` is not.
    """
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _parse_int(
    variable: str,
    value: str,
    minimum: int,
    error: type[InheritanceError] = InheritanceError,
) -> int:
    """Parse ``value`` strictly: ASCII digits only (no sign, space or prefix), at least ``minimum``.

    Raises:
        InheritanceError: ``error``, naming ``variable`` and ``value``, if it is malformed.
    """
    if not (value.isascii() and value.isdecimal()) or int(value) < minimum:
        kind = "a positive" if minimum > 0 else "a non-negative"
        raise error(f"{variable} must be {kind} integer, got {value!r}")
    return int(value)


def _check_notify_address(_instance: object, _attribute: object, address: str) -> None:
    """Reject a ``NOTIFY_SOCKET`` value that is neither an absolute path nor ``@abstract``."""
    if not (address.startswith("/") or (address.startswith("@") and len(address) > 1)):
        raise InheritanceError(
            "NOTIFY_SOCKET must be an absolute path or an abstract address starting with '@', "
            f"got {address!r}"
        )


@typing.final
@attrs.define(eq=False)
class Notifier:
    """Send ``sd_notify`` messages to systemd.

    Synopsis::

        notifier = Notifier.from_environ(os.environ)
        if notifier is not None:
            notifier.send({"READY": 1, "STATUS": "serving"})
            ...
            notifier.close()

    Each :meth:`send` is one ``AF_UNIX`` datagram on a non-blocking, non-inheritable socket,
    opened on first use and reused until :meth:`close`.

    Args:
        address: a ``NOTIFY_SOCKET`` value: an absolute path, or an abstract address written
            with a leading ``@``.

    Raises:
        InheritanceError: if ``address`` is neither.
    """

    _address: str = attrs.field(validator=_check_notify_address)
    _socket: socket.socket | None = attrs.field(default=None, init=False, repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier | None:
        """Return a notifier for ``NOTIFY_SOCKET``, or ``None`` if it is unset or empty.

        The variable stays in ``environ``: a successor started from this process needs it.

        Args:
            environ: the environment to read, usually :data:`os.environ`.

        Raises:
            InheritanceError: if ``NOTIFY_SOCKET`` is not an absolute path or ``@abstract``.
        """
        address = environ.get("NOTIFY_SOCKET", "")
        return cls(address) if address else None

    @property
    def address(self) -> str:
        """The ``NOTIFY_SOCKET`` value this notifier sends to."""
        return self._address

    def send(self, message: Mapping[str, str | int], fds: Sequence[int] = ()) -> None:
        """Send ``message`` as one datagram of ``KEY=VALUE`` lines, in the mapping's order.

        If the datagram cannot be sent, a warning is logged and nothing is raised.

        Args:
            message: the fields, for example ``{"READY": 1, "STATUS": "serving"}``.
                An integer (or a bool) is written as a decimal number.
            fds: file descriptors to pass along (``SCM_RIGHTS``), for ``FDSTORE=1``.

        Raises:
            ValueError: if a key is empty or contains ``=`` or a newline, or a value
                contains a newline: the datagram would mean something else.
        """
        lines = []
        for key, value in message.items():
            text = str(int(value)) if isinstance(value, int) else value
            if not key or "=" in key or "\n" in key or "\n" in text:
                raise ValueError(f"cannot send {key!r}={text!r} to systemd")
            lines.append(f"{key}={text}\n")
        datagram = "".join(lines).encode()
        sockaddr = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            self._socket.sendmsg([datagram], ancillary if fds else [], 0, sockaddr)
        except OSError as exc:
            _logger.warning("cannot notify systemd at NOTIFY_SOCKET=%s: %s", self._address, exc)

    def close(self) -> None:
        """Close the socket. Calling it again does nothing; a later :meth:`send` reopens it."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


@typing.final
@attrs.frozen
class InheritedSocket:
    """A file descriptor systemd passed through socket activation.

    Attributes:
        name: its name from ``LISTEN_FDNAMES`` (``FileDescriptorName=``), or ``"unknown"``.
        fd: its number: 3 for the first one, then 4, 5, ...
    """

    name: str
    fd: int


def listen_fds(environ: MutableMapping[str, str], pid: int) -> list[InheritedSocket]:
    """Take the sockets systemd passed to process ``pid``, like ``sd_listen_fds(1)``.

    On success the ``LISTEN_*`` variables are removed from ``environ``, so child processes do
    not mistake the sockets for theirs, and every fd is made non-inheritable. On error nothing
    is changed.

    Synopsis::

        for inherited in listen_fds(os.environ, os.getpid()):
            sock = socket.socket(fileno=inherited.fd)

    Args:
        environ: the environment to read and clean, usually :data:`os.environ`.
        pid: this process's pid; variables meant for another process are left alone.

    Returns:
        The sockets in fd order; empty if ``LISTEN_PID`` is unset or names another process.

    Raises:
        SocketActivationError: if ``LISTEN_PID``, ``LISTEN_FDS`` or ``LISTEN_FDNAMES`` is
            malformed, or one of the announced fds is not open.
    """
    listen_pid = environ.get("LISTEN_PID")
    if listen_pid is None:
        return []
    if _parse_int("LISTEN_PID", listen_pid, 1, SocketActivationError) != pid:
        _logger.debug("ignoring socket activation for pid %s (this is pid %d)", listen_pid, pid)
        return []
    count = _parse_int("LISTEN_FDS", environ.get("LISTEN_FDS", "0"), 0, SocketActivationError)
    names = _parse_fd_names(environ.get("LISTEN_FDNAMES"), count)
    fds = range(_LISTEN_FDS_START, _LISTEN_FDS_START + count)
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError as exc:
            raise SocketActivationError(f"LISTEN_FDS={count} but fd {fd} is not open") from exc

    for variable in ACTIVATION_VARIABLES:
        environ.pop(variable, None)
    for fd in fds:
        os.set_inheritable(fd, False)
    if names is None:
        names = ["unknown"] * count
    return [InheritedSocket(stored_name(name), fd) for name, fd in zip(names, fds, strict=True)]


def listen_sockets(environ: MutableMapping[str, str], pid: int) -> list[tuple[str, socket.socket]]:
    """:func:`listen_fds`, as ``(name, socket)`` pairs: what a process can serve.

    Raises:
        SocketActivationError: as :func:`listen_fds`, or a passed fd is not a socket
            (``ListenFIFO=``, ``ListenSpecial=``); the message names it.
    """
    inherited = listen_fds(environ, pid)
    for activated in inherited:
        if not stat.S_ISSOCK(os.fstat(activated.fd).st_mode):
            raise SocketActivationError(
                f"systemd passed fd {activated.fd} ({activated.name!r}), which is not a "
                "socket (only ListenStream=/ListenDatagram= sockets can be served)"
            )
    return [(activated.name, socket.socket(fileno=activated.fd)) for activated in inherited]


def _parse_fd_names(text: str | None, count: int) -> list[str] | None:
    """Split ``LISTEN_FDNAMES`` into ``count`` valid names; ``None`` if it is unset."""
    if text is None:
        return None
    names = text.split(":") if text else []
    if len(names) != count:
        raise SocketActivationError(
            f"LISTEN_FDNAMES has {len(names)} names but LISTEN_FDS is {count}"
        )
    for name in names:
        if not (0 < len(name) <= _MAX_FD_NAME_LENGTH and name.isascii() and name.isprintable()):
            raise SocketActivationError(f"LISTEN_FDNAMES holds an invalid name: {name!r}")
    return names


def store_name(name: str) -> str:
    """A listener's name as an ``FDNAME=`` (no ``:``, which separates ``LISTEN_FDNAMES``)."""
    return name.replace("%", "%25").replace(":", "%3A")


def stored_name(fdname: str) -> str:
    """The listener's name back from a name in ``LISTEN_FDNAMES`` (see :func:`store_name`)."""
    return fdname.replace("%3A", ":").replace("%25", "%")


def store_fds(notifier: Notifier, listeners: Sequence[tuple[str, int]]) -> None:
    """Keep ``listeners`` in systemd's file descriptor store, each under its name.

    systemd keeps them while the service restarts (``systemctl restart``, ``Restart=``)
    and passes them back through ``LISTEN_FDS``: their accept queues live on, so clients
    that connect while no process runs wait instead of being refused. A socket already in
    the store is not stored twice. The unit needs ``FileDescriptorStoreMax=``.
    """
    for name, fd in listeners:
        notifier.send({"FDSTORE": 1, "FDNAME": store_name(name)}, [fd])


def remove_stored_fds(notifier: Notifier, names: Sequence[str]) -> None:
    """Remove the listeners called ``names`` from systemd's file descriptor store."""
    for name in names:
        notifier.send({"FDSTOREREMOVE": 1, "FDNAME": store_name(name)})


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Return the watchdog timeout systemd set for process ``pid``, in seconds.

    Args:
        environ: the environment to read, usually :data:`os.environ`.
        pid: this process's pid.

    Returns:
        ``WATCHDOG_USEC`` in seconds, or ``None`` if it is unset or ``WATCHDOG_PID`` names
        another process.

    Raises:
        InheritanceError: if ``WATCHDOG_USEC`` is not a positive integer or ``WATCHDOG_PID``
            is not a positive integer.
    """
    usec = environ.get("WATCHDOG_USEC")
    if usec is None:
        return None
    seconds = _parse_int("WATCHDOG_USEC", usec, 1) / 1e6
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid is not None and _parse_int("WATCHDOG_PID", watchdog_pid, 1) != pid:
        return None
    return seconds


async def run_watchdog(notifier: Notifier, interval: float) -> typing.NoReturn:
    """Send ``WATCHDOG=1`` now, then every ``interval / 2`` seconds, until cancelled.

    Run it as a task: if the event loop stops running, the pings stop, and systemd notices.

    Args:
        notifier: where to send the pings.
        interval: the watchdog timeout, as returned by :func:`watchdog_interval`.

    Raises:
        ValueError: if ``interval`` is not positive.
    """
    if not interval > 0:
        raise ValueError(f"interval must be positive, got {interval!r}")
    while True:
        notifier.send({"WATCHDOG": 1})
        await trio.sleep(interval / 2)
