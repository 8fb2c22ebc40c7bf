"""The engine alone (no HTTP, no moderation) on the same workload as bench_serve.py: N prompts at once,
64 tokens each, so the server's overhead can be read off against it."""
import sys
import time

from minichat.engine import Engine, SamplingParams
from minichat.gguf_import import load

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_serve import PROMPTS  # noqa: E402

model, tok, _ = load("smollm2", verbose=False)
eng = Engine(model, tok, max_batch=32)
for n in [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "1,8,32").split(",")]:
    prompts = [tok.render_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])[0] for i in range(n)]
    p = SamplingParams(max_tokens=64, min_tokens=64, temperature=0.7, seed=0)
    eng.generate(prompts[:1], SamplingParams(max_tokens=4))
    t0 = time.perf_counter()
    outs = eng.generate(prompts, p)
    dt = time.perf_counter() - t0
    print(f"engine alone, {n:>2} prompts at once: {sum(len(o.token_ids) for o in outs) / dt:.1f} tok/s", flush=True)
