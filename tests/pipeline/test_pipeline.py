"""A tiny end-to-end pipeline run (seconds), resuming, redoing, and clear errors for bad inputs."""
import json

import pytest
import torch

from minichat.errors import MinichatError
from minichat.pipeline import STAGES, main, preset_tiny, run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run"
    cfg = preset_tiny()
    cfg.out_dir = str(out)
    cfg.runtime.threads = 1
    state = run(cfg)
    return out, state


def test_every_stage_finishes_and_leaves_its_artefacts(tiny_run):
    out, state = tiny_run
    assert [s for s in STAGES if state["stages"][s]["status"] == "done"] == STAGES
    for p in ("tokenizer/tokenizer.json", "pretrain/final", "sft/final", "reward/final", "reward_hinge/final",
              "ppo/final", "ppo_noptx/final", "data/sft.jsonl", "data/comparisons.jsonl",
              "data/comparisons_heldout.jsonl", "data/comparisons_heldout_labelers.jsonl", "eval/metrics.json", "eval/answers.jsonl", "report/report.md",
              "report/report.html", "report/plots/likert.png", "report/plots/winrates.png",
              "report/plots/attention.png", "report/plots/losses.png", "report/plots/ppo.png"):
        assert (out / p).exists(), p
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(m["models"]) == {"pretrained", "sft", "best_of_n", "rsft", "ppo", "ppo_noptx"}
    assert set(m["reward_models"]) == {"logsigmoid", "hinge"}
    assert all(0 <= r["accuracy_train_prompts"] <= 1 for r in m["reward_models"].values())
    for name, r in m["models"].items():
        assert 1 <= r["likert"]["mean"] <= 7
        assert set(r["by_category"]) and 0 <= r["accuracy"] <= 1
        if name != "sft":
            w = r["win_vs_sft"]
            assert 0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1
    assert "kl_from_sft" in m["models"]["ppo"] and "val_ppl" in m["models"]["ppo_noptx"]
    md = (out / "report" / "report.md").read_text()
    for phrase in ("Targets and evidence", "log-sigmoid", "best-of-", "pretraining mix", "Accuracy per use-case"):
        assert phrase in md
    assert "<table>" in (out / "report" / "report.html").read_text()


def test_demonstrations_and_comparisons_have_instructgpt_shape(tiny_run):
    out, _ = tiny_run
    demos = [json.loads(l) for l in (out / "data" / "sft.jsonl").read_text().splitlines()]
    comps = [json.loads(l) for l in (out / "data" / "comparisons.jsonl").read_text().splitlines()]
    assert demos and comps
    # the K = 3 SFT samples and one of the prompted pretrained model, each distinct answer shown once
    assert all(2 <= len(c["answers"]) == len(c["ranks"]) <= 4 for c in comps)
    assert all(len(set(c["answers"])) == len(c["answers"]) for c in comps)
    held = [json.loads(l) for l in (out / "data" / "comparisons_heldout.jsonl").read_text().splitlines()]
    assert all(len(c["answers"]) == 3 for c in held)  # the reward model's test keeps every sample
    assert {c["labeler"] for c in held}.isdisjoint({d["labeler"] for d in demos} | {c["labeler"] for c in comps})


def test_rerun_skips_finished_stages(tiny_run, capsys):
    out, state = tiny_run
    before = json.loads((out / "pipeline.json").read_text())
    main(["--preset", "tiny", "--out_dir", str(out), "--runtime.threads", "1"])
    printed = capsys.readouterr().out
    assert printed.count("skipped") == len(STAGES)
    after = json.loads((out / "pipeline.json").read_text())
    assert after["stages"]["pretrain"] == before["stages"]["pretrain"]


def test_redo_from_a_stage_and_missing_outputs(tiny_run, capsys):
    out, _ = tiny_run
    main(["--preset", "tiny", "--out_dir", str(out), "--runtime.threads", "1", "--from", "report"])
    assert "report: finished" in capsys.readouterr().out
    (out / "eval" / "metrics.json").rename(out / "eval" / "metrics.moved")
    try:
        with pytest.raises(MinichatError, match="--from eval"):
            main(["--preset", "tiny", "--out_dir", str(out), "--runtime.threads", "1"])
    finally:
        (out / "eval" / "metrics.moved").rename(out / "eval" / "metrics.json")


