"""The engine alone (no HTTP, no moderation) on bench_serve.py's closed loop: N clients, client c starting at step
2c, each sending R requests of 64 tokens one after another, so prompts arrive while others decode, as in the
server. Prints tokens/s, ms per step, and where a step's time goes (the compiled layer pass, the head's matmul,
sampling, the rest: Python).

    python bench/serve/engine_closed_loop.py [--clients 32] [--requests 4] [--threads N]
"""
import argparse
import sys
import time

import torch

from minichat.engine import Engine, SamplingParams
from minichat.gguf_import import load
from minichat.serve.config import EngineSettings

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_serve import PROMPTS  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--clients", type=int, default=32)
ap.add_argument("--requests", type=int, default=4)
ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
model, tok, _ = load("smollm2", verbose=False)
es = EngineSettings()
eng = Engine(model, tok, max_batch=32, weights=es.weights, prefix_cache=es.prefix_cache)
spent = {"layers": 0.0, "head": 0.0, "sample": 0.0}
K = eng.kernels
if K is not None:  # time the compiled calls (the head is the only gemm_s8 called from Python in fast mode)
    def timed(name, f):
        def call(*args, **kw):
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                spent[name] += time.perf_counter() - t
        return call

    K.decode_layers, K.gemm_s8, K.sample = (timed("layers", K.decode_layers), timed("head", K.gemm_s8),
                                            timed("sample", K.sample))


def prompt(c, k):
    return tok.render_chat([{"role": "user", "content": f"[{c}.{k}] {PROMPTS[(c + k) % len(PROMPTS)]}"}])[0]


sp = SamplingParams(max_tokens=64, min_tokens=64, temperature=0.7)
eng.generate([prompt(0, 0)], SamplingParams(max_tokens=4))
spent = dict.fromkeys(spent, 0.0)
N, R = a.clients, a.requests
done = [0] * N
reqs = {}
toks, steps, in_step, t0 = 0, 0, 0.0, time.perf_counter()
while reqs or steps < 2 * N:
    if steps % 2 == 0 and steps // 2 < N:
        c = steps // 2
        reqs[c] = eng.submit(prompt(c, 0), sp, seed=c)
    t = time.perf_counter()
    eng.step()
    in_step += time.perf_counter() - t
    steps += 1
    for c, r in list(reqs.items()):
        if r.finished:
            toks += len(r.output)
            done[c] += 1
            if done[c] < R:
                reqs[c] = eng.submit(prompt(c, done[c]), sp, seed=c * 100 + done[c])
            else:
                del reqs[c]
dt = time.perf_counter() - t0
ms = {k: 1000 * v / steps for k, v in spent.items()}
print(f"{N} clients x {R} requests: {toks / dt:.1f} tok/s, {steps} steps, {1000 * dt / steps:.2f} ms a step; in step() "
      f"{1000 * in_step / steps:.2f}: layers {ms['layers']:.2f}, head {ms['head']:.2f}, sampling {ms['sample']:.2f}, "
      f"rest {1000 * in_step / steps - sum(ms.values()):.2f} ms")
