"""Prometheus metrics of the frontends (one registry per process; nothing global).

Engine gauges are read at scrape time from the latest `SchedulerStats` the engine client saw (heartbeats carry
them at least every second), so every frontend shows them once per engine; request counters and latency
histograms are measured here. Each metric is exposed as `conveyor:*` and, for dashboards built for vLLM, as the
same `vllm:*` name.

With several API servers (`--api-server-count N`) the launcher sets PROMETHEUS_MULTIPROC_DIR before starting
them: prometheus_client then keeps each process's counters and histograms in files there, and a scrape of any
frontend sums them over all (Prometheus' multiprocess mode, as vLLM does).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine_core.protocol import SchedulerStats

_PREFIXES = ("conveyor:", "vllm:")
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)

# metric suffix, help, SchedulerStats -> value
_ENGINE_GAUGES: tuple[tuple[str, str, Callable[[SchedulerStats], float]], ...] = (
    ("num_requests_running", "Requests in the running batch.", lambda s: s.num_running_reqs),
    ("num_requests_waiting", "Requests waiting to be scheduled.", lambda s: s.num_waiting_reqs),
    ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", lambda s: s.kv_cache_usage),
    ("num_kv_blocks", "KV-cache blocks in the pool.", lambda s: s.num_kv_blocks),
    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache (cumulative).",
     lambda s: s.prefix_cache_queries),
    ("prefix_cache_hits", "Prompt tokens found in the prefix cache (cumulative).", lambda s: s.prefix_cache_hits),
    ("engine_steps", "Engine steps that ran a forward pass (cumulative).", lambda s: s.num_steps),
    ("engine_scheduled_requests", "Sum over steps of requests in the step (cumulative).",
     lambda s: s.num_scheduled_reqs),
    ("max_requests_in_step", "Most requests seen in one step.", lambda s: s.max_reqs_in_step),
    ("num_preemptions", "Requests preempted (cumulative).", lambda s: s.num_preemptions),
    ("prompt_tokens_computed", "Prompt tokens whose KV this engine computed (cumulative).",
     lambda s: s.prompt_tokens_computed),
    ("prompt_tokens_transferred", "Prompt tokens whose KV a KV connector loaded from another instance "
     "(cumulative).", lambda s: s.prompt_tokens_transferred),
    ("kv_transfers_failed", "KV loads from another instance that failed (cumulative).",
     lambda s: s.num_kv_transfers_failed),
    ("kv_blocks_held_for_transfer", "KV blocks a prefill instance keeps until a decode instance pulls them.",
     lambda s: s.num_blocks_held_for_transfer),
    ("mm_encoder_items", "Media items (images, videos) the vision encoder ran on (cumulative).",
     lambda s: s.mm_items_encoded),
    ("mm_encoder_cache_hits", "Media items a request took from the encoder cache instead of encoding them "
     "(cumulative).", lambda s: s.mm_encoder_cache_hits),
)


class _EngineStatsCollector(Collector):
    """One series per engine core, labelled `engine` with its data-parallel rank (as vLLM does)."""

    def __init__(self, stats: Callable[[], list[SchedulerStats | None]], model_name: str) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterable[Metric]:
        per_engine = [stats or SchedulerStats() for stats in self._stats()] or [SchedulerStats()]
        for suffix, help_text, value in _ENGINE_GAUGES:
            for prefix in _PREFIXES:
                family = GaugeMetricFamily(prefix + suffix, help_text, labels=["model_name", "engine"])
                for rank, stats in enumerate(per_engine):
                    family.add_metric([self._model_name, str(rank)], float(value(stats)))
                yield family


class FrontendMetrics:
    """Per-process metrics; `observe_finished` is called once per finished engine request."""

    def __init__(self, model_name: str, stats: Callable[[], list[SchedulerStats | None]]) -> None:
        self.registry = CollectorRegistry()  # what a scrape renders
        self.registry.register(_EngineStatsCollector(stats, model_name))
        self._model_name = model_name
        # Multiprocess mode: this process's values live in files the collector sums with the other frontends';
        # registering the live objects too would count this process twice.
        own = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
            own = CollectorRegistry()

        def counter(name: str, help_text: str, labels: tuple[str, ...] = ()) -> list[Counter]:
            return [Counter(p + name, help_text, ["model_name", *labels], registry=own) for p in _PREFIXES]

        def histogram(name: str, help_text: str, buckets: tuple[float, ...]) -> list[Histogram]:
            return [Histogram(p + name, help_text, ["model_name"], buckets=buckets, registry=own)
                    for p in _PREFIXES]

        self._prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self._generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._request_success = counter("request_success", "Requests finished.", ("finished_reason",))
        self._ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self._tpot = histogram("time_per_output_token_seconds", "Mean time per output token after the first.",
                               _TPOT_BUCKETS)
        self._e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        # Create the labelled series now so every metric is exported (as 0) before the first request.
        for metric in (*self._prompt_tokens, *self._generation_tokens, *self._ttft, *self._tpot, *self._e2e):
            metric.labels(model_name)
        for success_counter in self._request_success:
            for reason in ("stop", "length", "abort"):
                success_counter.labels(model_name, reason)

    def observe_first_token(self, ttft_s: float) -> None:
        for histogram in self._ttft:
            histogram.labels(self._model_name).observe(ttft_s)

    def observe_finished(self, num_prompt_tokens: int, num_generation_tokens: int, finish_reason: str,
                         e2e_s: float, ttft_s: float | None) -> None:
        for prompt_counter, generation_counter, success_counter in zip(
                self._prompt_tokens, self._generation_tokens, self._request_success):
            prompt_counter.labels(self._model_name).inc(num_prompt_tokens)
            generation_counter.labels(self._model_name).inc(num_generation_tokens)
            success_counter.labels(self._model_name, finish_reason).inc()
        for histogram in self._e2e:
            histogram.labels(self._model_name).observe(e2e_s)
        if ttft_s is not None and num_generation_tokens > 1:
            for histogram in self._tpot:
                histogram.labels(self._model_name).observe((e2e_s - ttft_s) / (num_generation_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