def test_eval_cli_on_the_run(tiny_run, tmp_path):
    from minichat.eval.cli import main as eval_main

    out, _ = tiny_run
    assert eval_main(["--preset", "tiny", "--run", str(out), "--out_dir", str(tmp_path / "ev"), "--limit", "11",
                      "--runtime.threads", "1"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_tasks"] == 11 and "ppo" in m["models"]


def test_malformed_user_file_fails_before_training(tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    with pytest.raises(MinichatError, match="sft.jsonl:2"):
        main(["--preset", "tiny", "--out_dir", str(tmp_path / "r"), "--data.sft", str(bad)])
    assert not (tmp_path / "r" / "pretrain").exists()
    with pytest.raises(MinichatError, match="does not exist"):
        main(["--preset", "tiny", "--out_dir", str(tmp_path / "r"), "--data.comparisons", str(tmp_path / "nope.jsonl")])


def test_a_stage_without_its_input_says_what_is_missing(tmp_path):
    cfg = preset_tiny()
    cfg.out_dir = str(tmp_path / "r")
    run(cfg, until="world")
    with pytest.raises(MinichatError, match="needs the pretrained model"):
        from minichat.pipeline import Paths, stage_sft

        stage_sft(cfg, Paths(cfg))


def test_ranked_samples_can_spread_their_temperatures(tmp_path):
    """world.sample_min_temperature: answer j of every prompt is sampled at a temperature stepping from
    sample_temperature down to it; at 0 the last answer is the SFT model's greedy one."""
    from minichat.eval.evaluate import generate, load_tasks
    from minichat.gguf_import import load
    from minichat.pipeline import Paths

    cfg = preset_tiny()
    cfg.out_dir = str(tmp_path / "r")
    cfg.runtime.threads = 1
    cfg.world.sample_min_temperature = 0.0
    cfg.world.distinct_answers = False  # keep every answer in place, to check which is which
    run(cfg, until="comparisons")
    P = Paths(cfg)
    rows = [json.loads(line) for line in P.comparisons.read_text().splitlines() if line.strip()]
    tasks = load_tasks(P.rm_tasks)
    k = cfg.world.rm_k
    assert len(rows) == len(tasks) and all(len(r["answers"]) == k + cfg.world.rm_pretrained_samples for r in rows)
    model, tok, _ = load(str(P.stage_dir("sft")), verbose=False)
    prompts = [tok.render_chat(t.messages, add_generation_prompt=True)[0] for t in tasks]
    greedy = generate(model, tok, prompts, cfg.world.max_new_tokens, 0.0, 0)
    assert [tok.decode(c.content_ids, skip_special=True).strip() for c in greedy] == [r["answers"][k - 1] for r in rows]
    # the last answer is the prompted pretrained model's (Q: ... A: format, as the evaluation prompts it)
    from minichat.pipeline import pretrained_answers

    pre = pretrained_answers(P, tasks, 1, cfg.world.sample_temperature, cfg.world.max_new_tokens,
                             cfg.world.seed + 150, torch.device("cpu"))
    assert [p[0][0] for p in pre] == [r["answers"][-1] for r in rows]
    with pytest.raises(MinichatError, match="sample_min_temperature"):
        main(["--preset", "tiny", "--out_dir", str(tmp_path / "x"), "--world.sample_min_temperature", "2"])


def test_labelers_rank_only_distinct_answers(tiny_run):
    """Two copies of one answer are never ranked against each other (a labeler would only order them by
    noise); a prompt whose answers are all the same is dropped, and extra candidates join the ranking."""
    from minichat.eval.evaluate import load_tasks
    from minichat.eval.labelers import TRAIN_LABELERS
    from minichat.gguf_import import load
    from minichat.pipeline import sample_and_rank

    out, _ = tiny_run
    model, tok, _ = load(str(out / "sft"), verbose=False)
    tasks = load_tasks(out / "data" / "rm_tasks.jsonl")[:4]
    args = (model, tok, tasks, 2, TRAIN_LABELERS, 0.0, 6, 0, "test")  # greedy twice: identical answers
    assert len(sample_and_rank(*args)) == len(tasks)
    assert sample_and_rank(*args, distinct=True) == []
    extra = [[("A different answer.", True), ("A different answer.", True)] for _ in tasks]
    rows = sample_and_rank(*args, distinct=True, extra=extra)
    assert len(rows) == len(tasks)
    for r in rows:
        assert len(r["answers"]) == 2 and r["answers"][1] == "A different answer." and len(r["ranks"]) == 2


def test_reward_model_can_start_from_the_pretrained_model(tmp_path):
    from minichat.checkpoint import resolve
    from minichat.errors import ConfigError

    cfg = preset_tiny()
    cfg.out_dir = str(tmp_path / "r")
    cfg.runtime.threads = 1
    cfg.reward_init, cfg.reward_train_last_layers = "pretrain", 0
    state = run(cfg, until="reward")
    assert state["stages"]["reward"]["status"] == "done"
    rc = json.loads((resolve(tmp_path / "r" / "reward") / "config.json").read_text())
    assert rc["reward"]["init_from"].endswith("pretrain") and rc["reward"]["train_last_layers"] == 0
    with pytest.raises(ConfigError, match="reward_init"):
        main(["--preset", "tiny", "--out_dir", str(tmp_path / "x"), "--reward_init", "base"])
