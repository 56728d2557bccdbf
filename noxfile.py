"""Developer tasks, run through ``python3 dev.py SESSION`` (or ``nox -s SESSION``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

TEST_DEPS = [
    "pytest>=8",
    "pytest-trio>=0.8",
    "pytest-timeout>=2.3",
    "hypothesis>=6",
    "trio-websocket>=0.11",
    "httpx[http2]>=0.27",
    "starlette>=0.40",
    "trustme>=1.1",
    "prometheus-client>=0.17",
    "mypy>=1.8",  # tests/test_docs.py type-checks the documentation's code
]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite (real processes, signals and sockets on loopback)."""
    session.install("-e", ".[hypercorn]", *TEST_DEPS)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package, the tests and the benchmarks."""
    # nox for this file; exceptiongroup for the Python 3.10 branch mypy also checks.
    session.install("-e", ".[hypercorn]", "mypy", "nox", "exceptiongroup", *TEST_DEPS)
    session.run("mypy", "--strict", "src", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session
def demo(session: nox.Session) -> None:
    """Run the demo HTTP server; kill -HUP restarts it, kill -TERM stops it.

    ``nox -s demo -- --keeper`` runs it under the keeper (one stable pid, Ctrl-C works);
    ``-- --workers N`` runs N workers under the keeper, one per core (``auto``: one per
    CPU). Under the keeper, ``demo.pid`` names the keeper and ``demo.control`` is its
    control socket. Other arguments go to the demo (default: ``--port 8000``, and
    ``--pid-file demo.pid`` without the keeper).
    """
    session.install("-e", ".[demo]")
    args, keeper = list(session.posargs), []
    if "--keeper" in args:
        args.remove("--keeper")
        keeper = ["--pid-file", "demo.pid", "--control", "demo.control"]
    if "--workers" in args:
        at = args.index("--workers")
        keeper = ["--pid-file", "demo.pid", "--control", "demo.control", *args[at : at + 2]]
        del args[at : at + 2]
    demo = ["python", "-m", "graceful_restart_trio.demo"]
    demo += args or ["--port", "8000", *([] if keeper else ["--pid-file", "demo.pid"])]
    if keeper:
        demo = ["python", "-m", "graceful_restart_trio.keeper", *keeper, "--", *demo]
    session.run(*demo)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation (Sphinx, API reference from the docstrings)."""
    session.install("-e", ".[hypercorn]", "sphinx>=7", "myst-parser>=2", "furo")
    session.run("sphinx-build", "-W", "-b", "html", "docs", "docs/_build/html")


@nox.session
def package(session: nox.Session) -> None:
    """Build the sdist and the wheel into dist/, and check them with twine."""
    session.install("build", "twine")
    dist = Path("dist")
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist))
    session.run("twine", "check", "--strict", *sorted(str(path) for path in dist.iterdir()))


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks (ratios against baselines measured in the same run)."""
    session.install("-e", ".[hypercorn]", "h11", "httpx[http2]", "starlette")
    scripts = ["lease_micro", "import_time", "server_throughput", "restart_under_load"]
    for script in [*scripts, "probation_cost", "http_restarts", "socket_sharing"]:
        session.run("python", f"benchmarks/{script}.py", *session.posargs)
    session.run("python", "benchmarks/server_throughput.py", "--pair", "asgi", *session.posargs)
    # The HTTP/1.1 paths side by side under wrk (a Debian package); see benchmarks/README.md.
    if shutil.which("wrk") is None:
        session.log("skipping --compare http1: wrk is not installed (apt-get install wrk)")
    else:
        compare = ["--compare", "http1", *session.posargs]
        session.run("python", "benchmarks/server_throughput.py", *compare)
        # The keeper's --workers: throughput N=2/N=1, rolls under load, balance.
        session.run("python", "benchmarks/workers.py", *session.posargs)
