"""The exceptions this library raises.

Every one of them derives from :class:`GracefulRestartError`, so ``except
GracefulRestartError`` catches anything the library reports::

    GracefulRestartError
    ├── RestartError                 a restart did not happen; this process keeps serving
    │   ├── RestartUnavailableError  not now: another restart is under way, or we are draining
    │   ├── SuccessorStartError      the successor could not be started at all (exec failed)
    │   ├── SuccessorExitedError     the successor exited (or stopped) before the handover
    │   └── SuccessorTimeoutError    the successor was not ready within ``ready_timeout``
    ├── InheritanceError             what the environment hands us is malformed
    │   └── SocketActivationError    ``LISTEN_FDS`` / ``LISTEN_FDNAMES`` / ``LISTEN_PID``
    ├── ListenerError                a listener request cannot be met
    ├── PidFileError                 the pid file cannot be written
    └── UsageError                   the API was used in a way it cannot work (also a RuntimeError)

Invalid options are reported with the standard :class:`ValueError` and
:class:`TypeError`, naming the option.
"""

from __future__ import annotations

__all__ = [
    "GracefulRestartError",
    "InheritanceError",
    "ListenerError",
    "PidFileError",
    "RestartError",
    "RestartUnavailableError",
    "SocketActivationError",
    "SuccessorExitedError",
    "SuccessorStartError",
    "SuccessorTimeoutError",
    "UsageError",
]


class GracefulRestartError(Exception):
    """Base class of every error this library raises."""


class RestartError(GracefulRestartError):
    """A restart did not happen. The process that asked keeps serving as before."""


class RestartUnavailableError(RestartError):
    """A restart cannot start now: one is already under way, or this process is draining."""


class SuccessorStartError(RestartError):
    """The successor could not be started at all (for example, the interpreter is missing).

    Attributes:
        errno: the error number of the failed start (``errno.ENOENT``: the command was
            not found), or None if it was not a system call that failed.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class SuccessorExitedError(RestartError):
    """The successor exited before it said it was ready, or during its probation.

    Attributes:
        returncode: its exit status, negative for the signal that killed it
            (as in :mod:`subprocess`); None if it stopped serving during its probation
            and is still finishing its work.
    """

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class SuccessorTimeoutError(RestartError):
    """The successor did not say it was ready within ``ready_timeout``; it was killed."""


class InheritanceError(GracefulRestartError):
    """What the environment hands this process (sockets, variables) is malformed."""


class SocketActivationError(InheritanceError):
    """systemd's socket-activation variables (``LISTEN_FDS`` and friends) are malformed."""


class ListenerError(GracefulRestartError):
    """A listener cannot be opened as asked (bad name, address, or type)."""


class PidFileError(GracefulRestartError):
    """The pid file cannot be written (for example, its directory does not exist)."""


class UsageError(GracefulRestartError, RuntimeError):
    """The library was used in a way that cannot work (outside the main thread, say)."""
