"""The pieces of the library in-process: options, state machine, leases, accepting, drain."""

from __future__ import annotations

import logging
import re
import signal
import socket
import sys
import threading
import types
from pathlib import Path

import pytest
import trio
import trio.testing

import graceful_restart_trio as graceful_restart
from graceful_restart_trio import Options, State, UsageError
from graceful_restart_trio._pidfile import write_pid_file
from graceful_restart_trio._state import TRANSITIONS, StateMachine

from .conftest import ROOT, SERVER, children

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

# -- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"drain_timeout": -1}, ValueError, "drain_timeout"),
        ({"drain_timeout": 0}, ValueError, "drain_timeout"),
        ({"drain_timeout": float("inf")}, ValueError, "drain_timeout"),
        ({"drain_timeout": "30"}, TypeError, "drain_timeout"),
        ({"drain_timeout": True}, TypeError, "drain_timeout"),
        ({"ready_timeout": float("nan")}, ValueError, "ready_timeout"),
        ({"restart_signals": signal.SIGHUP}, TypeError, "restart_signals"),
        ({"restart_signals": {999}}, ValueError, "restart_signals"),
        ({"shutdown_signals": {signal.SIGKILL}}, ValueError, "SIGKILL cannot be caught"),
        ({"shutdown_signals": {signal.SIGTERM, signal.SIGHUP}}, ValueError, "both contain SIGHUP"),
        ({"pid_file": 42}, TypeError, "pid_file"),
        ({"command": "python app.py"}, TypeError, "command"),
        ({"command": []}, ValueError, "command"),
        ({"logger": ""}, TypeError, "logger"),
        ({"systemd": "yes"}, TypeError, "systemd"),
    ],
)
def test_bad_options_raise_errors_naming_the_option(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    """A bad option raises TypeError or ValueError whose message names it."""
    with pytest.raises(error, match=message):
        Options(**options)  # type: ignore[arg-type]


def test_unknown_option_is_refused() -> None:
    """A misspelt option is an error, not silently ignored."""
    with pytest.raises(TypeError, match="drain_timout"):
        Options(drain_timout=3)  # type: ignore[call-arg]


def test_options_defaults() -> None:
    """The defaults: 30 s drain, 60 s to be ready, SIGHUP restarts, SIGTERM/SIGINT stop."""
    options = Options()
    assert options.drain_timeout == 30.0
    assert options.ready_timeout == 60.0
    assert options.restart_signals == {signal.SIGHUP}
    assert options.shutdown_signals == {signal.SIGTERM, signal.SIGINT}
    assert options.pid_file is None


async def test_open_checks_the_pid_file_directory(tmp_path: Path) -> None:
    """A pid file in a missing directory fails at open(), naming the directory."""
    missing = tmp_path / "nowhere" / "app.pid"
    with pytest.raises(graceful_restart.PidFileError, match="nowhere"):
        async with graceful_restart.open(pid_file=missing):
            pass  # pragma: no cover


def test_open_outside_the_main_thread_is_refused() -> None:
    """open() must run in the main thread, where signals arrive; elsewhere UsageError."""
    errors: list[BaseException] = []

    async def body() -> None:
        async with graceful_restart.open():
            pass  # pragma: no cover

    def run() -> None:
        try:
            trio.run(body)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], UsageError)
    assert "main thread" in str(errors[0])


# -- the state machine ---------------------------------------------------------------------


def test_every_transition_outside_the_table_raises() -> None:
    """Only the transitions in the table are legal; any other raises UsageError at once."""
    for old in State:
        for new in State:
            machine = StateMachine(old)
            if new in TRANSITIONS[old]:
                assert machine.advance(new) is old
                assert machine.state is new
            else:
                with pytest.raises(UsageError, match=f"{old.value} -> {new.value}"):
                    machine.advance(new)
                assert machine.state is old


# -- leases, accepting, drain, in one process ------------------------------------------------


async def test_leases_count_with_and_async_with() -> None:
    """A lease is a counter: async with and with both count, and nest."""
    async with graceful_restart.open() as gr:
        assert gr.statistics().leases == 0
        async with gr.lease():
            with gr.lease():
                assert gr.statistics().leases == 2
            assert gr.statistics().leases == 1
        assert gr.statistics().leases == 0
        gr.shutdown()


async def test_statistics_of_a_first_start() -> None:
    """A first start is generation 1 with no predecessor or successor."""
    async with graceful_restart.open() as gr:
        stats = gr.statistics()
        assert stats.state is State.STARTING
        assert (stats.generation, stats.predecessor, stats.successor) == (1, None, None)
        gr.ready()
        assert gr.state is State.SERVING
        gr.ready()  # a second ready() changes nothing
        assert gr.statistics().state is State.SERVING
        gr.shutdown()
    assert gr.statistics().state is State.STOPPED


