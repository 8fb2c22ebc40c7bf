"""Throughput of minichat's CUDA path: training steps (the stage trainer, eager and compiled) and the engine's
batched decoding. Run by bench/gpu/check.sh on a GPU machine; prints one JSON line per measurement.

    python bench/gpu/gpu_bench.py [--quick] [--only decode / dry / grammar / train] [--tokenizer DIR]

`--only grammar` needs a real vocabulary: a tokenizer folder (SmolLM2's, saved with `tokenizer.save(DIR)`), since
the GGUF with the weights is too large to send to a lent machine; the weights are random.
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


def grammar_rate(tok_dir: str, batches: list[int], new_tokens: int) -> list[dict]:
    """The cost of constrained decoding on the GPU: the same decoding with and without a JSON-schema grammar,
    runs alternating (three pairs, median). The masks are built on the host and copied to the GPU each step; a
    warm-up run first fills the grammar's mask cache, as a server reusing a schema would have it."""
    from minichat.constrain import JSONGrammar, TokenVocab
    from minichat.engine import Engine, SamplingParams
    from minichat.model import ModelConfig, Transformer
    from minichat.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536,
                      max_seq_len=2048)
    eng = Engine(Transformer(cfg).eval().to("cuda"), tok, max_batch=max(batches), stop_token_ids=[])
    s = {"type": "string", "maxLength": 40}
    props = {"name": s, "age": {"type": "integer"}, "tags": {"type": "array", "items": s, "maxItems": 8}}
    schema = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    t0 = time.perf_counter()
    grammar = JSONGrammar(TokenVocab(tok), schema)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    out = []
    for B in batches:
        prompts = [torch.randint(0, cfg.vocab_size, (64,), generator=g).tolist() for _ in range(B)]
        ways = {"none": None, "json_schema": grammar}
        t0 = time.perf_counter()
        eng.generate(prompts, SamplingParams(temperature=1.0, max_tokens=new_tokens, seed=0, grammar=grammar))
        warm_s = time.perf_counter() - t0
        rates: dict[str, list[float]] = {w: [] for w in ways}
        ntok: dict[str, list[int]] = {w: [] for w in ways}
        step_ms: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(3):
            for w, gr in ways.items():
                params = SamplingParams(temperature=1.0, max_tokens=new_tokens, seed=0, grammar=gr)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = eng.generate(prompts, params)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                n = sum(len(r.token_ids) for r in res)
                ntok[w].append(n)
                rates[w].append(n / dt)
                # rows a grammar ends early leave the batch: per step (the longest row's length) is the fair unit
                step_ms[w].append(1e3 * dt / max(len(r.token_ids) for r in res))
        for w in ways:
            rs = sorted(rates[w])
            out.append({"what": "grammar", "way": w, "batch": B, "prompt": 64, "max_tokens": new_tokens,
                        "tokens_per_s": round(rs[1]), "runs": [round(r) for r in rates[w]], "tokens": ntok[w],
                        "ms_per_step": round(sorted(step_ms[w])[1], 2),
                        "step_ms_runs": [round(x, 2) for x in step_ms[w]],
                        "vocab": tok.vocab_size, "first_run_s": round(warm_s, 2), "vocab_build_s": round(build_s, 2)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["decode", "dry", "grammar", "train"], help="one part: plain decoding, "
                    "decoding with DRY against without (greedy, 128 new tokens), with a JSON-schema grammar against "
                    "without (needs --tokenizer), or training")
    ap.add_argument("--tokenizer", help="a tokenizer folder for --only grammar (SmolLM2's vocabulary)")
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
    if a.only == "grammar":
        if not a.tokenizer:
            ap.error("--only grammar needs --tokenizer DIR")
        for r in grammar_rate(a.tokenizer, [1, 16] if not a.quick else [1, 4], 96 if not a.quick else 16):
            print(json.dumps(r), flush=True)
    if a.only not in (None, "train"):
        return 0
    steps = 60 if a.quick else 200
    for shape, comp in [("gpu-preset-8x512", False), ("gpu-preset-8x512", True), ("smollm2-shape-30x576", False)]:
        print(json.dumps(train_rate(shape, comp, steps, 64)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
