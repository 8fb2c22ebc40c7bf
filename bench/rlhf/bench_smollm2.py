"""RLHF stages with the built-in SmolLM2-135M: SFT tokens/s, one PPO iteration (16 prompts x 64 new tokens),
and a reward model on real human preferences (Anthropic HH harmless, ../shared) with held-out accuracy.

    python bench/rlhf/bench_smollm2.py [--only sft|ppo|rm] [--rm-train 400] [--rm-val 200] [--rm-steps 40]
    python bench/rlhf/bench_smollm2.py --only ppo --ppo-lora 16 [--ppo-recompute] [--ppo-shared-value]   # PPO through adapters (peak memory in the JSON)

Affordable on a 2-core CPU by design: the reward model trains only its last 2 blocks and the head (the rest
of the trunk is frozen), on a subset of the data, with prompts cut from the left to 192 tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

HH = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "preferences" / "hh_harmless_dev.jsonl.gz"


def bench_sft(work: Path, steps: int) -> dict:
    from minichat.data.chat import load_comparisons
    from minichat.train import sft

    rows = []
    for c in load_comparisons(HH, limit=300):  # the chosen HH answers as demonstrations
        rows.append({"messages": c.prompt + [{"role": "assistant", "content": c.answers[0]}]})
    (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = sft.SFTConfig(init_from="smollm2")
    cfg.data.train, cfg.data.val_fraction, cfg.data.pack, cfg.data.max_len = str(work / "sft.jsonl"), 0.0, True, 256
    t = cfg.train
    t.out_dir, t.max_steps, t.batch_size, t.warmup_steps = str(work / "sft"), steps, 4, 0
    t.eval_every, t.save_every, t.progress, t.log_every, t.resume, t.peak_tflops = 0, 0, False, 1000, "never", 1.0
    res = sft.run(cfg)
    return {"sft_tokens_per_s": steps * 4 * 256 / res["train_time_s"], "steps": steps, "batch": 4, "seq_len": 256}


def bench_ppo(work: Path, iterations: int, lora: int = 0, recompute: bool = False, shared_value: bool = False) -> dict:
    from minichat.checkpoint import save_checkpoint
    from minichat.data.chat import load_comparisons
    from minichat.gguf_import import load
    from minichat.heads import scalar_from_lm
    from minichat.train import ppo

    # an (untrained-head) reward model on the SmolLM2 trunk: the cost is what is measured here
    lm, tok, _ = load("smollm2", verbose=False)
    save_checkpoint(work / "rm_smol", scalar_from_lm(lm), tok, extra_config={"kind": "reward"})
    prompts = [{"prompt": c.prompt} for c in load_comparisons(HH, limit=64) if len(c.prompt) == 1]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    cfg = (ppo.preset_lora() if lora else ppo.PPOConfig())
    cfg.lora.rank, cfg.lora.alpha = lora, 2.0 * lora
    cfg.ppo.activation_checkpointing, cfg.ppo.value_on_reward_trunk = recompute, shared_value
    cfg.policy_from, cfg.reward_from, cfg.prompts = "smollm2", str(work / "rm_smol"), str(work / "prompts.jsonl")
    cfg.out_dir, cfg.save_every, cfg.progress, cfg.resume = str(work / "ppo"), 0, False, "never"
    cfg.ppo.iterations, cfg.ppo.rollout_batch, cfg.ppo.max_new_tokens, cfg.ppo.max_prompt_len = iterations, 16, 64, 128
    ppo.run(cfg)
    rows = [json.loads(l) for l in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return {"ppo_iterations": rows, "ppo_lora": lora, "ppo_activation_checkpointing": recompute,
            "ppo_value_on_reward_trunk": shared_value}


def bench_rm(work: Path, n_train: int, n_val: int, steps: int, lora: int = 0) -> dict:
    from minichat.data.chat import read_jsonl
    from minichat.train import reward

    rows = [obj for _, obj in read_jsonl(HH)]
    import random

    random.Random(0).shuffle(rows)
    (work / "hh_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (work / "hh_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-n_val:]))
    cfg = reward.preset_smollm2_hh()
    cfg.data.train, cfg.data.val, cfg.data.max_len = str(work / "hh_train.jsonl"), str(work / "hh_val.jsonl"), 192
    t = cfg.train
    t.out_dir, t.max_steps, t.batch_size, t.eval_every, t.save_every, t.progress = str(work / "rm"), steps, 8, 0, 0, False
    t.resume, t.warmup_steps, t.lr, t.min_lr, t.peak_tflops = "never", 5, 3e-4, 3e-5, 1.0
    if lora:  # adapters on every block instead of the last 2 blocks trained whole; SFT's LoRA learning rate
        cfg.train_last_layers, cfg.lora.rank, cfg.lora.alpha = -1, lora, 2.0 * lora
        t.lr, t.min_lr = 5e-4, 5e-5
    t0 = time.perf_counter()
    res = reward.run(cfg)
    return {"rm_val_accuracy": res.get("val_accuracy"), "rm_val_pairs": res.get("val_pairs"), "rm_train": n_train,
            "rm_steps": steps, "rm_batch": 8, "rm_lora": lora, "rm_wall_s": time.perf_counter() - t0, "warnings": res.get("warnings")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["all", "sft", "ppo", "rm"], default="all")
    ap.add_argument("--sft-steps", type=int, default=4)
    ap.add_argument("--ppo-iterations", type=int, default=2)
    ap.add_argument("--ppo-lora", type=int, default=0, help="LoRA rank for PPO's policy and value (0: full)")
    ap.add_argument("--ppo-recompute", action="store_true", help="PPO with activation checkpointing")
    ap.add_argument("--ppo-shared-value", action="store_true", help="PPO's value: a head on the reward trunk")
    ap.add_argument("--rm-train", type=int, default=400)
    ap.add_argument("--rm-val", type=int, default=200)
    ap.add_argument("--rm-steps", type=int, default=40)
    ap.add_argument("--rm-lora", type=int, default=0, help="LoRA rank on every block (0: the last 2 blocks train)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if not HH.is_file():
        raise SystemExit(f"skipped: {HH} is not here (the benchmark reads ../shared)")
    work = Path(a.out or tempfile.mkdtemp(prefix="rlhf_smol_"))
    work.mkdir(parents=True, exist_ok=True)
    res = {"threads": torch.get_num_threads(), "load_avg": os.getloadavg()}
    if a.only in ("all", "sft"):
        res.update(bench_sft(work, a.sft_steps))
    if a.only in ("all", "ppo"):
        res.update(bench_ppo(work, a.ppo_iterations, a.ppo_lora, a.ppo_recompute, a.ppo_shared_value))
    if a.only in ("all", "rm"):
        res.update(bench_rm(work, a.rm_train, a.rm_val, a.rm_steps, a.rm_lora))
    res["load_avg_end"] = os.getloadavg()
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(json.dumps(res, indent=2))
    (work / f"results_{a.only}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
