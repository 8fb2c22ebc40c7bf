"""The labeling service: schema, import, assignment with overlap, validation, permissions, agreement, export."""
from __future__ import annotations

import datetime as dt
import json

import pytest
from tests.label.conftest import login, write_jsonl
from sqlalchemy import func, inspect, select

from minichat.errors import MinichatError
from minichat.label.importer import read_prompts
from minichat.label.models import Prompt
from minichat.label.service import (
    Forbidden, Labeling, ProjectConfig, Unauthorized, export_counts, pair_agreement, ranks_from_groups,
    rating_agreement,
)
from minichat.serve.store import HEAD_REVISION as SERVE_HEAD
from minichat.serve.store import NotFound, Store

PROMPTS = [
    {"prompt": "Write a haiku about the sea.", "category": "generation", "answers": ["a1", "a2", "a3", "a4"]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}],
     "category": "Open_QA", "id": "q7", "metadata": {"source": "team"}, "answers": ["4", "four", "5", "22"]},
]


@pytest.fixture
def project(lab, tmp_path):
    cfg = ProjectConfig(tasks=["demonstration", "ranking", "rating"], models=[], k=4, overlap=2)
    lab.create_project("p", cfg, "# Guidelines\nBe **helpful**.")
    lab.import_prompts("p", read_prompts(write_jsonl(tmp_path / "p.jsonl", PROMPTS)))
    return "p"


def test_schema_matches_models_and_other_tools_still_open_the_store(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from minichat.label.models import LabelBase
    from minichat.serve.feedback import export as feedback_export

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(url)
    Labeling(store)
    Labeling(store)  # idempotent
    names = set(inspect(store.engine).get_table_names())
    assert {"label_users", "label_rankings", "label_alembic_version", "conversations"} <= names
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": "label_alembic_version"})
        diff = compare_metadata(ctx, LabelBase.metadata)
    assert [d for d in diff if "label_" in str(d)] == []
    store.close()
    # a tool that knows only the serving store's migrations (minichat feedback export) still opens it
    plain = Store(url)
    assert plain.revision() == {SERVE_HEAD}
    assert feedback_export(plain, tmp_path / "prefs.jsonl") == {"comparison": 0, "thumbs": 0}
    plain.close()


def test_import_jsonl_and_csv_with_categories_metadata_and_multi_turn(lab, project, tmp_path):
    d = lab.dashboard({"id": 0, "name": "", "role": "admin"}, "p")["projects"][0]
    assert d["prompts"] == 2 and d["tasks"] == {"demonstration": 2, "ranking": 2, "rating": 2}
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('prompt,category,system,team,answer_1\n"Summarize: the cat sat.",summarization,Be terse.,blue,'
                        '"The cat sat."\n"List three fruits",,,red,\n', encoding="utf-8")
    rows = read_prompts(csv_file)
    assert rows[0].messages == [{"role": "system", "content": "Be terse."},
                                {"role": "user", "content": "Summarize: the cat sat."}]
    assert rows[0].category == "summarization" and rows[0].meta == {"team": "blue"} and rows[1].category is None
    assert rows[0].answers == [{"content": "The cat sat.", "model": "imported"}]
    lab.create_project("demos", ProjectConfig(tasks=["demonstration"], models=[]))
    assert lab.import_prompts("demos", rows)["tasks"] == 2
    u = login(lab, "ann")
    a = lab.next_assignment(u, "p", "demonstration")
    b = lab.submit_demonstration(u, a["id"], "first")
    a2 = lab.next_assignment(u, "p", "demonstration")
    assert a2["messages"][-1] == {"role": "user", "content": "What is 2+2?"} and a2["category"] == "open qa"
    assert a2["metadata"] == {"source": "team", "id": "q7"}
    lab.submit_demonstration(u, a2["id"], "4.")
    sft = lab.export_rows()["sft"]
    # the multi-turn prompt's reply is the assistant's last turn
    assert sft[1]["messages"][-2:] == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    assert sft[0]["messages"][-1]["content"] == "first" and b["record"]["content"] == "first"


def test_malformed_import_files_are_reported_by_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n\n[1, 2]\n{"prompt": "x", "category": "poetry"}\n'
                   '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                   '{"text": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(MinichatError) as e:
        read_prompts(bad)
    msg = str(e.value)
    assert "5 malformed line(s), nothing imported" in msg
    for line, what in ((2, "malformed JSON"), (4, "expected a JSON object"), (5, "unknown category 'poetry'"),
                       (6, "a conversation must end with a user turn"), (7, "expected a 'prompt' or 'messages'")):
        assert f"bad.jsonl:{line}: {what}" in msg
    c = tmp_path / "bad.csv"
    c.write_text("prompt,category\nfine,chat\n,chat\nx,chat,extra\n", encoding="utf-8")
    with pytest.raises(MinichatError, match=r"bad.csv:3: the prompt is empty[\s\S]*bad.csv:4: 1 more fields"):
        read_prompts(c)
    (tmp_path / "h.csv").write_text("question\nx\n")
    with pytest.raises(MinichatError, match="h.csv:1: the CSV header must have a 'prompt' column"):
        read_prompts(tmp_path / "h.csv")
    with pytest.raises(MinichatError, match="does not exist"):
        read_prompts(tmp_path / "none.jsonl")


def test_imported_answers_must_number_k(lab, tmp_path):
    lab.create_project("k5", ProjectConfig(tasks=["ranking"], models=[], k=5))
    with pytest.raises(MinichatError, match=r"p.jsonl:1: 4 answers given, but this project ranks K=5"):
        lab.import_prompts("k5", read_prompts(write_jsonl(tmp_path / "p.jsonl", PROMPTS)))
    with pytest.raises(MinichatError, match="k .* must be 4..9"):
        ProjectConfig(k=3).validate()


def test_an_over_long_field_imports_nothing(lab, tmp_path):
    lab.create_project("long", ProjectConfig(tasks=["ranking"], models=[], k=4))
    rows = [PROMPTS[0], {"prompt": "Hi", "answers": [{"content": "a", "model": "m" * 301}, "b", "c", "d"]}]
    with pytest.raises(MinichatError, match="label_answers.model takes at most 300 characters"):
        lab.import_prompts("long", read_prompts(write_jsonl(tmp_path / "long.jsonl", rows)))
    lab.import_prompts("long", read_prompts(write_jsonl(tmp_path / "ok.jsonl", rows[:1])))
    with lab.store.session() as s:  # the refused transaction wrote nothing; the next one works
        assert s.scalar(select(func.count()).select_from(Prompt)) == 1


def test_ranking_must_be_a_permutation_with_ties():
    shown = [10, 11, 12, 13]
    assert ranks_from_groups([[12], [10, 13], [11]], shown) == [1, 2, 0, 1]
    for groups, msg in (([[10], [11], [12]], "answer.* 13 not ranked"),
                        ([[10], [11, 12], [13, 10]], "answer 10 appears more than once"),
                        ([[10], [11], [12], [13], [99]], "answer 99 is not one of the answers shown"),
                        ([[10, 11, 12, 13]], "all answers are tied"),
                        ([[10], []], "list of groups"), ("10>11", "list of groups"),
                        ([["10"], [11, 12, 13]], "must be integers")):
        with pytest.raises(MinichatError, match=msg):
            ranks_from_groups(groups, shown)


def test_rank_flow_random_order_ties_none_acceptable_and_skip(lab, project):
    ann, bob = login(lab, "ann"), login(lab, "bob")
    a = lab.next_assignment(ann, project, "ranking")
    b = lab.next_assignment(bob, project, "ranking")
    assert a["task_id"] == b["task_id"] and len(a["answers"]) == 4  # overlap 2: the same task for both
    ids = [x["id"] for x in a["answers"]]
    with pytest.raises(MinichatError, match="not ranked"):
        lab.submit_ranking(ann, a["id"], [[ids[0]], [ids[1]]])
    assert lab.assignment(ann, a["id"])["status"] == "open"  # a rejected ranking changes nothing
    got = lab.submit_ranking(ann, a["id"], [[ids[2]], [ids[0], ids[3]], [ids[1]]], comment="close call")
    assert got["status"] == "done" and got["record"]["ranking"] == [[ids[2]], [ids[0], ids[3]], [ids[1]]]
    # resubmitting replaces the record
    lab.submit_ranking(ann, a["id"], [[ids[0]], [ids[1]], [ids[2]], [ids[3]]])
    rows = lab.export_rows()["rankings"]
    assert len(rows) == 1 and rows[0]["ranks"] == [0, 1, 2, 3]
    assert rows[0]["answers"] == [next(x["content"] for x in a["answers"] if x["id"] == i) for i in ids]
    # a third labeler finds no ranking task left on that prompt (overlap 2), so gets the next prompt's
    cid = login(lab, "cid")
    c = lab.next_assignment(cid, project, "ranking")
    assert c["task_id"] != a["task_id"]
    lab.submit_ranking(cid, c["id"], None, none_acceptable=True)
    assert lab.assignment(cid, c["id"])["record"]["none_acceptable"] is True
    with pytest.raises(MinichatError, match="mark none acceptable, or skip"):
        lab.submit_ranking(bob, b["id"], [])
    s = lab.skip(bob, b["id"], "I can't judge haiku")
    assert s["status"] == "skipped" and s["skip_reason"] == "I can't judge haiku"
    assert lab.next_assignment(bob, project, "ranking")["task_id"] == c["task_id"]
    assert lab.next_assignment(cid, project, "ranking") is None  # nothing left for cid
    counts = export_counts(lab.export_rows())
    assert counts["rankings"] == 1 and counts["comparisons"] == 6  # "none acceptable" without order: not exported


def test_work_in_progress_comes_back_and_drafts_are_kept(lab, project):
    ann = login(lab, "ann")
    a = lab.next_assignment(ann, project, "demonstration")
    lab.save_draft(ann, a["id"], {"content": "half a hai"})
    again = lab.next_assignment(ann, project, "demonstration")
    assert again["id"] == a["id"] and again["draft"] == {"content": "half a hai"}
    done = lab.submit_demonstration(ann, a["id"], "A whole haiku")
    assert done["draft"] is None
    with pytest.raises(MinichatError, match="empty"):
        lab.submit_demonstration(ann, a["id"], "   ")
    with pytest.raises(MinichatError, match="is a demonstration task, not a ranking"):
        lab.submit_ranking(ann, a["id"], [[1], [2]])


def test_ratings_likert_and_instructgpt_metadata(lab, project):
    ann = login(lab, "ann")
    a = lab.next_assignment(ann, project, "rating")
    assert len(a["answers"]) == 1
    aid = a["answers"][0]["id"]
    for bad, msg in (([{"answer_id": aid, "likert": 8}], "likert must be an integer 1..7"),
                     ([{"answer_id": aid, "likert": 5, "flags": {"rude": True}}], "unknown 'rude'"),
                     ([{"answer_id": aid, "likert": 5, "flags": {"hallucination": "yes"}}], "true or false"),
                     ([], "rate every shown answer exactly once"),
                     ([{"answer_id": aid + 1000, "likert": 5}], "rate every shown answer")):
        with pytest.raises(MinichatError, match=msg):
            lab.submit_rating(ann, a["id"], bad)
    lab.submit_rating(ann, a["id"], [{"answer_id": aid, "likert": 6, "flags": {"hallucination": True},
                                      "comment": "made up a fact"}])
    r = lab.export_rows()["ratings"]
    assert len(r) == 1 and r[0]["likert"] == 6 and r[0]["flags"]["hallucination"] is True
    assert len(r[0]["flags"]) == 11 and r[0]["flags"]["harmful_advice"] is False
    assert r[0]["prompt"][-1]["role"] == "user" and r[0]["model"] == "imported"


def test_labelers_cannot_see_or_change_each_others_work_unless_admin(lab, project):
    ann, bob, boss = login(lab, "ann"), login(lab, "bob"), login(lab, "boss", role="admin")
    a = lab.next_assignment(ann, project, "demonstration")
    lab.submit_demonstration(ann, a["id"], "ann's words")
    with pytest.raises(Forbidden):
        lab.assignment(bob, a["id"])
    with pytest.raises(Forbidden):
        lab.submit_demonstration(bob, a["id"], "bob overwrites")
    with pytest.raises(Forbidden):
        lab.save_draft(bob, a["id"], {"content": "x"})
    with pytest.raises(Forbidden):
        lab.skip(bob, a["id"])
    with pytest.raises(Forbidden):
        lab.assignments(bob, of_user="ann")
    assert lab.assignments(bob) == []
    assert lab.assignment(boss, a["id"])["record"]["content"] == "ann's words"
    assert [x["id"] for x in lab.assignments(boss, of_user="ann")] == [a["id"]]
    lab.submit_demonstration(boss, a["id"], "fixed by the admin")
    assert lab.export_rows()["sft"][0]["meta"]["labeler"] == "ann"  # still ann's record
    with pytest.raises(NotFound):
        lab.assignment(ann, 99999)
    dash = lab.dashboard(bob, project)
    assert [r["labeler"] for r in dash["labelers"]] in ([], ["bob"]) and "per_pair" not in dash["agreement"]
    assert {r["labeler"] for r in lab.dashboard(boss, project)["labelers"]} == {"ann"}
    # a project restricted to some labelers
    lab.create_project("closed", ProjectConfig(tasks=["demonstration"], models=[], labelers=["ann"]))
    with pytest.raises(Forbidden):
        lab.next_assignment(bob, "closed")
    assert [p["name"] for p in lab.projects(bob)] == ["p"]


def test_accounts_logins_and_sessions(lab):
    user, token = lab.add_user("ann")
    assert user["role"] == "labeler" and len(token) >= 20
    with pytest.raises(MinichatError, match="already exists"):
        lab.add_user("ann")
    with pytest.raises(MinichatError, match="role must be"):
        lab.add_user("zed", role="owner")
    with pytest.raises(MinichatError, match="at least 8"):
        lab.add_user("zed", secret="short")
    with pytest.raises(Unauthorized):
        lab.login("ann", "wrong")
    session, _ = lab.login("ann", token)
    assert lab.authenticate(session)["name"] == "ann"
    lab.update_user("ann", secret="a new password")  # a new secret ends old sessions
    with pytest.raises(Unauthorized):
        lab.authenticate(session)
    s2, _ = lab.login("ann", "a new password")
    lab.logout(s2)
    with pytest.raises(Unauthorized):
        lab.authenticate(s2)
    lab.update_user("ann", active=False)
    with pytest.raises(Unauthorized):
        lab.login("ann", "a new password")


def test_sessions_expire(lab):
    """A login lasts session_hours: an older session is refused (and removed), a fresh one works, and logging in
    clears the expired sessions of everyone."""
    from minichat.label.models import Session as LoginSession

    _, token = lab.add_user("bo")
    old, _ = lab.login("bo", token)
    other, _ = lab.login("bo", token)
    with lab.store.session() as s:  # both logged in 15 days ago; the default lifetime is 14 days
        for row in s.scalars(select(LoginSession)):
            row.created_at -= dt.timedelta(days=15)
    with pytest.raises(Unauthorized, match="expired .*14 days"):
        lab.authenticate(old)
    with pytest.raises(Unauthorized, match="ended"):  # removed, not merely refused
        lab.authenticate(old)
    new, _ = lab.login("bo", token)
    assert lab.authenticate(new)["name"] == "bo"
    with lab.store.session() as s:
        assert s.scalar(select(func.count()).select_from(LoginSession)) == 1  # `other` was cleared at login
    short = Labeling(lab.store, migrate=False, session_hours=2)
    with pytest.raises(Unauthorized, match="2 hours"):
        with lab.store.session() as s:
            s.scalars(select(LoginSession)).one().created_at -= dt.timedelta(hours=3)
        short.authenticate(new)
    with pytest.raises(MinichatError, match="positive"):
        Labeling(lab.store, migrate=False, session_hours=0)


def test_pairwise_agreement_by_hand():
    # a: 0 < 1 < 2; b: 0 < 2 < 1 -> pairs (0,1) agree, (0,2) agree, (1,2) opposite: 2/3
    assert pair_agreement([0, 1, 2], [0, 2, 1]) == (2.0, 3)
    # a tie against an order counts half; two ties are not counted
    assert pair_agreement([0, 0, 1], [0, 1, 1]) == (0.5 + 1.0 + 0.5, 3)
    assert pair_agreement([0, 0], [0, 0]) == (0.0, 0)


def test_rating_agreement_by_hand():
    # answer 1 rated (7, 6): |d| = 1; answer 2 rated (3, 3, 1): pairs |0|, |2|, |2|; answer 3 rated once: left out
    r = rating_agreement([[7, 6], [3, 3, 1], [5]])
    assert r["answers"] == 2 and r["pairs"] == 4
    assert r["exact"] == 0.25 and r["within_one"] == 0.5 and r["mean_abs_diff"] == pytest.approx(5 / 4)
    # Krippendorff's interval alpha, by hand: values 7 6 3 3 1 (n = 5).
    # D_o = [2·1²/1 + 2·(0² + 2² + 2²)/2] / 5 = (2 + 8) / 5 = 2
    # D_e = 2·Σ_{i<j}(v_i − v_j)² / (5·4): Σ = 1+16+16+36 + 9+9+25 + 0+4 + 4 = 120 -> 240 / 20 = 12
    assert r["alpha"] == pytest.approx(1 - 2 / 12)
    assert rating_agreement([[4, 4], [2, 2]])["alpha"] == 1.0  # perfect agreement
    assert rating_agreement([[1, 5], [5, 1]])["alpha"] == pytest.approx(-0.5)  # worse than chance
    assert rating_agreement([[3], [4]])["pairs"] == 0 and rating_agreement([])["alpha"] is None


def test_ratings_agreement_in_the_dashboard(lab, tmp_path):
    project = "rated"
    lab.create_project(project, ProjectConfig(tasks=["rating"], models=[], k=4, overlap=2, rate_answers=4))
    lab.import_prompts(project, read_prompts(write_jsonl(tmp_path / "r.jsonl", PROMPTS[:1])))
    ann, bob = login(lab, "ann"), login(lab, "bob")
    given = {"ann": {"a1": 7, "a2": 5, "a3": 3, "a4": 1}, "bob": {"a1": 6, "a2": 5, "a3": 1, "a4": 1}}
    flagged = {"ann": {"a3", "a4"}, "bob": {"a4"}}  # they agree on a1, a2, a4 and differ on a3
    shown = None
    for u in (ann, bob):
        a = lab.next_assignment(u, project, "rating")
        shown = sorted(x["content"] for x in a["answers"])
        lab.submit_rating(u, a["id"], [{"answer_id": x["id"], "likert": given[u["name"]][x["content"]],
                                        "flags": {"hallucination": x["content"] in flagged[u["name"]]}}
                                       for x in a["answers"]])
    diffs = [abs(given["ann"][c] - given["bob"][c]) for c in shown]  # the same task: overlap 2
    r = lab.agreement(project)["ratings"]
    assert r["pairs"] == len(shown) == 4
    assert r["exact"] == pytest.approx(diffs.count(0) / len(diffs))
    assert r["mean_abs_diff"] == pytest.approx(sum(diffs) / len(diffs))
    assert lab.dashboard(ann, project)["agreement"]["ratings"] == r  # labelers see the overall figures
    f = lab.agreement(project)["flags"]
    assert f["hallucination"]["pairs"] == 4 and f["hallucination"]["exact"] == 0.75
    # nominal alpha by hand: values (0,0) (0,0) (1,0) (1,1); D_o = 2·1/1 / 8 = 1/4;
    # D_e = 2·(ones·zeros = 3·5) / (8·7) = 30/56 -> alpha = 1 − (1/4)/(30/56) = 1 − 56/120
    assert f["hallucination"]["alpha"] == pytest.approx(1 - 56 / 120)
    assert f["harmful_advice"]["exact"] == 1.0 and f["harmful_advice"]["alpha"] is None  # all "no": no spread


def test_agreement_dashboard_and_held_out_export(lab, project):
    ann, bob = login(lab, "ann"), login(lab, "bob")
    eve = login(lab, "eve", held_out=True)
    boss = login(lab, "boss", role="admin")
    for u, order in ((ann, [0, 1, 2, 3]), (bob, [0, 2, 1, 3])):
        a = lab.next_assignment(u, project, "ranking")
        by_content = {x["content"]: x["id"] for x in a["answers"]}
        contents = ["a1", "a2", "a3", "a4"]
        lab.submit_ranking(u, a["id"], [[by_content[contents[i]]] for i in order])
    ag = lab.agreement(project)
    assert ag["agreement"] == pytest.approx(5 / 6) and ag["pairs"] == 6 and ag["tasks"] == 1
    assert ag["per_pair"]["ann & bob"]["agreement"] == pytest.approx(5 / 6)
    # eve is held out: her ranking (the next prompt) and her demonstration are for evaluation only
    a = lab.next_assignment(eve, project, "ranking")
    ids = [x["id"] for x in a["answers"]]
    lab.submit_ranking(eve, a["id"], [[i] for i in ids])
    d = lab.next_assignment(eve, project, "demonstration")
    lab.submit_demonstration(eve, d["id"], "eve's answer")
    train = export_counts(lab.export_rows(project=project))
    assert train["rankings"] == 2 and train["demonstrations"] == 0 and train["comparisons"] == 12
    evalu = lab.export_rows(held_out="only")
    assert {r["meta"]["labeler"] for r in evalu["rankings"] + evalu["sft"]} == {"eve"}
    assert export_counts(lab.export_rows(held_out="include"))["rankings"] == 3
    assert export_counts(lab.export_rows(labelers=["bob"]))["rankings"] == 1
    with pytest.raises(NotFound):
        lab.export_rows(labelers=["nobody"])
    future = dt.datetime.utcnow() + dt.timedelta(days=1)
    assert export_counts(lab.export_rows(since=future))["rankings"] == 0
    assert export_counts(lab.export_rows(until=future))["rankings"] == 2
    # an admin marks bob held out: his work leaves the training export
    lab.update_user("bob", held_out=True)
    assert {r["meta"]["labeler"] for r in lab.export_rows()["rankings"]} == {"ann"}
    dash = lab.dashboard(boss, project)
    rows = {r["labeler"]: r for r in dash["labelers"]}
    assert rows["ann"]["done"] == {"ranking": 1} and rows["eve"]["held_out"] is True
    assert rows["ann"]["agreement"] == pytest.approx(5 / 6) and rows["eve"]["agreement"] is None
    p = dash["projects"][0]
    assert p["assignments"]["done"] == 4 and p["tasks_complete"] == 1 and p["comparisons"] == 18


def test_sampling_k_answers_from_a_model(lab, tiny_lm, tmp_path):
    lab.create_project("s", ProjectConfig(tasks=["ranking", "rating"], models=[f"m1={tiny_lm}", f"m2={tiny_lm}"],
                                          k=5, rate_answers=2, max_tokens=8, temperature=1.0, seed=3))
    lab.import_prompts("s", read_prompts(write_jsonl(tmp_path / "q.jsonl", [
        {"prompt": "tell me about red"}, {"prompt": "tell me about blue"}])))
    assert len(lab.tasks_needing_answers("s")) == 4
    from minichat.label.sampling import sample_project

    got = sample_project(lab, "s", device="cpu", weights="fp32")
    assert got == {"tasks": 4, "answers": 2 * 5 + 2 * 2, "skipped": 0}
    assert lab.tasks_needing_answers("s") == []
    assert sample_project(lab, "s")["tasks"] == 0  # nothing left to do
    u = login(lab, "ann")
    a = lab.next_assignment(u, "s", "ranking")
    assert len(a["answers"]) == 5
    ids = [x["id"] for x in a["answers"]]
    lab.submit_ranking(u, a["id"], [[i] for i in ids])
    models = lab.export_rows()["rankings"][0]["meta"]["models"]
    assert sorted(models) == ["m1", "m1", "m1", "m2", "m2"]  # K split among the models
