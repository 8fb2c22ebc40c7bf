"""LoRA (Hu et al. 2021): fine-tune a frozen model through low-rank updates of its linear layers.

    W x  ->  W x + (α / r) · B (A x),   A (r, in) random, B (out, r) zeros, W frozen

Only A and B train, so the optimizer keeps state for a few hundred thousand numbers instead of every weight,
and the backward pass skips the frozen weights' gradients (for SmolLM2 the biggest is the tied 49k-word head).
At the start B = 0, so the model computes exactly what it did before.

PPO: the reference model is the policy with its adapters switched off (`adapters_disabled`), so the frozen
weights are held once; the engine samples from `merged_weight()`, W + α/r · B A computed when it is built.

Checkpoints: a stage's resumable checkpoints keep W, A, B and the scale apart (`<name>.lora_A`, `.lora_B`,
`.lora_scale`), so a resume continues exactly; its final checkpoint is merged (W + α/r · B A) into an ordinary
model that the engine, chat and server read as any other. `load_weights` merges unmerged checkpoints too.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minichat.errors import ConfigError

TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclass
class LoRAConfig:
    rank: int = 0  # 0: off (every weight trains); e.g. 8 or 16
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only
    targets: str = ",".join(TARGETS)  # which linear layers of each block get an adapter

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError("lora.rank must be >= 0 (0 turns LoRA off)")
        if self.rank and self.alpha <= 0:
            raise ConfigError("lora.alpha must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("lora.dropout must be in [0, 1)")
        bad = [t for t in self.target_list() if t not in TARGETS]
        if bad or (self.rank and not self.target_list()):
            raise ConfigError(f"lora.targets: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(TARGETS)}")


class LoRALinear(nn.Linear):
    """An nn.Linear whose weight is frozen, plus a trainable low-rank update. Same `weight` key as before."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # (out, r): the update starts at 0
        bound = 1.0 / math.sqrt(base.in_features)  # nn.Linear's own init (kaiming uniform, a = √5), as LoRA's code
        with torch.no_grad():
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
        self.register_buffer("lora_scale", torch.tensor(alpha / rank, dtype=torch.float32))
        self.drop = nn.Dropout(dropout)
        self.adapter_enabled = True  # False: exactly the frozen layer (PPO's reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return y
        return y + F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.lora_scale.to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + α/r · B A as a new tensor (out, in); the frozen W alone while the adapter is switched off."""
        if not self.adapter_enabled:
            return self.weight.detach()
        return self.weight + self.lora_scale.to(self.weight.dtype) * (self.lora_B @ self.lora_A)

    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.merged_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def add_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> int:
    """Freeze every parameter of `model` and wrap its target linear layers; returns the trainable count.
    The adapters' random init comes from `seed` alone, whatever drew from torch's global generator before."""
    if not cfg.rank:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(cfg.target_list())
    gen = torch.Generator().manual_seed(seed)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout, gen))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ConfigError(f"lora.targets {cfg.targets!r} matched no linear layer of the model")
    return n


def effective_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight a linear layer applies: merged with its adapter for a LoRALinear (what the engine reads)."""
    return linear.merged_weight() if isinstance(linear, LoRALinear) else linear.weight


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block `model` computes exactly its frozen base (every adapter off); restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.adapter_enabled for m in layers]
    for m in layers:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, on in zip(layers, before):
            m.adapter_enabled = on


def lora_flops(model, seq_len: int, trained_share: float) -> float:
    """Training FLOPs per token with frozen weights: the forward, the input gradients through every layer
    (about one more forward) and weight gradients only for the trained share."""
    return model.flops_per_token(seq_len, training=False) * (2 + trained_share)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by an ordinary nn.Linear holding W + α/r · B A (in place; returns the model)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model


def merge_lora_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved state dict with adapters -> the same with each adapter folded into its weight."""
    out = {k: v for k, v in tensors.items() if not k.rsplit(".", 1)[-1].startswith("lora_")}
    for key in tensors:
        if key.endswith(".lora_A"):
            prefix = key[: -len(".lora_A")]
            A, B = tensors[key].float(), tensors[prefix + ".lora_B"].float()
            w = tensors[prefix + ".weight"]
            out[prefix + ".weight"] = (w.float() + tensors[prefix + ".lora_scale"].float() * (B @ A)).to(w.dtype)
    return out


def has_lora(tensors) -> bool:
    return any(k.endswith(".lora_A") for k in tensors)
