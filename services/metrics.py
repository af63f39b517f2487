"""Prometheus metrics of one service process, in a registry of its own (one per app instance)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Counters, gauges and histograms the service updates; `render()` is the /metrics body."""

    def __init__(self, busy_seconds: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.problems = Counter(
            "mindgap_problems", "Problems rewritten, by the stage that produced their examples", ["stage"], registry=r
        )
        self.examples = Counter("mindgap_examples", "Examples produced, by stage", ["stage"], registry=r)
        self.generated_tokens = Counter("mindgap_generated_tokens", "Tokens sampled by the engine", registry=r)
        self.chunks = Counter("mindgap_chunks", "Task chunks handled, by outcome", ["outcome"], registry=r)
        self.jobs_submitted = Counter("mindgap_jobs_submitted", "Jobs created, by mode", ["mode"], registry=r)
        self.batch_size = Histogram(
            "mindgap_batch_problems",
            "Problems in one engine batch (a chunk or a synchronous rewrite)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.inflight = Gauge("mindgap_inflight_chunks", "Chunks running on this replica", registry=r)
        self.stream_lag = Gauge(
            "mindgap_stream_lag", "Examples the trainer group has not read yet (backpressure input)", registry=r
        )
        self.backpressure = Gauge(
            "mindgap_backpressure",
            "1 while new chunks are held back because the trainer group lags more than max_lag examples",
            registry=r,
        )
        self.policy_version = Gauge("mindgap_policy_version", "Policy version being served", registry=r)
        self.reloads = Counter("mindgap_policy_reloads", "Weight reloads, by outcome", ["outcome"], registry=r)
        self.policy_hash_error = Gauge(
            "mindgap_policy_hash_error", "1 while the policy hash in Redis is unusable (see /readyz)", registry=r
        )
        self.busy_fraction = Gauge(
            "mindgap_engine_busy_fraction",
            "Share of wall time with engine work in flight, since the last scrape",
            registry=r,
        )
        self._busy_seconds = busy_seconds
        self._last = (time.monotonic(), busy_seconds())
        self.busy_fraction.set_function(self._busy_since_last)

    def _busy_since_last(self) -> float:
        now, busy = time.monotonic(), self._busy_seconds()
        then, busy_then = self._last
        self._last = (now, busy)
        return (busy - busy_then) / (now - then) if now > then else 0.0

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
