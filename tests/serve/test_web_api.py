"""The web chat's JSON API: conversations kept in the store, streamed generation, edit, regenerate, stop,
feedback and comparisons."""
from __future__ import annotations

import json
import time

import httpx
import pytest


def events(live, cid, body, stop_after: int | None = None) -> list[dict]:
    out = []
    with httpx.stream("POST", f"{live.url}/api/conversations/{cid}/generate", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
                if stop_after is not None and len(out) >= stop_after:
                    break  # leaving the block closes the connection, as the page's Stop button does
    return out


@pytest.fixture
def api(live):
    with httpx.Client(base_url=live.url, timeout=30) as c:
        yield c


def test_page_and_config(api):
    r = api.get("/")
    assert r.status_code == 200 and "<title>minichat</title>" in r.text
    assert api.get("/static/app.js").status_code == 200 and api.get("/static/markdown.js").status_code == 200
    cfg = api.get("/api/config").json()
    assert cfg["models"] == ["tiny", "script", "bad"] and cfg["default_model"] == "tiny" and cfg["moderation"]


def test_chat_regenerate_edit_feedback(api, live, model_files):
    c = api.post("/api/conversations", json={"model": "script", "system_prompt": "Be brief.",
                                             "settings": {"temperature": 0}}).json()
    ev = events(live, c["id"], {"parent_id": None, "content": "Why is the sky blue?"})
    assert [e["type"] for e in ev][0] == "start" and ev[-1]["type"] == "done"
    text = "".join(e["content"] for e in ev if e["type"] == "delta")
    assert text == model_files.script_text == ev[-1]["message"]["content"]
    user_id, a1 = ev[0]["user_message"]["id"], ev[-1]["message"]["id"]
    assert ev[-1]["message"]["finish_reason"] == "stop" and ev[-1]["conversation"]["title"] == "Why is the sky blue?"

    ev2 = events(live, c["id"], {"reply_to": user_id})  # regenerate: a sibling answer
    a2 = ev2[-1]["message"]["id"]
    assert ev2[0]["user_message"] is None and ev2[-1]["message"]["parent_id"] == user_id

    ev3 = events(live, c["id"], {"parent_id": None, "content": "Edited question"})  # edit the first message
    conv = api.get(f"/api/conversations/{c['id']}").json()
    assert len(conv["messages"]) == 5
    assert conv["path"] == [ev3[0]["user_message"]["id"], ev3[-1]["message"]["id"]]
    assert conv["settings"] == {"temperature": 0} and conv["system_prompt"] == "Be brief."

    assert api.post(f"/api/messages/{a1}/feedback", json={"rating": -1, "comment": "too long"}).json()["rating"] == -1
    assert api.post(f"/api/messages/{a1}/feedback", json={"rating": 7}).status_code == 400
    assert api.post("/api/comparisons", json={"chosen_id": a2, "rejected_id": a1}).status_code == 200
    msgs = {m["id"]: m for m in api.get(f"/api/conversations/{c['id']}").json()["messages"]}
    assert msgs[a1]["feedback"] == {"rating": -1, "comment": "too long"}
    pairs = list(live.store.preference_pairs())
    assert any(p["meta"]["chosen_id"] == a2 and p["meta"]["rejected_id"] == a1 for p in pairs)

    api.patch(f"/api/conversations/{c['id']}", json={"current_leaf_id": a2})
    assert api.get(f"/api/conversations/{c['id']}").json()["path"] == [user_id, a2]
    assert c["id"] in [x["id"] for x in api.get("/api/conversations").json()["data"]]


def test_stop_keeps_the_partial_reply(api, live):
    c = api.post("/api/conversations", json={"model": "tiny", "settings": {"max_tokens": 220, "min_tokens": 220}}).json()
    ev = events(live, c["id"], {"parent_id": None, "content": "Tell me a long story."}, stop_after=4)
    aid = ev[0]["assistant_message"]["id"]
    deadline = time.time() + 20
    while time.time() < deadline:
        m = {x["id"]: x for x in api.get(f"/api/conversations/{c['id']}").json()["messages"]}[aid]
        if m["finish_reason"] == "stopped":
            break
        time.sleep(0.05)
    assert m["finish_reason"] == "stopped"
    streamed = "".join(e["content"] for e in ev if e["type"] == "delta")
    assert m["content"].startswith(streamed) and (m["completion_tokens"] or 0) < 220


def test_moderation_replaces_reply_and_is_stored(api, live):
    c = api.post("/api/conversations", json={"model": "bad", "settings": {"temperature": 0}}).json()
    ev = events(live, c["id"], {"parent_id": None, "content": "What is your plan?"})
    mod = [e for e in ev if e["type"] == "moderation"]
    assert len(mod) == 1 and mod[0]["source"] == "output" and "violence" in mod[0]["categories"]
    done = ev[-1]["message"]
    assert done["moderated"] and done["finish_reason"] == "content_filter" and done["content"] == mod[0]["refusal"]
    got = {m["id"]: m for m in api.get(f"/api/conversations/{c['id']}").json()["messages"]}[done["id"]]
    assert got["moderation"]["source"] == "output" and got["moderation"]["action"] == "replaced"
    # a flagged question is refused without asking the model
    ev = events(live, c["id"], {"parent_id": done["id"], "content": "I will kill you"})
    assert ev[-1]["message"]["moderated"] and ev[-1]["message"]["completion_tokens"] == 0
    decisions = live.store.moderation_decisions(conversation_id=c["id"])
    assert [d["source"] for d in decisions] == ["output", "input"]


def test_web_api_errors(api):
    assert api.get("/api/conversations/nope").status_code == 404
    c = api.post("/api/conversations", json={"model": "tiny"}).json()
    r = api.post(f"/api/conversations/{c['id']}/generate", json={"content": ""})
    assert r.status_code == 400
    r = api.post(f"/api/conversations/{c['id']}/generate", json={"reply_to": "nope"})
    assert r.status_code == 404
    assert api.post("/api/conversations", json={"model": "gpt-9"}).status_code == 404
    assert api.post("/api/conversations", json={"settings": {"temperature": 9}}).status_code == 400
    assert api.delete(f"/api/conversations/{c['id']}").json()["deleted"] is True


def test_config_defaults_follow_the_default_models_sampling(api, live):
    """The page's sampling defaults are the default model's recommended ones (the built-in model's card's)."""
    tiny = live.server.config.app.state.services.models.get("tiny")
    assert api.get("/api/config").json()["defaults"] == {"temperature": 0.7, "top_p": 0.95, "max_tokens": 512}
    tiny.sampling = {"temperature": 0.2, "top_p": 0.9}
    try:
        d = api.get("/api/config").json()["defaults"]
        assert d == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 512}
    finally:
        tiny.sampling = {}


