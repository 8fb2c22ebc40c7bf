"""GET /metrics: Prometheus's format, read back with prometheus_client's own parser, against what the API
answered (usage, finish reasons) for the same requests."""
from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import make_server


@pytest.fixture(scope="module")
def srv(model_files, tmp_path_factory):
    s, store = make_server(model_files, tmp_path_factory.mktemp("metrics"))
    s.start()
    yield s
    s.stop()
    store.close()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_agree_with_the_api(srv):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    user = [{"role": "user", "content": "Why is the sky blue?"}]
    before = scrape(srv.url)
    a = c.chat.completions.create(model="script", messages=user, temperature=0, n=2)
    usage = [a.usage]
    for ch in c.chat.completions.create(model="script", messages=user, temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage.append(ch.usage)
    b = c.chat.completions.create(model="tiny", messages=user, max_tokens=5, temperature=1, seed=1)
    usage.append(b.usage)
    assert b.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=user)
    assert httpx.get(srv.url + "/no/such/page", timeout=10).status_code == 404
    c.close()

    m = scrape(srv.url)

    def grew(name, **labels):
        return value(m, name, **labels) - value(before, name, **labels)

    assert grew("minichat_request_success_total", model="script", finished_reason="stop") == 3  # n=2, then 1
    assert grew("minichat_request_success_total", model="tiny", finished_reason="length") == 1
    gen = grew("minichat_generation_tokens_total", model="script") + grew("minichat_generation_tokens_total", model="tiny")
    assert gen == sum(u.completion_tokens for u in usage)
    prompt = grew("minichat_prompt_tokens_total", model="script") + grew("minichat_prompt_tokens_total", model="tiny")
    assert prompt == sum(u.prompt_tokens for u in usage)
    assert grew("minichat_time_to_first_token_seconds_count", model="script") == 2  # one per request
    assert grew("minichat_e2e_request_latency_seconds_count", model="script") == 2
    assert grew("minichat_e2e_request_latency_seconds_sum", model="script") > 0
    assert grew("minichat_time_per_output_token_seconds_count", model="tiny") == 1
    chat = dict(method="POST", route="/v1/chat/completions")
    assert grew("minichat_http_requests_total", status="200", **chat) == 3
    assert grew("minichat_http_requests_total", status="404", **chat) == 1
    assert grew("minichat_http_requests_total", method="GET", route="unmatched", status="404") == 1  # no raw paths
    # read from the workers at scrape time; nothing running between requests
    assert value(m, "minichat_num_requests_running", model="tiny") == 0
    assert value(m, "minichat_max_batch", model="tiny") == 8
    assert grew("minichat_engine_steps_total", model="script") > 0
    assert grew("minichat_prefill_tokens_total", model="script") > 0
    assert any(k[0] == "process_resident_memory_bytes" for k in m)


def test_moderation_actions_are_counted(srv):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    before = scrape(srv.url)
    r = c.chat.completions.create(model="bad", messages=[{"role": "user", "content": "What is your plan?"}],
                                  temperature=0)
    assert r.choices[0].finish_reason == "content_filter"
    r = c.chat.completions.create(model="script", messages=[{"role": "user", "content": "How do I kill my boss?"}])
    assert r.choices[0].finish_reason == "content_filter"
    c.close()
    m = scrape(srv.url)
    out = {k: v - before.get(k, 0.0) for k, v in m.items() if k[0] == "minichat_moderation_actions_total"}
    by = {(dict(k[1])["source"], dict(k[1])["action"]): v for k, v in out.items() if v}
    assert by.get(("output", "replaced")) == 1 and by.get(("input", "refused")) == 1
    assert all(dict(k[1])["category"] for k in out)


def test_metrics_can_be_turned_off(model_files, tmp_path):
    s, store = make_server(model_files, tmp_path, moderation=False, metrics=False)
    s.start()
    try:
        assert httpx.get(s.url + "/metrics", timeout=10).status_code == 404
    finally:
        s.stop()
        store.close()
