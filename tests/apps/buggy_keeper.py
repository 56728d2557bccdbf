"""The keeper, with the first restart's unexpected error of ``server.py``'s ``bug-in-restart``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from graceful_restart_trio.keeper import main
from tests.apps.server import bug_in_restart

if __name__ == "__main__":
    bug_in_restart()
    sys.exit(main())