async def test_shutdown_waits_for_leases_then_ends_the_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The drain waits for the work under leases, then cancels the rest of the body."""
    finished = []

    async def request(gr: graceful_restart.GracefulRestart, seconds: float) -> None:
        async with gr.lease():
            await trio.sleep(seconds)
            finished.append(seconds)

    async with graceful_restart.open(drain_timeout=10) as gr:
        gr.ready()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, gr, 3)
            nursery.start_soon(request, gr, 5)
            await trio.sleep(1)
            gr.shutdown()
            assert gr.state is State.DRAINING
    assert finished == [3, 5]
    assert trio.current_time() == pytest.approx(5)


async def test_drain_deadline_cancels_what_is_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Work still under a lease at drain_timeout is cancelled; open() returns normally."""
    cancelled = []

    async def request(gr: graceful_restart.GracefulRestart) -> None:
        async with gr.lease():
            try:
                await trio.sleep(1000)
            except trio.Cancelled:
                cancelled.append(gr.statistics().leases)
                raise

    async with graceful_restart.open(drain_timeout=7) as gr:
        gr.ready()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, gr)
            await trio.sleep(1)
            gr.shutdown()
    assert cancelled == [1]
    assert trio.current_time() == pytest.approx(8)


async def test_lease_taken_after_draining_began_is_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lease taken while draining (an accepted request) holds the drain until released."""
    async with graceful_restart.open(drain_timeout=30) as gr:
        gr.ready()
        gr.shutdown()
        async with gr.lease():
            await trio.sleep(4)
    assert trio.current_time() == pytest.approx(4)


async def test_cleanup_after_serving_runs_to_completion(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The drain waits for the body to return: its cleanup (awaits included) completes."""
    cleaned = []
    async with graceful_restart.open(drain_timeout=10) as gr:
        gr.ready()
        gr.shutdown()
        await trio.sleep(3)  # closing a database pool, flushing metrics...
        cleaned.append(trio.current_time())
    assert cleaned == [pytest.approx(3)]


async def test_a_body_that_never_returns_is_cancelled_at_the_deadline(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A body still running at drain_timeout is cancelled, and the log says so."""
    async with graceful_restart.open(drain_timeout=7) as gr:
        gr.ready()
        gr.shutdown()
        await trio.sleep_forever()
    assert trio.current_time() == pytest.approx(7)
    assert "cancelling 0 lease(s) and the open() body" in caplog.text


async def test_a_shutdown_before_ready_does_not_wait_for_the_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Still starting (nothing served): the body is cancelled as soon as the leases are."""
    async with graceful_restart.open(drain_timeout=7) as gr:
        gr.shutdown()
        await trio.sleep_forever()  # stuck in its start-up, say
    assert trio.current_time() == pytest.approx(0)


async def test_immediate_shutdown_cancels_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """shutdown(immediate=True) cuts the drain short."""
    async with graceful_restart.open(drain_timeout=30) as gr:
        gr.ready()
        async with gr.lease():
            gr.shutdown()
            await trio.sleep(2)
            gr.shutdown(immediate=True)
            await trio.sleep_forever()
    assert trio.current_time() == pytest.approx(2)


async def test_accepting_scopes_are_cancelled_when_accepting_stops() -> None:
    """accepting() scopes are cancelled by the shutdown; a new one is born cancelled."""
    async with graceful_restart.open() as gr:
        with gr.accepting() as scope:
            gr.shutdown()
            await trio.sleep_forever()
        assert scope.cancelled_caught
        with gr.accepting() as late:
            await trio.sleep_forever()
        assert late.cancelled_caught
        await gr.wait_draining()


async def test_body_ending_by_itself_runs_the_shutdown() -> None:
    """When the body returns, open() drains and stops without waiting for a signal."""
    async with graceful_restart.open() as gr:
        gr.ready()
    assert gr.state is State.STOPPED


async def test_an_error_in_the_body_propagates_unchanged() -> None:
    """An exception from the body comes out of open() as itself, not as a group."""
    with pytest.raises(KeyError, match="boom"):
        async with graceful_restart.open():
            raise KeyError("boom")


async def test_serve_listeners_serves_under_leases_until_shutdown() -> None:
    """gr.serve_listeners accepts, leases each connection, marks ready, and drains."""
    seen: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        seen.append(gr.statistics().leases)
        await stream.send_all(await stream.receive_some(100))

    async with graceful_restart.open() as gr, trio.open_nursery() as nursery:
        listeners = await gr.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        served = trio.Event()

        async def serve() -> None:
            await gr.serve_listeners(handler, listeners)
            served.set()

        nursery.start_soon(serve)
        await gr.state_value.wait_value(State.SERVING)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"hi")
            assert await stream.receive_some(100) == b"hi"
        gr.shutdown()
        await served.wait()
        with pytest.raises(OSError):  # noqa: PT011 - refused: the listener is closed
            await trio.open_tcp_stream("127.0.0.1", port)
    assert seen == [2]  # the server's own lease and this connection's


