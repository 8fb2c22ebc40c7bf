"""`minichat perplexity`: how well a model predicts a text corpus, as llama.cpp's llama-perplexity does.

    minichat perplexity --data my_texts.txt                       # the built-in model
    minichat perplexity --model runs/pipeline/ppo --data notes/ --context 256 --stride 128

Each document (a .txt file, a JSONL line's text field, a folder of them, or `builtin`) is scored on its own,
after the tokenizer's end-of-text token, so that every one of its tokens is predicted. A document longer than
the context is read in windows of `context` tokens that advance by `stride`; each token is scored once, with
at least context − stride tokens before it (HF's sliding-window perplexity). `--weights MODE` scores through
the engine's decoding path instead, token by token, with the numbers sampling sees (e.g. int8 or int4
weights). Reported: tokens scored, mean
negative log-likelihood per token, perplexity, and bits per byte (the NLL per UTF-8 byte in bits, which
compares models whose tokenizers differ). Windows of similar length are batched.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass

import torch

from minichat.errors import MinichatError


@dataclass
class Window:
    ids: list[int]  # the window's tokens
    scored_from: int  # targets at positions >= this (of ids[1:]) count; earlier ones are context only


def windows(ids: list[int], context: int, stride: int) -> list[Window]:
    """Sliding windows over one document's ids (its first token is context only), advancing by `stride`: each
    window scores the targets after the previous window's end, so every target is scored once."""
    out: list[Window] = []
    begin, done = 0, 1  # ids[done:] are not scored yet
    while done < len(ids):
        end = min(begin + context, len(ids))
        # the window predicts ids[begin + 1 : end]; target j of it is ids[begin + 1 + j]
        out.append(Window(ids[begin:end], done - begin - 1))
        done = end
        begin += stride
    return out


def _over_windows(docs: list[list[int]], context: int, stride: int, batch: int, step, desc: str | None):
    """Sum step(group) -> (NLL, tokens) over the documents' windows, in batches of similar length."""
    wins = sorted((w for d in docs for w in windows(d, context, stride)), key=lambda w: len(w.ids))
    total, n = 0.0, 0
    if desc is not None:
        from tqdm import tqdm

        bar = tqdm(total=len(wins), desc=desc, file=sys.stderr)
    for s in range(0, len(wins), batch):
        group = wins[s:s + batch]
        nll, k = step(group)
        total, n = total + nll, n + k
        if desc is not None:
            bar.update(len(group))
    if desc is not None:
        bar.close()
    return total, n


@torch.inference_mode()
def score(model, docs: list[list[int]], context: int, stride: int, batch: int = 8, dtype=torch.float32,
          progress: bool = False) -> tuple[float, int]:
    """(total NLL in nats, tokens scored) over the documents' windows, by the model's forward pass."""
    from minichat.runtime import autocast

    dev = next(model.parameters()).device

    def step(group: list[Window]) -> tuple[float, int]:
        T = max(len(w.ids) for w in group)
        x = torch.zeros(len(group), T, dtype=torch.long)
        keep = torch.zeros(len(group), T - 1, dtype=torch.bool)
        for r, w in enumerate(group):
            x[r, :len(w.ids)] = torch.tensor(w.ids)
            keep[r, w.scored_from:len(w.ids) - 1] = True
        select = torch.cat([keep, torch.zeros(len(group), 1, dtype=torch.bool)], 1)  # positions whose next counts
        with autocast(dev, dtype):
            # right padding: no real token attends to a pad; the head runs only where a target is scored
            logits = model(x.to(dev), select=select.to(dev))  # (N, V)
        targets = x[:, 1:][keep].to(dev)  # (N,), in the same row-major order
        return -float(torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).sum()), int(keep.sum())

    return _over_windows(docs, context, stride, batch, step, "windows" if progress else None)


def score_engine(engine, docs: list[list[int]], context: int, stride: int, batch: int = 8,
                 progress: bool = False) -> tuple[float, int]:
    """score() through an Engine's decoding path, token by token: the numbers sampling sees with its weight mode
    (int8, int4, fast ...), slower than the forward pass."""

    def step(group: list[Window]) -> tuple[float, int]:
        kept = [lp for w, lps in zip(group, engine.score_many([w.ids for w in group])) for lp in lps[w.scored_from:]]
        return -sum(kept), len(kept)

    return _over_windows(docs, context, stride, min(batch, engine.max_batch), step,
                         "windows (engine)" if progress else None)


