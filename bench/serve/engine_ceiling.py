"""The engine alone (no HTTP, no moderation) on the same workload as bench_serve.py: N prompts at once,
64 tokens each, so the server's overhead can be read off against it.

    python bench/serve/engine_ceiling.py [1,8,32] [--threads N]
"""
import argparse
import sys
import time

import torch

from minichat.engine import Engine, SamplingParams
from minichat.gguf_import import load

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_serve import PROMPTS  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("sizes", nargs="?", default="1,8,32")
ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default), as the server's --engine.threads")
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
model, tok, _ = load("smollm2", verbose=False)
from minichat.serve.config import EngineSettings  # noqa: E402

es = EngineSettings()  # the server's defaults (weights, prefix cache)
eng = Engine(model, tok, max_batch=32, weights=es.weights, prefix_cache=es.prefix_cache)
print(f"weights {es.weights}, prefix cache {es.prefix_cache} tokens, {torch.get_num_threads()} threads")
for n in [int(x) for x in a.sizes.split(",")]:
    # tagged like bench_serve's requests, so only the template's start can come from the prefix cache
    prompts = [tok.render_chat([{"role": "user", "content": f"[{n}.{i}.0] {PROMPTS[i % len(PROMPTS)]}"}])[0]
               for i in range(n)]
    p = SamplingParams(max_tokens=64, min_tokens=64, temperature=0.7, seed=0)
    eng.generate(prompts[:1], SamplingParams(max_tokens=4))
    t0, c0 = time.perf_counter(), time.process_time()
    outs = eng.generate(prompts, p)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"engine alone, {n:>2} prompts at once: {sum(len(o.token_ids) for o in outs) / dt:.1f} tok/s  "
          f"(step {1000 * dt / p.max_tokens:.1f} ms, CPU {1000 * cpu / p.max_tokens:.1f} ms)", flush=True)
