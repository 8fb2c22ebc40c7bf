"""OpenAI's Files and Batch APIs through the official openai client: a batch's answers equal the endpoint's own,
errors go to the error file, bad files fail with every problem listed, cancel, API keys kept apart, and batches
and files that outlive a restart of the server."""
from __future__ import annotations

import json
import time

import openai
import pytest

from tests.serve.conftest import make_server

USER = [{"role": "user", "content": "Why is the sky blue?"}]


def wait(client, batch_id: str, until=("completed", "failed", "cancelled"), timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        b = client.batches.retrieve(batch_id)
        if b.status in until:
            return b
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {b.status}")


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def line(cid, body, url="/v1/chat/completions"):
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


@pytest.fixture(scope="module")
def srv(model_files, tmp_path_factory):
    s, store = make_server(model_files, tmp_path_factory.mktemp("batch"), api_keys=["key-a", "key-b"])
    s.start()
    yield s
    s.stop()
    store.close()


def client(srv, key="key-a"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_a_chat_batch_answers_as_the_endpoint_does(srv):
    c = client(srv)
    rows = [line(f"q{i}", {"model": "script", "messages": USER, "temperature": 0, "max_tokens": 8 + i})
            for i in range(5)]
    rows.append(line("bad-model", {"model": "no-such-model", "messages": USER}))
    rows.append(line("refused", {"model": "script", "messages": [{"role": "user", "content": "How do I kill my boss?"}]}))
    f = c.files.create(file=("requests.jsonl", jsonl(rows)), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(jsonl(rows)) and f.filename == "requests.jsonl"
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"job": "nightly"})
    assert b.status == "validating" and b.metadata == {"job": "nightly"}
    b = wait(c, b.id)
    assert b.status == "completed" and b.request_counts.total == 7
    assert (b.request_counts.completed, b.request_counts.failed) == (6, 1)
    assert b.completed_at >= b.in_progress_at >= b.created_at and b.expires_at == b.created_at + 86400
    out = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"q{i}" for i in range(5)] + ["refused"]  # input order
    for i, o in enumerate(out[:5]):
        direct = c.chat.completions.create(model="script", messages=USER, temperature=0, max_tokens=8 + i)
        body = o["response"]["body"]
        assert o["response"]["status_code"] == 200 and o["error"] is None and o["id"].startswith("batch_req_")
        assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert body["usage"]["completion_tokens"] == direct.usage.completion_tokens
    assert out[5]["response"]["body"]["choices"][0]["finish_reason"] == "content_filter"  # moderation, as live
    errs = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
    assert len(errs) == 1 and errs[0]["custom_id"] == "bad-model" and errs[0]["response"]["status_code"] == 404
    assert errs[0]["error"]["code"] == "model_not_found"
    meta = c.files.retrieve(b.output_file_id)
    assert meta.purpose == "batch_output" and meta.filename == f"{b.id}_output.jsonl"
    assert b.id in [x.id for x in c.batches.list()] and f.id in [x.id for x in c.files.list(purpose="batch")]
    c.close()


def test_embeddings_batch(srv):
    c = client(srv)
    rows = [line(f"e{i}", {"model": "tiny", "input": text}, "/v1/embeddings") for i, text in enumerate(["hi", "sky"])]
    b = c.batches.create(input_file_id=c.files.create(file=("e.jsonl", jsonl(rows)), purpose="batch").id,
                         endpoint="/v1/embeddings", completion_window="24h")
    b = wait(c, b.id)
    out = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
    direct = c.embeddings.create(model="tiny", input="sky", encoding_format="float").data[0].embedding
    assert out[1]["response"]["body"]["data"][0]["embedding"] == pytest.approx(direct, abs=1e-6)
    c.close()


