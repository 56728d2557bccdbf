"""Micro-benchmark: what one lease acquire + release costs.

Runs inside a real ``graceful_restart_trio.open()`` block and times, in the same run and
interleaved batch by batch, ``async with gr.lease(): pass`` and ``with gr.lease(): pass``
against a bare baseline: an empty loop and an ``async with`` of a trivial class whose
``__aenter__``/``__aexit__`` do nothing. For context it also times entering and leaving a
``trio.CancelScope()`` and ``await trio.lowlevel.checkpoint()``.

Each number is nanoseconds per operation, loop overhead included (``net`` subtracts the
empty loop of the same batch). The target (from the issue): a lease costs under 1 µs.

Usage::

    python benchmarks/lease_micro.py [--iterations 200000] [--batches 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

import trio
from _common import environment, environment_lines, markdown_table, summary, write_json

import graceful_restart_trio as graceful_restart

TARGET_NS = 1000.0


class Trivial:
    """A context manager that does nothing, both async and sync: the baseline."""

    async def __aenter__(self) -> None:
        pass

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass

    def __enter__(self) -> None:
        pass

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass


Timer = Callable[[int], Awaitable[int]]


@dataclass(frozen=True)
class Case:
    """One timed operation: ``run(n)`` does it ``n`` times and returns the elapsed ns."""

    key: str
    label: str
    run: Timer
    divisor: int = 1  # the costly context operations run iterations // divisor times


def make_cases(gr: graceful_restart.GracefulRestart) -> list[Case]:
    """The timed loops. Each is its own function so each pays the same loop overhead."""
    trivial = Trivial()
    hoisted = gr.lease()

    async def empty_loop(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(n):
            pass
        return time.perf_counter_ns() - start

    async def trivial_async_with(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(n):
            async with trivial:
                pass
        return time.perf_counter_ns() - start

    async def trivial_with(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(n):
            with trivial:
                pass
        return time.perf_counter_ns() - start

    async def lease_async_with(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(n):
            async with gr.lease():
                pass
        return time.perf_counter_ns() - start

    async def lease_async_with_hoisted(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(n):
            async with hoisted:
                pass
        return time.perf_counter_ns() - start

    async def lease_with(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(n):
            with gr.lease():
                pass
        return time.perf_counter_ns() - start

    async def cancel_scope(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(n):
            with trio.CancelScope():  # noqa: ASYNC100 - its cost is what we time
                pass
        return time.perf_counter_ns() - start

    async def checkpoint(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(n):
            await trio.lowlevel.checkpoint()
        return time.perf_counter_ns() - start

    return [
        Case("empty_loop", "empty loop (`for _ in range(n): pass`)", empty_loop),
        Case("trivial_async_with", "`async with` trivial class (baseline)", trivial_async_with),
        Case("trivial_with", "`with` trivial class", trivial_with),
        Case("lease_async_with", "`async with gr.lease(): pass`", lease_async_with),
        Case(
            "lease_async_with_hoisted",
            "`async with lease: pass` (hoisted)",
            lease_async_with_hoisted,
        ),
        Case("lease_with", "`with gr.lease(): pass`", lease_with),
        Case("cancel_scope", "`with trio.CancelScope(): pass`", cancel_scope, divisor=10),
        Case("checkpoint", "`await trio.lowlevel.checkpoint()`", checkpoint, divisor=10),
    ]


@dataclass(frozen=True)
class Samples:
    """What :func:`measure` found for one case: ns per operation, one value per batch."""

    label: str
    iterations: int
    ns_per_op: list[float]


async def measure(iterations: int, batches: int, warmup: int) -> dict[str, Samples]:
    """ns per operation of every case, one value per batch, batches interleaved."""
    async with graceful_restart.open(drain_timeout=5) as gr:
        cases = make_cases(gr)
        samples = {
            case.key: Samples(case.label, max(1, iterations // case.divisor), []) for case in cases
        }
        for batch in range(warmup + batches):
            # Rotate the order so no case always runs first or right after another.
            shift = batch % len(cases)
            for case in cases[shift:] + cases[:shift]:
                n = samples[case.key].iterations
                gc.collect()
                gc.disable()
                try:
                    elapsed = await case.run(n)
                finally:
                    gc.enable()
                if batch >= warmup:
                    samples[case.key].ns_per_op.append(elapsed / n)
                await trio.lowlevel.checkpoint()  # let the signal task breathe
        if gr.lease().count:
            raise RuntimeError("a lease leaked: the count is not back to zero")
    return samples


def analyse(samples: dict[str, Samples]) -> dict[str, object]:
    """Medians, mins, net of the empty loop, and the lease's extra cost over the baseline."""
    empty = samples["empty_loop"].ns_per_op
    baseline = samples["trivial_async_with"].ns_per_op
    cases: dict[str, dict[str, object]] = {}
    for key, sample in samples.items():
        values = sample.ns_per_op
        net = [v - e for v, e in zip(values, empty, strict=True)]
        extra = [v - b for v, b in zip(values, baseline, strict=True)]
        cases[key] = {
            "label": sample.label,
            "iterations_per_batch": sample.iterations,
            "ns_per_op": summary(values),
            "net_of_empty_loop_ns": statistics.median(net),
            "extra_over_trivial_async_with_ns": {
                "median_of_batch_differences": statistics.median(extra),
                "difference_of_mins": min(values) - min(baseline),
            },
            "ratio_to_trivial_async_with": statistics.median(
                [v / b for v, b in zip(values, baseline, strict=True)]
            ),
            "per_batch_ns": values,
        }
    lease_net = cases["lease_async_with"]["net_of_empty_loop_ns"]
    assert isinstance(lease_net, float)
    return {
        "cases": cases,
        "target_ns": TARGET_NS,
        "lease_net_ns": lease_net,
        "target_met": lease_net < TARGET_NS,
    }


