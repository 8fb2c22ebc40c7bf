"""Old engine vs new, same process, same prompts: tokens per CPU-second of this process (robust to other
processes sharing the cores, unlike wall-clock rates). The old engine is minichat/engine.py at a git
revision (default HEAD), the new one the working tree.

    python bench/engine/ab_engine.py --threads 1 --batch 32 --new 128 --weights fast [--rev HEAD]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))


def load_rev(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:minichat/engine.py"], capture_output=True, text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "engine_old.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("engine_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["engine_old"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--weights", default="fast")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--reps", type=int, default=1)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    torch.set_num_threads(a.threads)
    import minichat.engine as new_mod
    from bench_engine import prompts_for
    from minichat.gguf_import import load

    old_mod = load_rev(a.rev)
    model, tok, _ = load("smollm2", verbose=False)
    engines = {"old": (old_mod, old_mod.Engine(model, tok, weights=a.weights)),
               "new": (new_mod, new_mod.Engine(model, tok, weights=a.weights))}
    ps = prompts_for(tok, a.batch)
    rates = {k: [] for k in engines}
    for mod, e in engines.values():  # warm up
        e.generate(ps[:2], mod.SamplingParams(temperature=0, max_tokens=4, stop_token_ids=[]))
    for _ in range(a.reps):
        for k, (mod, e) in engines.items():
            sp = mod.SamplingParams(temperature=0, max_tokens=a.new, stop_token_ids=[])
            t = time.process_time()
            outs = e.generate(ps, sp)
            rates[k].append(sum(len(o.token_ids) for o in outs) / (time.process_time() - t))
    old, new = max(rates["old"]), max(rates["new"])
    print(f"threads={a.threads} weights={a.weights} batch={a.batch} new={a.new}: old ({a.rev}) {old:.1f}, "
          f"new {new:.1f} tokens per CPU-second ({(new / old - 1) * 100:+.0f}%)")


if __name__ == "__main__":
    main()
