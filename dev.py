"""Run a development task (a nox session) with nothing installed by hand.

    python3 dev.py demo        # the demo server on port 8000 (kill -HUP it under load)
    python3 dev.py demo -- --workers 2   # two workers under the keeper, one per core
    python3 dev.py tests       # the whole test suite
    python3 dev.py lint typecheck docs package bench   # the other sessions
    python3 dev.py tests -- -k http                    # arguments after -- go to the session

It works with any Python 3.10+, Debian's and Ubuntu's ``/usr/bin/python3`` included,
whose pip refuses to install anything (PEP 668, "externally-managed-environment"): it
makes a virtual environment in ``.venv`` (once), installs nox into it, and runs
``nox -s SESSION``, which makes one environment per session under ``.nox``. Standard
library only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - run by any python3, it says what it needs
        sys.exit(f"dev.py: Python 3.10 or newer is needed; this is {sys.version.split()[0]}")
    split = argv.index("--") if "--" in argv else len(argv)
    sessions, extra = argv[:split], argv[split:]
    if not sessions:
        sys.exit(__doc__)
    if not PYTHON.exists():
        print(f"dev.py: making {VENV} (once)", flush=True)
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        except (OSError, subprocess.CalledProcessError) as error:
            sys.exit(
                f"dev.py: cannot make a virtual environment: {error}\n"
                "On Debian or Ubuntu: sudo apt install python3-venv"
            )
    check = subprocess.run([str(PYTHON), "-c", "import nox"], capture_output=True, check=False)
    if check.returncode != 0:
        pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "nox>=2024.3"], check=True)
    command = [str(PYTHON), "-m", "nox", "-s", *sessions, *extra]
    os.chdir(ROOT)
    os.execv(command[0], command)  # noqa: S606 - the nox we just installed, in our venv


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