def test_web_chat_and_api_on_a_postgresql_store(model_files, tmp_path, postgres):
    """`minichat serve --store_url postgresql+psycopg://...`: the web chat's tree, feedback and comparisons and
    the API's stored exchanges on a real PostgreSQL server."""
    from openai import OpenAI

    from tests.serve.conftest import make_server

    srv, store = make_server(model_files, tmp_path, store_url=postgres.new_database(), store_api_conversations=True)
    srv.start()
    try:
        assert store.engine.dialect.name == "postgresql"
        with httpx.Client(base_url=srv.url, timeout=30) as api:
            c = api.post("/api/conversations", json={"model": "script", "settings": {"temperature": 0}}).json()
            ev = events(srv, c["id"], {"parent_id": None, "content": "Why is the sky blue?"})
            assert ev[-1]["message"]["content"] == model_files.script_text
            user_id, a1 = ev[0]["user_message"]["id"], ev[-1]["message"]["id"]
            a2 = events(srv, c["id"], {"reply_to": user_id})[-1]["message"]["id"]
            assert api.post(f"/api/messages/{a1}/feedback", json={"rating": 1}).json()["rating"] == 1
            assert api.post("/api/comparisons", json={"chosen_id": a1, "rejected_id": a2}).status_code == 200
            r = api.post("/api/conversations", json={"title": "t" * 201})
            assert r.status_code == 400 and r.json()["error"]["param"] == "title"
        with OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            r = client.chat.completions.create(model="script", temperature=0,
                                               messages=[{"role": "user", "content": "Hello?"}])
            assert r.choices[0].message.content == model_files.script_text
        conv = store.get_conversation(c["id"])
        assert len(conv["messages"]) == 3 and conv["path"] == [user_id, a2]
        assert [x["source"] for x in store.list_conversations()] == ["api", "web"]
        pairs = list(store.preference_pairs())
        assert any(p["meta"]["chosen_id"] == a1 and p["meta"]["rejected_id"] == a2 for p in pairs)
    finally:
        srv.stop()
        store.close()
