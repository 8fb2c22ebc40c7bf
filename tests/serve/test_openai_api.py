"""The OpenAI-compatible API, driven by the official `openai` client against a live uvicorn server."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

USER = [{"role": "user", "content": "Why is the sky blue?"}]


def test_non_streaming(client, model_files):
    r = client.chat.completions.create(model="script", messages=USER, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "script"
    assert isinstance(r.created, int)
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert c.message.content == model_files.script_text
    assert c.finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == 19
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.moderation.input.results[0].flagged is False
    assert r.moderation.output.results[0].flagged is False


def test_roles_system_developer_assistant(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Use plain words."},
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "and now?"}]}]
    r = client.chat.completions.create(model="script", messages=msgs, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert r.choices[0].message.content == "Sure! Here"


def _stream(client, **kw):
    return list(client.chat.completions.create(stream=True, **kw))


@pytest.mark.parametrize("model", ["tiny", "script"])
def test_stream_equals_non_stream_and_chunk_semantics(client, model):
    kw = dict(model=model, messages=USER, temperature=0, max_tokens=40)
    whole = client.chat.completions.create(**kw)
    chunks = _stream(client, stream_options={"include_usage": True}, **kw)
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == [whole.choices[0].finish_reason]  # exactly one per choice
    # usage only on the final chunk, whose choices are empty
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.usage.model_dump() == whole.usage.model_dump()


def test_stream_without_usage_has_no_usage(client):
    chunks = _stream(client, model="script", messages=USER, temperature=0)
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_raw_sse_ends_with_done(live):
    body = {"model": "script", "messages": USER, "temperature": 0, "stream": True, "max_tokens": 4}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(ln[6:])["object"] == "chat.completion.chunk" for ln in lines[:-1])


def test_n_and_seed(client):
    kw = dict(model="tiny", messages=USER, temperature=1.0, max_tokens=12, n=2, extra_body={"min_tokens": 12})
    a = client.chat.completions.create(seed=7, **kw)
    b = client.chat.completions.create(seed=7, **kw)
    c = client.chat.completions.create(seed=8, **kw)
    assert [ch.index for ch in a.choices] == [0, 1]
    texts = lambda r: [ch.message.content for ch in r.choices]  # noqa: E731
    assert texts(a) == texts(b)  # same seed, same answers
    assert texts(a)[0] != texts(a)[1]  # the n samples differ
    assert texts(a) != texts(c)
    assert a.usage.completion_tokens == 24  # both choices count
    # streaming n=2: each choice gets its role chunk and exactly one finish_reason
    chunks = _stream(client, seed=7, **kw)
    per = {0: "", 1: ""}
    fin = {0: [], 1: []}
    for ch in chunks:
        for x in ch.choices:
            per[x.index] += x.delta.content or ""
            if x.finish_reason:
                fin[x.index].append(x.finish_reason)
    assert [per[0], per[1]] == texts(a)
    assert all(len(v) == 1 for v in fin.values())


def test_stop_sequences(client, model_files):
    r = client.chat.completions.create(model="script", messages=USER, temperature=0, stop=["blue", "zzz"])
    assert r.choices[0].message.content == "Sure! Here is my answer: the sky looks "
    assert r.choices[0].finish_reason == "stop"
    chunks = _stream(client, model="script", messages=USER, temperature=0, stop="blue")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Sure! Here is my answer: the sky looks "


def test_logprobs(client):
    r = client.chat.completions.create(model="script", messages=USER, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens == 6
    assert "".join(e.token for e in lp) == r.choices[0].message.content
    for e in lp:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token  # greedy: the sampled token is the most likely
        assert bytes(e.bytes).decode() == e.token
    chunks = _stream(client, model="script", messages=USER, temperature=0, max_tokens=6, logprobs=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in lp]


def test_top_logprobs_21_is_400_and_server_still_answers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, logprobs=True, top_logprobs=21)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "top_logprobs"
    assert e.value.body["type"] == "invalid_request_error"
    r = client.chat.completions.create(model="script", messages=USER, temperature=0, max_tokens=2)
    assert r.choices[0].message.content == "Sure!"


@pytest.mark.parametrize("kw,param", [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 99}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]}, "tool_calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]}, "tool_calls"),
    ({"messages": []}, "messages"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                  "function": {"name": "g"}}},
     "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_parameters_are_400_with_param(client, kw, param):
    args = {"model": "tiny", "messages": USER, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.body["param"] == param, e.value.body


def test_context_overflow_is_400(client):
    long = " ".join(["Paris is the capital of France."] * 200)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}])
    assert e.value.body["code"] == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_malformed_bodies_and_routes(live):
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(live.url + "/v1/chat/completions", json=["a list"], timeout=10)
    assert r.status_code == 400
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "tiny", "messages": "hi"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.get(live.url + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(live.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny", "script", "bad"]
    m = client.models.retrieve("script")
    assert m.id == "script" and m.owned_by == "minichat"


def test_moderations_endpoint(client):
    r = client.moderations.create(input="I will kill you")
    assert r.results[0].flagged and r.results[0].categories.violence
    assert r.results[0].category_scores.violence > 0.5
    r = client.moderations.create(input=["What a lovely day.", "I will kill you"])
    assert [x.flagged for x in r.results] == [False, True]
    with pytest.raises(openai.BadRequestError):
        client.moderations.create(input=[])


def test_flagged_input_is_refused(client, live):
    before = len(live.store.moderation_decisions())
    r = client.chat.completions.create(model="script", messages=[{"role": "user", "content": "I will kill you"}],
                                       temperature=0, n=2)
    assert [c.finish_reason for c in r.choices] == ["content_filter"] * 2
    assert r.choices[0].message.content != "" and "kill" not in r.choices[0].message.content
    assert r.usage.completion_tokens == 0
    assert r.moderation.input.results[0].flagged is True
    dec = live.store.moderation_decisions()[before:]
    assert dec and dec[0]["source"] == "input" and dec[0]["action"] == "refused" and "violence" in dec[0]["categories"]
    chunks = _stream(client, model="script", messages=[{"role": "user", "content": "I will kill you"}],
                     stream_options={"include_usage": True})
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["content_filter"]
    # the generation that started while the input was checked was cancelled, not left running
    deadline = time.time() + 10
    while True:
        st = httpx.get(live.url + "/health").json()["models"]["script"]
        if st["running"] == 0 and st["waiting"] == 0 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert st["running"] == 0 and st["waiting"] == 0


def test_flagged_output_mid_stream(client, model_files, live):
    chunks = _stream(client, model="bad", messages=USER, temperature=0, stream_options={"include_usage": True})
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["content_filter"]
    streamed = "".join(deltas)
    refusal = client.chat.completions.create(model="bad", messages=USER, temperature=0).choices[0].message.content
    assert streamed.endswith("\n\n" + refusal)
    before = streamed[: -len(refusal) - 2]
    # the harmless start went out as it was generated; the guard cut the rest as soon as it flagged
    assert before.startswith("Okay, let me") and model_files.bad_text.startswith(before)
    assert "tonight" not in before
    assert chunks[-1].usage.completion_tokens < len(model_files.bad_text)  # generation was cut short
    fin = [ch for c in chunks for ch in c.choices if ch.finish_reason][0]
    assert fin.model_extra["moderation"]["flagged"] is True


def test_score_mode_reports_without_blocking(client, model_files):
    r = client.chat.completions.create(model="bad", messages=USER, temperature=0,
                                       extra_body={"moderation": {"model": "minichat-moderation-1",
                                                                  "policy": {"output": {"mode": "score"}}}})
    assert r.choices[0].message.content == model_files.bad_text
    assert r.choices[0].finish_reason == "stop"
    assert r.moderation.output.results[0].flagged is True
    chunks = _stream(client, model="script", messages=USER, temperature=0,
                     extra_body={"moderation": {"model": "minichat-moderation-1"}})
    mod = [c for c in chunks if c.moderation is not None]
    assert len(mod) == 1 and mod[0].choices == [] and mod[0].moderation.output.results[0].flagged is False


def test_legacy_completions(client):
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    s = list(client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text
    e = client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, temperature=0, echo=True)
    assert e.choices[0].text == "Hello there" + r.choices[0].text
    two = client.completions.create(model="tiny", prompt=["Hello", "Paris"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    lp = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.tokens) == 3 and len(lp.choices[0].logprobs.top_logprobs[0]) == 2


def test_health(live):
    h = httpx.get(live.url + "/health", timeout=10).json()
    assert h["status"] == "ok" and set(h["models"]) == {"tiny", "script", "bad"}
    assert h["moderation"] is True and h["store"] is True


def test_sampling_defaults_and_dry_reach_the_engine():
    """A request that leaves temperature / top_p out gets the model's recommended values (the built-in model's
    card: 0.2 / 0.9), else OpenAI's 1.0; chat requests get the server's DRY unless they set dry_multiplier."""
    from types import SimpleNamespace

    from minichat.gguf_import import recommended_sampling
    from minichat.serve.app import _opts
    from minichat.serve.protocol import ChatCompletionRequest, CompletionRequest

    svc = SimpleNamespace(cfg=SimpleNamespace(max_n=4))
    builtin = SimpleNamespace(context_len=2048, sampling=recommended_sampling("smollm2"))
    other = SimpleNamespace(context_len=2048, sampling=recommended_sampling("runs/x/ppo"))
    chat = ChatCompletionRequest(model="m", messages=USER)
    o = _opts(svc, builtin, 10, max_tokens=None, default_max=64, req=chat, logprobs=False, top_logprobs=0,
              dry_default=0.8)
    assert (o.temperature, o.top_p, o.dry_multiplier, o.dry_base, o.dry_allowed_length) == (0.2, 0.9, 0.8, 1.75, 2)
    o = _opts(svc, other, 10, max_tokens=None, default_max=64, req=chat, logprobs=False, top_logprobs=0)
    assert (o.temperature, o.top_p, o.dry_multiplier) == (1.0, 1.0, 0.0)
    asked = ChatCompletionRequest(model="m", messages=USER, temperature=0.7, top_p=0.5, dry_multiplier=0,
                                  dry_base=2.0, dry_allowed_length=3)
    o = _opts(svc, builtin, 10, max_tokens=None, default_max=64, req=asked, logprobs=False, top_logprobs=0,
              dry_default=0.8)
    assert (o.temperature, o.top_p, o.dry_multiplier, o.dry_base, o.dry_allowed_length) == (0.7, 0.5, 0.0, 2.0, 3)
    with pytest.raises(ValueError):
        ChatCompletionRequest(model="m", messages=USER, dry_multiplier=-1)
    text = CompletionRequest(model="m", prompt="hi", dry_multiplier=1.5)
    assert _opts(svc, other, 3, max_tokens=None, default_max=16, req=text, logprobs=False,
                 top_logprobs=0).dry_multiplier == 1.5


def test_dry_in_extra_body(client):
    kw = dict(model="tiny", messages=USER, temperature=0, max_tokens=8)
    r = client.chat.completions.create(**kw, extra_body={"dry_multiplier": 1.2, "dry_allowed_length": 3})
    assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**kw, extra_body={"dry_multiplier": 20})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**kw, extra_body={"dry_base": 1.0})


ANSWER = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "color", "xs"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}, "color": {"enum": ["red", "green"]},
                         "xs": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}}}


def test_response_format_json_schema(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    finished = 0
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=USER, response_format=fmt, temperature=1.0,
                                           seed=seed, max_tokens=300)
        c = r.choices[0]
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), ANSWER)
            finished += 1
    assert finished >= 2
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, response_format=fmt, temperature=1.0,
                                                 seed=0, max_tokens=300, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    jsonschema.validate(json.loads(streamed), ANSWER)
    # the same schema in the openai client's own form: a pydantic model (client.beta ... parse)
    from pydantic import BaseModel

    class Answer(BaseModel):
        ok: bool
        n: int

    p = client.beta.chat.completions.parse(model="tiny", messages=USER, response_format=Answer, temperature=0,
                                           max_tokens=200)
    if p.choices[0].finish_reason == "stop":
        assert isinstance(p.choices[0].message.parsed, Answer)


def test_pydantic_formats_parse(client):
    """pydantic's date, datetime and UUID fields (JSON Schema formats), a dict field (additionalProperties) and
    bounded numbers (minimum / exclusiveMaximum ...):
    whatever the tiny random model writes under the grammar, a finished reply validates as the model."""
    import datetime
    import uuid

    from pydantic import BaseModel, Field

    class Event(BaseModel):
        day: datetime.date
        at: datetime.datetime
        id: uuid.UUID
        counts: dict[str, int]
        confidence: float = Field(ge=0, le=1)  # a number's range
        level: int = Field(gt=0, lt=10)

    finished = 0
    for seed in range(4):
        fmt = {"type": "json_schema", "json_schema": {"name": "event", "schema": Event.model_json_schema()}}
        r = client.chat.completions.create(model="tiny", messages=USER, response_format=fmt, temperature=1.0,
                                           seed=seed, max_tokens=300)
        if r.choices[0].finish_reason == "stop":
            Event.model_validate_json(r.choices[0].message.content)  # raises if a format or the dict is wrong
            finished += 1
    assert finished >= 1


def test_structured_reply_refused_in_refusal_field(client):
    """A flagged input under response_format: the refusal goes in message.refusal and the content stays empty
    (OpenAI's structured-outputs shape: content is only ever the JSON asked for); the finish reason is
    content_filter, which the client's parse() raises as its own error rather than failing to parse text."""
    from pydantic import BaseModel

    class Answer(BaseModel):
        ok: bool

    bad = [{"role": "user", "content": "I will kill you"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": Answer.model_json_schema()}}
    r = client.chat.completions.create(model="script", messages=bad, response_format=fmt, temperature=0)
    msg = r.choices[0].message
    assert msg.content is None and msg.refusal and "kill" not in msg.refusal
    assert r.choices[0].finish_reason == "content_filter"
    with pytest.raises(openai.ContentFilterFinishReasonError):
        client.beta.chat.completions.parse(model="script", messages=bad, response_format=Answer, temperature=0)
    chunks = _stream(client, model="script", messages=bad, response_format={"type": "json_object"})
    deltas = [ch.delta for c in chunks for ch in c.choices]
    assert "".join(d.refusal or "" for d in deltas) == msg.refusal
    assert not "".join(d.content or "" for d in deltas)
    # plain text requests keep the refusal as the reply's content, as in a chat
    r = client.chat.completions.create(model="script", messages=bad, temperature=0)
    assert r.choices[0].message.content == msg.refusal and r.choices[0].message.refusal is None


def test_response_format_json_object(client):
    r = client.chat.completions.create(model="tiny", messages=USER, response_format={"type": "json_object"},
                                       temperature=1.0, seed=0, max_tokens=40)
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    # the script model would say SCRIPT; under the grammar its first token must open an object instead
    s = client.chat.completions.create(model="script", messages=USER, response_format={"type": "json_object"},
                                       temperature=0, max_tokens=5)
    assert s.choices[0].message.content.lstrip().startswith("{")


@pytest.mark.parametrize("fmt,msg", [
    ({"type": "yaml"}, "type must be"),
    ({"type": "json_schema"}, "json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string"}}}, "root must be"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"$ref": "#/nowhere"}}}, "points at nothing"),
])
def test_bad_response_format_is_400(client, fmt, msg):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, response_format=fmt)
    assert e.value.body["param"] == "response_format" and msg in e.value.body["message"], e.value.body


