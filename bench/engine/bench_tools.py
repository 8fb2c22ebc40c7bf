"""Tool calls by the built-in model: does it pick the right tool, and are the calls valid?

    python bench/engine/bench_tools.py [--threads 2] [--weights fast]

The server's path without HTTP: minichat.toolcall renders the tools into the system message and builds the
grammar; the engine samples greedily, with the server's DRY (--dry 0.8). Each of PROMPTS names the tool a person would expect. For tool_choice
"required" and "auto": replies that are calls, calls of the expected tool, calls whose arguments follow the
tool's schema (jsonschema), and the mean time per reply.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

S = {"type": "string"}
N = {"type": "number"}


def fn(name, description, **props):
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}}}


TOOLS = [
    fn("get_weather", "Get the current weather in a city", city=S, unit={"enum": ["celsius", "fahrenheit"]}),
    fn("add", "Add two numbers", a=N, b=N),
    fn("send_email", "Send an email to someone", to=S, subject=S, body=S),
    fn("search_web", "Search the web for a query", query=S),
    fn("set_timer", "Set a timer for a number of minutes", minutes=N),
]
PROMPTS = [
    ("What's the weather like in Paris?", "get_weather"),
    ("Is it cold in Oslo today, in fahrenheit?", "get_weather"),
    ("What is 12 plus 30?", "add"),
    ("Add 2.5 and 4 for me.", "add"),
    ("Email Anna that the meeting moved to 3pm.", "send_email"),
    ("Send a message to bob@example.com saying thanks for the book.", "send_email"),
    ("Look up who won the 2018 World Cup.", "search_web"),
    ("Find recipes for banana bread online.", "search_web"),
    ("Set a timer for 10 minutes.", "set_timer"),
    ("Remind me in 25 minutes to take the pasta off.", "set_timer"),
    ("What's the temperature in Tokyo right now?", "get_weather"),
    ("How much is 7 plus 8?", "add"),
]


def main() -> None:
    import jsonschema

    from minichat.constrain import TokenVocab
    from minichat.engine import Engine, SamplingParams
    from minichat import toolcall as tools

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="fast")
    ap.add_argument("--dry", type=float, default=0.8, help="DRY multiplier (the server's default for chat)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    eng = Engine.from_pretrained("smollm2", weights=a.weights)
    tok = eng.tokenizer
    vocab = TokenVocab(tok)
    functions = tools.check_tools(TOOLS, "auto")
    schemas = {f["name"]: f["parameters"] for f in functions}
    print(f"SmolLM2-135M-Instruct, weights {a.weights}, {a.threads} threads, greedy, DRY {a.dry}; {len(PROMPTS)} prompts, "
          f"{len(TOOLS)} tools")
    print("| tool_choice | replies that are calls | the expected tool (first call) | its arguments follow the schema "
          "| calls | s / reply |")
    print("|---|---|---|---|---|---|")
    examples = {}
    for choice in ("required", "auto"):
        g = tools.grammar(vocab, functions, choice)
        calls = right = valid = n_calls = 0
        t0 = time.perf_counter()
        for prompt, expected in PROMPTS:
            msgs = tools.prompt_messages([{"role": "user", "content": prompt}], functions, choice,
                                         tok.meta.default_system)
            ids, _ = tok.render_chat(msgs)
            r = eng.submit(ids, SamplingParams(max_tokens=160, temperature=0.0, grammar=g, dry_multiplier=a.dry))
            while eng.has_unfinished():
                eng.step()
            c = r.completion()
            text = tok.decode(c.content_ids)
            # as the server does: a reply cut by max_tokens keeps its complete calls
            parsed = tools.parse_calls(text, functions, cut=c.finish_reason == "length")
            call = parsed[0] if parsed else None
            n_calls += len(parsed or [])
            examples.setdefault(choice, []).append((prompt, [p["function"] for p in parsed] if parsed else text[:80]))
            if call is None:
                continue
            calls += 1
            f = call["function"]
            right += f["name"] == expected
            try:
                jsonschema.validate(json.loads(f["arguments"]), schemas[f["name"]])
                valid += 1
            except jsonschema.ValidationError:
                pass
        n = len(PROMPTS)
        print(f"| {choice} | {calls}/{n} | {right}/{n} | {valid}/{n} | {n_calls} | "
              f"{(time.perf_counter() - t0) / n:.2f} |")
    for choice, rows in examples.items():
        print(f"\n{choice}:")
        for prompt, out in rows:
            print(f"  {prompt} -> {out}")


if __name__ == "__main__":
    main()
