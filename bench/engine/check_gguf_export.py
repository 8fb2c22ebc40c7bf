"""`minichat export` checked by its real consumer: llama.cpp (llama-cpp-python) runs the exported GGUF beside
minichat's own model and both answer the same chat prompts.

    pip install llama-cpp-python          # builds llama.cpp from source (about 3 minutes on 2 cores)
    python bench/engine/check_gguf_export.py [--model smollm2] [--dtype f16] [--new 32]

Per prompt: llama.cpp's rendering of the file's chat template equals minichat's, its tokens equal minichat's,
the relative difference of the next-token logits, and whether greedy decoding gives the same reply.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "How do I boil an egg?",
           "Give me three names for a cat.", "What is 17 + 25?", "Summarise: The meeting moved to Friday.",
           "Is the sun a star?", "Translate 'good morning' to Spanish."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--new", type=int, default=32)
    a = ap.parse_args()
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        raise SystemExit("skipped: llama-cpp-python is not installed (pip install llama-cpp-python)")
    from minichat.gguf_export import export_gguf
    from minichat.gguf_import import load

    torch.set_num_threads(2)
    out = Path(tempfile.mkdtemp()) / "export.gguf"
    info = export_gguf(a.model, out, a.dtype)
    model, tok, _ = load(a.model, verbose=False)
    llm = Llama(model_path=str(out), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                              bos_token="<|im_start|>")
    rows = []
    for p in PROMPTS:
        conv = [{"role": "user", "content": p}]
        text = fmt(messages=conv).prompt
        ids = tok.render_chat(conv)[0]
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[len(ids) - 1])
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0, -1].numpy()
        greedy = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if t in tok.stop_ids or len(greedy) == a.new:
                break
            greedy.append(t)
        cur, mine = list(ids), []
        with torch.no_grad():
            for _ in range(a.new):
                t = int(model(torch.tensor([cur]))[0, -1].argmax())
                if t in tok.stop_ids:
                    break
                mine.append(t)
                cur.append(t)
        rows.append((p, text == tok.render_chat_text(conv), llm.tokenize(text.encode(), add_bos=False, special=True) == ids,
                     float(np.linalg.norm(theirs - ours) / np.linalg.norm(ours)), greedy == mine,
                     tok.decode(greedy)))
    print(f"{a.model} exported as {a.dtype}: {info['bytes'] / 2**20:.1f} MiB; greedy up to {a.new} tokens\n")
    print("| prompt | template equal | tokens equal | logits, relative difference | greedy reply equal | llama.cpp's reply |")
    print("|---|---|---|---|---|---|")
    for p, te, ti, rel, g, reply in rows:
        print(f"| {p} | {te} | {ti} | {rel:.4f} | {g} | {reply[:60].replace('|', '/')!r} |")
    print(f"\ngreedy replies equal: {sum(r[4] for r in rows)} of {len(rows)}")


if __name__ == "__main__":
    main()
