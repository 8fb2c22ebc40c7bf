"""Continuous batching, cancellation on disconnect, the bounded queue (429), API keys and CORS."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from tests.serve.conftest import make_server

USER = [{"role": "user", "content": "Tell me a long story."}]


def health(live) -> dict:
    return httpx.get(live.url + "/health", timeout=10).json()["models"]["tiny"]


def wait_until(cond, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def long_stream(live, n_tokens: int, first_chunk: threading.Event, out: dict, model="tiny"):
    c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=60)
    chunks = 0
    for ch in c.chat.completions.create(model=model, messages=USER, max_tokens=n_tokens, stream=True,
                                        extra_body={"min_tokens": n_tokens}):
        chunks += 1
        first_chunk.set()
        if ch.choices and ch.choices[0].finish_reason:
            out["finish"] = ch.choices[0].finish_reason
            out["finished_at_chunks"] = chunks
    out["chunks"] = chunks
    c.close()


def test_concurrent_requests_share_decode_steps(live):
    h0 = health(live)
    results = []

    def one(i):
        c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="tiny", messages=USER, max_tokens=40, temperature=1.0, seed=i,
                                      extra_body={"min_tokens": 40})
        results.append(r.usage.completion_tokens)
        c.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    h1 = health(live)
    assert results == [40] * 6
    tokens = h1["tokens_generated"] - h0["tokens_generated"]
    steps = h1["steps"] - h0["steps"]
    assert tokens == 240
    # one by one would need a step per token; batched, each step decodes several requests at once
    assert steps < tokens / 2, (steps, tokens)


def test_new_request_joins_the_running_batch(live):
    first, out = threading.Event(), {}
    t = threading.Thread(target=long_stream, args=(live, 200, first, out))
    t.start()
    assert first.wait(30)
    c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=60)
    h0 = health(live)
    r = c.chat.completions.create(model="tiny", messages=USER, max_tokens=5, extra_body={"min_tokens": 5})
    assert r.usage.completion_tokens == 5
    assert "finish" not in out  # the short request (same model) finished while the long one was still generating
    h1 = health(live)
    assert h1["steps"] - h0["steps"] < h1["tokens_generated"] - h0["tokens_generated"]  # they shared steps
    t.join(60)
    assert out["finish"] == "length"
    c.close()


def test_disconnect_cancels_generation(live):
    h0 = health(live)
    body = {"model": "tiny", "messages": USER, "max_tokens": 220, "min_tokens": 220, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert got[0].startswith("data: ")
    # the client is gone: the worker must notice, cancel the sequence and free its row
    assert wait_until(lambda: health(live)["finished"].get("cancelled", 0) > h0["finished"].get("cancelled", 0))
    assert wait_until(lambda: health(live)["running"] == 0)
    assert health(live)["tokens_generated"] - h0["tokens_generated"] < 220


@pytest.fixture(scope="module")
def tight(model_files, tmp_path_factory):
    """One sequence at a time and no waiting line: a second request must get 429."""
    from minichat.serve.config import EngineSettings

    srv, store = make_server(model_files, tmp_path_factory.mktemp("tight"), max_queue=0, retry_after=3,
                             engine=EngineSettings(device="cpu", weights="fp32", max_batch=1))
    srv.start()
    yield srv
    srv.stop()
    store.close()


def test_full_queue_is_429_with_retry_after(tight):
    first, out = threading.Event(), {}
    t = threading.Thread(target=long_stream, args=(tight, 200, first, out))
    t.start()
    assert first.wait(30)
    c = openai.OpenAI(base_url=tight.url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=5)
    assert e.value.response.headers["retry-after"] == "3"
    assert e.value.body["code"] == "rate_limit_exceeded"
    t.join(60)
    assert out["finish"] == "length"
    r = c.chat.completions.create(model="script", messages=USER, temperature=0, max_tokens=2)  # room again
    assert r.choices[0].message.content == "Sure!"
    c.close()


@pytest.fixture(scope="module")
def locked(model_files, tmp_path_factory):
    srv, store = make_server(model_files, tmp_path_factory.mktemp("locked"), api_keys=["sk-one"],
                             cors_origins=["http://example.test"], moderation=False)
    srv.start()
    yield srv
    srv.stop()
    store.close()


def test_api_keys(locked, monkeypatch):
    def client(key):
        return openai.OpenAI(base_url=locked.url + "/v1", api_key=key, max_retries=0, timeout=30)

    with pytest.raises(openai.AuthenticationError) as e:
        client("sk-wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(locked.url + "/v1/chat/completions", json={"model": "tiny", "messages": USER}, timeout=10)
    assert r.status_code == 401
    assert [m.id for m in client("sk-one").models.list()] == ["tiny", "script", "bad"]
    r = client("sk-one").chat.completions.create(model="script", messages=USER, temperature=0, max_tokens=2)
    assert r.choices[0].message.content == "Sure!" and r.moderation is None  # moderation off on this server
    assert httpx.get(locked.url + "/health", timeout=10).status_code == 200  # health needs no key
    assert httpx.get(locked.url + "/api/conversations", timeout=10).status_code == 401


def test_keys_from_environment(model_files, tmp_path, monkeypatch):
    from minichat.serve.config import ServeConfig

    monkeypatch.setenv("MINICHAT_API_KEYS", "sk-a, sk-b")
    assert ServeConfig(api_keys=["sk-c"]).all_api_keys() == ["sk-c", "sk-a", "sk-b"]


def test_cors(locked):
    r = httpx.options(locked.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://example.test"
    r = httpx.options(locked.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": "http://evil.test", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
