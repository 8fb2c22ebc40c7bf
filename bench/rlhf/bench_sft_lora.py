"""SFT of the built-in SmolLM2-135M: full fine-tuning against LoRA, padded rows against packed ones.

    python bench/rlhf/bench_sft_lora.py [--steps 12] [--repeats 2] [--threads 2]

Each setting runs in its own process (so peak memory is its own): the chosen answers of Anthropic HH
harmless (../shared) as demonstrations, rows of at most 256 tokens, batch 8, no warmup. Reported: median
seconds per step (the first step, with its one-off costs, left out), conversation tokens per second (pad
tokens not counted), the process's peak resident memory, and the held-out loss after the steps.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HH = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "preferences" / "hh_harmless_dev.jsonl.gz"
SETTINGS = {  # name: (lora rank, pack, learning rate): `minichat sft`'s default and its `--preset lora`
    "full, padded": (0, False, 3e-5),
    "full, packed": (0, True, 3e-5),
    "LoRA 16, padded": (16, False, 5e-4),
    "LoRA 16, packed": (16, True, 5e-4),
}
MORE = {  # run by --only: the learning rates tried for the preset, and recomputed activations
    "LoRA 16, packed, lr 2e-4": (16, True, 2e-4),
    "LoRA 16, packed, lr 1e-3": (16, True, 1e-3),
    "full, packed, recompute": (0, True, 3e-5),
    "LoRA 16, packed, recompute": (16, True, 5e-4),
}


def write_data(work: Path, n_train: int, n_val: int) -> tuple[Path, Path]:
    from minichat.data.chat import load_comparisons

    rows = [{"messages": c.prompt + [{"role": "assistant", "content": c.answers[0]}]}
            for c in load_comparisons(HH, limit=n_train + n_val)]
    for name, part in (("train", rows[:n_train]), ("val", rows[n_train:])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return work / "train.jsonl", work / "val.jsonl"


def one(args: argparse.Namespace) -> None:
    """Child process: one setting, one result line as JSON on stdout's last line."""
    import torch

    from minichat.train import sft

    torch.set_num_threads(args.threads)
    rank, pack, lr = {**SETTINGS, **MORE}[args.setting]
    cfg = sft.SFTConfig(init_from="smollm2")
    cfg.data.train, cfg.data.val, cfg.data.pack, cfg.data.max_len = args.train, args.val, pack, 256
    if rank:
        cfg.lora.rank, cfg.lora.alpha = rank, 2.0 * rank
    t = cfg.train
    t.out_dir, t.max_steps, t.batch_size, t.warmup_steps, t.lr, t.min_lr = args.out, args.steps, 8, 0, lr, lr / 10
    t.eval_every, t.eval_batches, t.save_every, t.progress, t.log_every = 0, 100, 0, False, 1
    t.resume, t.peak_tflops = "never", 1.0
    t.activation_checkpointing = args.setting.endswith("recompute")
    cfg.runtime.threads = args.threads
    res = sft.run(cfg)
    rows = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in rows if "time_s" in r]
    steps = [b - a for a, b in zip(times, times[1:])]  # log_every 1: one step between lines
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    print(json.dumps({"s_per_step": statistics.median(steps), "tokens_per_s": statistics.median(tps),
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "val_loss": res.get("val_loss")}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-rows", type=int, default=800)
    ap.add_argument("--val-rows", type=int, default=100)
    ap.add_argument("--only", default="", help="setting names separated by semicolons (default: all)")
    ap.add_argument("--before", default="", help="a checkout of an earlier minichat (e.g. a git worktree): its full "
                    "fine-tuning settings run too, interleaved, for a side-by-side ratio")
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    ap.add_argument("--train", help=argparse.SUPPRESS)
    ap.add_argument("--val", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.setting:
        return one(a)
    if not HH.is_file():
        raise SystemExit(f"skipped: {HH} is not here (the benchmark reads ../shared)")
    work = Path(tempfile.mkdtemp(prefix="sft_lora_"))  # removed at the end
    train, val = write_data(work, a.train_rows, a.val_rows)
    names = [n.strip() for n in a.only.split(";") if n.strip()] or list(SETTINGS)
    runs = [(n, "") for n in names]
    if a.before:
        runs = [(f"before: {n}", a.before) for n in names if not {**SETTINGS, **MORE}[n][0]] + runs
    results: dict[str, list[dict]] = {label: [] for label, _ in runs}
    for rep in range(a.repeats):  # settings interleaved, so a slow spell of the machine hits all of them
        for label, path in runs:
            name = label.removeprefix("before: ")
            out = work / f"{label.replace(', ', '_').replace(' ', '').replace(':', '')}_{rep}"
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
            if path:
                env["PYTHONPATH"] = str(Path(path).resolve())
            cmd = [sys.executable, __file__, "--setting", name, "--train", str(train), "--val", str(val),
                   "--out", str(out), "--steps", str(a.steps), "--threads", str(a.threads)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode:
                raise SystemExit(f"{label} failed:\n{p.stderr[-3000:]}")
            results[label].append(json.loads(p.stdout.strip().splitlines()[-1]))
            shutil.rmtree(out, ignore_errors=True)  # SmolLM2 checkpoints with optimizer state: GBs per run
            print(label, results[label][-1], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{a.steps} steps of batch 8 (rows of <= 256 tokens), {a.threads} threads, medians of {a.repeats} runs; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| setting | s / step | conversation tokens / s | peak memory (GiB) | held-out loss after the steps |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"| {name} | {med['s_per_step']:.2f} | {med['tokens_per_s']:,.0f} | {med['peak_rss_gib']:.2f} | "
              f"{med['val_loss']:.3f} |")


if __name__ == "__main__":
    main()
