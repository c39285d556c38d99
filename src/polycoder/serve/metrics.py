"""Prometheus metrics of the server (`GET /metrics`, the text exposition format).

Built on `prometheus_client` with a registry per app (so several apps in one process, as
in tests, do not collide). What is counted: requests by route and status, prompt and
generated tokens, the waiting line's depth, the rows in the running batch, histograms
of request latency, time to first token, decode step time and batch size, speculation's
drafted and accepted tokens, and the prompt cache: prompts that reused a cached prefix
(hits) or not (misses), prompt tokens prefilled and reused, the pool's bytes and entries,
and evictions.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the server exports, in one registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("polycoder_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.request_seconds = Histogram("polycoder_request_seconds", "Time from request to last byte",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("polycoder_time_to_first_token_seconds",
                                      "Time from queueing a job to its first generated token",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("polycoder_prompt_tokens", "Prompt tokens received", registry=r)
        self.generated_tokens = Counter("polycoder_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("polycoder_queue_depth", "Requests waiting for rows of the batch", registry=r)
        self.active_rows = Gauge("polycoder_active_rows", "Rows (samples) in the running batch", registry=r)
        self.rejected = Counter("polycoder_rejected_requests", "Requests refused because the queue was full",
                                registry=r)
        self.cancelled_rows = Counter("polycoder_cancelled_rows", "Rows dropped because their client went away",
                                      registry=r)
        self.step_seconds = Histogram("polycoder_decode_step_seconds", "Time of one engine step",
                                      buckets=STEP_BUCKETS, registry=r)
        self.batch_rows = Histogram("polycoder_batch_rows", "Rows in the batch at each decode step",
                                    buckets=ROW_BUCKETS, registry=r)
        # accepted / drafted is the acceptance rate of speculative decoding (serve --speculate)
        self.drafted_tokens = Counter("polycoder_speculative_drafted_tokens", "Draft tokens verified", registry=r)
        self.accepted_tokens = Counter("polycoder_speculative_accepted_tokens", "Draft tokens the model kept",
                                       registry=r)

        # Prompt cache (serve --prompt-cache-mb): reused / (prefilled + reused) is the share of
        # prompt tokens it saved; with the cache off every prompt token counts as prefilled.
        self.prompt_cache_hits = Counter("polycoder_prompt_cache_hits",
                                         "Prompts whose prefill reused a cached prefix", registry=r)
        self.prompt_cache_misses = Counter("polycoder_prompt_cache_misses",
                                           "Prompts that found no cached prefix (prompt cache on)", registry=r)
        self.prefill_tokens = Counter("polycoder_prefill_tokens", "Prompt tokens run through the model",
                                      registry=r)
        self.prefill_reused_tokens = Counter("polycoder_prefill_reused_tokens",
                                             "Prompt tokens whose keys and values came from the prompt cache",
                                             registry=r)
        self.prompt_cache_bytes = Gauge("polycoder_prompt_cache_bytes",
                                        "Bytes of keys and values the prompt cache holds (a draft model's too)",
                                        registry=r)
        self.prompt_cache_entries = Gauge("polycoder_prompt_cache_entries", "Prompts the prompt cache holds",
                                          registry=r)
        self.prompt_cache_evictions = Counter("polycoder_prompt_cache_evictions",
                                              "Prompts evicted from the prompt cache to make room", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
