"""The whole loop: label -> export (CLI) -> the trainers' readers -> a tiny reward model trained by the real
reward trainer -> its accuracy on the exported comparisons is above chance."""
from __future__ import annotations

import json
import random

import pytest
from tests.label.conftest import COLORS, QUALITY, login, write_jsonl

from minichat.label.importer import read_prompts
from minichat.label.service import ProjectConfig


def test_label_export_train_reward_model(lab, store, tiny_lm, tmp_path, capsys):
    from minichat.data.chat import load_comparisons, load_sft
    from minichat.label import cli
    from minichat.train import reward

    lab.create_project("loop", ProjectConfig(tasks=["demonstration", "ranking"], models=[], k=4))
    rng = random.Random(0)
    rows = []
    for i in range(36):
        c = COLORS[i % len(COLORS)]
        rows.append({"prompt": f"tell me about {c}", "category": "open qa",
                     "answers": [{"content": f"{c} is {q}.", "model": f"m{j % 2}"} for j, q in enumerate(QUALITY)]})
    lab.import_prompts("loop", read_prompts(write_jsonl(tmp_path / "prompts.jsonl", rows)))
    ann, bob = login(lab, "ann"), login(lab, "bob")
    eve = login(lab, "eve", held_out=True)  # ranks backwards: must never reach the training files
    quality = {q: r for r, q in enumerate(QUALITY)}

    def rank_by_quality(u, a, reverse=False):
        groups: dict[int, list[int]] = {}
        for x in a["answers"]:
            r = quality[x["content"].split(" is ", 1)[1].rstrip(".")]
            if u["name"] == "bob" and r in (1, 2):
                r = 1  # bob calls "fine" and "meh" a tie
            groups.setdefault(-r if reverse else r, []).append(x["id"])
        return [groups[k] for k in sorted(groups)]

    turn = [ann, bob, eve]
    while True:
        u = turn[rng.randrange(3)]
        a = lab.next_assignment(u, "loop", "ranking") or next(
            (x for x in (lab.next_assignment(v, "loop", "ranking") for v in turn) if x), None)
        if a is None:
            break
        owner = next(v for v in turn if v["name"] == a["labeler"])
        lab.submit_ranking(owner, a["id"], rank_by_quality(owner, a, reverse=owner is eve))
    for i in range(6):
        a = lab.next_assignment(ann, "loop", "demonstration")
        c = a["messages"][-1]["content"].split()[-1]
        lab.submit_demonstration(ann, a["id"], f"{c} is good good.")

    out = tmp_path / "export"
    assert cli.main(["export", "--out", str(out), "--store", store.url, "--project", "loop"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())["counts"]
    n_train = sum(1 for line in (out / "rankings.jsonl").read_text().splitlines() if line)
    assert 0 < n_train < 36 and summary["rankings"] == n_train  # eve's rankings are left out
    assert summary["comparisons"] == 6 * n_train and f"= {summary['comparisons']} comparisons" in printed
    assert {json.loads(x)["meta"]["labeler"] for x in (out / "pairs.jsonl").read_text().splitlines()} <= {"ann", "bob"}

    # the trainers' own readers accept every file
    comps = load_comparisons(out / "rankings.jsonl")
    assert len(comps) == n_train and all(len(c.answers) == 4 for c in comps)
    assert all(c.answers[0].endswith("good good.") and c.ranks[0] == 0 for c in comps)
    pairs = load_comparisons(out / "pairs.jsonl")
    assert len(pairs) == summary["pairs"] < summary["comparisons"]  # bob's ties give fewer ordered pairs
    assert len(load_sft(out / "sft.jsonl")) == 6

    cfg = reward.preset_tiny()
    cfg.init_from, cfg.data.train, cfg.data.val = str(tiny_lm), str(out / "rankings.jsonl"), str(out / "pairs.jsonl")
    cfg.data.demos = str(out / "sft.jsonl")  # InstructGPT: demonstrations score 0 on average
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.lr = str(tmp_path / "rm"), 40, 3e-3
    cfg.train.eval_every, cfg.train.progress = 0, False
    res = reward.run(cfg)
    assert res["val_pairs"] == summary["pairs"]
    assert res["val_accuracy"] > 0.75, res  # chance is 0.5

    # the held-out labeler's work exports for evaluation only
    ev = tmp_path / "eval"
    assert cli.main(["export", "--out", str(ev), "--store", store.url, "--held-out", "only"]) == 0
    eve_rows = [json.loads(x) for x in (ev / "rankings.jsonl").read_text().splitlines()]
    assert eve_rows and {r["meta"]["labeler"] for r in eve_rows} == {"eve"}
    assert len(eve_rows) + n_train == 36


@pytest.mark.parametrize("k", [4, 9])
def test_comparisons_count_is_sum_of_k_choose_2(lab, tmp_path, k):
    from minichat.label.service import export_counts

    lab.create_project("kk", ProjectConfig(tasks=["ranking"], models=[], k=k))
    lab.import_prompts("kk", read_prompts(write_jsonl(tmp_path / "k.jsonl", [
        {"prompt": f"p{i}", "answers": [f"a{j}" for j in range(k)]} for i in range(3)])))
    u = login(lab, "ann")
    while (a := lab.next_assignment(u, "kk")) is not None:
        lab.submit_ranking(u, a["id"], [[x["id"]] for x in a["answers"]])
    c = export_counts(lab.export_rows())
    assert c["prompts"] == 3 and c["comparisons"] == 3 * k * (k - 1) // 2 == c["pairs"]
