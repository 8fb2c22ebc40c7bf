"""Rejection-sampling fine-tuning (`minichat rsft`, the pipeline's rsft stage): the selection, the stage on the
tiny pipeline, and clear errors for missing or malformed input."""
import json
import math

import pytest
import torch

from minichat.errors import MinichatError
from minichat.train.rejection import distinct_candidates, pick_best, selection_score


def test_pick_best_by_hand():
    answers = [["a", "b", "c"], ["", "x"], ["", "  "], ["p", "q"], ["u", "v", "w"]]
    scores = [[0.1, 0.5, 0.3],  # the highest score wins
              [9.0, -1.0],  # an empty answer never wins, however high its score
              [1.0, 2.0],  # nothing but empty answers: no pick
              [2.0, 2.0],  # a tie goes to the first
              [float("nan"), -3.0, -2.0]]  # a NaN score is never best
    assert pick_best(answers, scores) == [1, 1, None, 0, 2]
    with pytest.raises(ValueError):
        pick_best([["a", "b"]], [[1.0]])


def test_selection_score_is_ppos_terminal_score():
    # RM 0.5, log π_ref −3, never ended: 0.5 + 1·(−3) − 1 = −3.5
    assert selection_score(0.5, -3.0, False, 1.0, -1.0) == pytest.approx(-3.5)
    assert selection_score(0.5, -3.0, True, 0.5, -1.0) == pytest.approx(-1.0)
    # the likelihood term can reverse the reward model's order: a likelier answer with a lower RM score wins
    a = selection_score(1.0, -12.0, True, 1.0, -1.0)
    b = selection_score(0.2, -4.0, True, 1.0, -1.0)
    assert pick_best([["a", "b"]], [[a, b]]) == [1]


def test_distinct_candidates_keep_first_seen_order():
    got = distinct_candidates([[("x", True), ("y", False), ("x", True), ("x", False)], [("z", True)] * 3])
    assert got == [[("x", True), ("y", False), ("x", False)], [("z", True)]]


@pytest.fixture(scope="module")
def rsft_run(tmp_path_factory):
    """The tiny pipeline up to and including rsft, then PPO from it."""
    from minichat.pipeline import preset_tiny, run

    cfg = preset_tiny()
    cfg.out_dir = str(tmp_path_factory.mktemp("rs") / "run")
    cfg.ablations = False
    cfg.runtime.threads = 1
    state = run(cfg, until="ppo")
    return cfg, state


def test_stage_selects_best_answers_and_ppo_starts_from_it(rsft_run):
    from minichat.checkpoint import load_model
    from minichat.data.chat import load_prompts, load_sft
    from minichat.pipeline import Paths

    cfg, state = rsft_run
    P = Paths(cfg)
    assert state["stages"]["rsft"]["status"] == "done"
    rows = [json.loads(l) for l in (P.out / "rsft" / "selected.jsonl").read_text().splitlines()]
    prompts = load_prompts(P.prompts)
    assert 0 < len(rows) <= len(prompts)
    for r in rows:
        assert r["messages"][:-1] in prompts and r["messages"][-1]["role"] == "assistant"
        assert r["messages"][-1]["content"].strip() and 1 <= r["candidates"] <= cfg.rsft.samples
        assert math.isfinite(r["score"])
    assert len(load_sft(P.out / "rsft" / "selected.jsonl")) == len(rows)  # the fine-tuning reads it as SFT data
    res = state["stages"]["rsft"]["result"]
    assert res["selected"] == len(rows) and res["mean_best_score"] >= res["mean_first_score"]
    # a real fine-tuned checkpoint, different from the SFT model it started from
    rs, _, _ = load_model(P.out / "rsft")
    sft, _, _ = load_model(P.out / "sft")
    assert any(not torch.equal(a, b) for a, b in zip(rs.state_dict().values(), sft.state_dict().values()))
    # PPO started from it and kept the SFT model as reference
    ppo_cfg = json.loads((P.out / "ppo" / "final" / "config.json").read_text())["ppo"]
    assert ppo_cfg["policy_from"] == str(P.out / "rsft") and ppo_cfg["ref_from"] == str(P.out / "sft")


