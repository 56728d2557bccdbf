"""A successor that speaks the handover channel (fd 3) as one argument scripts it.

For the in-process tests of the restart story (``tests/test_story.py``): no library,
no listeners, only what the predecessor sees on the channel. Standard library only.

- ``exit-before-ready``: exits with status 3 without a word;
- ``never-ready``: says nothing, and waits to be killed;
- ``ready-then-exit``: says ready, then exits with status 4;
- ``ready-then-stop-serving``: says ready, then shuts its end of the channel down for
  writing (as the library does when it stops serving before it was handed the
  service: the launcher holds a copy of the channel until the commit, so that a
  successor's death is reported with its status, and a mere close is not seen), then
  waits for ``SIGTERM``;
- ``ready-then-stay``: says ready, then waits for ``SIGTERM``;
- ``garbage``: says ``hello`` instead of ready, then waits for ``SIGTERM``.

On ``SIGTERM`` it exits with status 0.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

CHANNEL = 3
BEHAVIOURS = frozenset(
    {
        "exit-before-ready",
        "never-ready",
        "ready-then-exit",
        "ready-then-stop-serving",
        "ready-then-stay",
        "garbage",
    }
)


def main(behaviour: str) -> int:
    if behaviour not in BEHAVIOURS:
        raise SystemExit(f"unknown behaviour {behaviour!r}: one of {sorted(BEHAVIOURS)}")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # sigwait takes it from here
    if behaviour == "exit-before-ready":
        return 3
    if behaviour == "garbage":
        os.write(CHANNEL, b"hello\n")
    elif behaviour != "never-ready":
        os.write(CHANNEL, b"ready\n")
    if behaviour == "ready-then-exit":
        return 4
    if behaviour == "ready-then-stop-serving":
        with socket.socket(fileno=os.dup(CHANNEL)) as channel:
            channel.shutdown(socket.SHUT_WR)
    signal.sigwait({signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
