"""`minichat eval`: evaluate models on held-out prompts with held-out simulated labelers.

    minichat eval --run runs/pipeline                # every model of a pipeline run, written to <run>/eval
    minichat eval --tasks eval_tasks.jsonl --sft runs/sft --ppo runs/ppo --reward runs/reward
"""
from __future__ import annotations

from minichat import config as C
from minichat.eval.evaluate import EvalConfig, run


def preset_tiny() -> EvalConfig:
    return EvalConfig(max_new_tokens=16, best_of_n=2, ppl_batches=2, batch_size=8, n_boot=100, progress=False)


PRESETS = {"default": EvalConfig, "tiny": preset_tiny}


def main(argv: list[str]) -> int:
    cfg, _ = C.build(EvalConfig, argv, PRESETS, prog="minichat eval",
                     description="Evaluate models on held-out prompts with held-out simulated labelers "
                                 "(Likert, win rate vs SFT, accuracy per category, refusals, premises, KL, perplexity).")
    run(cfg)
    return 0
