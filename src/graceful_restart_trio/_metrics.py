"""A server's status (see ``_control``) as Prometheus metrics, in the text format.

The exposition format is written by ``prometheus-client`` (the ``metrics`` extra), the
reference implementation, rather than by hand: escaping, ``# HELP``/``# TYPE`` lines and
counter naming follow the format's rules without this library restating them.
"""

from __future__ import annotations

from collections.abc import Iterator

from ._status import Status

__all__ = ["exposition"]

STATES = ("starting", "serving", "restarting", "probation", "draining", "stopped")


def exposition(status: Status) -> str:
    """The metrics of ``status`` in the Prometheus text format.

    Raises:
        SystemExit: prometheus-client is not installed (the message says how to).
    """
    try:
        from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415
        from prometheus_client.core import (  # noqa: PLC0415
            CounterMetricFamily,
            GaugeMetricFamily,
            Metric,
        )
    except ImportError:
        raise SystemExit(
            "graceful-restart status --prometheus needs prometheus-client: "
            "pip install prometheus-client (or the package's [metrics] extra)"
        ) from None

    def metrics() -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "graceful_restart_state", "1 for the state the process is in", labels=["state"]
        )
        for name in STATES:
            state.add_metric([name], 1.0 if status.state == name else 0.0)
        yield state
        for name, help_text, value in [
            ("generation", "generation of the process (1 for a first start)", status.generation),
            ("leases", "leases (requests, connections) in flight", status.leases),
            ("uptime_seconds", "seconds since the process started", status.uptime_s),
        ]:
            if value is not None:  # a keeper does not count leases
                yield GaugeMetricFamily(f"graceful_restart_{name}", help_text, value)
        yield GaugeMetricFamily(
            "graceful_restart_draining_processes",
            "older generations still draining",
            value=len(status.draining),
        )
        if status.workers:
            serving = GaugeMetricFamily(
                "graceful_restart_worker_serving",
                "1 if the worker slot has a serving process (the keeper's --workers)",
                labels=["worker"],
            )
            generation = GaugeMetricFamily(
                "graceful_restart_worker_generation",
                "generation of the process serving in the worker slot",
                labels=["worker"],
            )
            for worker in status.workers:
                slot = str(worker.worker)
                serving.add_metric([slot], 1.0 if worker.pid else 0.0)
                generation.add_metric([slot], float(worker.generation or 0))
            yield serving
            yield generation
        restarts = CounterMetricFamily(
            "graceful_restart_restarts", "restarts by outcome", labels=["outcome"]
        )
        for outcome in ("committed", "failed"):
            restarts.add_metric([outcome], float(status.restarts.get(outcome, 0)))
        yield restarts
        phases = GaugeMetricFamily(
            "graceful_restart_last_restart_phase_seconds",
            "seconds from the last restart's request to each of its phases",
            labels=["phase"],
        )
        for phase, ms in ((status.last_restart or {}).get("phases") or {}).items():
            phases.add_metric([phase], ms / 1000)
        yield phases

    class _Collector:
        def collect(self) -> Iterator[Metric]:
            return metrics()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    text: bytes = generate_latest(registry)
    return text.decode()