def test_logit_bias(client, model_files):
    from minichat.tokenizer import load_tokenizer

    tok = load_tokenizer(model_files.script)
    first = tok.encode(model_files.script_text)[0]
    kw = dict(model="script", messages=USER, temperature=0, max_tokens=3)
    assert client.chat.completions.create(**kw).choices[0].message.content.startswith(tok.decode([first]))
    r = client.chat.completions.create(**kw, logit_bias={str(first): -100})
    assert not r.choices[0].message.content.startswith(tok.decode([first]))
    other = tok.encode(" fox")[0]
    r = client.chat.completions.create(**kw, logit_bias={str(other): 100})
    assert r.choices[0].message.content.startswith(tok.decode([other]))
    for bad in ({"x": 1}, {"1": 200}, {str(10**7): 5}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**kw, logit_bias=bad)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                          "additionalProperties": False}}}


def test_tool_calls_required_and_named(client):
    import jsonschema

    called = 0
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, TIME], tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=400)
        c = r.choices[0]
        if c.finish_reason == "tool_calls":
            assert c.message.content is None and len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)
            for call in c.message.tool_calls:  # one call or several (parallel_tool_calls defaults to true)
                assert call.type == "function" and call.id.startswith("call_")
                args = json.loads(call.function.arguments)
                if call.function.name == "get_weather":
                    jsonschema.validate(args, WEATHER["function"]["parameters"])
                else:
                    assert call.function.name == "get_time" and args == {}
            called += 1
    assert called >= 2
    single = [client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, TIME], temperature=1.0,
                                             tool_choice="required", seed=seed, parallel_tool_calls=False,
                                             max_tokens=200).choices[0] for seed in range(3)]
    assert all(len(c.message.tool_calls) == 1 for c in single if c.finish_reason == "tool_calls")
    assert sum(c.finish_reason == "tool_calls" for c in single) >= 2
    r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, TIME], temperature=1.0, seed=0,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name == "get_time"
    assert r.choices[0].message.tool_calls[0].function.arguments == "{}"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_cut_by_max_tokens_keep_the_complete_ones(client, stream):
    """Parallel calls cut by max_tokens inside a later call: the complete calls come back as tool_calls, and the
    finish reason says the reply was cut."""
    seen = 0
    for seed in range(4):
        full = client.chat.completions.create(model="tiny", messages=USER, tools=[TIME], tool_choice="required",
                                              temperature=1.0, seed=seed, max_tokens=400)
        calls = full.choices[0].message.tool_calls or []
        if full.choices[0].finish_reason != "tool_calls" or len(calls) < 2:
            continue
        for mt in range(4, full.usage.completion_tokens):  # the same seed gives the same tokens: cut earlier
            args = dict(model="tiny", messages=USER, tools=[TIME], tool_choice="required", temperature=1.0,
                        seed=seed, max_tokens=mt)
            if stream:
                deltas = [ch.choices[0] for ch in client.chat.completions.create(**args, stream=True) if ch.choices]
                got = [tc for d in deltas if d.delta.tool_calls for tc in d.delta.tool_calls]
                reason = deltas[-1].finish_reason
                content = "".join(d.delta.content or "" for d in deltas)
            else:
                c = client.chat.completions.create(**args).choices[0]
                got, reason, content = c.message.tool_calls or [], c.finish_reason, c.message.content or ""
            assert reason == "length"
            if got:
                assert not content and 1 <= len(got) < len(calls)
                assert all(g.function.name == "get_time" and json.loads(g.function.arguments) == {} for g in got)
                seen += 1
                break
    assert seen >= 1


