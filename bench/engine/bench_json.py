"""JSON output of the built-in model: how often it is valid, and what the grammar costs per token.

    python bench/engine/bench_json.py [--rounds 3] [--threads 2] [--weights fast] [--out bench/results/json.json]
        [--temperature 0.2 --top-p 0.9 --dry 0.8]   (the API's defaults for the built-in model; greedy without)

Each of PROMPTS asks SmolLM2-135M-Instruct for a JSON object, with a schema of the fields it names. Three ways,
greedy, at batch 1, taking turns prompt by prompt:
  text         the prompt alone (response_format text): valid if the whole reply parses, or, leniently, the
               first ```json ... ``` block or {...} span in it
  json_object  the grammar of any JSON object
  json_schema  the grammar of the prompt's schema
Reported per way: replies that parse, that follow the schema (jsonschema), that ended by themselves (not at
max_tokens), and ms per generated token after the first (the prompt's prefill left out; median over prompts
and rounds; the first round of a grammar also finds its masks, later rounds reuse them as a server reusing a
schema would). Then all prompts as one batch per way: ms per decode step while every row is running.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import torch

P = {"type": "string"}
I = {"type": "integer"}
N = {"type": "number"}
B = {"type": "boolean"}


def obj(**props):
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


PROMPTS = [
    ("Give the name, capital and population of France as JSON.", obj(name=P, capital=P, population=I)),
    ("Describe a cat named Tom who is 3 years old and likes fish, as JSON.", obj(name=P, age=I, likes=P)),
    ("Return a JSON object with three colours in a list called colours.",
     obj(colours={"type": "array", "items": P, "maxItems": 5})),
    ("Write a JSON object for a book: title, author, year and whether it is fiction.",
     obj(title=P, author=P, year=I, fiction=B)),
    ("As JSON: is water wet? Give the answer and a short reason.", obj(answer=B, reason=P)),
    ("Give me a JSON object with a person's first name, last name and email.", obj(first_name=P, last_name=P, email=P)),
    ("Output JSON with the keys city and temperature for a sunny day in Rome.", obj(city=P, temperature=N)),
    ("Make a JSON shopping list with items and their quantities.",
     obj(items={"type": "array", "items": obj(item=P, quantity=I), "maxItems": 6})),
    ("Rate the movie Titanic from 1 to 10 and say why, in JSON.", obj(movie=P, rating=I, why=P)),
    ("Give a JSON object describing a car: brand, model, year, electric or not.",
     obj(brand=P, model=P, year=I, electric=B)),
    ("Classify the sentiment of 'I love this phone' as positive, negative or neutral. Answer in JSON.",
     obj(sentiment={"enum": ["positive", "negative", "neutral"]})),
    ("Extract the name and age from: 'Maria is 34 and lives in Lisbon.' Reply with JSON.",
     obj(name=P, age=I, city=P)),
    ("Create a JSON object for a recipe with a name and a list of ingredients.",
     obj(name=P, ingredients={"type": "array", "items": P, "maxItems": 8})),
    ("Return JSON with the largest planet and its number of moons.", obj(planet=P, moons=I)),
    ("Give a JSON object with a greeting in English and in Spanish.", obj(english=P, spanish=P)),
    ("Convert this to JSON: name Bob, job teacher, hobbies chess and running.",
     obj(name=P, job=P, hobbies={"type": "array", "items": P, "maxItems": 4})),
]


def lenient(text: str):
    m = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    for cand in ([m.group(1)] if m else []) + [text[text.find("{"):text.rfind("}") + 1]]:
        try:
            return json.loads(cand)
        except ValueError:
            continue
    return None


def main() -> None:
    import jsonschema

    from minichat.constrain import JSONGrammar, TokenVocab
    from minichat.engine import Engine, SamplingParams

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="fast")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--out")
    # the API's defaults for the built-in model are --temperature 0.2 --top-p 0.9 --dry 0.8 (sampled, seed 0)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--dry", type=float, default=0.0, help="dry_multiplier")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    eng = Engine.from_pretrained("smollm2", weights=a.weights)
    tok = eng.tokenizer
    t0 = time.perf_counter()
    vocab = TokenVocab(tok)
    vocab_s = time.perf_counter() - t0
    free = JSONGrammar(vocab)
    schemas = [JSONGrammar(vocab, s) for _, s in PROMPTS]
    ways = ["text", "json_object", "json_schema"]
    stats = {w: {"parsed": 0, "lenient": 0, "schema_ok": 0, "ended": 0, "ms_per_token": [], "first_round_ms": []}
             for w in ways}
    samples = {}
    for rnd in range(a.rounds):
        for k, (prompt, schema) in enumerate(PROMPTS):
            ids, _ = tok.render_chat([{"role": "user", "content": prompt}])
            for w in ways:
                g = {"text": None, "json_object": free, "json_schema": schemas[k]}[w]
                r = eng.submit(ids, SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                                                   dry_multiplier=a.dry, seed=0, grammar=g))
                eng.step()  # the prompt and the first token
                t = time.perf_counter()
                while eng.has_unfinished():
                    eng.step()
                dt = time.perf_counter() - t
                c = r.completion()
                ms = 1000 * dt / max(1, len(c.token_ids) - 1)
                s = stats[w]
                (s["first_round_ms"] if rnd == 0 else s["ms_per_token"]).append(ms)
                if rnd:
                    continue
                text = tok.decode(c.content_ids)
                samples.setdefault(w, []).append(text)
                try:
                    value = json.loads(text)
                    s["parsed"] += 1
                except ValueError:
                    value = lenient(text)
                if value is not None:
                    s["lenient"] += 1
                    try:
                        jsonschema.validate(value, schema)
                        s["schema_ok"] += 1
                    except jsonschema.ValidationError:
                        pass
                s["ended"] += c.finish_reason == "stop"
    n = len(PROMPTS)
    how = "greedy" if a.temperature == 0 else f"T {a.temperature}, top_p {a.top_p}, seed 0"
    print(f"SmolLM2-135M-Instruct, weights {a.weights}, {a.threads} threads, {how}, DRY {a.dry}, "
          f"max_tokens {a.max_tokens}; "
          f"{n} prompts; token texts indexed in {vocab_s:.2f} s")
    print("| way | parses | parses leniently | follows the schema | ended by itself | ms / token, first round | "
          "ms / token, later rounds |")
    print("|---|---|---|---|---|---|---|")
    for w in ways:
        s = stats[w]
        later = f"{statistics.median(s['ms_per_token']):.2f}" if s["ms_per_token"] else "—"
        print(f"| {w} | {s['parsed']}/{n} | {s['lenient']}/{n} | {s['schema_ok']}/{n} | {s['ended']}/{n} | "
              f"{statistics.median(s['first_round_ms']):.2f} | {later} |")
    # all prompts as one batch, as a server holding 16 such requests runs them: the time of a decode step while
    # all 16 rows are running (batches end at different lengths, so whole-batch tokens/s would compare tails)
    print(f"\n| way, {len(PROMPTS)} prompts batched | ms per step with all rows running (median) | steps measured |")
    print("|---|---|---|")
    for w in ways:
        times = []
        for rnd in range(a.rounds):
            for k, (prompt, _) in enumerate(PROMPTS):
                ids, _ = tok.render_chat([{"role": "user", "content": prompt}])
                g = {"text": None, "json_object": free, "json_schema": schemas[k]}[w]
                eng.submit(ids, SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                                               dry_multiplier=a.dry, seed=0, grammar=g))
            eng.step()  # prefill
            while eng.has_unfinished():
                full = eng.num_running == len(PROMPTS)
                t = time.perf_counter()
                eng.step()
                if full and rnd:
                    times.append(time.perf_counter() - t)
        print(f"| {w} | {1000 * statistics.median(times):.2f} | {len(times)} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"stats": stats, "samples": samples, "prompts": [p for p, _ in PROMPTS]}, f, indent=1)


if __name__ == "__main__":
    main()
