"""Sampling answers for RLHF (PPO rollouts, best-of-N) through the engine, with per-request seeds."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int = 64,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, logprobs: bool = False):
    """n completions per prompt (prompt 0's n, then prompt 1's, ...), as engine Completions.

    The engine runs in fp32 weights mode, so log-probabilities and tokens come from exactly the model being
    trained; it is rebuilt per call because the policy's weights change between PPO iterations.
    """
    from minichat.engine import Engine, SamplingParams

    was_training = model.training
    model.eval()
    eng = Engine(model, tokenizer, weights="fp32", max_batch=max(1, len(prompts) * n))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            logprobs=logprobs)
    reqs = [eng.submit(p, params, seed=(seed * 1_000_003 + i * n + j) % 2**63, prompt_index=i, index=j)
            for i, p in enumerate(prompts) for j in range(n)]
    while any(not r.finished for r in reqs):
        eng.step()
    model.train(was_training)
    return [r.completion() for r in reqs]
