"""Throughput of minichat's CUDA path: training steps (the stage trainer, eager and compiled) and the engine's
batched decoding. Run by bench/gpu/check.sh on a GPU machine; prints one JSON line per measurement.

    python bench/gpu/gpu_bench.py [--quick] [--only decode / dry / train]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

# (name, model overrides): the pipeline's gpu preset, and the shape of SmolLM2-135M (30 layers, width 576)
SHAPES = {
    "gpu-preset-8x512": ["--model.n_layer", "8", "--model.n_head", "8", "--model.n_kv_head", "4",
                         "--model.d_model", "512"],
    "smollm2-shape-30x576": ["--model.n_layer", "30", "--model.n_head", "9", "--model.n_kv_head", "3",
                             "--model.d_model", "576", "--model.d_ff", "1536"],
}


def train_rate(shape: str, compile_: bool, steps: int, batch: int) -> dict:
    """`minichat pretrain` on the built-in corpus; the trainer's own tokens/s and MFU, steps after warm-up."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "minichat.cli", "pretrain", "--preset", "small-bpe", "--runtime.device", "cuda",
               *SHAPES[shape], "--model.max_seq_len", "256", "--train.batch_size", str(batch),
               "--train.max_steps", str(steps), "--train.warmup_steps", "10", "--train.log_every", "10",
               "--train.eval_every", "100000", "--train.save_every", "0", "--sample.num_samples", "0",
               "--train.out_dir", d, "--runtime.compile", "true" if compile_ else "false"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode:
            return {"what": "train", "shape": shape, "compile": compile_, "error": p.stderr[-1500:]}
        rows = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r.get("stage") == "pretrain" and "tokens_per_s" in r]
        late = sorted(r["tokens_per_s"] for r in rows[len(rows) // 2:])  # the second half: past compile/warm-up
        mfu = sorted(r["mfu"] for r in rows[len(rows) // 2:])
        return {"what": "train", "shape": shape, "compile": compile_, "batch": batch, "seq": 256, "steps": steps,
                "tokens_per_s": round(late[len(late) // 2]), "mfu": round(mfu[len(mfu) // 2], 3),
                "final_loss": round(rows[-1]["loss"], 3), "wall_s": round(wall, 1)}


def decode_rate(batches: list[int], new_tokens: int, dry: tuple[float, ...] = (0.0,)) -> list[dict]:
    """The engine on the GPU (bf16 weights), SmolLM2-135M's shape with random weights: batched decoding.
    With several DRY multipliers, their runs alternate so that each pair is measured side by side; those runs
    are greedy, where a random model repeats itself and DRY has penalties to write."""
    from minichat.engine import Engine, SamplingParams
    from minichat.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536, max_seq_len=2048)
    eng = Engine(Transformer(cfg).eval().to("cuda"), max_batch=max(batches), stop_token_ids=[])
    out = []
    g = torch.Generator().manual_seed(1)
    temp = 1.0 if len(dry) == 1 else 0.0
    for B in batches:
        prompts = [torch.randint(0, cfg.vocab_size, (64,), generator=g).tolist() for _ in range(B)]
        eng.generate(prompts, SamplingParams(temperature=1.0, max_tokens=8, seed=0))  # warm-up
        rates: dict[float, list[float]] = {d: [] for d in dry}
        for _ in range(3):
            for d in dry:
                params = SamplingParams(temperature=temp, max_tokens=new_tokens, seed=0, dry_multiplier=d)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = eng.generate(prompts, params)
                torch.cuda.synchronize()
                rates[d].append(sum(len(r.token_ids) for r in res) / (time.perf_counter() - t0))
        for d in dry:
            rs = sorted(rates[d])
            out.append({"what": "decode", "weights": eng.weights, "batch": B, "prompt": 64, "new_tokens": new_tokens,
                        "temperature": temp, "dry_multiplier": d, "tokens_per_s": round(rs[1]),
                        "runs": [round(r) for r in rates[d]]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["decode", "dry", "train"], help="one part: plain decoding, decoding with "
                    "DRY against without (greedy, 128 new tokens), or training")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                      "bf16": torch.cuda.is_bf16_supported()}), flush=True)
    if a.only in (None, "decode"):
        for r in decode_rate([1, 32, 128] if not a.quick else [1, 8], 64 if not a.quick else 8):
            print(json.dumps(r), flush=True)
    if a.only == "dry":
        for r in decode_rate([1, 32] if not a.quick else [1, 8], 128 if not a.quick else 16, dry=(0.0, 0.8)):
            print(json.dumps(r), flush=True)
    if a.only not in (None, "train"):
        return 0
    steps = 60 if a.quick else 200
    for shape, comp in [("gpu-preset-8x512", False), ("gpu-preset-8x512", True), ("smollm2-shape-30x576", False)]:
        print(json.dumps(train_rate(shape, comp, steps, 64)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
