"""Per-key rate limits, as OpenAI's API has them: requests per minute and tokens per minute.

    minichat serve --api_keys k1 --api_keys k2 --rate_limit_rpm 60 --rate_limit_tpm 20000

Each API key (or, on a server without keys, each client address) has two token buckets that refill
continuously: `rpm` requests and `tpm` tokens a minute. A request is admitted while its key has a request left
and its token bucket is above zero; its prompt tokens are charged when it starts and its generated tokens when
it ends, so a long reply can take the bucket below zero and the next request waits for the refill (OpenAI
reserves max_tokens up front instead; charging what was used does not punish a large max_tokens). A refusal is
429 with code rate_limit_exceeded, `Retry-After`, and the message says which limit. Every admitted response
carries OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers, which the openai client reads.
Limits are per server process and kept in memory.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from minichat.serve.protocol import APIError


def duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    m, s = divmod(int(math.ceil(seconds)), 60)
    return f"{m}m{s}s"


@dataclass
class _Bucket:
    requests: float
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, rpm: int = 0, tpm: int = 0, clock: Callable[[], float] = time.monotonic):
        self.rpm, self.tpm, self.clock = rpm, tpm, clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()  # charged from the worker threads too

    def _bucket(self, key: str) -> _Bucket:
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) > 10_000:  # forget keys whose buckets are full again: nothing to remember
                full = [k for k, x in self._buckets.items() if self._level(x, now) == (self.rpm, self.tpm)]
                for k in full:
                    del self._buckets[k]
            b = self._buckets[key] = _Bucket(float(self.rpm), float(self.tpm), now)
        b.requests, b.tokens = self._level(b, now)
        b.at = now
        return b

    def _level(self, b: _Bucket, now: float) -> tuple[float, float]:
        dt = max(0.0, now - b.at)
        return (min(float(self.rpm), b.requests + dt * self.rpm / 60.0),
                min(float(self.tpm), b.tokens + dt * self.tpm / 60.0))

    def admit(self, key: str) -> None:
        """Take one request from the key's bucket, or raise a 429 APIError saying when to come back."""
        with self._lock:
            b = self._bucket(key)
            if self.rpm and b.requests < 1.0:
                wait = (1.0 - b.requests) * 60.0 / self.rpm
                raise self._refusal(key, b, "requests", self.rpm, wait)
            if self.tpm and b.tokens <= 0.0:
                wait = (1.0 - b.tokens) * 60.0 / self.tpm
                raise self._refusal(key, b, "tokens", self.tpm, wait)
            if self.rpm:
                b.requests -= 1.0

    def charge(self, key: str, tokens: int) -> None:
        if self.tpm and tokens > 0:
            with self._lock:
                self._bucket(key).tokens -= tokens

    def headers(self, key: str) -> dict[str, str]:
        with self._lock:
            b = self._bucket(key)
            return self._headers(b)

    def _headers(self, b: _Bucket) -> dict[str, str]:
        out = {}
        for what, limit, level in (("requests", self.rpm, b.requests), ("tokens", self.tpm, b.tokens)):
            if limit:
                out[f"x-ratelimit-limit-{what}"] = str(limit)
                out[f"x-ratelimit-remaining-{what}"] = str(max(0, math.floor(level)))
                out[f"x-ratelimit-reset-{what}"] = duration((limit - level) * 60.0 / limit)
        return out

    def _refusal(self, key: str, b: _Bucket, what: str, limit: int, wait: float) -> APIError:
        who = "this client address" if key.startswith("ip:") else "this API key"
        return APIError(429, f"Rate limit reached for {what} per minute on {who}: limit {limit}. "
                              f"Please try again in {duration(wait)}.", type=what, code="rate_limit_exceeded",
                        headers={"Retry-After": str(max(1, math.ceil(wait))), **self._headers(b)})


class RateLimitHeaders:
    """Pure ASGI middleware: adds the x-ratelimit-* headers to responses of admitted requests (the
    dependency leaves the key in request.state; streams get them with their first bytes)."""

    def __init__(self, app, limiter: RateLimiter):
        self.app, self.limiter = app, limiter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                key = (scope.get("state") or {}).get("ratelimit_key")
                if key is not None and message["status"] < 400:
                    extra = [(k.encode(), v.encode()) for k, v in self.limiter.headers(key).items()]
                    message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, with_headers)
