"""Prometheus metrics of `ptune serve` (GET /metrics, the text exposition format), on the server's own
registry (several servers in one process, as the tests start them, do not share counters).

    ptune_queue_rows                     rows waiting for the model (gauge)
    ptune_decoding_rows                  generation rows in the running decoding batch (gauge)
    ptune_batch_rows{kind}               rows per forward: classify, prefill, decode, request (histogram)
    ptune_request_seconds{endpoint}      time from a request's body to its answer (histogram)
    ptune_requests_total{endpoint,status}
    ptune_rows_total{adapter}            rows answered per adapter
    ptune_generated_tokens_total{adapter}
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ROWS_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("ptune_queue_rows", "Rows waiting for the model", registry=r)
        self.decoding = Gauge("ptune_decoding_rows", "Generation rows in the running decoding batch", registry=r)
        self.batch_rows = Histogram("ptune_batch_rows", "Rows per forward", ["kind"], buckets=ROWS_BUCKETS, registry=r)
        self.latency = Histogram("ptune_request_seconds", "Seconds from a request's body to its answer", ["endpoint"],
                                 buckets=SECONDS_BUCKETS, registry=r)
        self.requests = Counter("ptune_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.rows = Counter("ptune_rows", "Rows answered per adapter", ["adapter"], registry=r)
        self.generated = Counter("ptune_generated_tokens", "Tokens generated per adapter", ["adapter"], registry=r)

    def queued(self, n: int) -> None:
        self.queue.inc(n)

    def batch(self, kind: str, rows: int, adapters: list[str]) -> None:
        self.batch_rows.labels(kind).observe(rows)
        for a in adapters:
            self.rows.labels(a).inc()

    def tokens(self, adapter: str, n: int) -> None:
        self.generated.labels(adapter).inc(n)

    def running(self, n: int) -> None:
        self.decoding.set(n)

    def answered(self, endpoint: str, status: int, seconds: float | None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if seconds is not None:
            self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
