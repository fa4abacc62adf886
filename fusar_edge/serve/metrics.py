"""Prometheus metrics of the server (``GET /metrics``), on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGES = ("preprocess", "anchors", "vision", "fusion", "prefill", "decode", "parse", "total")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, pool):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fusar_requests_total", "HTTP requests by route and status code", ["route", "code"],
                                registry=r)
        self.errors = Counter("fusar_errors_total", "Requests answered with an error, by route and kind",
                              ["route", "kind"], registry=r)
        self.latency = Histogram("fusar_request_seconds", "Time from request to response, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("fusar_stage_seconds", "Time in each stage of answered questions", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("fusar_generated_tokens_total", "Tokens generated", registry=r)
        g = Gauge("fusar_queue_depth", "Questions admitted and waiting for a worker", registry=r)
        g.set_function(lambda: pool.queued)
        g = Gauge("fusar_inflight", "Questions being answered now", registry=r)
        g.set_function(lambda: pool.running)

    def observe_answer(self, timings_ms: dict, new_tokens: int) -> None:
        for name in STAGES:
            if name in timings_ms:
                self.stage.labels(name).observe(float(timings_ms[name]) / 1e3)
        self.tokens.inc(new_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
