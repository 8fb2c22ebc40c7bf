"""OpenAI's Responses API (POST /v1/responses), driven by the official `openai` client against a live server."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}
ASK = "Why is the sky blue?"


def test_text_reply_equals_chat_completions(client, model_files):
    r = client.responses.create(model="script", input=ASK, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    assert r.output_text == model_files.script_text
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    chat = client.chat.completions.create(model="script", messages=[{"role": "user", "content": ASK}], temperature=0)
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # instructions are the system message; input items with roles and text parts are the conversation
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": "Hello.", "annotations": []}]},
             {"type": "message", "role": "user", "content": ASK}]
    r2 = client.responses.create(model="tiny", instructions="Be brief.", input=items, temperature=0,
                                 max_output_tokens=8)
    c2 = client.chat.completions.create(model="tiny", temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": ASK}])
    assert r2.output_text == c2.choices[0].message.content
    assert r2.usage.input_tokens == c2.usage.prompt_tokens


def test_max_output_tokens_is_incomplete(client):
    # min_tokens (minichat's extension) keeps the random model from ending sooner
    r = client.responses.create(model="tiny", input=ASK, max_output_tokens=3, temperature=1.0,
                                extra_body={"min_tokens": 3})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.max_output_tokens == 3


def test_previous_response_id_and_stored_responses(client):
    first = client.responses.create(model="tiny", input=ASK, max_output_tokens=5, temperature=1.0)
    second = client.responses.create(model="tiny", input="And at night?", previous_response_id=first.id,
                                     max_output_tokens=5, temperature=1.0)
    alone = client.responses.create(model="tiny", input="And at night?", max_output_tokens=5, temperature=1.0)
    # the earlier exchange comes first in the prompt
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="x", previous_response_id=first.id)
    assert e.value.body["param"] == "previous_response_id"
    unstored = client.responses.create(model="tiny", input=ASK, max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_responses_are_kept_per_api_key(model_files, tmp_path):
    from tests.serve.conftest import make_server

    srv, store = make_server(model_files, tmp_path, moderation=False, api_keys=["k1", "k2"])
    srv.start()
    try:
        a = openai.OpenAI(base_url=srv.url + "/v1", api_key="k1", max_retries=0)
        b = openai.OpenAI(base_url=srv.url + "/v1", api_key="k2", max_retries=0)
        r = a.responses.create(model="tiny", input=ASK, max_output_tokens=2)
        assert a.responses.retrieve(r.id).id == r.id
        with pytest.raises(openai.NotFoundError):
            b.responses.retrieve(r.id)
        with pytest.raises(openai.BadRequestError):
            b.responses.create(model="tiny", input="x", previous_response_id=r.id)
    finally:
        srv.stop()
        store.close()


def test_responses_outlive_a_restart_in_the_store(model_files, tmp_path, db_url):
    """With a store (an SQLite file, and a real PostgreSQL database) responses are rows, not memory."""
    from tests.serve.conftest import make_server

    ids = []
    for round_ in range(2):
        srv, store = make_server(model_files, tmp_path, moderation=False, store_url=db_url)
        srv.start()
        try:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
            if round_ == 0:
                ids.append(c.responses.create(model="script", input=ASK, temperature=0).id)
            else:
                assert c.responses.retrieve(ids[0]).output_text.startswith("Sure!")
                nxt = c.responses.create(model="tiny", input="More?", previous_response_id=ids[0], max_output_tokens=2)
                assert nxt.usage.input_tokens > 20
                c.responses.delete(ids[0])
                with pytest.raises(openai.NotFoundError):
                    c.responses.retrieve(ids[0])
        finally:
            srv.stop()
            store.close()


def test_truncation_auto_drops_the_oldest_turns(client):
    long = " ".join(["Paris is the capital of France."] * 60)  # ~ 400 tokens a turn; the context is 1,024
    items = []
    for k in range(4):
        items += [{"role": "user", "content": f"{k}: {long}"}, {"role": "assistant", "content": "Noted."}]
    items.append({"role": "user", "content": ASK})
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input=items, max_output_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "input"
    r = client.responses.create(model="tiny", input=items, max_output_tokens=4, truncation="auto")
    assert r.truncation == "auto" and r.usage.input_tokens + 4 <= 1024 and r.usage.input_tokens > 400


def test_stream_events(client, model_files, live):
    with client.responses.stream(model="script", input=ASK, temperature=0) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == model_files.script_text
    assert final.output_text == model_files.script_text and final.status == "completed"
    assert client.responses.retrieve(final.id).output_text == model_files.script_text
    # cut by max_output_tokens: the last event is response.incomplete
    raw = httpx.post(live.url + "/v1/responses", json={"model": "tiny", "input": ASK, "stream": True,
                                                      "max_output_tokens": 3, "min_tokens": 3}, timeout=30)
    lines = [json.loads(x[6:]) for x in raw.text.splitlines() if x.startswith("data: ")]
    assert lines[-1]["type"] == "response.incomplete"
    assert lines[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_json_schema_format(client):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    done = 0
    for seed in range(4):
        r = client.responses.create(model="tiny", input=ASK, temperature=1.0, max_output_tokens=200,
                                    text={"format": {"type": "json_schema", "name": "w", "schema": schema}},
                                    extra_body={"seed": seed})
        if r.status == "completed":
            jsonschema.validate(json.loads(r.output_text), schema)
            done += 1
    assert done >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_function_calls_and_their_outputs(client, stream):
    args = dict(model="tiny", input="Weather in Rome?", tools=[WEATHER], tool_choice="required", temperature=1.0,
                max_output_tokens=200, parallel_tool_calls=False)
    if stream:
        with client.responses.stream(**args) as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert "response.function_call_arguments.done" in kinds and "response.output_text.delta" not in kinds
    else:
        r = client.responses.create(**args)
    call = r.output[0]
    assert r.status == "completed" and len(r.output) == 1
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    # the call and its output go back in as input items
    follow = client.responses.create(model="tiny", max_output_tokens=5, tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Rome?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 25 C"}])
    assert follow.output[0].type in ("message", "function_call")
    # the same through previous_response_id
    again = client.responses.create(model="tiny", max_output_tokens=5, tools=[WEATHER], previous_response_id=r.id,
                                    input=[{"type": "function_call_output", "call_id": call.call_id,
                                            "output": "Sunny"}])
    assert again.usage.input_tokens > follow.usage.input_tokens - 10


def test_flagged_input_and_output_are_refusals(client, model_files, live):
    r = client.responses.create(model="script", input="I will kill you", temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "content_filter"
    part = r.output[0].content[0]
    assert part.type == "refusal" and part.refusal and "kill" not in part.refusal and r.usage.output_tokens == 0
    # the refused answer goes back as history, as clients send earlier output items
    again = client.responses.create(model="script", temperature=0, input=[
        {"role": "user", "content": "Hello"}, r.output[0].model_dump(), {"role": "user", "content": ASK}])
    assert again.status == "completed"
    r = client.responses.create(model="bad", input=ASK, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "content_filter"
    assert [p.type for p in r.output[0].content] == ["refusal"] and "kill" not in r.output[0].content[0].refusal
    before = len(live.store.moderation_decisions())
    with client.responses.stream(model="bad", input=ASK, temperature=0) as s:
        events = list(s)
    dec = live.store.moderation_decisions()[before:]
    assert [(d["source"], d["action"]) for d in dec] == [("output", "replaced")]  # audited as chat completions are
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.incomplete" and "response.refusal.done" in kinds
    sent = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert model_files.bad_text.startswith(sent) and "tonight" not in sent  # the guard cut it as it flagged
    final = events[-1].response
    assert [p.type for p in final.output[0].content] == ["output_text", "refusal"]


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny"}, "input"),
    ({"model": "tiny", "input": ""}, "input"),
    ({"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"model": "tiny", "input": [{"type": "item_reference", "id": "x"}]}, "input"),
    ({"model": "tiny", "input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"model": "tiny", "input": "x", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"model": "tiny", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "tiny", "input": "x", "text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
     "text.format"),
])
def test_bad_requests_are_400_with_param(live, body, param):
    r = httpx.post(live.url + "/v1/responses", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_unknown_model_and_response(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-9", input="x")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nothing")


def test_streamed_text_reply_with_tools_offered(client):
    """tool_choice auto: a reply held back while it could still become a call goes out as text once it cannot;
    streamed and plain give the same output."""
    args = dict(model="tiny", input=ASK, tools=[WEATHER], temperature=0, max_output_tokens=30)
    plain = client.responses.create(**args)
    with client.responses.stream(**args) as s:
        events = list(s)
    final = events[-1].response
    assert [o.type for o in final.output] == [o.type for o in plain.output] == ["message"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == plain.output_text and text
    assert "response.function_call_arguments.done" not in [e.type for e in events]


def test_input_items_of_a_stored_response(client):
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Rome"}'}
    items = [{"role": "user", "content": "Weather in Rome?"}, call,
             {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
             {"role": "user", "content": "Thanks. And tomorrow?"}]
    r = client.responses.create(model="tiny", instructions="Be brief.", input=items, tools=[WEATHER],
                                tool_choice="none", max_output_tokens=3)  # a text answer
    got = list(client.responses.input_items.list(r.id, order="asc"))
    assert [i.type for i in got] == ["message", "function_call", "function_call_output", "message"]
    assert got[0].content[0].text == "Weather in Rome?" and got[0].role == "user"  # no instructions among them
    assert (got[1].call_id, got[1].name, got[1].arguments) == ("call_1", "get_weather", '{"city": "Rome"}')
    assert got[2].output == "Sunny" and got[3].content[0].text == "Thanks. And tomorrow?"
    newest = client.responses.input_items.list(r.id, limit=2)  # newest first by default
    assert [i.id for i in newest.data] == [got[3].id, got[2].id] and newest.has_more
    rest = client.responses.input_items.list(r.id, limit=2, after=newest.data[-1].id)
    assert [i.id for i in rest.data] == [got[1].id, got[0].id] and not rest.has_more
    # with previous_response_id the earlier exchange is part of the input
    nxt = client.responses.create(model="tiny", input="More?", previous_response_id=r.id, max_output_tokens=2)
    chain = list(client.responses.input_items.list(nxt.id, order="asc"))
    assert len(chain) == 6 and chain[4].role == "assistant" and chain[5].content[0].text == "More?"
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_nothing")
