"""The drain in-process, on trio's MockClock: it ends as its last lease does.

Tasks awaiting ``gr.lease().wait_idle()`` beside the drain never hold it up: a drain
with one 1 s lease ends at that lease's end, not at ``drain_timeout``.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

import graceful_restart_trio as graceful_restart


async def hold_a_lease(gr: graceful_restart.GracefulRestart, released: list[float]) -> None:
    """Hold one lease for 1 s; note when it was released."""
    async with gr.lease():
        await trio.sleep(1)
    released.append(trio.current_time())


async def test_a_drain_ends_with_its_last_lease_while_two_tasks_wait_for_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two tasks await wait_idle() while a 1 s lease is held: open() ends as the lease does."""
    released: list[float] = []
    idle: list[float] = []

    async def wait_idle(gr: graceful_restart.GracefulRestart) -> None:
        await gr.lease().wait_idle()
        idle.append(trio.current_time())

    async with graceful_restart.open(drain_timeout=30) as gr:
        gr.ready()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_a_lease, gr, released)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait_idle, gr)
            nursery.start_soon(wait_idle, gr)
            await trio.testing.wait_all_tasks_blocked()
            gr.shutdown()
    assert released == [1]
    assert idle == [1, 1]
    assert trio.current_time() == released[0]  # open() returned as the lease ended


async def test_tasks_awaiting_wait_idle_in_a_loop_let_the_drain_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """wait_idle() is a checkpoint even with no lease held: tasks awaiting it in a loop let
    the drain run, and are cancelled with the body the moment the lease ends."""
    released: list[float] = []
    ended: list[tuple[str, float]] = []

    async def watch_idle(gr: graceful_restart.GracefulRestart) -> None:
        """Housekeeping whenever no lease is held (bounded: without a checkpoint in
        wait_idle() an endless loop would freeze the event loop, and this test with it)."""
        try:
            for _ in range(1000):
                await gr.lease().wait_idle()
        except trio.Cancelled:
            ended.append(("cancelled", trio.current_time()))
            raise
        ended.append(("ran out", trio.current_time()))

    # Never ready (still starting): the drain cancels the body as soon as the leases are
    # released, without waiting for it to return.
    async with graceful_restart.open(drain_timeout=30) as gr, trio.open_nursery() as nursery:
        nursery.start_soon(hold_a_lease, gr, released)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(watch_idle, gr)
        nursery.start_soon(watch_idle, gr)
        await trio.testing.wait_all_tasks_blocked()
        gr.shutdown()
    assert released == [1]
    assert ended == [("cancelled", 1), ("cancelled", 1)]
    assert trio.current_time() == released[0]  # open() returned as the lease ended


async def test_a_drain_that_waits_on_the_body_says_so_within_a_second(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A background task in the body (a broadcast hub, say) holds the drain: one second
    after the last lease, the log names it; at drain_timeout it is cancelled."""
    caplog.set_level(logging.INFO, logger="graceful_restart_trio")
    said: list[float] = []

    class Clock(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for the open() body" in record.getMessage():
                said.append(trio.current_time())

    handler = Clock()
    logging.getLogger("graceful_restart_trio").addHandler(handler)
    try:
        async with graceful_restart.open(drain_timeout=30) as gr:
            gr.ready()
            async with trio.open_nursery() as nursery:

                async def hub() -> None:
                    await trio.sleep_forever()

                nursery.start_soon(hub, name="chat hub")
                await trio.testing.wait_all_tasks_blocked()
                gr.shutdown()
                started = trio.current_time()
    finally:
        logging.getLogger("graceful_restart_trio").removeHandler(handler)
    assert said == [started + 1]
    assert "(still running in it: chat hub)" in caplog.text
    assert trio.current_time() == started + 30  # cancelled at the deadline, as before


async def test_a_shutdown_is_a_drain_for_a_shutdown() -> None:
    async with graceful_restart.open() as gr:
        assert gr.drain_reason is None
        gr.shutdown()
        assert await gr.wait_draining() == "shutdown"
        assert gr.drain_reason == "shutdown"
