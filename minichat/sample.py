"""`minichat sample`: draw text from a checkpoint by sampling the next-token distribution."""
from __future__ import annotations

import argparse

import torch


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str = "", max_new_tokens: int = 100, temperature: float = 0.8,
                top_k: int = 50, seed: int = 0, device="cpu") -> str:
    """Plain ancestral sampling with a KV cache (the engine does batching, penalties and streaming)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else [0]
    limit = model.cfg.max_seq_len
    ids = ids[-(limit - 1):]
    cache = model.new_cache(1, limit)
    logits = model(torch.tensor([ids], device=device), cache=cache, logits="last")
    out: list[int] = []
    for _ in range(min(max_new_tokens, limit - len(ids))):
        z = logits[0, -1].float()
        if temperature <= 0:
            nxt = int(z.argmax())
        else:
            z = z / temperature
            if top_k:
                kth = torch.topk(z, min(top_k, z.numel())).values[-1]
                z = z.masked_fill(z < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(z, -1).cpu(), 1, generator=g))
        if nxt in tokenizer.stop_ids and tokenizer.meta.kind == "bpe" and out:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]], device=device), cache=cache, logits="last")
    return prompt + tokenizer.decode(out, skip_special=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="minichat sample", description=__doc__)
    ap.add_argument("--model", required=True, help="checkpoint or run folder, a .gguf, a Hugging Face folder, or smollm2")
    ap.add_argument("--prompt", default="")
    ap.add_argument("-n", "--num-samples", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from minichat.gguf_import import load

    model, tok, _ = load(a.model)
    for i in range(a.num_samples):
        print(sample_text(model, tok, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.seed + i))
        print("---")
    return 0
