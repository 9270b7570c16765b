"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own.

Counters and histograms are updated from both threads (the HTTP thread counts requests by
status, the main thread tokens and latencies); prometheus_client's metrics are thread-safe.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds; time to first token includes waiting in the queue and reading the prompt.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """Every metric `/metrics` shows."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mlxnode_requests",
            "HTTP requests to the API, by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mlxnode_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generated_tokens = Counter(
            "mlxnode_generated_tokens", "Tokens generated for requests.", registry=r
        )
        self.cached_prompt_tokens = Counter(
            "mlxnode_prompt_tokens_cached",
            "Prompt tokens taken from the prompt cache (an earlier request's KV cache) "
            "instead of prefilled.",
            registry=r,
        )
        self.ttft = Histogram(
            "mlxnode_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "mlxnode_inter_token_latency_seconds",
            "Between two consecutive tokens of a request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "mlxnode_queue_depth", "Requests waiting to join the batch.", registry=r
        )
        self.running = Gauge(
            "mlxnode_running_requests",
            "Requests in the running batch (the readiness probe included).",
            registry=r,
        )
        self.peak_memory = Gauge(
            "mlxnode_peak_memory_bytes",
            "Peak MLX memory of each rank since it loaded the model.",
            ["rank", "host"],
            registry=r,
        )
        self.ready = Gauge("mlxnode_ready", "1 while /ready answers 200.", registry=r)
        # The last gathered {"rank", "host", "peak_memory_bytes"} of every rank, for
        # `/v1/cluster`; replaced whole, so readers in another thread see one gathering.
        self.ranks: list[dict[str, Any]] = []
        self._cached = 0  # the prompt cache's total at the last step

    def token(self, seconds: float, first: bool) -> None:
        (self.ttft if first else self.inter_token).observe(seconds)
        self.generated_tokens.inc()

    def finished(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def step(self, queue_depth: int, running: int, cached: int = 0) -> None:
        """After a step: the queue, the batch, and the prompt cache's running total."""
        self.queue_depth.set(queue_depth)
        self.running.set(running)
        # The executor counts a running total; the counter takes what is new.
        self.cached_prompt_tokens.inc(cached - self._cached)
        self._cached = cached

    def memory(self, ranks: list[dict[str, Any]]) -> None:
        self.ranks = sorted(ranks, key=lambda r: r["rank"])
        for r in ranks:
            self.peak_memory.labels(rank=str(r["rank"]), host=r["host"]).set(r["peak_memory_bytes"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