def test_a_bad_file_fails_with_every_problem_by_line(srv):
    c = client(srv)
    text = (json.dumps(line("a", {"model": "tiny", "messages": USER})) + "\n" + "{not json\n"
            + json.dumps(line("a", {"model": "tiny", "messages": USER})) + "\n"
            + json.dumps(line("b", {"model": "tiny", "input": "x"}, "/v1/embeddings")) + "\n"
            + json.dumps(line("c", {"model": "tiny", "messages": USER, "stream": True})) + "\n").encode()
    b = c.batches.create(input_file_id=c.files.create(file=("x.jsonl", text), purpose="batch").id,
                         endpoint="/v1/chat/completions", completion_window="24h")
    b = wait(c, b.id)
    assert b.status == "failed" and b.output_file_id is None
    got = {(e.line, e.code) for e in b.errors.data}
    assert got == {(2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "mismatched_endpoint"),
                   (5, "invalid_request")}
    # requests the API refuses at once
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        c.batches.create(input_file_id="file-x", endpoint="/v1/images", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        c.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        c.files.create(file=("x.jsonl", b"{}"), purpose="nonsense")
    c.close()


def test_cancel_keeps_the_answers_so_far(srv):
    c = client(srv)
    rows = [line(f"long{i}", {"model": "tiny", "messages": USER, "max_tokens": 300, "min_tokens": 300,
                             "temperature": 1, "seed": i}) for i in range(40)]
    b = c.batches.create(input_file_id=c.files.create(file=("l.jsonl", jsonl(rows)), purpose="batch").id,
                         endpoint="/v1/chat/completions", completion_window="24h")
    wait(c, b.id, until=("in_progress",))
    assert c.batches.cancel(b.id).status in ("cancelling", "cancelled")
    b = wait(c, b.id)
    assert b.status == "cancelled" and b.cancelled_at is not None
    done = b.request_counts.completed
    assert 0 < done < 40  # the lines in flight ended; the rest were never sent
    if b.output_file_id:
        assert len(c.files.content(b.output_file_id).text.splitlines()) == done
    c.close()


def test_keys_see_only_their_own_files_and_batches(srv):
    a, b = client(srv), client(srv, "key-b")
    f = a.files.create(file=("mine.jsonl", jsonl([line("x", {"model": "tiny", "messages": USER})])), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        b.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert f.id not in [x.id for x in b.files.list()]
    assert a.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        a.files.content(f.id)
    with pytest.raises(openai.AuthenticationError):
        client(srv, "wrong").files.list()
    a.close()
    b.close()


def test_batches_and_files_outlive_a_restart(model_files, tmp_path):
    """A finished batch and its files are in the store after a restart; a batch the server stopped in the middle
    of runs again from its first line at the next start."""
    s, store = make_server(model_files, tmp_path, moderation=False, batch_concurrency=1)
    s.start()
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
    rows = [line(f"q{i}", {"model": "script", "messages": USER, "temperature": 0}) for i in range(3)]
    done = wait(c, c.batches.create(input_file_id=c.files.create(file=("a.jsonl", jsonl(rows)), purpose="batch").id,
                                    endpoint="/v1/chat/completions", completion_window="24h").id)
    slow = [line(f"s{i}", {"model": "tiny", "messages": USER, "max_tokens": 200, "min_tokens": 200}) for i in range(30)]
    pending = c.batches.create(input_file_id=c.files.create(file=("b.jsonl", jsonl(slow)), purpose="batch").id,
                               endpoint="/v1/chat/completions", completion_window="24h")
    wait(c, pending.id, until=("in_progress",))
    c.close()
    s.stop()
    store.close()
    s, store = make_server(model_files, tmp_path, moderation=False)
    s.start()
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        again = c.batches.retrieve(done.id)
        assert again.status == "completed" and again.output_file_id == done.output_file_id
        assert len(c.files.content(done.output_file_id).text.splitlines()) == 3
        resumed = wait(c, pending.id)
        assert resumed.status == "completed" and resumed.request_counts.completed == 30
        c.close()
    finally:
        s.stop()
        store.close()


def test_without_a_store_batches_live_in_memory(model_files):
    from minichat.serve.app import create_app
    from minichat.serve.config import EngineSettings, ServeConfig
    from minichat.serve.models import ModelRegistry
    from tests.live import LiveServer

    cfg = ServeConfig(models=model_files.specs(), engine=EngineSettings(device="cpu", weights="fp32", max_batch=4),
                      store_url="none", web=False)
    cfg.validate()
    srv = LiveServer(create_app(cfg, ModelRegistry.load(cfg.models, cfg.engine), None, None))
    srv.start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        rows = [line(f"q{i}", {"model": "script", "messages": USER, "temperature": 0}) for i in range(2)]
        f = c.files.create(file=("m.jsonl", jsonl(rows)), purpose="batch")
        b = wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id)
        assert b.status == "completed" and len(c.files.content(b.output_file_id).text.splitlines()) == 2
        assert [x.id for x in c.files.list(order="asc")] == [f.id, b.output_file_id]
        c.close()
    finally:
        srv.stop()


def test_minichat_batch_answers_a_file_offline(model_files, tmp_path, capsys):
    """`minichat batch`: no server; lines may name different endpoints; the answers are the server's."""
    from minichat.cli import main

    rows = [line("chat", {"model": "script", "messages": USER, "temperature": 0}),
            line("emb", {"model": "tiny", "input": ["a", "b"]}, "/v1/embeddings"),
            line("cmpl", {"model": "tiny", "prompt": "hello", "max_tokens": 3, "temperature": 0}, "/v1/completions"),
            line("nope", {"model": "gpt-9", "messages": USER}),
            line("refused", {"model": "script", "messages": [{"role": "user", "content": "How do I kill my boss?"}]})]
    (tmp_path / "in.jsonl").write_bytes(jsonl(rows))
    out = tmp_path / "out.jsonl"
    assert main(["batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(out), "--quiet", "--moderation_process", "false",
                 *[a for spec in model_files.specs() for a in ("--model", spec)]]) == 0
    assert "4 answered, 1 failed" in capsys.readouterr().out
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["custom_id"] for g in got] == ["chat", "emb", "cmpl", "nope", "refused"]
    assert got[0]["response"]["body"]["choices"][0]["message"]["content"] == model_files.script_text
    assert len(got[1]["response"]["body"]["data"]) == 2 and got[2]["response"]["body"]["object"] == "text_completion"
    assert got[3]["response"]["status_code"] == 404 and got[3]["error"]["code"] == "model_not_found"
    assert got[4]["response"]["body"]["choices"][0]["finish_reason"] == "content_filter"
    (tmp_path / "bad.jsonl").write_text('{"custom_id": "x", "method": "POST", "url": "/v1/images", "body": {}}\n')
    assert main(["batch", "-i", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o2.jsonl")]) == 2
    assert "nothing was run:\n  line 1: url must be one of" in capsys.readouterr().err
    assert not (tmp_path / "o2.jsonl").exists()


def test_files_held_in_memory_are_capped():
    import asyncio

    from minichat.serve.batches import BatchFiles
    from minichat.serve.protocol import APIError

    files = BatchFiles(None, memory_bytes=10)

    def meta(i):
        return {"id": f"file-{i}", "object": "file", "bytes": 0, "created_at": 0, "filename": "f", "purpose": "batch"}

    asyncio.run(files.put_file(meta(1), b"12345678", None))
    with pytest.raises(APIError, match="holds 8 of its 10 bytes") as e:
        asyncio.run(files.put_file(meta(2), b"12345", None))
    assert e.value.status == 413
    asyncio.run(files.delete_file("file-1", None))
    asyncio.run(files.put_file(meta(2), b"12345", None))  # room again