def test_tool_calls_streamed(client):
    chunks = list(client.chat.completions.create(
        model="tiny", messages=USER, tools=[TIME], tool_choice="required", temperature=1.0, seed=0, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    calls = [d.tool_calls for d in deltas if d.tool_calls]
    assert len(calls) == 1 and calls[0][0].function.name == "get_time" and calls[0][0].index == 0
    assert not "".join(d.content or "" for d in deltas)  # the call's text is never streamed as content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    # the client's own stream helper and pydantic tools read the calls
    from pydantic import BaseModel

    class GetWeather(BaseModel):
        city: str
        days: int

    with client.beta.chat.completions.stream(model="tiny", messages=USER, tools=[openai.pydantic_function_tool(GetWeather)],
                                             tool_choice="required", temperature=1.0, seed=0, max_tokens=300) as s:
        final = s.get_final_completion()  # (the helper raises if the reply ran to max_tokens: seeded, it does not)
    assert final.choices[0].finish_reason == "tool_calls"
    assert all(isinstance(c.function.parsed_arguments, GetWeather) for c in final.choices[0].message.tool_calls)


def test_tool_choice_auto_and_none_leave_text_replies_alone(client, model_files):
    """"none" leaves the tools out: the script model says its script. Under "auto" a reply that does not begin
    a call (the tiny model pushed to one word by logit_bias) is plain text, streamed or not."""
    r = client.chat.completions.create(model="script", messages=USER, tools=[WEATHER], tool_choice="none",
                                       temperature=0)
    assert r.choices[0].message.content == model_files.script_text and r.choices[0].finish_reason == "stop"
    from minichat.tokenizer import load_tokenizer

    word = load_tokenizer(model_files.tiny).encode(" the")
    assert len(word) == 1
    kw = dict(model="tiny", messages=USER, tools=[WEATHER], temperature=0, max_tokens=4,
              logit_bias={str(word[0]): 100})
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == " the" * 4 and not r.choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == " the" * 4


def test_a_conversation_with_tool_results(client):
    """The client's loop: the assistant's call and the tool's result go back in; the server takes them."""
    msgs = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": "{\"city\": \"Paris\", \"days\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"},
    ]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER], max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_prompt_messages_and_parsing():
    from minichat import toolcall as tools

    fns = [WEATHER["function"]]
    msgs = tools.prompt_messages(
        [{"role": "user", "content": "Weather in Rome?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
         {"role": "tool", "tool_call_id": "c", "content": "sunny"}], fns, "auto", "You are SmolLM.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("You are SmolLM.\n\n# Tools") and '"name": "get_weather"' in msgs[0]["content"]
    assert msgs[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    assert msgs[3]["content"] == "<tool_response>\nsunny\n</tool_response>"
    assert tools.prompt_messages([{"role": "user", "content": "hi"}], fns, "none", None) == [
        {"role": "user", "content": "hi"}]
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}\n</tool_call>'
    calls = tools.parse_calls(one, fns)
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Rome", "days": 1}'}]
    two = tools.parse_calls(one + "\n" + one.replace("Rome", "Paris"), fns)
    assert [json.loads(c["function"]["arguments"])["city"] for c in two] == ["Rome", "Paris"]
    assert two[0]["id"] != two[1]["id"]
    assert tools.parse_calls('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', fns) is None
    assert tools.parse_calls("It is sunny.", fns) is None
    assert tools.parse_calls(one + " and some text", fns) is None
    # cut by max_tokens: the complete calls count when only the start of another follows them
    cut = one + '\n<tool_call>\n{"name": "get_weather", "argu'
    assert tools.parse_calls(cut, fns) is None
    assert [c["function"]["name"] for c in tools.parse_calls(cut, fns, cut=True)] == ["get_weather"]
    for bad in (one + " and some text", "text " + cut, '<tool_call>\n{"name": "get_w'):
        assert tools.parse_calls(bad, fns, cut=True) is None, bad
    assert tools.may_be_call("  <tool") and tools.may_be_call("<tool_call>\n{") and not tools.may_be_call("<b>")


def _reference_embedding(model_files, text: str):
    """Mean of the tiny model's final hidden states over the text's tokens, unit length: what the endpoint serves."""
    import torch

    from minichat.checkpoint import load_model

    model, tok, _ = load_model(model_files.tiny)
    with torch.no_grad():
        _, h = model(torch.tensor([tok.encode(text)]), logits="none", return_hidden=True)
    return torch.nn.functional.normalize(h[0].mean(0), dim=-1), tok


def test_embeddings(client, model_files):
    import numpy as np

    texts = ["Paris is the capital of France.", "def add(a, b):\n    return a + b\n" * 3, "the cat"]
    r = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
    assert r.object == "list" and r.model == "tiny" and [d.index for d in r.data] == [0, 1, 2]
    ref, tok = _reference_embedding(model_files, texts[2])
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (3, 64) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    # batched with longer texts (right-padded) the short text's vector is its own
    assert np.allclose(got[2], ref.numpy(), atol=1e-5)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(tok.encode(t)) for t in texts)
    f = client.embeddings.create(model="tiny", input=texts[2], encoding_format="float")
    assert np.allclose(f.data[0].embedding, got[2], atol=1e-6)
    ids = client.embeddings.create(model="tiny", input=[tok.encode(texts[2])], encoding_format="float")
    assert np.allclose(ids.data[0].embedding, got[2], atol=1e-6)
    short = client.embeddings.create(model="tiny", input=texts[2], dimensions=16, encoding_format="float")
    v = np.array(short.data[0].embedding)
    assert v.shape == (16,) and np.allclose(v, got[2][:16] / np.linalg.norm(got[2][:16]), atol=1e-5)


@pytest.mark.parametrize("kw,param", [
    ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": ["a", ""]}, "input"), ({"input": [[]]}, "input"),
    ({"input": [[10 ** 6]]}, "input"), ({"input": "x", "dimensions": 65}, "dimensions"),
    ({"input": "x", "dimensions": 0}, "dimensions"), ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": ["x"] * 2049}, "input"),
])
def test_embeddings_bad_input_is_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny", **kw)
    assert e.value.body["param"] == param, e.value.body


def test_embeddings_too_long_and_unknown_model(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny", input=" ".join(["Paris is the capital of France."] * 200))
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-9", input="x")


def test_embeddings_while_generating(client):
    """Embeddings run beside the generation worker: the same vectors while a long reply is being sampled."""
    import threading

    import numpy as np

    idle = client.embeddings.create(model="tiny", input=["the cat", "Paris"], encoding_format="float")
    out: dict = {}

    def long_reply():
        out["r"] = client.chat.completions.create(model="tiny", messages=USER, max_tokens=300, temperature=1.0,
                                                  seed=1)

    t = threading.Thread(target=long_reply)
    t.start()
    busy = [client.embeddings.create(model="tiny", input=["the cat", "Paris"], encoding_format="float")
            for _ in range(5)]
    t.join(60)
    assert out["r"].usage.completion_tokens > 0
    for b in busy:
        for x, y in zip(idle.data, b.data):
            assert np.allclose(x.embedding, y.embedding, atol=1e-6)


def test_tokenize_and_detokenize(live, model_files):
    """vLLM's /tokenize and /detokenize: the ids a prompt or a conversation costs, and back."""
    from minichat.tokenizer import load_tokenizer

    tok = load_tokenizer(model_files.tiny)
    r = httpx.post(live.url + "/tokenize", json={"model": "tiny", "prompt": "Paris is the capital"}, timeout=10).json()
    assert r["tokens"] == tok.encode("Paris is the capital") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 1024
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    r = httpx.post(live.url + "/tokenize", json={"model": "tiny", "messages": msgs}, timeout=10).json()
    assert r["tokens"] == tok.render_chat(msgs, add_generation_prompt=True)[0]
    back = httpx.post(live.url + "/detokenize", json={"model": "tiny", "tokens": tok.encode("héllo")}, timeout=10)
    assert back.json() == {"prompt": "héllo"}
    for path, body, param in [("/tokenize", {"model": "tiny"}, "prompt"),
                              ("/tokenize", {"model": "tiny", "prompt": "a", "messages": msgs}, "prompt"),
                              ("/detokenize", {"model": "tiny", "tokens": [10 ** 6]}, "tokens")]:
        e = httpx.post(live.url + path, json=body, timeout=10)
        assert e.status_code == 400 and e.json()["error"]["param"] == param
    assert httpx.post(live.url + "/tokenize", json={"model": "gpt-9", "prompt": "a"}, timeout=10).status_code == 404
