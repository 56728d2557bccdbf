"""Start-up benchmark: ``import graceful_restart_trio`` versus ``import trio`` alone.

Each sample is a fresh interpreter: ``python -c "import X"``, with ``python -c pass``
measured in the same round as the floor. Both the wall time and the child's CPU time
(user + system, from ``getrusage``) are recorded: on a busy machine the CPU time is the
steadier of the two. The three commands run interleaved (the order rotating every
round), after untimed warm-up rounds that also write the bytecode caches. A fourth
command per round, ``python -X importtime -c "import graceful_restart_trio"``, gives
CPython's own account: the summed self time of the modules that ``import trio`` does not
load, i.e. what the library adds on top of trio, measured within one process.

By default the children write and read bytecode in a temporary ``PYTHONPYCACHEPREFIX``
(``--bytecode as-is`` keeps this environment, ``PYTHONDONTWRITEBYTECODE`` included).

It also checks, in a subprocess, that ``import graceful_restart_trio`` does not import
hypercorn or h11 (``sys.modules``), and lists what it imports beyond ``import trio``.
Exits with status 1 if a forbidden module is imported.

Usage::

    python benchmarks/import_time.py [--runs 15] [--warmup 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from _common import (
    environment,
    environment_lines,
    markdown_table,
    package_version,
    summary,
    write_json,
)

SUBJECT = "graceful_restart_trio"
BASELINE = "trio"
FORBIDDEN = ("hypercorn", "h11")
TIMEOUT = 60

COMMANDS = {
    "pass": "pass",
    BASELINE: f"import {BASELINE}",
    SUBJECT: f"import {SUBJECT}",
}


def child_environment(bytecode: str, cache: str) -> dict[str, str]:
    """The children's environment.

    ``cached``: bytecode may be written, into the temporary ``cache`` directory (so
    nothing lands in the source tree), and the warm-up rounds fill it: every module then
    loads from bytecode, as in an installed deployment. ``as-is``: this environment
    unchanged (e.g. ``PYTHONDONTWRITEBYTECODE=1`` makes an editable install compile the
    library's source on every start while trio loads its installed bytecode).
    """
    env = dict(os.environ)
    if bytecode == "cached":
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = cache
    return env


def run_once(python: str, code: str, cwd: str, env: dict[str, str]) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one fresh ``python -c code``, in ms."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter_ns()
    subprocess.run(
        [python, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT,
        check=True,
    )
    wall = (time.perf_counter_ns() - start) / 1e6
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    return wall, cpu


IMPORTTIME = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s*(\S+)")


def importtime_self_ms(python: str, cwd: str, env: dict[str, str]) -> dict[str, float]:
    """``-X importtime``: each module's self time in ms when importing the subject."""
    result = subprocess.run(
        [python, "-X", "importtime", "-c", f"import {SUBJECT}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT,
        check=True,
    )
    found: dict[str, float] = {}
    for line in result.stderr.splitlines():
        match = IMPORTTIME.match(line)
        if match:
            found[match.group(3)] = int(match.group(1)) / 1000
    if SUBJECT not in found:
        raise RuntimeError(f"-X importtime did not list {SUBJECT}")
    return found


def imported_modules(python: str, module: str, cwd: str, env: dict[str, str]) -> set[str]:
    """``sys.modules`` after ``import module`` in a fresh interpreter."""
    code = f"import sys\nimport {module}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [python, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT,
        check=True,
    )
    return set(result.stdout.split())


@dataclass(frozen=True)
class Modules:
    """What ``import trio`` and ``import graceful_restart_trio`` load."""

    baseline: set[str]
    subject: set[str]

    @property
    def forbidden(self) -> list[str]:
        return sorted(name for name in self.subject if name.partition(".")[0] in FORBIDDEN)

    @property
    def extra(self) -> list[str]:
        return sorted(self.subject - self.baseline)

    def as_json(self) -> dict[str, object]:
        return {
            "forbidden_imported": self.forbidden,
            "modules_after_import_trio": len(self.baseline),
            "modules_after_import_subject": len(self.subject),
            "extra_modules": self.extra,
        }


def measure(
    python: str, *, runs: int, warmup: int, cwd: str, env: dict[str, str], modules: Modules
) -> dict[str, list[float]]:
    """Wall and CPU ms per command, and -X importtime's extra self time, one per round."""
    samples: dict[str, list[float]] = {}
    for key in COMMANDS:
        samples[f"{key}:wall"] = []
        samples[f"{key}:cpu"] = []
    samples["importtime_extra_self"] = []
    samples["importtime_subject_cumulative"] = []
    keys = list(COMMANDS)
    for number in range(warmup + runs):
        shift = number % len(keys)
        for key in keys[shift:] + keys[:shift]:
            wall, cpu = run_once(python, COMMANDS[key], cwd, env)
            if number >= warmup:
                samples[f"{key}:wall"].append(wall)
                samples[f"{key}:cpu"].append(cpu)
        self_ms = importtime_self_ms(python, cwd, env)
        if number >= warmup:
            added = set(modules.extra)
            extra = sum(ms for name, ms in self_ms.items() if name in added)
            samples["importtime_extra_self"].append(extra)
            for name in added & set(self_ms):
                samples.setdefault(f"self:{name}", []).append(self_ms[name])
            samples["importtime_subject_cumulative"].append(sum(self_ms.values()))
        print(f"round {number + 1}/{warmup + runs}", file=sys.stderr, flush=True)
    return samples


def analyse(samples: dict[str, list[float]]) -> dict[str, object]:
    """Per metric: medians, net of ``python -c pass``, the subject's extra over trio."""
    result: dict[str, object] = {}
    for metric in ("wall", "cpu"):
        base = samples[f"pass:{metric}"]
        trio = samples[f"{BASELINE}:{metric}"]
        subject = samples[f"{SUBJECT}:{metric}"]
        net_trio = [v - p for v, p in zip(trio, base, strict=True)]
        net_subject = [v - p for v, p in zip(subject, base, strict=True)]
        extra = [s - t for s, t in zip(subject, trio, strict=True)]
        result[metric] = {
            "ms": {key: summary(samples[f"{key}:{metric}"]) for key in COMMANDS},
            "net_of_pass_ms": {
                BASELINE: statistics.median(net_trio),
                SUBJECT: statistics.median(net_subject),
            },
            "extra_ms": {
                "median_of_round_differences": statistics.median(extra),
                "difference_of_medians": statistics.median(subject) - statistics.median(trio),
                "difference_of_mins": min(subject) - min(trio),
            },
            "ratio_subject_to_trio_net_of_pass": statistics.median(net_subject)
            / statistics.median(net_trio),
        }
    per_module = {
        key.removeprefix("self:"): statistics.median(values)
        for key, values in samples.items()
        if key.startswith("self:")
    }
    result["importtime"] = {
        "extra_self_ms": summary(samples["importtime_extra_self"]),
        "subject_total_ms": summary(samples["importtime_subject_cumulative"]),
        "extra_modules_self_ms_median": dict(sorted(per_module.items(), key=lambda item: -item[1])),
    }
    result["samples_ms"] = samples
    return result


def report(result: dict[str, object], modules: Modules, runs: int) -> str:
    """The Markdown table, the verdicts and the module check."""
    wall = result["wall"]
    cpu = result["cpu"]
    importtime = result["importtime"]
    assert isinstance(wall, dict)
    assert isinstance(cpu, dict)
    assert isinstance(importtime, dict)
    rows: list[list[object]] = [
        [
            f"`python -c {COMMANDS[key]!r}`",
            round(wall["ms"][key]["median"], 1),
            round(wall["ms"][key]["min"], 1),
            round(wall["net_of_pass_ms"].get(key, 0.0), 1),
            round(cpu["ms"][key]["median"], 1),
            round(cpu["ms"][key]["min"], 1),
            round(cpu["net_of_pass_ms"].get(key, 0.0), 1),
        ]
        for key in COMMANDS
    ]
    rows.append(
        [
            f"extra of `{SUBJECT}` over `trio` (paired rounds)",
            round(wall["extra_ms"]["median_of_round_differences"], 1),
            round(wall["extra_ms"]["difference_of_mins"], 1),
            "",
            round(cpu["extra_ms"]["median_of_round_differences"], 1),
            round(cpu["extra_ms"]["difference_of_mins"], 1),
            "",
        ]
    )
    table = markdown_table(
        [
            "command (fresh interpreter)",
            "wall median ms",
            "wall min ms",
            "wall net of pass ms",
            "CPU median ms",
            "CPU min ms",
            "CPU net of pass ms",
        ],
        rows,
    )
    extra_modules = modules.extra
    outside = sorted({n.partition(".")[0] for n in extra_modules} - {SUBJECT})
    lines = [
        f"- `import {SUBJECT}` vs `import trio`, {runs} interleaved rounds: extra "
        f"**{cpu['extra_ms']['median_of_round_differences']:.1f} ms CPU** / "
        f"**{wall['extra_ms']['median_of_round_differences']:.1f} ms wall** (medians of the "
        f"per-round differences; differences of the medians: "
        f"{cpu['extra_ms']['difference_of_medians']:.1f} ms CPU, "
        f"{wall['extra_ms']['difference_of_medians']:.1f} ms wall). Net of `python -c pass` "
        f"the library import takes **{cpu['ratio_subject_to_trio_net_of_pass']:.2f}x** "
        f"(CPU) / {wall['ratio_subject_to_trio_net_of_pass']:.2f}x (wall) as long as "
        f"`import trio`.",
        f"- `-X importtime`, self time of the modules `import trio` does not load: "
        f"**{importtime['extra_self_ms']['median']:.1f} ms** median (min "
        f"{importtime['extra_self_ms']['min']:.1f} ms), of "
        f"{importtime['subject_total_ms']['median']:.1f} ms for the whole import. Largest: "
        + ", ".join(
            f"`{name}` {ms:.1f}"
            for name, ms in list(importtime["extra_modules_self_ms_median"].items())[:5]
        )
        + " (ms).",
        f"- Modules after `import trio`: {len(modules.baseline)}; after `import {SUBJECT}`: "
        f"{len(modules.subject)} ({len(extra_modules)} more). Top-level packages beyond "
        f"trio's, other than the library: "
        + (", ".join(f"`{name}`" for name in outside) or "none")
        + ".",
        f"- hypercorn / h11 imported by `import {SUBJECT}`: "
        + (
            "**no** (checked in `sys.modules`)."
            if not modules.forbidden
            else "**YES**: " + ", ".join(f"`{n}`" for n in modules.forbidden)
        ),
    ]
    return table + "\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter to measure (default: this one)"
    )
    parser.add_argument(
        "--bytecode",
        choices=["cached", "as-is"],
        default="cached",
        help="cached: children write and use bytecode in a temporary PYTHONPYCACHEPREFIX "
        "(default); as-is: this environment unchanged (see PYTHONDONTWRITEBYTECODE)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0:
        parser.error("need --runs >= 1 and --warmup >= 0")

    env = environment()
    env["python_measured"] = args.python
    env["bytecode"] = args.bytecode
    if args.python != sys.executable:
        env["trio"] = package_version("trio", args.python)
        env["graceful_restart_trio"] = package_version("graceful-restart-trio", args.python)
    # A neutral working directory: nothing there can shadow a module.
    with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryDirectory() as cache:
        child_env = child_environment(args.bytecode, cache)
        modules = Modules(
            baseline=imported_modules(args.python, BASELINE, cwd, child_env),
            subject=imported_modules(args.python, SUBJECT, cwd, child_env),
        )
        samples = measure(
            args.python,
            runs=args.runs,
            warmup=args.warmup,
            cwd=cwd,
            env=child_env,
            modules=modules,
        )
    result = analyse(samples)
    print(f"## Import time\n\n{environment_lines(env)}\n")
    print(report(result, modules, args.runs))
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "import_time",
                "environment": env,
                "runs": args.runs,
                "modules": modules.as_json(),
                **result,
            },
        )
    if modules.forbidden:
        sys.exit(1)


if __name__ == "__main__":
    main()