def test_best_is_best_of_the_samples(rsft_run, tmp_path):
    """Rerun the selection on a few prompts: every kept answer scores at least as high as any other sample of
    its prompt (recomputed independently through the same models)."""
    from minichat.checkpoint import load_model
    from minichat.data.chat import load_prompts
    from minichat.heads import load_scalar_model
    from minichat.pipeline import Paths
    from minichat.train.rejection import RSFTConfig, sample_candidates, score_candidates, select

    cfg, _ = rsft_run
    P = Paths(cfg)
    rc = RSFTConfig(policy_from=str(P.out / "sft"), reward_from=str(P.out / "reward"), prompts=str(P.prompts),
                    out_dir=str(tmp_path / "rs"), samples=3, max_new_tokens=8, max_prompts=6, progress=False)
    path, meta = select(rc, torch.device("cpu"))
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    model, tok, _ = load_model(rc.policy_from)
    rm, _, _ = load_scalar_model(rc.reward_from)
    convs = load_prompts(rc.prompts)[:6]
    cands = sample_candidates(model, tok, convs, rc)  # the same seeds: the same samples
    scores = score_candidates(rm, model, tok, convs, cands, rc, torch.device("cpu"))
    kept = 0
    for m, g, sc in zip(convs, cands, scores):
        ok = [s for (a, _), s in zip(g, sc) if a]
        if not ok:  # every sample empty: the prompt is left out
            continue
        row = rows[kept]
        kept += 1
        assert row["messages"][:-1] == m and row["messages"][-1]["content"] in [a for a, _ in g]
        assert row["score"] == pytest.approx(max(ok), abs=1e-3)
    assert kept == len(rows) == meta["selected"]
    # the same settings again: the selection is reused, not redone
    again, meta2 = select(rc, torch.device("cpu"))
    assert meta2 == meta


def test_rsft_is_a_switch():
    """Off by default (the plain InstructGPT path; it did not help reliably), on with --rsft.samples K."""
    from minichat.pipeline import STAGES, PipelineConfig, active_stages, preset_gpu, preset_tiny

    assert "rsft" in STAGES
    assert "rsft" not in active_stages(PipelineConfig()) and "rsft" not in active_stages(preset_gpu())
    cfg = preset_tiny()
    assert "rsft" in active_stages(cfg)  # the tiny preset keeps it on, so the tests run it
    cfg.rsft.samples = 0
    assert "rsft" not in active_stages(cfg)


def test_pipeline_without_rsft_runs_ppo_from_sft(rsft_run, tmp_path):
    """--rsft.samples 0 on a finished run: --from ppo redoes PPO from the SFT model; --from rsft (switched off)
    means the next stage."""
    import shutil

    from minichat.pipeline import main

    cfg, _ = rsft_run
    out = tmp_path / "run"
    shutil.copytree(cfg.out_dir, out)
    main(["--preset", "tiny", "--out_dir", str(out), "--ablations", "false", "--runtime.threads", "1",
          "--rsft.samples", "0", "--from", "rsft", "--until", "eval"])
    ppo_cfg = json.loads((out / "ppo" / "final" / "config.json").read_text())["ppo"]
    assert ppo_cfg["policy_from"] == str(out / "sft")
    # the old rsft folder is still there, but the evaluation no longer reports it as PPO's starting point
    assert (out / "rsft" / "final").exists()
    assert "rsft" not in json.loads((out / "eval" / "metrics.json").read_text())["models"]


def test_missing_and_malformed_input_fail_clearly(rsft_run, tmp_path):
    from minichat.cli import main as cli_main
    from minichat.pipeline import Paths, preset_tiny, stage_rsft
    from minichat.train.rejection import main

    cfg, _ = rsft_run
    P = Paths(cfg)
    base = ["--preset", "tiny", "--policy_from", str(P.out / "sft"), "--reward_from", str(P.out / "reward"),
            "--out_dir", str(tmp_path / "o"), "--runtime.threads", "1"]
    with pytest.raises(MinichatError, match="does not exist"):
        main(base + ["--prompts", str(tmp_path / "nope.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{oops\n')
    with pytest.raises(MinichatError, match="bad.jsonl:2"):
        main(base + ["--prompts", str(bad)])
    with pytest.raises(MinichatError, match="set --prompts"):
        main(base)
    with pytest.raises(MinichatError, match="does not exist"):
        main(base[:4] + ["--reward_from", str(tmp_path / "no_rm"), "--prompts", str(P.prompts)] + base[6:])
    with pytest.raises(MinichatError, match="not a reward model"):
        main(base[:4] + ["--reward_from", str(P.out / "sft"), "--prompts", str(P.prompts)] + base[6:])
    with pytest.raises(MinichatError, match="samples"):
        main(base + ["--prompts", str(P.prompts), "--samples", "0"])
    # the CLI prints the error (exit code 2), no traceback
    assert cli_main(["rsft"] + base + ["--prompts", str(bad)]) == 2
    assert not (tmp_path / "o" / "selected.jsonl").exists()
    # the pipeline stage names what is missing
    c2 = preset_tiny()
    c2.out_dir = str(tmp_path / "fresh")
    with pytest.raises(MinichatError, match="needs the SFT model"):
        stage_rsft(c2, Paths(c2))
