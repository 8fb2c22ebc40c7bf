"""Per-key rate limits: the buckets' arithmetic on a fake clock, then a live server with two API keys driven by
the official openai client (429s it recognises, OpenAI's x-ratelimit-* headers, keys kept apart)."""
from __future__ import annotations

import httpx
import openai
import pytest

from minichat.serve.protocol import APIError
from minichat.serve.ratelimit import RateLimiter, duration
from tests.serve.conftest import make_server

USER = [{"role": "user", "content": "Why is the sky blue?"}]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_buckets_refill_continuously():
    clock = Clock()
    lim = RateLimiter(rpm=2, tpm=120, clock=clock)
    lim.admit("a")
    lim.admit("a")
    with pytest.raises(APIError) as e:
        lim.admit("a")
    assert e.value.status == 429 and "requests per minute" in str(e.value) and e.value.headers["Retry-After"] == "30"
    lim.admit("b")  # another key has its own buckets
    clock.t += 29.0
    with pytest.raises(APIError):
        lim.admit("a")
    clock.t += 1.0  # one request refilled in 60 / rpm seconds
    lim.admit("a")
    # tokens: admitted while above zero; a charge may take the bucket below zero, then the refill decides
    lim.charge("c", 100)
    assert lim.headers("c")["x-ratelimit-remaining-tokens"] == "20"
    lim.admit("c")
    lim.charge("c", 80)  # 20 - 80 = -60: the next request waits (60 + 1) / 2 tokens a second = 30.5 s
    with pytest.raises(APIError) as e:
        lim.admit("c")
    assert e.value.type == "tokens" and e.value.headers["Retry-After"] == "31"
    clock.t += 31.0
    lim.admit("c")
    h = lim.headers("c")
    assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-limit-tokens"] == "120"
    assert h["x-ratelimit-remaining-requests"] == "1" and h["x-ratelimit-reset-tokens"] == "59s"  # 2 tokens left
    assert RateLimiter(rpm=5).headers("x").keys() == {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                                                      "x-ratelimit-reset-requests"}


def test_duration_format():
    assert [duration(x) for x in (0.02, 1.5, 59.0, 360.0, 61.2)] == ["20ms", "1.5s", "59s", "6m0s", "1m2s"]


@pytest.fixture(scope="module")
def limited(model_files, tmp_path_factory):
    s, store = make_server(model_files, tmp_path_factory.mktemp("ratelimit"), moderation=False,
                           api_keys=["key-one", "key-two"], rate_limit_rpm=3)
    s.start()
    yield s
    s.stop()
    store.close()


def test_requests_per_minute_per_key(limited):
    one = openai.OpenAI(base_url=limited.url + "/v1", api_key="key-one", max_retries=0, timeout=60)
    raw = one.chat.completions.with_raw_response.create(model="script", messages=USER, temperature=0, max_tokens=3)
    assert raw.headers["x-ratelimit-limit-requests"] == "3" and raw.headers["x-ratelimit-remaining-requests"] == "2"
    assert raw.parse().choices[0].message.content
    for chunk in one.chat.completions.create(model="script", messages=USER, stream=True, max_tokens=3):
        pass  # a stream counts as one request
    one.embeddings.create(model="tiny", input="hello")
    with pytest.raises(openai.RateLimitError) as e:
        one.chat.completions.create(model="script", messages=USER, max_tokens=3)
    assert e.value.code == "rate_limit_exceeded" and "this API key" in e.value.message
    assert int(e.value.response.headers["Retry-After"]) >= 1
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    two = openai.OpenAI(base_url=limited.url + "/v1", api_key="key-two", max_retries=0, timeout=60)
    assert two.completions.create(model="tiny", prompt="hello", max_tokens=2).choices  # its own bucket
    # a bad key is refused before any bucket is touched; endpoints that generate nothing are not limited
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=limited.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert len(one.models.list().data) == 3
    assert "x-ratelimit-limit-requests" not in httpx.get(limited.url + "/health").headers
    one.close()
    two.close()


def test_tokens_per_minute_count_what_was_generated(model_files, tmp_path):
    """Without API keys the client's address is the key. The script model's reply (about 20 tokens) plus its
    prompt exceed a 30-token budget: the next request is refused until the bucket refills."""
    s, store = make_server(model_files, tmp_path, moderation=False, rate_limit_tpm=30)
    s.start()
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="script", messages=USER, temperature=0)
        assert r.usage.prompt_tokens + r.usage.completion_tokens > 30
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="script", messages=USER)
        assert "tokens per minute on this client address" in e.value.message
        remaining = int(e.value.response.headers["x-ratelimit-remaining-tokens"])
        assert remaining == 0 and int(e.value.response.headers["Retry-After"]) >= 1
        c.close()
    finally:
        s.stop()
        store.close()
