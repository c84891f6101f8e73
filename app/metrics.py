"""Prometheus metrics, in a registry per app so several apps (tests) never collide."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from charlm.engine import Engine
from charlm.request import GenerationResult


class _EngineCollector(Collector):
    """Reads the engine's live figures at scrape time, so the worker never touches Prometheus."""

    def __init__(self, engine: Callable[[], Engine | None]):
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:
            return
        yield GaugeMetricFamily("charlm_queue_depth", "requests waiting to be admitted", value=engine.queue_depth)
        yield GaugeMetricFamily("charlm_active_rows", "requests being decoded now (the batch size)",
                                value=engine.active)
        yield CounterMetricFamily("charlm_decode_steps", "batched decode steps run", value=engine.stats.steps)
        yield CounterMetricFamily("charlm_cancellations", "generations cancelled (client gone or shutdown)",
                                  value=engine.stats.cancelled)
        yield CounterMetricFamily("charlm_timeouts", "generations ended by the request timeout",
                                  value=engine.stats.timeouts)
        yield CounterMetricFamily("charlm_scored_texts", "texts scored (POST /score, echo with logprobs)",
                                  value=engine.stats.scored)
        yield CounterMetricFamily("charlm_decode_rows", "rows decoded, summed over steps (÷ steps = mean batch)",
                                  value=engine.stats.batch_rows)


class Metrics:
    def __init__(self, engine: Callable[[], Engine | None]):
        self.registry = CollectorRegistry()
        self.requests = Counter("charlm_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "charlm_http_request_duration_seconds", "HTTP request latency by route", ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry,
        )
        self.chars = Counter("charlm_generated_characters", "characters generated", registry=self.registry)
        self.rejections = Counter("charlm_rejections", "requests refused before generation, by reason",
                                  ["reason"], registry=self.registry)
        self.finished = Counter("charlm_generations", "generations by finish reason", ["finish_reason"],
                                registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def record(self, result: GenerationResult | None) -> None:
        """Count a finished generation (None: a choice with nothing to generate) by its characters and
        finish reason, for every route that serves one."""
        if result is not None:
            self.chars.inc(result.usage.generated_chars)
            self.finished.labels(result.finish_reason).inc()
