"""Prometheus metrics of the engines a server runs (vLLM's names, with the `dashinfer:` prefix):

    dashinfer:num_requests_running / _waiting        gauge, read from the engine at scrape time
    dashinfer:kv_cache_usage_perc                     gauge, share of KV blocks in use (0-1)
    dashinfer:prefix_cache_hit_rate                   gauge, share of queried prompt tokens served from cache
    dashinfer:num_preemptions_total                   counter, read from the engine
    dashinfer:spec_decode_num_draft_tokens_total / _num_accepted_tokens_total   counters, read from the engine
    dashinfer:prefix_cache_disk_hit_tokens_total      counter, prompt tokens read back from the disk tier
    dashinfer:prompt_tokens_total / generation_tokens_total   counters
    dashinfer:request_success_total{finished_reason}  counter
    dashinfer:time_to_first_token_seconds             histogram
    dashinfer:inter_token_latency_seconds             histogram (per token)
    dashinfer:e2e_request_latency_seconds             histogram

Every series carries a `model_name` label. The AsyncEngine feeds the counters and histograms from the
outputs it delivers (on its step thread, once per step); the gauges are read from EngineStats when
scraped.
"""
from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "dashinfer:"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _StatsCollector:
    """Gauges read from each registered engine's stats at scrape time."""

    def __init__(self):
        self.engines: dict[str, object] = {}  # model name -> an engine with get_stats()

    def collect(self):
        running = GaugeMetricFamily(PREFIX + "num_requests_running", "Requests in the running batch",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests waiting to run", labels=["model_name"])
        kv = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = all)",
                               labels=["model_name"])
        hits = GaugeMetricFamily(PREFIX + "prefix_cache_hit_rate", "Share of queried prompt tokens served "
                                 "from the prefix cache", labels=["model_name"])
        preempt = CounterMetricFamily(PREFIX + "num_preemptions", "Sequences preempted for lack of KV blocks",
                                      labels=["model_name"])
        drafts = CounterMetricFamily(PREFIX + "spec_decode_num_draft_tokens", "Speculative decoding: tokens "
                                     "proposed", labels=["model_name"])
        accepted = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens", "Speculative decoding: "
                                       "proposed tokens accepted", labels=["model_name"])
        disk = CounterMetricFamily(PREFIX + "prefix_cache_disk_hit_tokens", "Prompt tokens whose KV was read "
                                   "back from the prefix cache's disk tier", labels=["model_name"])
        for name, engine in list(self.engines.items()):
            try:
                stats = engine.get_stats()
            except Exception:  # a stopped engine: nothing to report
                continue
            running.add_metric([name], stats.num_running)
            waiting.add_metric([name], stats.num_waiting)
            kv.add_metric([name], 1.0 - stats.num_free_blocks / stats.num_blocks if stats.num_blocks else 0.0)
            hits.add_metric([name], stats.prefix_hit_rate)
            preempt.add_metric([name], stats.num_preemptions)
            drafts.add_metric([name], stats.spec_draft_tokens)
            accepted.add_metric([name], stats.spec_accepted_tokens)
            disk.add_metric([name], stats.disk_hit_tokens)
        yield from (running, waiting, kv, hits, preempt, drafts, accepted, disk)


class Metrics:
    """One per registry (a process serves one): the metric families, shared by its engines."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.stats = _StatsCollector()
        self.registry.register(self.stats)
        label = ["model_name"]
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed", label,
                                     registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", label,
                                         registry=self.registry)
        self.success = Counter(PREFIX + "request_success", "Requests finished, by reason",
                               label + ["finished_reason"], registry=self.registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to the first token", label,
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between two tokens of a request", label,
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to the last output", label,
                             buckets=E2E_BUCKETS, registry=self.registry)

    def attach(self, engine, model_name: str) -> None:
        """Report `engine` (an AsyncEngine) under model_name: its gauges, and its outputs as they go out."""
        self.stats.engines[model_name] = engine
        engine.set_output_observer(RequestObserver(self, model_name).observe)

    def exposition(self) -> tuple[bytes, str]:
        """(the text format, its content type) for a /metrics response."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestObserver:
    """Turns one engine's delivered outputs into counts and latencies (called on its step thread)."""

    def __init__(self, metrics: Metrics, model_name: str):
        self.m = metrics
        self.name = model_name
        self.last_token_time: dict[str, float] = {}
        self.lock = threading.Lock()

    def observe(self, outputs: list) -> None:
        now = time.monotonic()
        name = self.name
        with self.lock:
            for out in outputs:
                new_tokens = sum(len(c.delta_token_ids) for c in out.outputs)
                last = self.last_token_time.get(out.request_id)
                if last is None and (new_tokens or out.finished):  # its first output
                    self.m.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
                    if out.arrival_time is not None:
                        self.m.ttft.labels(name).observe(now - out.arrival_time)
                elif new_tokens:  # spread over the tokens it brings
                    gap = (now - last) / new_tokens
                    for _ in range(new_tokens):
                        self.m.itl.labels(name).observe(gap)
                if new_tokens:
                    self.m.generation_tokens.labels(name).inc(new_tokens)
                self.last_token_time[out.request_id] = now
                if out.finished:
                    self.last_token_time.pop(out.request_id, None)
                    reason = "error" if out.error else (out.outputs[0].finish_reason if out.outputs else "stop")
                    self.m.success.labels(name, reason or "stop").inc()
                    if out.arrival_time is not None:
                        self.m.e2e.labels(name).observe(now - out.arrival_time)