def main(argv: list[str] | None = None) -> int:
    from minichat import gguf_import
    from minichat.data.corpus import iter_documents
    from minichat.runtime import resolve_device, resolve_dtype

    ap = argparse.ArgumentParser(prog="minichat perplexity", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (built in), a .gguf file, or a minichat checkpoint")
    ap.add_argument("--data", required=True, help="a .txt/.txt.gz file, JSONL (one document per line), a folder, "
                                                  "or builtin")
    ap.add_argument("--text_field", default="text", help="the JSONL field that holds a document's text")
    ap.add_argument("--context", type=int, default=0, help="tokens per window (default: the model's context)")
    ap.add_argument("--stride", type=int, default=0, help="tokens a window advances (default: half the context)")
    ap.add_argument("--max_tokens", type=int, default=0, help="stop after this many tokens of documents (0: all)")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=("auto", "fp32", "bf16"),
                    help="matmul precision (auto: bf16 where this device multiplies it clearly faster)")
    ap.add_argument("--weights", default="", help="score through the engine's decoding path with this weight mode "
                                                  "(fast, int8, int4, bf16, fp32, ...), as sampling sees it; token "
                                                  "by token, slower (default: the model's forward pass)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.context < 0 or a.stride < 0 or a.max_tokens < 0 or a.batch < 1:
        raise MinichatError("--context, --stride and --max_tokens must be >= 0, --batch >= 1")
    device = resolve_device(a.device)
    model, tok, _ = gguf_import.load(a.model, device, verbose=not a.json)
    context = a.context or model.cfg.max_seq_len
    if not 2 <= context <= model.cfg.max_seq_len:
        raise MinichatError(f"--context must be in 2..{model.cfg.max_seq_len} (the model's context), got {context}")
    stride = a.stride or max(1, context // 2)
    if stride > context - 1:
        raise MinichatError(f"--stride must be at most context - 1 = {context - 1}, got {stride}")
    start = [tok.eos_id] if tok.eos_id is not None else []
    docs, n_bytes, n_docs, budget = [], 0, 0, a.max_tokens or math.inf
    for text in iter_documents(a.data, a.text_field):
        if not text:
            continue
        ids = tok.encode(text)
        if not ids:
            continue
        if len(ids) > budget:  # the last document is cut at the budget; its bytes are counted as decoded
            ids = ids[:int(budget)]
            text = tok.decode(ids)
        docs.append(start + ids if start else ids)
        n_bytes += len(text.encode("utf-8"))
        n_docs += 1
        budget -= len(ids)
        if budget <= 0:
            break
    if not docs:
        raise MinichatError(f"{a.data} holds no text to score")
    if not start:  # without an end-of-text token a document's first token has nothing to be predicted from
        n_bytes -= sum(len(tok.decode(d[:1]).encode("utf-8")) for d in docs)
    dtype = torch.float32 if a.dtype == "fp32" else (torch.bfloat16 if a.dtype == "bf16" else
                                                     resolve_dtype("auto", device))
    if a.weights:
        from minichat.engine import Engine

        engine = Engine(model, tok, weights=a.weights, max_batch=a.batch)
        if context > engine.max_seq_len - 1:  # the decoding path needs room for one more position
            context = engine.max_seq_len - 1
            stride = min(stride, context - 1)
        t0 = time.perf_counter()
        nll, n = score_engine(engine, docs, context, stride, a.batch, progress=not a.json)
        precision = f"engine weights {engine.weights}"
    else:
        t0 = time.perf_counter()
        nll, n = score(model, docs, context, stride, a.batch, dtype, progress=not a.json)
        precision = str(dtype).removeprefix("torch.")
    secs = time.perf_counter() - t0
    if n == 0:
        raise MinichatError("no token was scored: every document is a single token")
    out = {"model": a.model, "data": a.data, "documents": n_docs, "tokens": n, "bytes": n_bytes,
           "context": context, "stride": stride, "precision": precision,
           "nll_per_token": nll / n, "perplexity": math.exp(nll / n),
           "bits_per_byte": nll / math.log(2) / max(1, n_bytes), "seconds": round(secs, 2),
           "tokens_per_s": round(n / secs, 1) if secs > 0 else None}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{out['documents']} documents, {n:,} tokens scored ({n_bytes:,} bytes), context {context}, "
              f"stride {stride}, {precision}: NLL {out['nll_per_token']:.4f} per token, "
              f"perplexity {out['perplexity']:.3f}, {out['bits_per_byte']:.4f} bits per byte "
              f"({out['tokens_per_s']} tokens/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
