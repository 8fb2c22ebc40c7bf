"""SmolLM2-135M on this machine: minichat's engine side by side with Hugging Face transformers `generate`
on the same weights (the GGUF dequantized to fp32), in one run.

    python bench/engine/bench_engine.py                      # everything (several minutes on 2 cores)
    python bench/engine/bench_engine.py --quick              # no transformers batch 32, shorter quality checks
    python bench/engine/bench_engine.py --no-hf              # only minichat (transformers not installed)

Measures: load time until ready to generate (ours: the converted cache plus the engine build, in a fresh process;
transformers: from the GGUF),
tokens/s at batch 1 (greedy, `--new` tokens, end-of-turn ignored; also decode-only, defined alike for both
sides as (n - 1) / (T(n) - T(1)) with T(k) the time to generate k tokens), aggregate tokens/s at batch 8 and
32, time to first token for a 512-token prompt, greedy agreement of the fast weight modes with fp32, their
perplexity on a fixed text decoded alone and on 32 texts decoded as one batch (the big-batch kernels), and
whether fp32 greedy output is token-identical to transformers.
Writes a markdown table to stdout (and --out FILE).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis simply.",
    "Give me three tips for learning to cook.", "What is 12 times 7?", "Name a famous painter and one painting.",
    "Why is the sky blue?", "Write a short poem about autumn leaves.", "How do I make a cup of tea?",
    "What are the planets of the solar system?", "Tell me a fun fact about octopuses.",
    "Summarize the story of Cinderella in two sentences.", "What does a compiler do?",
    "Suggest a name for a friendly robot.", "How many days are in a leap year?", "What is gravity?",
]

FIXED_TEXT = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after decades of salt and wind. "
    "Every evening the keeper climbed the spiral stairs, one hundred and twelve steps, to light the lamp that "
    "warned ships away from the rocks below. Nobody in the village remembered a time before the light; "
    "children learned to count by its slow flashes, and fishermen set their clocks by the moment it first "
    "turned on. When the harbour authority announced that an automatic beacon would replace the keeper, the "
    "village held a meeting in the school hall. Some argued that machines were cheaper and never slept. Others "
    "said that a person who watched the sea could see what a sensor could not: a small boat without lights, a "
    "swimmer caught by the tide, a storm arriving faster than the forecast had promised. In the end the "
    "council decided to keep both. The beacon would turn itself on at dusk, and the keeper would still climb "
    "the stairs each night, not to light the lamp, but to look."
)


def chat_ids(tok, q):
    return tok.render_chat([{"role": "user", "content": q}])[0]


def prompts_for(tok, n):
    return [chat_ids(tok, QUESTIONS[i % len(QUESTIONS)] + (" Please answer in detail." if i >= len(QUESTIONS) else ""))
            for i in range(n)]


def long_prompt(tok, n=512):
    ids = tok.encode((FIXED_TEXT + " ") * 8)[: n - 8]
    return chat_ids(tok, tok.decode(ids))[:n]


# --------------------------------------------------------------------------------------------- ours

def ours_generate(eng, prompts, new):
    from minichat.engine import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=new, stop_token_ids=[])
    t = time.perf_counter()
    outs = eng.generate(prompts, sp)
    dt = time.perf_counter() - t
    return outs, sum(len(o.token_ids) for o in outs) / dt


def ours_decode_rate(eng, prompt, new):
    """Batch 1: (total tok/s including prefill, decode-only tok/s = (n - 1) / (T(n) - T(1)))."""
    t1 = min(1 / ours_generate(eng, [prompt], 1)[1] for _ in range(2))  # one token: 1 / rate
    _, rate = ours_generate(eng, [prompt], new)
    return rate, (new - 1) / (new / rate - t1)


def ours_ttft(eng, prompt):
    from minichat.engine import SamplingParams

    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        eng.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
        best = min(best, time.perf_counter() - t)
    return best


def ours_load_time(threads):
    """Seconds until the built-in model can generate, in a fresh process: import, load the converted
    checkpoint from the cache, build the engine (default weights) — and, warm, a second load + build."""
    ready = ("from minichat.gguf_import import load;from minichat.engine import Engine;"
             "m,tok,_=load('smollm2',verbose=False);Engine(m,tok)")
    code = ("import time,torch;torch.set_num_threads(%d);%s;t=time.perf_counter();%s;"
            "print(time.perf_counter()-t)" % (threads, ready, ready))
    code_cold = ("import time;t=time.perf_counter();import torch;torch.set_num_threads(%d);%s;"
                 "print(time.perf_counter()-t)" % (threads, ready))
    warm = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    first = float(subprocess.run([sys.executable, "-c", code_cold], capture_output=True, text=True, check=True).stdout)
    return first, warm


def engine_for(model, tok, spec: str, **kw):
    """An engine for MODE[:SMALL_ROWS][@KV], e.g. "fast", "fast:0", "fast@bf16"."""
    from minichat.engine import Engine

    spec, _, kv = spec.partition("@")
    mode, _, rows = spec.partition(":")
    if rows:
        kw["small_rows"] = int(rows)
    return Engine(model, tok, weights=mode, kv_cache=kv or "auto", **kw)


def perplexity(eng, ids):
    lp = eng.score(ids)
    return float(torch.tensor(lp).neg().mean().exp())


def batch_perplexity(eng, seqs):
    lp = eng.score_many(seqs)
    return float(torch.tensor([x for row in lp for x in row]).neg().mean().exp())


def batch_texts(tok, path, n=32, length=96):
    """n windows of `length` tokens: from a text file if given and present (e.g. /work/shared's
    tinyshakespeare), else from the fixed text repeated."""
    text = open(path).read()[:300_000] if path and os.path.exists(path) else (FIXED_TEXT + " ") * 40
    ids = tok.encode(text)
    step = max(1, (len(ids) - length) // n)
    return [ids[i * step: i * step + length] for i in range(n)]


# --------------------------------------------------------------------------------------------- transformers

def hf_load():
    from transformers import AutoModelForCausalLM

    from minichat import gguf_import

    d = str(gguf_import.builtin_gguf_path().parent)
    t = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf_import.BUILTIN_FILE, dtype=torch.float32).eval()
    return m, time.perf_counter() - t


@torch.no_grad()
def hf_generate(m, prompts, new, pad_id, force_length=True):
    """force_length: no early end (min_new_tokens), for timing; off for the identity check, since
    min_new_tokens forbids <|im_end|>, which changes greedy choices (our engine just keeps going)."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    extra = dict(min_new_tokens=new) if force_length else dict(eos_token_id=None)
    out = m.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad_id, **extra)
    dt = time.perf_counter() - t
    gen = out[:, L:]
    return [row.tolist() for row in gen], gen.numel() / dt, dt


