"""Prometheus metrics, in a registry per app so several apps (tests) never collide."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from charlm.prefix_cache import PrefixCache
from charlm.request import GenerationResult

if TYPE_CHECKING:
    from app.registry import Served


class _EngineCollector(Collector):
    """Reads each loaded model's engine at scrape time, so the worker never touches Prometheus. The
    `model` label takes the registry's ids only (never a client's words), so its values are bounded."""

    FAMILIES = (  # (name, help, kind, what of an engine)
        ("charlm_queue_depth", "requests waiting to be admitted", "gauge", lambda e: e.queue_depth),
        ("charlm_active_rows", "requests being decoded now (the batch size)", "gauge", lambda e: e.active),
        ("charlm_decode_steps", "batched decode steps run", "counter", lambda e: e.stats.steps),
        ("charlm_cancellations", "generations cancelled (client gone or shutdown)", "counter",
         lambda e: e.stats.cancelled),
        ("charlm_timeouts", "generations ended by the request timeout", "counter", lambda e: e.stats.timeouts),
        ("charlm_scored_texts", "texts scored (POST /score, echo with logprobs)", "counter", lambda e: e.stats.scored),
        ("charlm_decode_rows", "rows decoded, summed over steps (÷ steps = mean batch)", "counter",
         lambda e: e.stats.batch_rows),
    )

    def __init__(self, loaded: Callable[[], Sequence[Served]], cache: Callable[[], PrefixCache | None]):
        self._loaded, self._cache = loaded, cache

    def collect(self) -> Iterator[Metric]:
        yield from self._cache_families()
        served = self._loaded()
        for name, doc, kind, read in self.FAMILIES:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=["model"])
            for s in served:
                family.add_metric([s.id], read(s.engine))
            yield family
        loaded = GaugeMetricFamily("charlm_model_loaded", "1 for each model in memory, labelled with its version",
                                   labels=["model", "version"])
        for s in served:
            loaded.add_metric([s.id, s.version], 1)
        yield loaded

    def _cache_families(self) -> Iterator[Metric]:
        cache = self._cache()
        if cache is None:
            return
        stats = cache.stats
        yield CounterMetricFamily("charlm_prefix_cache_hits", "long seeds and texts that resumed from a cached "
                                  "prefix", value=stats.hits)
        yield CounterMetricFamily("charlm_prefix_cache_misses", "long seeds and texts that found no cached prefix",
                                  value=stats.misses)
        yield CounterMetricFamily("charlm_prefix_cache_saved_characters", "characters not run through a model "
                                  "again thanks to the prefix cache", value=stats.chars_saved)
        yield GaugeMetricFamily("charlm_prefix_cache_bytes", "bytes the prefix cache holds", value=stats.bytes)


class Metrics:
    def __init__(self, loaded: Callable[[], Sequence[Served]], cache: Callable[[], PrefixCache | None]):
        self.registry = CollectorRegistry()
        self.requests = Counter("charlm_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "charlm_http_request_duration_seconds", "HTTP request latency by route", ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry,
        )
        self.chars = Counter("charlm_generated_characters", "characters generated", ["model"],
                             registry=self.registry)
        self.rejections = Counter("charlm_rejections", "requests refused before generation, by reason",
                                  ["reason"], registry=self.registry)
        self.finished = Counter("charlm_generations", "generations by model and finish reason",
                                ["model", "finish_reason"], registry=self.registry)
        self.loads = Counter("charlm_model_loads", "model loads by model and outcome (ok, failed)",
                             ["model", "outcome"], registry=self.registry)
        self.load_seconds = Histogram("charlm_model_load_seconds", "time to load and warm up a model",
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.registry.register(_EngineCollector(loaded, cache))

    def record(self, model: str, result: GenerationResult | None) -> None:
        """Count a finished generation of `model` (None: a choice with nothing to generate) by its
        characters and finish reason, for every route that serves one."""
        if result is not None:
            self.chars.labels(model).inc(result.usage.generated_chars)
            self.finished.labels(model, result.finish_reason).inc()
