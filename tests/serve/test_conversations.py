"""OpenAI's Conversations API and `conversation` in responses, through the openai client: a conversation carries
the history as previous_response_id does, items can be added, read and deleted, keys are kept apart, and
conversations outlive a restart."""
from __future__ import annotations

import openai
import pytest

from tests.serve.conftest import make_server


@pytest.fixture(scope="module")
def srv(model_files, tmp_path_factory):
    s, store = make_server(model_files, tmp_path_factory.mktemp("conv"), api_keys=["key-a", "key-b"])
    s.start()
    yield s
    s.stop()
    store.close()


def client(srv, key="key-a"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_a_conversation_carries_the_history(srv, model_files):
    c = client(srv)
    conv = c.conversations.create(items=[{"type": "message", "role": "user", "content": "My name is Ada."}],
                                  metadata={"topic": "names"})
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "names"}
    r1 = c.responses.create(model="script", conversation=conv.id, input="What is my name?", temperature=0)
    assert r1.conversation.id == conv.id and r1.output_text == model_files.script_text
    items = c.conversations.items.list(conv.id, order="asc").data
    assert [(i.type, i.role) for i in items] == [("message", "user"), ("message", "user"), ("message", "assistant")]
    assert items[1].content[0].text == "What is my name?" and items[2].id == r1.output[0].id
    # the next turn sees all of it, exactly as a previous_response_id chain does
    r2 = c.responses.create(model="script", conversation={"id": conv.id}, input="And again?", temperature=0)
    chained = c.responses.create(model="script", previous_response_id=r1.id, input="And again?", temperature=0)
    assert r2.usage.input_tokens == chained.usage.input_tokens > r1.usage.input_tokens
    streamed = c.responses.create(model="script", conversation=conv.id, input="Once more?", stream=True)
    assert [e.type for e in streamed][-1] == "response.completed"
    assert len(c.conversations.items.list(conv.id, limit=100).data) == 7
    # items: add, read, delete; the conversation itself: update, delete
    added = c.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "Note."}])
    got = c.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert got.content[0].text == "Note."
    c.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
    with pytest.raises(openai.NotFoundError):
        c.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert c.conversations.update(conv.id, metadata={"topic": "done"}).metadata == {"topic": "done"}
    assert c.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.conversations.retrieve(conv.id)
    c.close()


def test_bad_requests_and_other_keys(srv):
    a, b = client(srv), client(srv, "key-b")
    conv = a.conversations.create()
    with pytest.raises(openai.BadRequestError, match="not both"):
        first = a.responses.create(model="script", input="hi")
        a.responses.create(model="script", input="hi", conversation=conv.id, previous_response_id=first.id)
    with pytest.raises(openai.BadRequestError) as e:
        a.responses.create(model="script", input="hi", conversation="conv_nope")
    assert e.value.param == "conversation"
    with pytest.raises(openai.NotFoundError):
        b.conversations.retrieve(conv.id)
    with pytest.raises(openai.BadRequestError):  # another key's conversation is not there for it
        b.responses.create(model="script", input="hi", conversation=conv.id)
    with pytest.raises(openai.BadRequestError) as e:
        a.conversations.items.create(conv.id, items=[{"type": "image", "url": "x"}])
    assert e.value.param == "items"
    with pytest.raises(openai.BadRequestError, match="at most 20"):
        a.conversations.create(items=[{"type": "message", "role": "user", "content": "x"}] * 21)
    a.close()
    b.close()


def test_conversations_outlive_a_restart(model_files, tmp_path):
    s, store = make_server(model_files, tmp_path, moderation=False)
    s.start()
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
    conv = c.conversations.create(items=[{"type": "message", "role": "user", "content": "Remember me."}])
    c.responses.create(model="script", conversation=conv.id, input="hi", temperature=0)
    c.close()
    s.stop()
    store.close()
    s, store = make_server(model_files, tmp_path, moderation=False)
    s.start()
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert len(c.conversations.items.list(conv.id).data) == 3
        c.close()
    finally:
        s.stop()
        store.close()


def test_without_a_store_conversations_and_jobs_live_in_memory(model_files, tmp_path):
    """`--store_url none`: conversations, fine-tuning jobs and their events are kept in memory."""
    import json
    import time

    from minichat.serve.app import create_app
    from minichat.serve.config import EngineSettings, ServeConfig
    from minichat.serve.models import ModelRegistry
    from tests.live import LiveServer

    cfg = ServeConfig(models=model_files.specs(), engine=EngineSettings(device="cpu", weights="fp32", max_batch=4),
                      store_url="none", web=False, fine_tune_dir=str(tmp_path / "ft"))
    cfg.validate()
    srv = LiveServer(create_app(cfg, ModelRegistry.load(cfg.models, cfg.engine), None, None))
    srv.start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        conv = c.conversations.create(items=[{"type": "message", "role": "user", "content": "Hello."}])
        c.responses.create(model="script", conversation=conv.id, input="Hi?", temperature=0)
        assert len(c.conversations.items.list(conv.id).data) == 3
        rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 4
        f = c.files.create(file=("t.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(training_file=f.id, model="tiny", hyperparameters={"n_epochs": 1})
        deadline = time.time() + 120
        while job.status not in ("succeeded", "failed", "cancelled") and time.time() < deadline:
            time.sleep(0.1)
            job = c.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error
        assert [j.id for j in c.fine_tuning.jobs.list().data] == [job.id]
        assert any("ready and served" in e.message for e in c.fine_tuning.jobs.list_events(job.id).data)
        c.close()
    finally:
        srv.stop()