async def test_restart_signal_before_ready_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """A SIGHUP while starting is logged and ignored: no successor, no death."""
    caplog.set_level(logging.INFO, logger="graceful_restart_trio")
    async with graceful_restart.open() as gr:
        signal.raise_signal(signal.SIGHUP)
        with trio.fail_after(30):
            ignored = "SIGHUP ignored: cannot restart while starting"
            while ignored not in caplog.text:  # noqa: ASYNC110 - the log
                await trio.sleep(0.001)
        assert gr.state is State.STARTING
        gr.shutdown()


async def test_restart_while_starting_is_unavailable() -> None:
    """gr.restart() before ready raises RestartUnavailableError; nothing changes."""
    async with graceful_restart.open() as gr:
        with pytest.raises(graceful_restart.RestartUnavailableError, match="starting"):
            await gr.restart()
        assert gr.state is State.STARTING
        gr.shutdown()


async def test_listener_names_must_be_unique() -> None:
    """Asking twice for a listener of the same name is a clear error."""
    async with graceful_restart.open() as gr:
        listeners = await gr.open_tcp_listeners(0, host="127.0.0.1", name="web")
        with pytest.raises(graceful_restart.ListenerError, match="'web' is already open"):
            await gr.open_tcp_listeners(0, host="127.0.0.1", name="web")
        for listener in listeners:
            await listener.aclose()
        gr.shutdown()


async def test_unix_listener_replaces_a_stale_socket_file(tmp_path: Path) -> None:
    """A socket file nobody listens on (left by a crash) is replaced; it is removed at exit."""
    path = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    async with graceful_restart.open() as gr:
        listener = await gr.open_unix_listener(str(path))
        assert path.exists()
        await listener.aclose()
        gr.ready()
        gr.shutdown()
    assert not path.exists()


async def test_a_process_that_never_served_leaves_the_socket_file(tmp_path: Path) -> None:
    """Shut down before ready (a failed successor, say): the socket file is not removed."""
    path = tmp_path / "app.sock"
    async with graceful_restart.open() as gr:
        listener = await gr.open_unix_listener(str(path))
        await listener.aclose()
        gr.shutdown()
    assert path.exists()


async def test_unix_listener_refuses_a_path_in_use(tmp_path: Path) -> None:
    """Another process listening at the path, or a regular file there, is a clear error."""
    path = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(str(path))
        busy.listen()
        async with graceful_restart.open() as gr:
            with pytest.raises(graceful_restart.ListenerError, match="another process"):
                await gr.open_unix_listener(str(path))
            plain = tmp_path / "plain"
            plain.write_text("x")
            with pytest.raises(graceful_restart.ListenerError, match="not a socket"):
                await gr.open_unix_listener(str(plain))
            gr.shutdown()


async def test_open_socket_makes_and_registers_a_custom_socket() -> None:
    """open_socket() calls create() on a first start and hands the socket over later."""
    made = []

    def create() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        made.append(sock)
        return sock

    async with graceful_restart.open() as gr:
        sock = gr.open_socket("udp:metrics", create)
        assert len(made) == 1
        assert sock.getsockname() == made[0].getsockname()
        sock.close()
        gr.shutdown()


# -- what the review found, in-process ------------------------------------------------------


async def test_any_number_of_tasks_may_wait_for_idle_leases() -> None:
    """wait_idle() has no single-waiter limit: a user's waiter never stalls the drain."""
    leases = graceful_restart.LeaseCounter()
    woken: list[int] = []

    async def waiter(number: int) -> None:
        await leases.wait_idle()
        woken.append(number)

    async with trio.open_nursery() as nursery:
        leases.__enter__()
        for number in range(3):
            nursery.start_soon(waiter, number)
        await trio.testing.wait_all_tasks_blocked()
        leases.__exit__(None, None, None)
    assert sorted(woken) == [0, 1, 2]


@pytest.mark.parametrize("path", ["/dev/null", "."])
async def test_a_pid_file_that_is_not_a_regular_file_is_refused(path: str) -> None:
    """A device or a directory at the pid file's path is an error, never replaced."""
    with pytest.raises(graceful_restart.PidFileError, match="not a regular file"):
        async with graceful_restart.open(pid_file=path):
            pass  # pragma: no cover
    assert _is_char_device("/dev/null")


def _is_char_device(path: str) -> bool:
    return Path(path).is_char_device()


