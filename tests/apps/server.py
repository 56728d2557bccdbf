"""The server the tests run: the demo app, or a plain trio echo server, under the library.

Like a real deployment, what a new copy does is read at start-up from a *deploy file*
(``--deploy-file``), so a test can "deploy" a bad version and then send SIGHUP:

``ok``                   serve normally
``crash-at-import``      write an import error to stderr, exit with status 3 before
                         opening anything
``hang-before-ready``    open the listeners, never say ready
``exit-after-ready``     say ready, then exit 4 at once
``quit-after-ready``     serve, shut down 0.2 s later (its in-flight work drained) and
                         exit with status 5: a successor that decides to stop
``die-after-ready``      serve, and be SIGKILLed 0.2 s later (an OOM kill, say)
``return-before-ready``  open the listeners, then leave the ``open()`` body without serving
``helper-then-crash``    start a helper in a session of its own (its pid goes to the file
                         ``<deploy file>.helper``), then exit with status 3 before ready
``ready-with-a-pipe``    say ready to a keeper with a pipe among the listening sockets
``listen-elsewhere``     listen on a listener named ``elsewhere`` instead of the usual one
``bug-in-restart``       this copy's first restart meets an unexpected error (an OSError,
                         as at the fd limit) right after its successor is ready
``stop-keeper-at-ready`` say ready, then send SIGTERM to the keeper at once
``crash-at-second-start`` the first copy started with this deploy file serves; the
                         second exits with status 3 before ready (the starts are
                         counted in ``<deploy file>.starts``)

The echo server also answers ``fill-fds`` (open fds until there are none left),
``free-fds``, ``close-unclaimed`` (``gr.close_unclaimed()``), ``restart-and-leave``
(``gr.restart()`` in a scope cancelled at once: the caller stops waiting), ``raise``
(its handler raises) and ``wait-drain`` (answers once this copy drains, with
``gr.wait_draining()``'s reason); every copy writes ``SIGUSR1 received`` to stderr when
it gets one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config

import graceful_restart_trio as graceful_restart
from graceful_restart_trio.asgi import Receive, Scope, Send, serve
from graceful_restart_trio.demo import app


def deployed(path: str | None) -> str:
    """The behaviour the deploy file asks for (``ok`` when there is none)."""
    if path is None or not Path(path).exists():
        return "ok"
    return Path(path).read_text(encoding="utf-8").strip() or "ok"


FILLER: list[int] = []
"""Fds opened by ``fill-fds``."""


async def echo(gr: graceful_restart.GracefulRestart, stream: trio.SocketStream) -> None:
    """Answer each chunk with ``<pid> <chunk>`` until the client closes.

    The chunk ``restart`` calls ``gr.restart()`` and answers with its outcome.
    """
    async for chunk in stream:
        reply = chunk
        if chunk.strip() == b"restart":
            try:
                answer = f"restarted {await gr.restart()}"
            except graceful_restart.RestartError as error:
                answer = f"failed {type(error).__name__}: {error}"
            reply = answer.encode() + b"\n"
        elif chunk.strip() == b"fill-fds":
            with contextlib.suppress(OSError):
                while True:
                    FILLER.append(os.open("/dev/null", os.O_RDONLY))
            reply = f"filled {len(FILLER)}\n".encode()
        elif chunk.strip() == b"raise":
            raise RuntimeError("this client's input breaks its handler")
        elif chunk.strip() == b"wait-drain":
            reply = f"draining for a {await gr.wait_draining()}\n".encode()
        elif chunk.strip() == b"restart-and-leave":
            with trio.move_on_after(0):
                await gr.restart()
            reply = b"left\n"
        elif chunk.strip() == b"close-unclaimed":
            reply = f"closed {gr.close_unclaimed()}\n".encode()
        elif chunk.strip() == b"free-fds":
            while FILLER:
                os.close(FILLER.pop())
            reply = b"freed\n"
        await stream.send_all(f"{os.getpid()} ".encode() + reply)


async def logged_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The demo app, logging when a request starts (tests wait for that line)."""
    if scope["type"] == "http":
        logging.getLogger("app").info("request %s started in pid %d", scope["path"], os.getpid())
    await app(scope, receive, send)


