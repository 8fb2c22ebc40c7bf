"""Bad input never gets a 5xx: hypothesis throws malformed and odd JSON at every endpoint that reads a body, and
each answer must be a 2xx or a 4xx in OpenAI's error shape (OpenAI clients retry 5xx, so a client's mistake
answered with one is retried in vain)."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import make_server

ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/moderations",
             "/v1/batches", "/v1/fine_tuning/jobs", "/v1/conversations", "/tokenize", "/detokenize"]
FIELDS = ["model", "messages", "prompt", "input", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
          "stream", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "logit_bias",
          "instructions", "previous_response_id", "text", "encoding_format", "dimensions", "input_file_id",
          "endpoint", "completion_window", "metadata", "max_output_tokens", "presence_penalty", "min_tokens",
          "stream_options", "echo", "suffix", "user", "tokens", "truncation", "parallel_tool_calls", "conversation",
          "items", "training_file", "hyperparameters", "method"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=40), st.sampled_from(["tiny", "script", "user", "assistant", "auto", "none",
                                                           "json_object", "function", "-1", ""]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(
                                                           ["role", "content", "type", "name", "function",
                                                            "parameters", "json_schema", "schema", "text",
                                                            "arguments", "tool_call_id", "include_usage"]) | st.text(max_size=8),
                                                           inner, max_size=4)), max_leaves=12)
# a body: sometimes a near-valid request with one field wrong, sometimes anything at all
near_valid = st.fixed_dictionaries({"model": st.sampled_from(["tiny", "nope"]),
                                    "messages": st.just([{"role": "user", "content": "hi"}]),
                                    "prompt": st.just("hi"), "input": st.just("hi"), "max_tokens": st.just(2)},
                                   optional={k: values for k in FIELDS
                                             if k not in ("model", "messages", "prompt", "input", "max_tokens")})
bodies = st.one_of(near_valid, st.dictionaries(st.sampled_from(FIELDS), values, max_size=6), values)


@pytest.fixture(scope="module")
def srv(model_files, tmp_path_factory):
    s, store = make_server(model_files, tmp_path_factory.mktemp("fuzz"), moderation=False)
    s.start()
    yield s
    s.stop()
    store.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(endpoint=st.sampled_from(ENDPOINTS), body=bodies)
def test_no_request_body_gets_a_5xx(srv, endpoint, body):
    # json.dumps writes NaN and Infinity as Python's json reads them back: the server must cope with those too
    r = httpx.post(srv.url + endpoint, content=json.dumps(body), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code < 500, (endpoint, body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=64))
def test_no_raw_body_gets_a_5xx(srv, endpoint, raw):
    r = httpx.post(srv.url + endpoint, content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, (endpoint, raw, r.status_code, r.text[:300])


WEB = ["/api/conversations", "/api/conversations/{cid}", "/api/conversations/{cid}/generate",
       "/api/messages/{mid}/feedback", "/api/comparisons"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(path=st.sampled_from(WEB), body=st.one_of(st.dictionaries(
    st.sampled_from(["title", "model", "system_prompt", "settings", "content", "parent_id", "reply_to", "rating",
                     "comment", "chosen_id", "rejected_id", "parent", "temperature", "max_tokens"]), values, max_size=5),
    values), method=st.sampled_from(["POST", "PATCH"]))
def test_the_web_chat_api_never_answers_bad_input_with_a_5xx(srv, path, body, method):
    """The page's own JSON API, on a real conversation and message ids as well as made-up ones."""
    c = httpx.Client(base_url=srv.url, timeout=60)
    conv = c.post("/api/conversations", json={"model": "script"}).json()
    gen = c.post(f"/api/conversations/{conv['id']}/generate", json={"content": "hi"})
    mid = next((m["id"] for m in c.get(f"/api/conversations/{conv['id']}").json()["messages"]), "m-none")
    assert gen.status_code == 200
    url = path.format(cid=conv["id"], mid=mid)
    r = c.request(method, url, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (method, url, body, r.status_code, r.text[:300])
    c.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/files", "/v1/batches", "/v1/models", "/api/conversations", "/v1/files/x/content",
                             "/v1/batches/batch_x", "/v1/responses/resp_x/input_items"]),
       params=st.dictionaries(st.sampled_from(["limit", "after", "order", "purpose", "before", "offset"]),
                              st.one_of(st.text(max_size=12), st.integers(-10**12, 10**12).map(str)), max_size=3))
def test_list_queries_never_get_a_5xx(srv, path, params):
    r = httpx.get(srv.url + path, params=params, timeout=60)
    assert r.status_code < 500, (path, params, r.status_code, r.text[:300])
