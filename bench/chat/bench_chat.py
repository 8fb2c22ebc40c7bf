"""Chat replies of the built-in model under sampling settings: runaway loops, replies that never end, and a blind
pairwise judgement.

    python bench/chat/bench_chat.py generate [--prompts bench/chat/prompts_test.jsonl] --out OUT.json \
        before=temperature:0.2,top_p:0.9 after=temperature:0.2,top_p:0.9,dry_multiplier:0.8
    python bench/chat/bench_chat.py pairs OUT.json NEW OLD --out pairs.jsonl --key key.json
    python bench/chat/bench_chat.py score key.json verdicts.tsv [--prompts ...]
    python bench/chat/bench_chat.py flags OUT.json      # replies the moderation output check would refuse
    python bench/chat/bench_chat.py guard chatdev chattest  # the moderation sets, streamed through the guard

`generate` samples one reply per conversation for each setting (one engine, batches of 16, max_tokens 512,
seed 0, one torch thread) and prints the share that ended on their own ("stop"), the share that loop (a word
5-gram sequence in which more than a quarter of the 5-grams occur more than once) and the mean length. `pairs`
writes the differing replies of two settings as A/B pairs in random order, for a judge who sees neither the
settings nor the key; identical replies count as ties. `score` turns the judge's verdicts (`id<TAB>A|B|tie`)
into the new setting's win rate. The prompt sets were written by a helper: `prompts_dev.jsonl` for choosing,
`prompts_test.jsonl` for the figures (bench/results/chat.md).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import random
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def loops(text: str) -> bool:
    w = re.findall(r"\w+", text.lower())
    grams = [tuple(w[i:i + 5]) for i in range(len(w) - 4)]
    if len(grams) < 10:
        return False
    c = collections.Counter(grams)
    return sum(v for v in c.values() if v > 1) / len(grams) > 0.25


def parse_setting(spec: str) -> tuple[str, dict]:
    name, _, kv = spec.partition("=")
    params = {}
    for item in filter(None, kv.split(",")):
        k, v = item.split(":")
        params[k] = int(v) if k in ("seed", "top_k", "dry_allowed_length") else float(v)
    return name, params


def generate(a) -> None:
    import torch

    from minichat.engine import Engine, SamplingParams
    from minichat.gguf_import import load

    torch.set_num_threads(1)
    model, tok, _ = load(a.model, device="cpu", verbose=False)
    eng = Engine(model, tok, weights="auto", max_batch=16)
    convs = [json.loads(l)["messages"] for l in open(a.prompts, encoding="utf-8") if l.strip()]
    prompts = [tok.render_chat(m, add_generation_prompt=True)[0] for m in convs]
    out = {}
    for spec in a.settings:
        name, params = parse_setting(spec)
        t0 = time.time()
        comps = eng.generate(prompts, SamplingParams(**{"max_tokens": 512, "seed": 0, **params}))
        texts = [tok.decode(c.content_ids, skip_special=True) for c in comps]
        stop = sum(c.finish_reason == "stop" for c in comps) / len(comps)
        print(f"{name:14} {params}: stop {stop:.0%}  loops {sum(map(loops, texts)) / len(texts):.0%}  mean tokens "
              f"{sum(len(c.token_ids) for c in comps) / len(comps):.0f}  ({time.time() - t0:.0f} s)", flush=True)
        out[name] = texts
    Path(a.out).write_text(json.dumps(out, indent=1))


def pairs(a) -> None:
    outs = json.loads(Path(a.outputs).read_text())
    convs = [json.loads(l)["messages"] for l in open(a.prompts, encoding="utf-8") if l.strip()]
    rng = random.Random(a.seed)
    rows, key = [], {}
    for i, c in enumerate(convs):
        new, old = outs[a.new][i].strip(), outs[a.old][i].strip()
        if new == old:
            key[str(i)] = "same"
            continue
        flip = rng.random() < 0.5
        key[str(i)] = "B" if flip else "A"  # the letter the new setting's reply has
        rows.append({"id": str(i), "conversation": c, "A": (old if flip else new)[:1800],
                     "B": (new if flip else old)[:1800]})
    rng.shuffle(rows)
    Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    Path(a.key).write_text(json.dumps(key))
    print(f"{len(rows)} pairs, {sum(v == 'same' for v in key.values())} identical replies")


def score(a) -> None:
    key = json.loads(Path(a.key).read_text())
    verdicts = dict(l.rstrip("\n").split("\t") for l in open(a.verdicts, encoding="utf-8") if l.strip())
    kinds = [json.loads(l).get("kind", "") for l in open(a.prompts, encoding="utf-8") if l.strip()]
    res = {k: (0.5 if v == "tie" else float(v == key[k])) for k, v in verdicts.items()}
    same = sum(v == "same" for v in key.values())
    if len(res) + same != len(key):
        raise SystemExit(f"{len(key) - same} pairs but {len(res)} verdicts")
    judged = len(res)
    p = sum(res.values()) / judged
    overall = (sum(res.values()) + 0.5 * same) / len(key)
    wins, losses = sum(v == 1 for v in res.values()), sum(v == 0 for v in res.values())
    print(f"new setting: {wins} wins, {losses} losses, {judged - wins - losses} ties, {same} identical; win rate "
          f"{overall:.1%} (identical = tie); among differing replies {p:.1%} ± {1.96 * math.sqrt(p * (1 - p) / judged):.1%}")
    by = collections.defaultdict(list)
    for k, v in res.items():
        by[kinds[int(k)]].append(v)
    print("  by kind:", ", ".join(f"{k} {sum(v) / len(v):.2f} ({len(v)})" for k, v in sorted(by.items())))


def flags(a) -> None:
    """The moderator's verdict on each setting's replies: the prompts are benign, so every flag is a reply that
    the output check would have replaced with a refusal."""
    from minichat.moderation import Moderator, StreamGuard

    mod = Moderator.load()
    for name, texts in json.loads(Path(a.outputs).read_text()).items():
        res = mod.check_many(texts)
        cats = collections.Counter(c for r in res for c in r.flagged_categories)
        cut = 0
        for t in texts:  # as the chat path streams: the guard re-checks the tail as words arrive
            g = StreamGuard(mod)
            words = re.findall(r"\S+\s*", t)
            cut += any(g.feed(w) is not None for w in words) or g.finish() is not None
        print(f"{name:14} whole reply flagged {sum(r.flagged for r in res)}/{len(texts)}, stopped while streaming "
              f"{cut}/{len(texts)}  {dict(cats)}")


def guard(a) -> None:
    """The moderation bench's hand-written sets streamed word by word through the stream guard: how many harmful
    and benign texts it stops."""
    from minichat.moderation import Moderator, StreamGuard

    mod = Moderator.load()
    for split in a.sets:
        for kind in ("unsafe", "safe"):
            path = HERE.parent / "moderation" / f"fresh_{split}_{kind}.tsv"
            rows = [l.rstrip("\n").split("\t", 1) for l in open(path, encoding="utf-8") if l.strip() and not l.startswith("#")]
            stopped = 0
            for _, t in rows:
                g = StreamGuard(mod)
                stopped += any(g.feed(w) is not None for w in re.findall(r"\S+\s*", t)) or g.finish() is not None
            print(f"{split} {'harmful' if kind == 'unsafe' else 'benign'}: stopped {stopped}/{len(rows)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("settings", nargs="+", help="NAME=param:value,... (SamplingParams fields)")
    g.add_argument("--prompts", default=str(HERE / "prompts_test.jsonl"))
    g.add_argument("--model", default="smollm2")
    g.add_argument("--out", required=True)
    p = sub.add_parser("pairs")
    p.add_argument("outputs")
    p.add_argument("new")
    p.add_argument("old")
    p.add_argument("--prompts", default=str(HERE / "prompts_test.jsonl"))
    p.add_argument("--out", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score")
    s.add_argument("key")
    s.add_argument("verdicts")
    s.add_argument("--prompts", default=str(HERE / "prompts_test.jsonl"))
    f = sub.add_parser("flags")
    f.add_argument("outputs")
    gd = sub.add_parser("guard")
    gd.add_argument("sets", nargs="+", help="names of bench/moderation's sets, e.g. chatdev chattest")
    a = ap.parse_args()
    {"generate": generate, "pairs": pairs, "score": score, "flags": flags, "guard": guard}[a.cmd](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