async def main(args: argparse.Namespace, behaviour: str) -> None:
    options: graceful_restart.OpenOptions = {
        "pid_file": args.pid_file,
        "drain_timeout": args.drain_timeout,
        "ready_timeout": args.ready_timeout,
        "probation": args.probation,
        "fd_store": args.fd_store or None,
        "control": args.control,
    }
    async with graceful_restart.open(**options) as gr:
        if args.unix:
            path = "\0" + args.unix[1:] if args.unix.startswith("@") else args.unix
            listeners = [await gr.open_unix_listener(path)]
        else:
            name = "elsewhere" if behaviour == "listen-elsewhere" else None
            listeners = await gr.open_tcp_listeners(args.port, host="127.0.0.1", name=name)
        if behaviour == "hang-before-ready":
            await trio.sleep_forever()
        if behaviour == "return-before-ready":
            return
        if behaviour == "stop-keeper-at-ready":
            gr.ready()
            assert gr.keeper_pid is not None
            os.kill(gr.keeper_pid, signal.SIGTERM)
        if behaviour == "exit-after-ready":
            gr.ready()
            sys.exit(4)
        async with trio.open_nursery() as nursery:
            if behaviour == "die-after-ready":
                nursery.start_soon(die_soon)
            if behaviour == "quit-after-ready":
                nursery.start_soon(quit_soon, gr)
            if args.late_port is not None:
                nursery.start_soon(serve_late, gr, args.late_port)
            if args.kind == "echo":
                await gr.serve_listeners(partial(echo, gr), listeners)
            else:
                config = Config()
                config.errorlog = logging.getLogger("hypercorn.error")
                await serve(gr, logged_app, listeners, config)


async def die_soon() -> None:
    """Die by SIGKILL 0.2 s after starting to serve: no cleanup, as after an OOM kill."""
    await trio.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


async def quit_soon(gr: graceful_restart.GracefulRestart) -> None:
    """Shut down 0.2 s after starting to serve; the process then exits with status 5."""
    await trio.sleep(0.2)
    QUIT.append(5)
    gr.shutdown()


QUIT: list[int] = []


async def serve_late(gr: graceful_restart.GracefulRestart, port: int) -> None:
    """Open the listener ``late`` only once the first one serves, and echo on it."""
    await trio.sleep(0.3)
    listeners = await gr.open_tcp_listeners(port, host="127.0.0.1", name="late")
    await gr.serve_listeners(partial(echo, gr), listeners)


def ready_with_a_pipe() -> None:
    """Make the library attach a pipe to its ready message, as a broken app might."""
    import graceful_restart_trio._upstream as story  # noqa: PLC0415 - a test's hack

    original = vars(story)["send_ready"]

    def send_ready(channel: socket.socket, listeners: list[tuple[str, int]] | None) -> None:
        read, _ = os.pipe()
        original(channel, [*(listeners or []), ("pipe", read)])

    vars(story)["send_ready"] = send_ready


def bug_in_restart() -> None:
    """Make this copy's first restart fail with an OSError right after the successor is
    ready, where no RestartError is expected."""
    from graceful_restart_trio._timeline import Timeline  # noqa: PLC0415 - a test's hack

    original = Timeline.mark

    def mark(self: Timeline, phase: str, **details: object) -> None:
        original(self, phase, **details)
        if phase == "stopped accepting" and self.trigger != "start" and not BUGS:
            BUGS.append(phase)
            raise OSError(24, "Too many open files (injected by a test)")

    Timeline.mark = mark  # type: ignore[method-assign]


BUGS: list[str] = []


def count_start(deploy_file: str) -> int:
    """This start's number among those with ``deploy_file`` (1 for the first)."""
    starts = Path(f"{deploy_file}.starts")
    with starts.open("a") as file:
        file.write("x")
    return len(starts.read_text())


def start_helper(deploy_file: str) -> None:
    """A helper in a session of its own, as ``start_new_session=True`` makes one."""
    helper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    Path(f"{deploy_file}.helper").write_text(str(helper.pid))


def note_sigusr1(_signum: int, _frame: object) -> None:
    os.write(2, f"[pid {os.getpid()}] SIGUSR1 received\n".encode())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["http", "echo"], default="http")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--unix", help="a unix socket path; @name: the abstract namespace")
    parser.add_argument("--pid-file", required=True)
    parser.add_argument("--deploy-file")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    parser.add_argument("--probation", type=float, default=0.2)
    parser.add_argument("--late-port", type=int)
    parser.add_argument("--fd-store", action="store_true", help="keep listeners in the fd store")
    parser.add_argument("--control", help="the control socket's path")
    arguments = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    behaviour = deployed(arguments.deploy_file)
    signal.signal(signal.SIGUSR1, note_sigusr1)
    if behaviour == "crash-at-import":
        sys.stderr.write("ModuleNotFoundError: No module named 'app.views'\n")
        sys.exit(3)
    if behaviour == "helper-then-crash":
        start_helper(arguments.deploy_file)
        sys.exit(3)
    if behaviour == "crash-at-second-start" and count_start(arguments.deploy_file) == 2:
        sys.exit(3)
    if behaviour == "ready-with-a-pipe":
        ready_with_a_pipe()
    if behaviour == "bug-in-restart":
        bug_in_restart()
    trio.run(main, arguments, behaviour)
    sys.exit(QUIT[0] if QUIT else 0)
