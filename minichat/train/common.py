"""Pieces the fine-tuning stages (sft, reward, ppo, dpo) share: loading the starting model and data splits."""
from __future__ import annotations

from pathlib import Path

import torch

from minichat.errors import MinichatError


def load_lm(path: str, device: torch.device):
    """(Transformer in train mode, tokenizer, config) from a checkpoint, a run folder, a .gguf or "smollm2"."""
    from minichat.gguf_import import load

    if not path:
        raise MinichatError("set --init_from: a checkpoint or run folder (e.g. runs/sft), a .gguf file, or smollm2")
    model, tok, cfg = load(path, device=device, verbose=False)
    if tok.im_start_id is None or tok.im_end_id is None:
        raise MinichatError(f"{path}: its tokenizer has no chat tokens (<|im_start|>, <|im_end|>); "
                            "pretrain with a BPE tokenizer (it adds them) or start from smollm2")
    model.train()
    return model, tok, cfg


def context_len(model_max: int, wanted: int) -> int:
    return min(model_max, wanted) if wanted > 0 else model_max


def require_file(path: str, what: str) -> Path:
    if not path:
        raise MinichatError(f"set {what}")
    p = Path(path)
    if not p.is_file():
        raise MinichatError(f"{what}: {p} does not exist")
    return p


def freeze_lm(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy's parameters need no gradients (and no optimizer state): reference and reward models."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def collate_answers(seqs: list[tuple[list[int], list[int]]], pad_id: int):
    """(prompt, answer) id lists -> right-padded (x, y, answer mask) for scoring answers under an LM:
    x = ids[:-1], y = ids[1:], mask 1 where y is an answer token."""
    L = max(len(p) + len(a) for p, a in seqs) - 1
    x = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    m = torch.zeros((len(seqs), L))
    for i, (p, a) in enumerate(seqs):
        ids = p + a
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(ids[1:])
        m[i, len(p) - 1:n] = 1.0
    return x, y, m


def sequence_logprobs(model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t mask_t log π(y_t | x_≤t) per row: (B,). The head runs only where mask_t ≠ 0 (the answers)."""
    import torch.nn.functional as F

    sel = mask != 0
    lp = -F.cross_entropy(model(x, select=sel).float(), y[sel], reduction="none")  # (N,)
    out = torch.zeros(x.shape[0], dtype=lp.dtype, device=lp.device)
    return out.index_add(0, sel.nonzero()[:, 0], lp * mask[sel].to(lp.dtype))


class PtxStream:
    """Random windows of pretraining text for a pretraining-loss mix (PPO-ptx, and SFT's guard against
    forgetting); each batch is seeded by its key (iteration, step, ...), so resuming is exact."""

    def __init__(self, source: str, tok, seq_len: int, seed: int):
        from minichat.data.corpus import iter_documents

        ids: list[int] = []
        for doc in iter_documents(source, "text", seed):
            ids += tok.encode(doc) + ([tok.eos_id] if tok.eos_id is not None else [])
            if len(ids) > 2_000_000:
                break
        if len(ids) < seq_len + 2:
            raise MinichatError(f"ptx_data {source}: too little text ({len(ids)} tokens) for rows of {seq_len}")
        self.data, self.seq_len, self.seed = torch.tensor(ids), seq_len, seed

    def batch(self, key: list[int], n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(hash((self.seed, *key)) % 2**62)
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (n,), generator=g)
        rows = torch.stack([self.data[s:s + self.seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1].to(device), rows[:, 1:].to(device)
