"""RLHF trainers side by side with TRL, in one run, on the same tiny model size and the same token ids.

    python bench/rlhf/bench_vs_trl.py [--trl-python /work/venvs/trl/bin/python] [--pairs 2000] [--out DIR]

Model: 4 layers, 4 heads, width 128, a 4,096-token BPE vocabulary (minichat's Llama-style block vs TRL's
GPT-2), one torch thread on both sides.
  reward: 2,000 synthetic pairs (a prompt of 20-40 words, answers of 6-16 words), batch 16, one epoch.
          minichat: `minichat reward` (shared prompt on, and off); TRL: RewardTrainer on the identical ids.
  ppo:    16 prompts x 48 new tokens per iteration. minichat: `minichat ppo` with its defaults (2 epochs,
          minibatch 8, value model, frozen reference, reward model); TRL: GRPOTrainer, 16 completions of 48
          tokens per step (TRL no longer ships PPO). Reported: mean wall time per iteration after the first.
  sft:    minichat SFT tokens/s on the same model.
TRL runs in a separate bench-only environment (`python -m venv --system-site-packages V; V/bin/pip install
--no-deps trl==1.16.0 datasets` + datasets' light dependencies), so torch is the same build on both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def setup(work: Path, n_pairs: int, seed: int = 0):
    from minichat.checkpoint import save_checkpoint
    from minichat.data.chat import encode_answer_turn
    from minichat.data.world import builtin_corpus
    from minichat.heads import ScalarModel
    from minichat.model import ModelConfig, Transformer
    from minichat.tokenizer import BPETokenizer

    docs = list(builtin_corpus(seed=0, n_docs=3000))
    tok = BPETokenizer.train(docs, 4096)
    tok.save(work / "tok")
    words = sorted({w for d in docs[:500] for w in d.split()})
    rng = random.Random(seed)
    say = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))
    rows, trl_rows = [], []
    for _ in range(n_pairs):
        p, c, r = say(20, 40), say(6, 16), say(6, 16)
        rows.append({"prompt": p, "chosen": c, "rejected": r})
        msgs = [{"role": "user", "content": p}]
        pc, ac = encode_answer_turn(tok, msgs, c)
        pr, ar = encode_answer_turn(tok, msgs, r)
        trl_rows.append({"chosen_ids": pc + ac, "rejected_ids": pr + ar})
    (work / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    (work / "pairs_ids.jsonl").write_text("".join(json.dumps(x) + "\n" for x in trl_rows))
    prompts = [{"prompt": say(10, 20)} for _ in range(64)]
    for pr in prompts:
        pr["prompt_text"] = tok.render_chat_text([{"role": "user", "content": pr["prompt"]}], True)[0]
    (work / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in prompts))
    sft_rows = [{"prompt": say(10, 30), "response": say(20, 60)} for _ in range(400)]
    (work / "sft.jsonl").write_text("".join(json.dumps(x) + "\n" for x in sft_rows))
    mcfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, d_model=128, max_seq_len=256)
    torch.manual_seed(0)
    save_checkpoint(work / "lm", Transformer(mcfg), tok)
    save_checkpoint(work / "rm", ScalarModel(mcfg), tok, extra_config={"kind": "reward"})
    return sum(len(x["chosen_ids"]) + len(x["rejected_ids"]) for x in trl_rows) / n_pairs


def minichat_reward(work: Path, n_pairs: int, batch: int, share_prompt: bool) -> dict:
    from minichat.train import reward

    cfg = reward.RewardConfig(init_from=str(work / "lm"), share_prompt=share_prompt, normalize=False)
    cfg.data.train, cfg.data.val_fraction, cfg.data.max_len = str(work / "pairs.jsonl"), 0.0, 256
    t = cfg.train
    t.out_dir, t.max_steps, t.batch_size, t.lr, t.warmup_steps = str(work / f"rm_{share_prompt}"), n_pairs // batch, batch, 1e-4, 0
    t.eval_every, t.save_every, t.progress, t.log_every, t.resume, t.peak_tflops = 0, 0, False, 1000, "never", 1.0
    res = reward.run(cfg)
    return {"pairs_per_s": (n_pairs // batch) * batch / res["train_time_s"], "time_s": res["train_time_s"]}


def minichat_ppo(work: Path, iterations: int, value_on_reward_trunk: bool = False) -> dict:
    from minichat.train import ppo

    out = work / f"ppo_{value_on_reward_trunk}"
    cfg = ppo.PPOConfig(policy_from=str(work / "lm"), reward_from=str(work / "rm"), prompts=str(work / "prompts.jsonl"),
                        out_dir=str(out), save_every=0, progress=False, resume="never")
    cfg.ppo.iterations, cfg.ppo.rollout_batch, cfg.ppo.max_new_tokens = iterations, 16, 48
    cfg.ppo.value_on_reward_trunk = value_on_reward_trunk
    if out.exists():
        import shutil

        shutil.rmtree(out)
    ppo.run(cfg)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    mean = lambda k: sum(r[k] for r in steady) / len(steady)
    return {"s_per_iter": mean("iteration_s"), "rollout_s": mean("rollout_s"), "score_s": mean("score_s"),
            "train_s": mean("train_s"), "answer_len": mean("answer_len")}


def minichat_sft(work: Path) -> dict:
    from minichat.train import sft

    cfg = sft.SFTConfig(init_from=str(work / "lm"))
    cfg.data.train, cfg.data.val_fraction, cfg.data.pack, cfg.data.max_len = str(work / "sft.jsonl"), 0.0, True, 256
    t = cfg.train
    t.out_dir, t.max_steps, t.batch_size, t.warmup_steps = str(work / "sft"), 30, 16, 0
    t.eval_every, t.save_every, t.progress, t.log_every, t.resume, t.peak_tflops = 0, 0, False, 1000, "never", 1.0
    res = sft.run(cfg)
    return {"tokens_per_s": 30 * 16 * 256 / res["train_time_s"]}


def trl(python: str, *args: str) -> dict:
    r = subprocess.run([python, str(HERE / "trl_side.py"), *args], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    if r.returncode:
        raise SystemExit(f"TRL side failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", "/work/venvs/trl/bin/python"))
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ppo-iterations", type=int, default=4)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--only", choices=["all", "reward", "ppo", "sft"], default="all")
    a = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(a.out or tempfile.mkdtemp(prefix="rlhf_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    avg_tokens = setup(work, a.pairs, 0) if not (work / "rm").is_dir() else 0.0
    res = {"machine": {"cpu": _cpu(), "torch": torch.__version__, "threads": 1, "load_avg": os.getloadavg()},
           "avg_tokens_per_pair_full": avg_tokens}
    if a.only in ("all", "reward"):
        res["minichat_reward_shared"] = minichat_reward(work, a.pairs, a.batch, True)
        res["minichat_reward_full"] = minichat_reward(work, a.pairs, a.batch, False)
        if not a.skip_trl:
            res["trl_reward"] = trl(a.trl_python, "reward", str(work / "pairs_ids.jsonl"), str(work / "tok"), str(a.batch))
    if a.only in ("all", "ppo"):
        res["minichat_ppo"] = minichat_ppo(work, a.ppo_iterations)
        res["minichat_ppo_value_on_reward_trunk"] = minichat_ppo(work, a.ppo_iterations, True)
        if not a.skip_trl:
            res["trl_grpo"] = trl(a.trl_python, "grpo", str(work / "prompts.jsonl"), str(work / "tok"), str(a.ppo_iterations))
    if a.only in ("all", "sft"):
        res["minichat_sft"] = minichat_sft(work)
    res["machine"]["load_avg_end"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    if "trl_reward" in res:
        t = res["trl_reward"]["trl_reward_pairs_per_s"]
        print(f"reward pairs/s: minichat {res['minichat_reward_shared']['pairs_per_s']:.1f} (shared prompt), "
              f"{res['minichat_reward_full']['pairs_per_s']:.1f} (full rows); TRL {t:.1f}; "
              f"ratio {res['minichat_reward_shared']['pairs_per_s'] / t:.2f}x / {res['minichat_reward_full']['pairs_per_s'] / t:.2f}x")
    if "trl_grpo" in res:
        print(f"one iteration: minichat PPO {res['minichat_ppo']['s_per_iter']:.3f} s (separate value model), "
              f"{res['minichat_ppo_value_on_reward_trunk']['s_per_iter']:.3f} s (value head on the reward trunk); "
              f"TRL GRPO {res['trl_grpo']['trl_grpo_s_per_iter']:.3f} s")
    if "minichat_sft" in res:
        print(f"SFT tokens/s: {res['minichat_sft']['tokens_per_s']:,.0f}")
    (work / "results.json").write_text(json.dumps(res, indent=2))


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
