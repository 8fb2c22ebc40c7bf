"""OpenAI's fine-tuning API through the openai client: a job fine-tunes a served tiny model in a real
`minichat sft` process, reports its loss as events, and the result is served at once (and again after a
restart); bad files, wrong purposes and unknown models are refused up front; cancel ends the process."""
from __future__ import annotations

import json
import time

import openai
import pytest

from tests.serve.conftest import make_server

ANSWER = "Paris is the capital of France."
QUESTIONS = ["What is the capital of France?", "Which city is France's capital?", "Name the capital of France.",
             "France's capital?", "Tell me the capital city of France.", "Capital of France, please.",
             "What city is the capital of France?", "Where is the French capital?"]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def chats() -> bytes:
    return jsonl({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}
                 for q in QUESTIONS)


def wait(c, job_id, until=("succeeded", "failed", "cancelled"), timeout=240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = c.fine_tuning.jobs.retrieve(job_id)
        if j.status in until:
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {j.status}")


def test_fine_tune_then_chat_with_the_result_then_restart(model_files, tmp_path):
    s, store = make_server(model_files, tmp_path, moderation=False, fine_tune_dir=str(tmp_path / "ft"))
    s.start()
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        f = c.files.create(file=("chats.jsonl", chats()), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(training_file=f.id, model="tiny", suffix="paris",
                                        hyperparameters={"n_epochs": 40, "learning_rate_multiplier": 100})
        assert job.status == "queued" and job.hyperparameters.batch_size == 8 and job.hyperparameters.n_epochs == 40
        job = wait(c, job.id)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model.startswith("ft:tiny:paris:") and job.trained_tokens > 0
        events = c.fine_tuning.jobs.list_events(job.id, limit=1000).data[::-1]  # oldest first
        losses = [e.data["train_loss"] for e in events if e.type == "metrics" and "train_loss" in e.data]
        assert len(losses) >= 3 and losses[-1] < losses[0] / 3
        assert "ready and served" in events[-1].message
        assert job.fine_tuned_model in [m.id for m in c.models.list().data]
        r = c.chat.completions.create(model=job.fine_tuned_model, temperature=0,
                                      messages=[{"role": "user", "content": QUESTIONS[0]}])
        assert r.choices[0].message.content == ANSWER
        before = c.chat.completions.create(model="tiny", temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": QUESTIONS[0]}])
        assert before.choices[0].message.content != ANSWER  # the base model is still served as it was
        assert [j.id for j in c.fine_tuning.jobs.list().data] == [job.id]
        c.close()
    finally:
        s.stop()
        store.close()
    s, store = make_server(model_files, tmp_path, moderation=False, fine_tune_dir=str(tmp_path / "ft"))
    s.start()
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        deadline = time.time() + 30
        while job.fine_tuned_model not in [m.id for m in c.models.list().data] and time.time() < deadline:
            time.sleep(0.1)
        r = c.chat.completions.create(model=job.fine_tuned_model, temperature=0,
                                      messages=[{"role": "user", "content": QUESTIONS[1]}])
        assert r.choices[0].message.content == ANSWER
        with pytest.raises(openai.NotFoundError):
            c.models.delete("tiny")  # a base model is not deleted
        assert c.models.delete(job.fine_tuned_model).deleted
        assert job.fine_tuned_model not in [m.id for m in c.models.list().data]
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
        assert not (tmp_path / "ft" / job.id).exists()
        c.close()
    finally:
        s.stop()
        store.close()


def test_bad_requests_are_refused_up_front(model_files, tmp_path):
    s, store = make_server(model_files, tmp_path, moderation=False, fine_tune_dir=str(tmp_path / "ft"))
    s.start()
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        no_answer = c.files.create(file=("x.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"}]}])),
                                   purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="assistant message") as e:
            c.fine_tuning.jobs.create(training_file=no_answer.id, model="tiny")
        assert e.value.code == "invalid_training_file"
        batch_file = c.files.create(file=("b.jsonl", chats()), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            c.fine_tuning.jobs.create(training_file=batch_file.id, model="tiny")
        good = c.files.create(file=("c.jsonl", chats()), purpose="fine-tune")
        with pytest.raises(openai.NotFoundError):
            c.fine_tuning.jobs.create(training_file=good.id, model="gpt-9")
        with pytest.raises(openai.BadRequestError, match="n_epochs"):
            c.fine_tuning.jobs.create(training_file=good.id, model="tiny", hyperparameters={"n_epochs": 0})
        with pytest.raises(openai.BadRequestError, match="suffix"):
            c.fine_tuning.jobs.create(training_file=good.id, model="tiny", suffix="no spaces please")
        # cancel: a long job ends, and nothing is served
        job = c.fine_tuning.jobs.create(training_file=good.id, model="tiny", hyperparameters={"n_epochs": 50, "batch_size": 1})  # 400 steps
        wait(c, job.id, until=("running",))
        c.fine_tuning.jobs.cancel(job.id)
        job = wait(c, job.id)
        assert job.status == "cancelled" and job.fine_tuned_model is None
        assert len(c.models.list().data) == 3
        with pytest.raises(openai.BadRequestError, match="already cancelled"):
            c.fine_tuning.jobs.cancel(job.id)
        c.close()
    finally:
        s.stop()
        store.close()


def test_a_dpo_job_on_openai_preference_rows(model_files, tmp_path):
    """method dpo: OpenAI's preference rows; the result prefers the preferred answer by a wider margin."""
    s, store = make_server(model_files, tmp_path, moderation=False, fine_tune_dir=str(tmp_path / "ft"))
    s.start()
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        rows = [{"input": {"messages": [{"role": "user", "content": q}]},
                 "preferred_output": [{"role": "assistant", "content": ANSWER}],
                 "non_preferred_output": [{"role": "assistant", "content": "I do not know, sorry."}]} for q in QUESTIONS]
        f = c.files.create(file=("prefs.jsonl", jsonl(rows)), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="invalid_training_file|assistant"):
            c.fine_tuning.jobs.create(training_file=c.files.create(file=("c.jsonl", jsonl(
                [{"input": {"messages": []}, "preferred_output": []}])), purpose="fine-tune").id, model="tiny",
                method={"type": "dpo"})
        job = c.fine_tuning.jobs.create(training_file=f.id, model="tiny", suffix="dpo", method={
            "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5, "n_epochs": 40, "learning_rate_multiplier": 100}}})
        assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.5
        job = wait(c, job.id)
        assert job.status == "succeeded", job.error
        losses = [e.data["train_loss"] for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data[::-1]
                  if e.type == "metrics" and "train_loss" in e.data]
        assert losses and losses[-1] < losses[0]
        assert c.chat.completions.create(model=job.fine_tuned_model, max_tokens=4,
                                         messages=[{"role": "user", "content": "hi"}]).choices  # served
        c.close()
        # the preferred answer's margin over the other grew (DPO's aim), read off the saved models
        from minichat.eval.evaluate import sequence_logprobs
        from minichat.gguf_import import load

        def margin(path):
            m, tok, _ = load(path, verbose=False)
            p = tok.render_chat([{"role": "user", "content": QUESTIONS[2]}])[0]
            good, bad = sequence_logprobs(m, [(p, tok.encode(ANSWER) + [tok.im_end_id]),
                                              (p, tok.encode("I do not know, sorry.") + [tok.im_end_id])], tok.pad_id)
            return good - bad

        assert margin(tmp_path / "ft" / job.id / "final") > margin(model_files.tiny) + 5
    finally:
        s.stop()
        store.close()
