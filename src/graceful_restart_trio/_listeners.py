"""The listener registry: which listening sockets this process serves, by name.

A listener's *name* is derived from the address it was asked for (``tcp:HOST:PORT``,
``unix:PATH``) unless the application gives one. The name, not the bound address, is
what a successor asks for again, so a listener asked for on port 0 comes back on the
port it got the first time. A first start binds; a successor takes its predecessor's
socket of the same name; under systemd socket activation the socket is found by its
``FileDescriptorName=`` or else by its address.

The registry keeps its own copy of every listener (the application gets a ``dup``), so
the application may close its listeners at any time without losing what the next
restart hands over.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Sequence
from typing import Any, final

import attrs
import trio

from ._exceptions import ListenerError
from ._status import Listener

__all__ = ["ListenerRegistry", "describe_address", "shared_dup", "tcp_name", "unix_name"]

DEFAULT_BACKLOG = 4096


def tcp_name(host: str | None, port: int) -> str:
    """The name of a TCP listener asked for on ``host`` (None: every address) and ``port``."""
    return f"tcp:{host or '*'}:{port}"


def unix_name(path: str) -> str:
    """The name of a unix-socket listener at ``path``."""
    return f"unix:{path}"


def shared_dup(sock: socket.socket) -> socket.socket:
    """A new fd for ``sock`` that leaves the socket's blocking mode alone.

    ``socket.dup()`` calls ``settimeout()``, which sets or clears ``O_NONBLOCK``; that
    flag lives on the open file, which a predecessor or successor shares: clearing it
    would leave that process's trio blocked inside ``accept()``.
    """
    return socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))


def _is_listening_stream(sock: socket.socket, families: tuple[int, ...]) -> bool:
    return (
        sock.family in families
        and sock.type == socket.SOCK_STREAM
        and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    )


@final
@attrs.frozen
class _UnixPath:
    path: str
    device: int
    inode: int

    @classmethod
    def of(cls, path: str) -> _UnixPath | None:
        if not path or path.startswith("\0"):  # abstract: nothing on disk
            return None
        try:
            info = os.stat(path)
        except FileNotFoundError:  # removed by hand: nothing of ours to remove later
            return None
        return cls(path, info.st_dev, info.st_ino)

    def unlink(self) -> None:
        """Remove the socket file, unless something else has replaced it since."""
        try:
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == (self.device, self.inode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def _remove_stale_unix_socket(path: str) -> None:
    if path.startswith("\0"):  # abstract: no file; the kernel frees the name
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenerError(f"cannot listen on {path}: it exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a full backlog must not block the event loop
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: left behind by a crash
            return
        except BlockingIOError:
            pass  # somebody listens, and is busy
        except OSError as error:
            if error.errno != errno.ENOENT:
                raise
            return
    raise ListenerError(f"cannot listen on {path}: another process is listening there")


@final
@attrs.define(eq=False)
class ListenerRegistry:
    """The listening sockets of this process, by name; what a restart hands over."""

    _inherited: list[tuple[str, socket.socket]] = attrs.field(factory=list)
    _inherited_files: frozenset[str] = frozenset()
    """Names of inherited unix listeners whose socket file this library created."""
    _owned: list[tuple[str, socket.socket]] = attrs.field(factory=list)
    _unix_paths: dict[str, _UnixPath] = attrs.field(factory=dict)
    """Socket files to remove on the final stop, by listener name: only those we created
    (a socket file systemd created is systemd's to remove)."""

    def _take(self, name: str, matches: Callable[[socket.socket], bool]) -> list[socket.socket]:
        """Claim the inherited sockets called ``name`` or, failing that, matching by address."""
        if any(owned == name for owned, _ in self._owned):
            raise ListenerError(f"a listener named {name!r} is already open")
        named = [sock for inherited, sock in self._inherited if inherited == name]
        taken = named or [sock for _, sock in self._inherited if matches(sock)]
        self._inherited = [(n, s) for n, s in self._inherited if s not in taken]
        return taken

    def _own(self, name: str, socks: list[socket.socket]) -> list[socket.socket]:
        self._owned += [(name, sock) for sock in socks]
        return [shared_dup(sock) for sock in socks]

    async def tcp(
        self, port: int, host: str | None, backlog: int | None, name: str | None
    ) -> list[socket.socket]:
        """Sockets listening on TCP ``host``:``port``: inherited, or bound now."""
        if not 0 <= port <= 65535:
            raise ListenerError(f"port must be in 0..65535, not {port}")
        name = name or tcp_name(host, port)
        infos = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        wanted = {info[4][:2] for info in infos}

        def matches(sock: socket.socket) -> bool:
            if not _is_listening_stream(sock, (socket.AF_INET, socket.AF_INET6)):
                return False
            address = sock.getsockname()[:2]
            return address in wanted if port else False

        socks = self._take(name, matches)
        for sock in socks:
            if not _is_listening_stream(sock, (socket.AF_INET, socket.AF_INET6)):
                raise ListenerError(f"inherited listener {name!r} is not a listening TCP socket")
        if not socks:
            socks = _bind_tcp(infos, backlog or DEFAULT_BACKLOG)
        return self._own(name, socks)

    def unix(
        self, path: str, mode: int | None, backlog: int | None, name: str | None
    ) -> socket.socket:
        """A socket listening at unix ``path``: inherited, or bound now."""
        if not path or "\0" in path[1:]:
            raise ListenerError(f"not a unix socket path: {path!r}")
        path = os.path.abspath(path) if not path.startswith("\0") else path
        name = name or unix_name(path)

        def matches(sock: socket.socket) -> bool:
            return _is_listening_stream(sock, (socket.AF_UNIX,)) and sock.getsockname() == path

        socks = self._take(name, matches)
        if len(socks) > 1 or (socks and not _is_listening_stream(socks[0], (socket.AF_UNIX,))):
            raise ListenerError(f"inherited listener {name!r} is not one listening unix socket")
        if socks:
            sock = socks[0]
            ours = name in self._inherited_files
        else:
            ours = True
            _remove_stale_unix_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
                if mode is not None:
                    os.chmod(path, mode)
                sock.listen(backlog or DEFAULT_BACKLOG)
            except BaseException:
                sock.close()
                raise
        unix_path = _UnixPath.of(path) if ours else None
        if unix_path is not None:
            self._unix_paths[name] = unix_path
        return self._own(name, [sock])[0]

    def custom(self, name: str, create: Callable[[], socket.socket]) -> socket.socket:
        """The inherited socket called ``name``, or the one ``create()`` makes now."""
        socks = self._take(name, lambda _: False)
        if len(socks) > 1:
            raise ListenerError(f"{len(socks)} sockets were inherited as {name!r}, expected one")
        return self._own(name, socks or [create()])[0]

    def handover(self) -> list[tuple[str, int]]:
        """The name and fd of every listener a successor should get.

        Inherited listeners nobody claimed (yet) go along too: a listener the
        application opens late must find its socket in every generation.
        """
        return [(name, sock.fileno()) for name, sock in self._owned + self._inherited]

    def describe(self) -> tuple[Listener, ...]:
        """The name and address of each listener open, for a status (none once this
        process has stopped accepting for good: it closed them)."""
        return tuple(
            Listener(name, describe_address(sock))
            for name, sock in self._owned
            if sock.fileno() != -1
        )

    def socket_files(self) -> list[str]:
        """Names of the unix listeners whose socket file is ours to remove in the end."""
        return sorted(self._unix_paths)

    def unclaimed(self) -> list[str]:
        """The names of inherited listeners nobody asked for (yet)."""
        return [name for name, _ in self._inherited]

    def close_unclaimed(self) -> list[str]:
        """Close inherited listeners nobody asked for; return their names."""
        names = [name for name, _ in self._inherited]
        for _, sock in self._inherited:
            sock.close()
        self._inherited = []
        return names

    def close(self) -> None:
        """Close every socket the registry holds (never ``shutdown``: others may share them)."""
        self.close_unclaimed()
        for _, sock in self._owned:
            sock.close()

    def unlink_unix_paths(self, log: logging.LoggerAdapter) -> None:  # type: ignore[type-arg]
        """Remove the socket files of our unix listeners: only on the final stop.

        One that cannot be removed (its directory is no longer ours, say) is logged and
        left: nothing here may stop a shutdown.
        """
        for unix_path in self._unix_paths.values():
            try:
                unix_path.unlink()
            except OSError as error:
                log.warning("cannot remove the socket file %s: %s", unix_path.path, error)
        self._unix_paths = {}


def describe_address(sock: socket.socket) -> str:
    """A socket's address, as a status shows it."""
    address = sock.getsockname()
    if isinstance(address, bytes):  # abstract unix
        return "@" + address[1:].decode(errors="replace")
    if isinstance(address, str):
        return address
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_tcp(infos: Sequence[tuple[Any, ...]], backlog: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as error:
                if error.errno == errno.EAFNOSUPPORT and len(infos) > 1:
                    continue  # no IPv6 on this machine: serve the other family
                raise
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as error:
                raise ListenerError(f"cannot listen on {address}: {error.strerror}") from error
            sock.listen(backlog)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks
