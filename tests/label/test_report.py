"""`minichat label report`: win rates, Likert and flags from people's work, checked by hand on small rows, then
end to end through the service and the CLI on a real store."""
from __future__ import annotations

import pytest
from tests.label.conftest import login, write_jsonl

from minichat.errors import MinichatError
from minichat.label.importer import read_prompts
from minichat.label.report import evaluation, to_markdown
from minichat.label.service import ProjectConfig


def _meta(pid, labeler, held_out=False, assignment=0, category="open qa", **extra):
    return {"prompt_id": pid, "labeler": labeler, "held_out": held_out, "assignment_id": assignment,
            "category": category, **extra}


def _ranking(pid, models, ranks, labeler="ann", held_out=False):
    return {"answers": [f"a{i}" for i in range(len(models))], "ranks": ranks,
            "meta": _meta(pid, labeler, held_out, models=models)}


def _rating(pid, model, likert, assignment, labeler="ann", held_out=False, flags=None, category="open qa"):
    return {"model": model, "likert": likert, "flags": flags or {},
            "meta": _meta(pid, labeler, held_out, assignment, category)}


ROWS = {
    "rankings": [
        _ranking(1, ["A", "B"], [0, 1]),  # A above B: A wins
        _ranking(2, ["B", "A", "A"], [0, 1, 1]),  # B above both A answers: two losses for A (the A-A pair is no match)
        _ranking(3, ["A", "B"], [0, 0], labeler="hal", held_out=True),  # a tie: half
    ],
    "ratings": [
        _rating(1, "A", 6, 10, flags={"hallucination": True}), _rating(1, "B", 4, 10),
        _rating(2, "A", 3, 11, labeler="hal", held_out=True, category="chat"), _rating(2, "B", 5, 11, labeler="hal",
                                                                                        held_out=True, category="chat"),
    ],
    "sft": [], "pairs": [],
}


def test_win_rates_likert_and_flags_by_hand():
    rep = evaluation(ROWS, n_boot=200)
    assert rep["models"] == ["A", "B"]
    every = rep["groups"]["all labelers"]
    w = every["win_rankings"]["A"]["B"]
    assert w["win_rate"] == pytest.approx((1 + 0 + 0 + 0.5) / 4) and (w["wins"], w["ties"], w["losses"]) == (1, 1, 2)
    assert w["prompts"] == 3 and every["win_rankings"]["B"]["A"]["win_rate"] == pytest.approx(0.625)
    assert 0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1
    assert every["win_ratings"]["A"]["B"]["win_rate"] == 0.5  # 6 > 4 for ann, 3 < 5 for hal
    assert rep["groups"]["training labelers"]["win_ratings"]["A"]["B"]["win_rate"] == 1.0
    held = rep["groups"]["held-out labelers"]
    assert held["labelers"] == ["hal"] and held["win_ratings"]["A"]["B"]["win_rate"] == 0.0
    assert held["win_rankings"]["A"]["B"]["win_rate"] == 0.5
    la = every["likert"]["A"]
    assert la["mean"] == 4.5 and la["counts"][6] == 1 and la["counts"][3] == 1 and la["n"] == 2
    assert la["by_category"] == {"chat": 3.0, "open qa": 6.0}
    assert every["flags"]["A"]["hallucination"] == 0.5 and every["flags"]["B"]["hallucination"] == 0.0
    # against a baseline: only the column of B
    based = evaluation(ROWS, baseline="B", n_boot=50)["groups"]["all labelers"]["win_rankings"]
    assert list(based) == ["A"] and list(based["A"]) == ["B"]
    with pytest.raises(MinichatError, match="--baseline 'C'"):
        evaluation(ROWS, baseline="C")
    md = to_markdown(rep)
    assert "## Held-out labelers: 1 (hal)" in md and "| A | 2 | 4.50 [" in md and "37.5% [" in md
    assert "hallucination" in md


def test_nothing_to_report_is_said_plainly():
    empty = {"rankings": [], "ratings": [], "sft": [], "pairs": []}
    assert "No rated or ranked answers yet." in to_markdown(evaluation(empty))
    one_model = {**empty, "rankings": [_ranking(1, ["A", "A"], [0, 1])]}
    assert evaluation(one_model)["groups"]["all labelers"]["win_rankings"] == {}
    assert "No win rates" in to_markdown(evaluation(one_model))


def test_report_end_to_end(lab, db_url, tmp_path, capsys):
    """People rank and rate the answers of two models on a real store; the CLI reports what they did."""
    from minichat.label import cli

    lab.create_project("cmp", ProjectConfig(tasks=["ranking", "rating"], models=[], k=4, rate_answers=2))
    rows = [{"prompt": f"question {i}", "category": "open qa" if i % 2 else "chat",
             "answers": [{"content": f"{q} answer {i}.{j}", "model": m} for j in range(2)
                         for q, m in (("good", "ppo"), ("bad", "sft"))]} for i in range(8)]  # ratings show the first 2
    lab.import_prompts("cmp", read_prompts(write_jsonl(tmp_path / "p.jsonl", rows)))
    ann, bob = login(lab, "ann"), login(lab, "bob")
    hal = login(lab, "hal", held_out=True)  # the held-out labeler prefers the other model
    for kind in ("ranking", "rating"):  # the labelers take turns, so each does some of every kind
        turn = 0
        while (a := lab.next_assignment(u := (ann, bob, hal)[turn % 3], "cmp", kind)) is not None:
            turn += 1
            good = [x["id"] for x in a["answers"] if x["content"].startswith("good")]
            bad = [x["id"] for x in a["answers"] if x["content"].startswith("bad")]
            first, second = (bad, good) if u is hal else (good, bad)
            if kind == "ranking":
                lab.submit_ranking(u, a["id"], [first, second])  # each model's two answers tied
            else:
                lab.submit_rating(u, a["id"], [{"answer_id": i, "likert": 6 if i in first else 2,
                                                "flags": {"hallucination": i in second}} for i in first + second])
    out = tmp_path / "report.md"
    assert cli.main(["report", "--store", db_url, "--project", "cmp", "--baseline", "sft", "--out", str(out),
                     "--bootstrap", "200"]) == 0
    md = capsys.readouterr().out
    assert out.read_text() == md
    assert "## Training labelers: 2 (ann, bob)" in md and "## Held-out labelers: 1 (hal)" in md
    rep = evaluation(lab.export_rows(project="cmp", held_out="include"), "sft", n_boot=200)
    train, held = rep["groups"]["training labelers"], rep["groups"]["held-out labelers"]
    # 8 tasks of each kind, one labeler each, in turn: ann and bob 3, hal 2; a rating task rates 2 answers
    assert (train["rankings"], held["rankings"]) == (6, 2) and (train["ratings"], held["ratings"]) == (12, 4)
    assert train["win_rankings"]["ppo"]["sft"]["win_rate"] == 1.0
    assert train["win_rankings"]["ppo"]["sft"]["judgements"] == 6 * 4  # 2 x 2 answers of different models each
    assert held["win_rankings"]["ppo"]["sft"]["win_rate"] == 0.0
    assert train["win_ratings"]["ppo"]["sft"]["win_rate"] == 1.0
    assert held["win_ratings"]["ppo"]["sft"]["win_rate"] == 0.0
    assert train["likert"]["ppo"]["mean"] == 6.0 and held["likert"]["ppo"]["mean"] == 2.0
    assert train["flags"]["sft"]["hallucination"] == 1.0 and held["flags"]["ppo"]["hallucination"] == 1.0
    assert rep["groups"]["all labelers"]["flags"]["sft"]["hallucination"] == 0.75
    assert "| ppo | 8 | 5.00 [" in md  # all labelers: 6 ratings of 6 and 2 of 2
    assert cli.main(["report", "--store", db_url, "--json"]) == 0
    assert '"held-out labelers"' in capsys.readouterr().out
    with pytest.raises(MinichatError, match="baseline"):
        cli.main(["report", "--store", db_url, "--baseline", "gpt-9"])
