"""Scalar models: the Transformer trunk plus one linear head, for the reward model and PPO's value model.

    tokens (B, T) -> Transformer trunk -> hidden (B, T, D) -> head -> (B, T) scores
    reward r(x, y): the score at the last real token of prompt+answer (batches are left-padded, so position −1)
    value V(s_t):   the score at every position (PPO reads the positions of the answer tokens)

ScalarModel is a Transformer with one extra module, so its state dict is the language model's plus
`head.weight`/`head.bias`: the shared training loop saves and resumes it unchanged, `load_model` on a reward
checkpoint yields the bare trunk, and an LM checkpoint initialises a reward model (the head starts at zero).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from minichat.errors import MinichatError
from minichat.model import ModelConfig, Transformer


def read_scalar(head: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """head(h) (..., D) -> (...) in fp32, also under autocast: in bf16 the head's bias rounds to ~0.4% of itself,
    which would undo the reward model's normalising shift and quantise the scores PPO compares."""
    with torch.autocast(h.device.type, enabled=False):
        return torch.nn.functional.linear(h.float(), head.weight.float(), head.bias.float()).squeeze(-1)


class ScalarModel(Transformer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.head = nn.Linear(cfg.d_model, 1)
        nn.init.normal_(self.head.weight, 0.0, 1.0 / (cfg.d_model + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        # the LM head is never evaluated here; an untied one would get no gradient (and trip DDP)
        if not cfg.tie_embeddings:
            self.lm_head.weight.requires_grad_(False)

    def forward(self, idx: torch.Tensor, key_mask: torch.Tensor | None = None, per_token: bool = False,
                answers: torch.Tensor | None = None, answer_lens: torch.Tensor | None = None,
                owner: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of left-padded sequences idx (B, T): (B,) read at the last position, or (B, T) with per_token.

        With `answers` (N, A) right-padded, `answer_lens` (N,) and `owner` (N,) naming each answer's row of idx,
        idx holds prompts: each prompt is encoded once, its keys and values are reused for all of its answers,
        and the (N,) rewards are read at each answer's last token. The same numbers as scoring N full
        sequences, for the cost of B prompts + N answers instead of N prompts + N answers.
        """
        if answers is not None:
            return self._score_answers(idx, key_mask, answers, answer_lens, owner)
        _, h = super().forward(idx, key_mask=key_mask, return_hidden=True, logits="none")
        if not per_token:
            h = h[:, -1]
        return read_scalar(self.head, h)

    def hidden(self, idx: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's final hidden states (B, T, D), e.g. to read rewards and values from one pass."""
        return super().forward(idx, key_mask=key_mask, return_hidden=True, logits="none")[1]

    def _score_answers(self, prompts, prompt_mask, answers, answer_lens, owner) -> torch.Tensor:
        B, P = prompts.shape
        N, A = answers.shape
        if prompt_mask is None:
            prompt_mask = torch.ones(B, P, dtype=torch.bool, device=prompts.device)
        cache = ConcatCache()
        super().forward(prompts, cache=cache, key_mask=prompt_mask, logits="none")
        cache.select(owner)
        # the answers' right padding is masked too, so no position runs past its row's prompt + answer length:
        # the batch is P + A wide, but only each row has to fit max_seq_len
        answer_mask = torch.arange(A, device=answers.device)[None] < answer_lens.to(answers.device)[:, None]
        key_mask = torch.cat([prompt_mask[owner], answer_mask], 1)
        _, h = super().forward(answers, cache=cache, key_mask=key_mask, return_hidden=True, logits="none")
        last = h[torch.arange(N, device=h.device), answer_lens.to(h.device) - 1]  # (N, D)
        return read_scalar(self.head, last)

    def freeze_trunk(self, train_last_layers: int = 0) -> list[nn.Parameter]:
        """Freeze the trunk except its last `train_last_layers` blocks (and final norm); the head always trains.
        Returns the parameters that still train (what the optimizer gets)."""
        for p in super().parameters():
            p.requires_grad_(False)
        keep: list[nn.Module] = [self.head]
        if train_last_layers > 0:
            keep += list(self.layers[-train_last_layers:]) + [self.norm]
        for m in keep:
            for p in m.parameters():
                p.requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]


class ConcatCache:
    """The KV-cache interface Transformer.forward uses, built by concatenation rather than in-place writes,
    so gradients flow through the cached prompt keys and values while training."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def select(self, index: torch.Tensor) -> None:
        self.k = {i: t[index] for i, t in self.k.items()}
        self.v = {i: t[index] for i, t in self.v.items()}


def scalar_from_lm(lm: Transformer) -> ScalarModel:
    """A ScalarModel whose trunk copies `lm` (a reward model initialised from the SFT model)."""
    sm = ScalarModel(lm.cfg)
    missing, unexpected = sm.load_state_dict(lm.state_dict(), strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise MinichatError(f"cannot build a scalar model from this LM: missing {missing}, unexpected {unexpected}")
    return sm.to(next(lm.parameters()).device)


def load_scalar_model(path: str | Path, device: str | torch.device = "cpu", allow_lm: bool = True) -> tuple[ScalarModel, object, dict]:
    """(ScalarModel, tokenizer, config) from a reward checkpoint, or from an LM checkpoint / "smollm2" (new head)."""
    from minichat.checkpoint import load_weights, model_config_from_dict, read_config
    from minichat.gguf_import import resolve_model
    from minichat.tokenizer import load_tokenizer

    p = resolve_model(path, verbose=False)
    cfg = read_config(p)
    has_head = cfg.get("kind") in ("reward", "value")
    if not has_head and not allow_lm:
        raise MinichatError(f"{p} is a {cfg.get('kind', 'lm')!r} checkpoint, not a reward model (train one with `minichat reward`)")
    model = ScalarModel(model_config_from_dict(cfg["model"]))
    load_weights(model, p, strict=has_head)  # an LM checkpoint has no head: it keeps its fresh init
    return model.to(device).eval(), load_tokenizer(p), cfg


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L), key_mask (B, L)) with every sequence ending at the last column."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, L - len(s):] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_sequences(model: ScalarModel, seqs: list[list[int]], pad_id: int, batch_size: int = 32,
                    device=None) -> torch.Tensor:
    """Rewards (N,) of token sequences, batched by similar length so little compute goes to padding."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, km = left_pad([seqs[i] for i in idx], pad_id, device)
        full = bool(km.all())
        out[idx] = model(ids, key_mask=None if full else km).cpu()
    return out
