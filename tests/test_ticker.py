"""``examples/ticker_server.py`` under load: 200 long-lived subscribers, 5 restarts, then a
stop. Every subscriber is told before its connection ends (``reconnect`` after a
restart, ``bye`` at the stop), then sees a clean end of stream: 0 resets, 0 cut short.
"""

from __future__ import annotations

import signal
import sys
from collections import Counter
from collections.abc import Callable

import trio
from trio_util import AsyncValue

from .conftest import ROOT, TIMEOUT, Server, children, wait_until

StartServer = Callable[..., Server]
TICKER = ROOT / "examples" / "ticker_server.py"
SUBSCRIBERS = 200
RESTARTS = 5


async def subscribe(
    port: int, seen: Counter[str], pids: dict[int, int], changes: AsyncValue, index: int
) -> None:
    """One subscriber: reconnect when told to, stop when told bye; count every ending."""
    while True:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            seen["refused"] += 1
            return
        told = None
        buffer = b""
        async with stream:
            try:
                while chunk := await stream.receive_some(4096):
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.startswith(b"tick ") and pids.get(index) != int(line.split()[-1]):
                            pids[index] = int(line.split()[-1])
                            changes.value += 1
                        elif line in (b"reconnect", b"bye"):
                            told = line.decode()
                    if told is not None:
                        break
                if told is None:
                    seen["cut without a word"] += 1
                    return
                seen[told] += 1
                while await stream.receive_some(4096):  # the server half-closed: to EOF
                    pass
            except trio.BrokenResourceError:
                seen["reset"] += 1
                return
        if told == "bye":
            return


async def test_long_lived_subscribers_are_told_and_never_cut(start_server: StartServer) -> None:
    server = start_server(
        "--port", "0", "--probation", "0.3", command=[sys.executable, str(TICKER)]
    )
    pid = server.wait_serving()
    port = server.port
    seen: Counter[str] = Counter()
    pids: dict[int, int] = {}
    changes = AsyncValue(0)

    def all_on(pid: int) -> Callable[[int], bool]:
        return lambda _: list(pids.values()) == [pid] * SUBSCRIBERS

    with trio.fail_after(TIMEOUT * 3):
        async with trio.open_nursery() as clients:
            for index in range(SUBSCRIBERS):
                clients.start_soon(subscribe, port, seen, pids, changes, index)
            pids_seen = [pid]
            for _ in range(RESTARTS):
                old = pids_seen[-1]
                await changes.wait_value(all_on(old))  # every subscriber ticks from it
                server.signal(signal.SIGHUP, old)
                new = await trio.to_thread.run_sync(server.wait_serving, old)
                pids_seen.append(new)
                await changes.wait_value(all_on(new))  # every one reconnected to it
            server.signal(signal.SIGTERM, pids_seen[-1])
    assert seen == {"reconnect": SUBSCRIBERS * RESTARTS, "bye": SUBSCRIBERS}
    for old in pids_seen:
        assert await trio.to_thread.run_sync(server.wait_exit, old) == 0
    assert len(set(pids_seen)) == RESTARTS + 1
    wait_until(lambda: children() == [], "every copy to be gone")