def report(result: dict[str, object], batches: int) -> str:
    """The Markdown table and the verdict."""
    cases = result["cases"]
    assert isinstance(cases, dict)
    rows: list[list[object]] = []
    for data in cases.values():
        ns = data["ns_per_op"]
        extra = data["extra_over_trivial_async_with_ns"]
        rows.append(
            [
                data["label"],
                data["iterations_per_batch"],
                round(ns["median"], 1),
                round(ns["min"], 1),
                round(data["net_of_empty_loop_ns"], 1),
                round(extra["median_of_batch_differences"], 1),
                round(data["ratio_to_trivial_async_with"], 2),
            ]
        )
    table = markdown_table(
        [
            "operation",
            "iterations/batch",
            "median ns/op",
            "min ns/op",
            "net of empty loop (ns)",
            "extra over trivial async with (ns)",
            "ratio to trivial async with",
        ],
        rows,
    )
    lease = cases["lease_async_with"]
    verdict = (
        f"`async with gr.lease()`: {lease['net_of_empty_loop_ns']:.0f} ns net of the loop, "
        f"{lease['extra_over_trivial_async_with_ns']['median_of_batch_differences']:.0f} ns "
        f"more than a trivial `async with` (median of {batches} paired batches; difference "
        f"of mins {lease['extra_over_trivial_async_with_ns']['difference_of_mins']:.0f} ns). "
        f"Target < {TARGET_NS:.0f} ns: {'met' if result['target_met'] else 'NOT met'}."
    )
    return f"{table}\n\n{verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--iterations",
        type=int,
        default=200_000,
        help="operations per batch (CancelScope and checkpoint run a tenth); default 200000",
    )
    parser.add_argument("--batches", type=int, default=15, help="timed batches (default 15)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if args.iterations < 10 or args.batches < 1 or args.warmup < 0:
        parser.error("need --iterations >= 10, --batches >= 1, --warmup >= 0")

    env = environment()
    samples = trio.run(measure, args.iterations, args.batches, args.warmup)
    result = analyse(samples)
    print(f"## Lease micro-benchmark\n\n{environment_lines(env)}\n")
    print(report(result, args.batches))
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "lease_micro",
                "environment": env,
                "iterations": args.iterations,
                "batches": args.batches,
                **result,
            },
        )


if __name__ == "__main__":
    main()
