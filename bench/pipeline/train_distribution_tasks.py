"""Write fresh prompts of the TRAINING distribution (train templates and entities, a seed no stage uses), with
ground truth, so `minichat eval --tasks` can separate "RLHF helped" from "it generalised to held-out templates".

    python bench/pipeline/train_distribution_tasks.py /tmp/train_tasks.jsonl
    minichat eval --run runs/pipeline --tasks /tmp/train_tasks.jsonl --out_dir /tmp/eval_train
"""
import sys

from minichat.data.chat import write_jsonl
from minichat.data.world import CATEGORIES, World

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "train_tasks.jsonl"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 330
    write_jsonl(out, [t.to_row() for t in World(0).tasks("train", n, seed=13, categories=CATEGORIES)])
    print(f"wrote {n} training-distribution tasks to {out}")
