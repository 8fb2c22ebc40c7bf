"""Pretraining throughput and quality on nanoGPT's shakespeare-char CPU configuration.

Part 1 (side by side, same process): median step time of minichat's model and of a nanoGPT-shaped GPT-2
baseline on identical batches (4 layers, 4 heads, width 128, block 64, batch 12), per thread count, precision
and compile setting; full training steps (forward, backward, clipping, AdamW).
Part 2: `minichat pretrain --preset shakespeare-char` end to end: validation loss and wall time, for the full
2,000 iterations and for a run that must finish inside nanoGPT's wall-clock budget (~68 s measured here).

    python bench/pretrain/shakespeare_char.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DATA = (HERE / "../../../shared/data/tinyshakespeare.txt").resolve()


def step_times(model, steps, threads, dtype, compile_=False, seed=0):
    from minichat.runtime import autocast
    from minichat.train.loop import TrainConfig, make_optimizer

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 65, (steps + 10, 12, 65), generator=g)
    opt = make_optimizer(model, TrainConfig(lr=1e-3), torch.device("cpu"))
    fm = torch.compile(model) if compile_ else model
    times = []
    for i in range(steps + 10):
        x, y = text[i, :, :-1], text[i, :, 1:]
        t = time.perf_counter()
        with autocast(torch.device("cpu"), dtype):
            loss = F.cross_entropy(fm(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times[10:]  # the first steps warm up allocators (and compile)


def part1(steps, repeats):
    from gpt2_baseline import GPT2

    from minichat.model import ModelConfig, Transformer

    rows = []
    configs = [(1, torch.float32, False), (1, torch.bfloat16, False), (2, torch.float32, False), (2, torch.bfloat16, False),
               (1, torch.float32, True), (2, torch.float32, True)]
    for threads, dtype, comp in configs:
        for name, make in (("nanoGPT-shaped GPT-2", lambda: GPT2()),
                           ("minichat", lambda: Transformer(ModelConfig(vocab_size=65, n_layer=4, n_head=4, d_model=128, max_seq_len=64)))):
            meds = []
            for r in range(1 if comp else repeats):  # compiling takes ~20 s a run: once is enough
                torch.manual_seed(r)
                ts = step_times(make(), steps, threads, dtype, comp, seed=r)
                meds.append(statistics.median(ts))
            ms = statistics.median(meds) * 1000
            rows.append({"model": name, "threads": threads, "dtype": str(dtype).replace("torch.", ""),
                         "compile": comp, "ms_per_step": round(ms, 2), "tokens_per_s": round(12 * 64 / ms * 1000),
                         "runs": [round(m * 1000, 2) for m in meds]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def part2(extra_args, label):
    out = HERE / "../out" / label
    cmd = [sys.executable, "-m", "minichat.cli", "pretrain", "--preset", "shakespeare-char", "--data.corpus", str(DATA),
           "--train.out_dir", str(out), "--train.resume", "never", "--train.progress", "false",
           "--sample.num_samples", "0", *extra_args]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(r.stderr)
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    vals = [x for x in rows if "val_loss" in x]
    steps = [x for x in rows if "tokens_per_s" in x]
    res = {"run": label, "args": " ".join(extra_args), "wall_s": round(wall, 1), "final_step": vals[-1]["step"],
           "val_loss": round(vals[-1]["val_loss"], 4),
           "median_tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in steps)),
           "median_mfu": round(statistics.median(x["mfu"] for x in steps), 3)}
    print(json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    ap.add_argument("--part", choices=["1", "2", "all"], default="all")
    a = ap.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"skipped: {DATA} not found (the benchmark reads ../shared/data/tinyshakespeare.txt)")
    results = {"machine": {"threads_available": torch.get_num_threads(), "torch": torch.__version__}}
    if a.part in ("1", "all"):
        results["side_by_side"] = part1(steps=40 if a.quick else 100, repeats=1 if a.quick else 3)
    if a.part in ("2", "all"):
        results["full"] = part2(["--runtime.threads", "2"], "full-2000")
        results["full_compiled"] = part2(["--runtime.threads", "2", "--runtime.compile", "true"], "full-2000-compiled")
        # inside nanoGPT's wall-clock budget (~68 s here, start-up and compilation included)
        results["budget"] = part2(["--runtime.threads", "2", "--runtime.compile", "true",
                                   "--train.max_steps", "1200", "--train.decay_steps", "1200",
                                   "--train.eval_every", "600"], "budget-1200-compiled")
    (HERE / "../out").mkdir(exist_ok=True)
    (HERE / "../out/shakespeare_char.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