def hf_ttft(m, prompt):
    best = 1e9
    for _ in range(3):
        _, _, dt = hf_generate(m, [prompt], 1, 2)
        best = min(best, dt)
    return best


def hf_decode_rate(m, prompt, new):
    """Batch 1, as ours_decode_rate: (tokens, total tok/s, decode-only tok/s)."""
    t1 = hf_ttft(m, prompt)
    toks, rate, dt = hf_generate(m, [prompt], new, 2)
    return toks, rate, (new - 1) / (dt - t1)


# --------------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    ap.add_argument("--modes", default="fp32,auto,fast,fast@bf16",
                    help="engine weight modes to time (MODE@KV: with that KV cache, e.g. fast@bf16)")
    ap.add_argument("--quality-modes", default="bf16,int8,int4,auto,w8a8,fast,fast@bf16,fast:0",
                    help="MODE[:SMALL_ROWS][@KV] (fast:0 = fast's big-batch W8A8 kernels at batch 1; "
                         "fast@bf16 = fast with a bf16 KV cache instead of its int8 one)")
    ap.add_argument("--hf-batches", default="1,8,32")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--batch-text", default="/work/shared/data/tinyshakespeare.txt",
                    help="text for the batch-32 perplexity (falls back to the fixed text if missing)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="runs per rate measurement; the median is reported")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.quick:  # the issue's measure stays: 128 new tokens; only transformers' slow batch 32 is left out
        a.hf_batches = "1,8"
    torch.set_num_threads(a.threads)
    from minichat.engine import Engine
    from minichat.gguf_import import load

    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    load_first, load_warm = ours_load_time(a.threads)
    model, tok, _ = load("smollm2", verbose=False)
    out(f"# Engine benchmark: SmolLM2-135M-Instruct, {a.threads} threads, {a.new} new tokens, greedy")
    out()
    out(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"load average at start {os.getloadavg()[0]:.1f} (other processes share these cores)")
    out()
    hf = None
    if not a.no_hf:
        try:
            hf, hf_load_s = hf_load()
        except ImportError as e:
            out(f"(transformers not available: {e})")
    rows = []
    rows.append(("load until ready to generate (ours: cached checkpoint + engine build; fresh process incl. "
                 "imports / repeat)",
                 f"{load_first:.2f} s / {load_warm:.2f} s", f"{hf_load_s:.1f} s (GGUF)" if hf else "-"))
    p1 = prompts_for(tok, 1)[0]
    engines = {m: engine_for(model, tok, m, max_batch=64) for m in a.modes.split(",")}
    for e in engines.values():  # warm up allocations and kernels
        ours_decode_rate(e, p1, 4)
    hf_b1 = hf_b1_dec = None
    res = {}
    R = max(1, a.repeats)

    def med(xs):  # the median run (rates are noisy on a shared machine)
        return sorted(xs)[len(xs) // 2]

    if hf:
        hf_generate(hf, [p1], 4, 2)
        runs = [hf_decode_rate(hf, p1, a.new) for _ in range(R)]
        res["hf_b1_tokens"] = runs[0][0][0]
        hf_b1, hf_b1_dec = med([r[1] for r in runs]), med([r[2] for r in runs])
    for m, e in engines.items():
        runs = [ours_decode_rate(e, p1, a.new) for _ in range(R)]
        res[f"b1_{m}"] = (med([r[0] for r in runs]), med([r[1] for r in runs]))
    for m, e in engines.items():
        tot, dec = res[f"b1_{m}"]
        speed = f" ({tot / hf_b1:.1f}x)" if hf_b1 else ""
        dspeed = f", {dec / hf_b1_dec:.1f}x" if hf_b1 else ""
        rows.append((f"batch 1 tok/s, weights={m} (decode only)", f"{tot:.1f}{speed} ({dec:.1f}{dspeed})",
                     f"{hf_b1:.1f} ({hf_b1_dec:.1f})" if hf_b1 else "-"))
    # 1 vs 2 threads at batch 1
    for th in sorted({1, a.threads}):
        torch.set_num_threads(th)
        for m, e in engines.items():
            tot, dec = ours_decode_rate(e, p1, a.new)
            out(f"threads={th} weights={m}: batch 1 {tot:.1f} tok/s (decode only {dec:.1f})")
    torch.set_num_threads(a.threads)
    out()
    hf_batches = [int(b) for b in a.hf_batches.split(",") if b]
    for B in (8, 32):
        ps = prompts_for(tok, B)
        for m, e in engines.items():
            ours_generate(e, ps[:B], 2)  # warm-up: grows the KV cache to B slots once
            res[f"b{B}_{m}"] = med([ours_generate(e, ps, a.new)[1] for _ in range(R)])
        hf_rate = None
        if hf and B in hf_batches:
            hf_rate = med([hf_generate(hf, ps, a.new, 2)[1] for _ in range(R if B <= 8 else 1)])
        for m in engines:
            rate = res[f"b{B}_{m}"]
            rel = f" ({rate / hf_b1:.1f}x transformers' batch-1 rate)" if hf_b1 else ""
            rows.append((f"batch {B} aggregate tok/s, weights={m}", f"{rate:.1f}{rel}",
                         f"{hf_rate:.1f}" if hf_rate else "-"))
    lp = long_prompt(tok)
    for m, e in engines.items():
        rows.append((f"time to first token, {len(lp)}-token prompt, weights={m}", f"{ours_ttft(e, lp) * 1000:.0f} ms",
                     f"{hf_ttft(hf, lp) * 1000:.0f} ms" if hf else "-"))
    out("| measure | minichat | transformers |")
    out("|---|---|---|")
    for r in rows:
        out(f"| {r[0]} | {r[1]} | {r[2]} |")
    out()

    # fp32 identity with transformers, agreement and perplexity of the fast modes
    qp = prompts_for(tok, 8)
    n_q = min(a.new, 32 if a.quick else 64)
    ref_eng = engines.get("fp32") or Engine(model, tok, weights="fp32")
    ref = [o.token_ids for o in (ref_eng.generate([p], __import__("minichat.engine", fromlist=["x"]).SamplingParams(
        temperature=0, max_tokens=n_q, stop_token_ids=[]))[0] for p in qp)]
    if hf:
        same = sum(hf_generate(hf, [p], n_q, 2, force_length=False)[0][0] == r for p, r in zip(qp, ref))
        out(f"fp32 greedy vs transformers greedy, batch 1, {len(qp)} prompts x {n_q} tokens: {same}/{len(qp)} identical")
    fixed = tok.encode(FIXED_TEXT)
    btexts = batch_texts(tok, a.batch_text)
    out()
    out(f"| weights | greedy outputs identical to fp32 ({len(qp)} prompts x {n_q} tokens) | mean identical prefix | "
        f"perplexity on a fixed {len(fixed)}-token text (decode path) | perplexity, {len(btexts)} texts x "
        f"{len(btexts[0])} tokens decoded as one batch |")
    out("|---|---|---|---|---|")
    ref_ppl, ref_bppl = perplexity(ref_eng, fixed), batch_perplexity(ref_eng, btexts)
    out(f"| fp32 | - | - | {ref_ppl:.3f} | {ref_bppl:.3f} |")
    from minichat.engine import SamplingParams

    for spec in a.quality_modes.split(","):
        e = engines.get(spec) or engine_for(model, tok, spec)
        m = spec
        got = [e.generate([p], SamplingParams(temperature=0, max_tokens=n_q, stop_token_ids=[]))[0].token_ids for p in qp]
        same = sum(g == r for g, r in zip(got, ref))
        prefix = sum(next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), len(r)) for g, r in zip(got, ref)) / len(qp)
        ppl, bppl = perplexity(e, fixed), batch_perplexity(e, btexts)
        out(f"| {m} | {same}/{len(qp)} | {prefix:.1f} / {n_q} | {ppl:.3f} ({(ppl / ref_ppl - 1) * 100:+.1f}%) | "
            f"{bppl:.3f} ({(bppl / ref_bppl - 1) * 100:+.1f}%) |")
    out()
    out(f"load average at end {os.getloadavg()[0]:.1f}")
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
