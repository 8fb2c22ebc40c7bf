"""Best-of-N: sample N answers and keep the reward model's favourite (the RM as a selector instead of PPO).

    python -m minichat.bestofn --model runs/sft --reward runs/reward -n 8 --prompt "Write a haiku about tea"

`best_of_n` is what chat and eval call; its cost is N rollouts plus N reward-model passes per prompt, with no
training at all, which is the comparison InstructGPT-style reports make against PPO.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from minichat.errors import MinichatError


@dataclass
class Choice:
    text: str  # the best answer (without its end-of-turn token)
    token_ids: list[int]
    score: float
    scores: list[float]  # every candidate's reward, in sampling order
    candidates: list[str]


@torch.no_grad()
def best_of_n(policy, reward_model, tokenizer, conversations: list[list[dict]], n: int = 4,
              max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
              unfinished_penalty: float = 0.0) -> list[Choice]:
    """For each conversation (messages ending with a user turn), the highest-reward of n sampled answers."""
    from minichat.heads import score_sequences
    from minichat.rollout import sample

    if n < 1:
        raise MinichatError("n must be >= 1")
    prompts = [tokenizer.render_chat(c, add_generation_prompt=True)[0] for c in conversations]
    room = policy.cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise MinichatError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context")
    prompts = [p[-room:] for p in prompts]
    comps = sample(policy, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, seed=seed)
    im_end = tokenizer.im_end_id
    # score each answer as the reward model was trained: ending with <|im_end|>
    seqs = [prompts[c.prompt_index] + c.content_ids + [im_end] for c in comps]
    device = next(reward_model.parameters()).device
    scores = score_sequences(reward_model, [s[-reward_model.cfg.max_seq_len:] for s in seqs], tokenizer.pad_id,
                             device=device)
    scores = scores + torch.tensor([0.0 if c.finish_reason == "stop" else unfinished_penalty for c in comps])
    out = []
    for i in range(len(prompts)):
        group = comps[i * n:(i + 1) * n]
        s = scores[i * n:(i + 1) * n]
        j = int(s.argmax())
        texts = [tokenizer.decode(c.content_ids, skip_special=True) for c in group]
        out.append(Choice(texts[j], group[j].content_ids, float(s[j]), s.tolist(), texts))
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="minichat bestofn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="policy: checkpoint, run folder, .gguf or smollm2")
    ap.add_argument("--reward", required=True, help="reward model checkpoint (minichat reward)")
    ap.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    ap.add_argument("--prompts", help="a prompt file (JSONL or .txt)")
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="print every candidate with its score")
    a = ap.parse_args(argv)
    from minichat.data.chat import load_prompts
    from minichat.gguf_import import load
    from minichat.heads import load_scalar_model

    if not a.prompt and not a.prompts:
        raise MinichatError("give --prompt TEXT or --prompts FILE")
    policy, tok, _ = load(a.model, verbose=False)
    convs = [[{"role": "user", "content": p}] for p in a.prompt] + (
        load_prompts(a.prompts, tok.meta.default_system) if a.prompts else [])
    rm, rtok, _ = load_scalar_model(a.reward, allow_lm=False)
    if rtok.vocab_size != tok.vocab_size:
        raise MinichatError("the policy and the reward model use different tokenizers")
    for conv, ch in zip(convs, best_of_n(policy, rm, tok, convs, a.n, a.max_new_tokens, a.temperature, seed=a.seed)):
        print(f"> {conv[-1]['content']}")
        if a.all:
            for s, t in sorted(zip(ch.scores, ch.candidates), reverse=True):
                print(f"  [{s:+.3f}] {t}")
        print(f"[best of {a.n}, reward {ch.score:+.3f}] {ch.text}\n")
    return 0


if __name__ == "__main__":
    import sys

    from minichat.errors import MinichatError as _E

    try:
        sys.exit(main(sys.argv[1:]))
    except _E as e:
        print(f"minichat bestofn: error: {e}", file=sys.stderr)
        sys.exit(2)