def test_the_pid_file_never_follows_a_planted_link(tmp_path: Path) -> None:
    """Whoever can write the directory cannot make the pid file truncate another file."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pid_file = tmp_path / "app.pid"
    for name in (f".{pid_file.name}.{4242}.tmp", f".{pid_file.name}.tmp"):
        (tmp_path / name).symlink_to(victim)
    write_pid_file(pid_file, 4242)
    assert pid_file.read_text() == "4242\n"
    assert victim.read_text() == "precious\n"
    assert not pid_file.is_symlink()
    assert oct(pid_file.stat().st_mode & 0o777) == oct(0o644)


async def test_an_error_leaves_open_with_its_own_cause_and_context() -> None:
    """open() re-raises the body's exception as it was: its __cause__, no group as context."""
    cause = KeyError("cause")
    with pytest.raises(ValueError, match="boom") as caught:
        async with graceful_restart.open():
            raise ValueError("boom") from cause
    assert caught.value.__cause__ is cause
    assert not isinstance(caught.value.__context__, BaseExceptionGroup)


async def test_an_outer_cancellation_is_a_plain_cancelled() -> None:
    """Cancelled from outside, open() lets a trio.Cancelled out, not a group of them."""
    escaped: list[BaseException] = []
    with trio.CancelScope() as scope:
        try:
            async with graceful_restart.open():
                scope.cancel()
                await trio.sleep_forever()
        except BaseException as error:
            escaped.append(error)
            raise
    assert len(escaped) == 1
    assert isinstance(escaped[0], trio.Cancelled)


async def test_a_second_open_at_once_is_a_usage_error() -> None:
    """One open() per process at a time: a nested one raises UsageError."""
    async with graceful_restart.open():
        with pytest.raises(UsageError, match="already running"):
            async with graceful_restart.open():
                pass  # pragma: no cover
    async with graceful_restart.open():  # once the first is over, another may run
        pass


async def test_shutdown_at_every_step_of_a_restart_leaves_one_story(tmp_path: Path) -> None:
    """gr.shutdown() at each state of a restart: no illegal transition, no successor left."""
    pid_file = tmp_path / "successor.pid"
    for stop_at in (State.RESTARTING, State.PROBATION):
        async with graceful_restart.open(
            command=[sys.executable, str(SERVER), "--kind", "echo", "--pid-file", str(pid_file)],
            probation=30,
            drain_timeout=30,
        ) as gr:
            listeners = await gr.open_tcp_listeners(0, host="127.0.0.1")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(gr.serve_listeners, _ignore, listeners)
                await trio.testing.wait_all_tasks_blocked()
                outcome: list[BaseException] = []
                nursery.start_soon(_restart_into, gr, outcome)
                machine = gr._machine
                await machine.wait_leaving(State.SERVING)
                if stop_at is State.PROBATION:
                    await machine.wait_leaving(State.RESTARTING)
                assert gr.state is stop_at
                gr.shutdown()
        assert gr.statistics().state is State.STOPPED
        assert [(type(error), str(error)) for error in outcome] == [
            (graceful_restart.RestartError, "restart abandoned: this process is draining")
        ], f"restart() at {stop_at} was not told the shutdown abandoned it"
        assert children() == [], f"the successor outlived a shutdown at {stop_at}"


async def _restart_into(gr: graceful_restart.GracefulRestart, outcome: list[BaseException]) -> None:
    try:
        await gr.restart()
    except graceful_restart.RestartError as error:
        outcome.append(error)


async def _ignore(stream: trio.SocketStream) -> None:
    await stream.aclose()


async def test_a_busy_unix_listener_is_detected_without_blocking(tmp_path: Path) -> None:
    """Another process's listener with a full backlog: ListenerError, the loop never blocks."""
    path = str(tmp_path / "busy.sock")
    queued: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(path)
        busy.listen(0)
        try:
            while True:  # fill the backlog until a connect would block
                client = socket.socket(socket.AF_UNIX)
                client.setblocking(False)
                queued.append(client)
                client.connect(path)
        except BlockingIOError:
            pass
        try:
            async with graceful_restart.open() as gr:
                with pytest.raises(graceful_restart.ListenerError, match="another process"):
                    await gr.open_unix_listener(path)
        finally:
            for client in queued:
                client.close()


# -- the public namespace ------------------------------------------------------------------


def test_every_public_name_is_in_the_api_summary_and_nothing_else_is_public() -> None:
    """``dir(graceful_restart_trio)`` holds only the API (no ``annotations``), each name in
    docs/api.md's summary table."""
    names = [
        name
        for name in dir(graceful_restart)
        if not name.startswith("_")
        and not isinstance(getattr(graceful_restart, name), types.ModuleType)  # asgi, cli...
    ]
    assert "annotations" not in names
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    summarised = [name for name in names if re.search(rf"^\| `{name}(\(\))?` \|", api, re.M)]
    assert summarised == names
