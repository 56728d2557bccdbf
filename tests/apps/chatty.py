"""A test app that says on its handover channel what nobody asked for (tests/test_channel.py).

``chatty.py --pid-file PATH --talk WHAT``: an echo server on 127.0.0.1 (port 0) under the
library, alone or under a keeper. The first generation serves quietly. A later one (a
successor, or a keeper's generation 2 or more) writes on a copy of its channel, taken
before the library reads the handover variable:

``fds``           once ready, during its probation: :data:`MESSAGES` lines with
                  :data:`FDS` file descriptors each; once the other end has read them
                  all (nothing left in the socket's send queue) it logs ``the other end
                  read N fds`` and shuts down (exit 0): the restart rolls back
``endless-line``  before it opens anything: bytes without a newline, up to 100 MB, while
                  the other end reads them
"""

from __future__ import annotations

import argparse
import array
import fcntl
import json
import logging
import os
import socket
import struct
import sys
import termios

import trio

import graceful_restart_trio as graceful_restart

MESSAGES = 10
FDS = 50
LOG = logging.getLogger("chatty")


def channel() -> socket.socket | None:
    """A copy of the handover channel, for a generation after the first; else None."""
    raw = os.environ.get("GRACEFUL_RESTART_TRIO")
    if raw is None:
        return None
    variable = json.loads(raw)
    if variable["generation"] < 2:  # the first generation is quiet
        return None
    return socket.socket(fileno=os.dup(variable["channel"]))


def unread(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the other end has not read yet (``SIOCOUTQ``)."""
    answer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", answer)[0])


async def echo(stream: trio.SocketStream) -> None:
    """Answer each chunk with ``<pid> <chunk>`` until the client closes."""
    async for chunk in stream:
        await stream.send_all(f"{os.getpid()} ".encode() + chunk)


async def all_read(sock: socket.socket) -> None:
    """Wait until the other end has read everything sent on ``sock``."""
    with trio.fail_after(60):
        while unread(sock):  # noqa: ASYNC110 - a send queue has no event to wait on
            await trio.sleep(0.01)


async def send_fds(gr: graceful_restart.GracefulRestart, sock: socket.socket) -> None:
    """Say ready, then send the fds (see the module docstring), then shut down."""
    gr.ready()
    await all_read(sock)  # else the fds may come with the ready line, read in one go
    null = os.open(os.devnull, os.O_RDONLY)
    fds = array.array("i", [null] * FDS)
    chatter = trio.socket.from_stdlib_socket(sock)
    for _ in range(MESSAGES):
        await chatter.sendmsg([b"chatter\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    os.close(null)
    await all_read(sock)
    LOG.info("[pid %d] the other end read %d fds", os.getpid(), MESSAGES * FDS)
    chatter.close()
    gr.shutdown()


def send_endless_line(sock: socket.socket) -> None:
    """Bytes and no newline, 64 KB at a time, up to 100 MB, while the other end reads."""
    sock.setblocking(True)
    with sock:
        for _ in range(1600):
            sock.sendall(b"x" * 65536)


async def main(args: argparse.Namespace) -> None:
    chatty = channel()
    if chatty is not None and args.talk == "endless-line":
        send_endless_line(chatty)
        return
    async with graceful_restart.open(pid_file=args.pid_file, probation=args.probation) as gr:
        listeners = await gr.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            if chatty is not None:
                nursery.start_soon(send_fds, gr, chatty)
            await gr.serve_listeners(echo, listeners)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pid-file", required=True)
    parser.add_argument("--talk", choices=["fds", "endless-line"], required=True)
    parser.add_argument("--probation", type=float, default=30.0)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    trio.run(main, parser.parse_args())
