"""`GET /metrics`: the server's counters in Prometheus's text format, for Prometheus/Grafana as vLLM and TGI
expose them.

Per request (recorded when a job's last choice finishes, in the worker thread; prometheus_client is
thread-safe): time to first token, end-to-end latency, time per output token after the first, prompt and
generated tokens, finish reasons. Per scrape (read from each worker's `stats()`, nothing on the hot path):
sequences running and waiting, engine steps and their time, prefill and prefix-cache tokens. Also HTTP
requests by route and status, moderation actions by source and category, and the process's CPU and memory.
Each app owns its registry: several servers in one process (the tests) do not share counters.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from minichat.serve.worker import Job

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: decode steps here take 5-50 ms, a first token 20 ms to seconds under load
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PER_TOKEN = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class _WorkerCollector:
    """Gauges and counters the workers keep anyway, read at scrape time."""

    def __init__(self, workers: Callable[[], dict]):
        self.workers = workers

    def collect(self):
        g = {n: GaugeMetricFamily(f"minichat_{n}", d, labels=["model"]) for n, d in (
            ("num_requests_running", "sequences in the continuous batch"),
            ("num_requests_waiting", "sequences queued for a place in the batch"),
            ("max_batch", "the batch's capacity in sequences"))}
        c = {n: CounterMetricFamily(f"minichat_{n}", d, labels=["model"]) for n, d in (
            ("engine_steps", "engine steps (one decode step for the whole batch, with any prefill)"),
            ("engine_step_seconds", "wall seconds inside engine steps"),
            ("prefill_tokens", "prompt tokens computed"),
            ("prefix_cache_hit_tokens", "prompt tokens whose keys and values came from the prefix cache"))}
        for name, w in self.workers().items():
            s = w.stats()
            for key, metric in (("running", "num_requests_running"), ("waiting", "num_requests_waiting"),
                                ("max_batch", "max_batch")):
                g[metric].add_metric([name], s[key])
            for key, metric in (("steps", "engine_steps"), ("step_seconds", "engine_step_seconds"),
                                ("prefill_tokens", "prefill_tokens"), ("prefix_cache_tokens", "prefix_cache_hit_tokens")):
                c[metric].add_metric([name], s[key])
        yield from g.values()
        yield from c.values()


class HTTPCounter:
    """Pure ASGI middleware (streams pass through untouched): requests by method, route template and status.
    The route is the template FastAPI matched (/v1/responses/{response_id}), so ids never become labels."""

    def __init__(self, app, metrics: "ServerMetrics"):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http.labels(scope["method"], route, str(status[0])).inc()


class ServerMetrics:
    def __init__(self, workers: Callable[[], dict]):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("minichat_time_to_first_token_seconds", "from submission to the first token",
                              ["model"], buckets=_LATENCY, registry=r)
        self.e2e = Histogram("minichat_e2e_request_latency_seconds", "from submission to the last choice's end",
                             ["model"], buckets=_LATENCY, registry=r)
        self.tpot = Histogram("minichat_time_per_output_token_seconds", "after the first token, per further token",
                              ["model"], buckets=_PER_TOKEN, registry=r)
        self.prompt_hist = Histogram("minichat_request_prompt_tokens", "prompt tokens per request", ["model"],
                                     buckets=_TOKENS, registry=r)
        self.gen_hist = Histogram("minichat_request_generation_tokens", "generated tokens per request (all choices)",
                                  ["model"], buckets=_TOKENS, registry=r)
        self.prompt_tokens = Counter("minichat_prompt_tokens", "prompt tokens of finished requests", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("minichat_generation_tokens", "tokens generated (as in usage)", ["model"],
                                         registry=r)
        self.finished = Counter("minichat_request_success", "choices finished, by reason (stop, length, "
                                "tool_calls, cancelled, error)", ["model", "finished_reason"], registry=r)
        self.http = Counter("minichat_http_requests", "HTTP requests by route and status", ["method", "route", "status"],
                            registry=r)
        self.moderation = Counter("minichat_moderation_actions", "flagged texts: source input|output, action "
                                  "refused|replaced|stopped, the first flagged category", ["source", "action", "category"],
                                  registry=r)
        r.register(_WorkerCollector(workers))
        try:
            ProcessCollector(registry=r)  # CPU seconds, resident memory, open files (Linux /proc)
        except Exception:  # noqa: BLE001 - elsewhere it is simply absent
            pass

    def job_done(self, job: "Job", model: str) -> None:
        """Called by the worker when the job's last choice has finished."""
        now = time.perf_counter()
        tokens = sum(c.tokens for c in job.choices)
        self.e2e.labels(model).observe(now - job.submitted_at)
        if job.first_token_at is not None:
            self.ttft.labels(model).observe(job.first_token_at - job.submitted_at)
            longest = max(c.tokens for c in job.choices)
            if longest > 1:
                self.tpot.labels(model).observe((now - job.first_token_at) / (longest - 1))
        self.prompt_hist.labels(model).observe(job.prompt_tokens)
        self.gen_hist.labels(model).observe(tokens)
        self.prompt_tokens.labels(model).inc(job.prompt_tokens)
        self.generation_tokens.labels(model).inc(tokens)
        for c in job.choices:
            self.finished.labels(model, c.reason or "unknown").inc()

    def moderated(self, source: str, action: str, categories: list[str]) -> None:
        self.moderation.labels(source, action, categories[0] if categories else "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
