"""The Transformer: a decoder-only language model of the Llama family, in one readable file.

    tokens (B, T) -> embedding (B, T, D) -> n_layer x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))]
                  -> RMSNorm -> lm_head -> logits (B, T, V)

Attention is softmax(Q Kᵀ / √d_k) V over H query heads that share n_kv_head key/value heads (grouped-query
attention), with rotary position embeddings on Q and K. `attention_reference` writes that formula out;
the fast path is torch's scaled_dot_product_attention, and the tests prove the two equal.

RoPE uses the "rotate half" layout (the first and second halves of each head form the pairs), as Hugging
Face Llama does; GGUF checkpoints store Q/K rows interleaved, and the loader un-permutes them.

Incremental decoding: pass a KVCache; each call appends T positions to it. Batches of different lengths are
left-padded and described by `key_mask` (B, S) with True on real tokens; positions then come from the mask.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from minichat.errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: same as n_head (plain multi-head attention)
    d_model: int = 128
    d_ff: int | None = None  # None: SwiGLU's usual 8/3·d_model rounded up to a multiple of 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        return int(math.ceil(8 * self.d_model / 3 / 64) * 64)

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ConfigError(f"model.n_head ({self.n_head}) must divide model.d_model ({self.d_model})")
        if self.head_dim % 2:
            raise ConfigError(f"model.d_model / model.n_head = {self.head_dim} must be even for rotary embeddings")
        if self.n_head % self.kv_heads:
            raise ConfigError(f"model.n_kv_head ({self.kv_heads}) must divide model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise ConfigError("model.rope_theta must be positive")


class KVCache:
    """Keys and values of past positions, preallocated: (n_layer, B, n_kv_head, max_len, head_dim)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far (shared across the batch; padding is masked)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions > {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. drop finished sequences, or repeat a prompt n times)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_len, head_dim/2): angle = position · theta^(-2i/head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (B or 1, 1, T, hd/2). Rotates pairs (x[i], x[i + hd/2])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def attention_reference(q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ / √d_k) V written out. q: (B, H, T, d); k, v: (B, Hkv, S, d); mask: bool (B|1, 1, T, S)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, S, d): each KV head serves `groups` query heads
    v = v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v  # (B, H, T, d)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.hd = layer, cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.use_reference = False  # switched by Transformer.set_attention("reference")

    def forward(self, x, cos, sin, cache: KVCache | None, mask: torch.Tensor | None, causal: bool):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, hd), S = past + T
        if self.use_reference:
            if mask is None and causal:
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)[None, None]
            y = attention_reference(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv != self.n_head,
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)  # (B, T, D)
        return self.wo(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.w_down = nn.Linear(cfg.ff_dim, cfg.d_model, bias=False)

    def forward(self, x):  # (B, T, D) -> (B, T, F) -> (B, T, D)
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache, mask, causal):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, mask, causal))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


_NO_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def no_weight_init():
    """Build modules whose weights are about to be overwritten by loaded ones without filling them with
    random numbers first. Random init of SmolLM2's 135M parameters costs ~0.5 s on the CPU, and building on
    the meta device instead costs ~1 s of first-use imports: together most of a chat's start-up. nn.Linear
    and nn.Embedding skip reset_parameters inside the block, so their weights hold uninitialized memory
    (Transformer skips its own init too: see `init_weights`)."""
    with _NO_INIT_LOCK:
        saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
        try:
            for cls in saved:
                cls.reset_parameters = lambda self: None
            yield
        finally:
            for cls, f in saved.items():
                cls.reset_parameters = f


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, init_weights: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.checkpoint_activations = False  # training: recompute blocks in backward (less memory)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not init_weights:  # weights are loaded next (see no_weight_init)
            return
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/√(2·n_layer)
            if name.endswith("wo.weight") or name.endswith("w_down.weight"):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.cfg.init_std)

    def set_attention(self, impl: str) -> None:
        """'sdpa' (fast, default) or 'reference' (the formula written out)."""
        if impl not in ("sdpa", "reference"):
            raise ValueError(f"unknown attention implementation {impl!r}")
        for blk in self.layers:
            blk.attn.use_reference = impl == "reference"

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        dtype = dtype or self.embed.weight.dtype
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len, self.embed.weight.device, dtype)

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        logits: str = "all",
        select: torch.Tensor | None = None,
    ):
        """idx (B, T) token ids.
        cache: append these T positions to it (incremental decoding).
        positions (B, T): rotary positions; by default past + arange(T), or from key_mask when given.
        key_mask (B, S) bool, S = past + T: False marks padding keys (left-padded batches).
        doc_ids (B, T): packed rows (no cache): a token attends only to earlier tokens of its own document, and
            positions restart at 0 with each document, so a packed row computes what its documents would alone.
        logits: "all" (B, T, V), "last" (B, 1, V) or "none" (skip the head; e.g. reward models).
        select (B, T) bool: the head runs only where True, giving (N, V) logits in row-major order. Training
            needs logits only at trained targets; for SmolLM2 the 49k-word head over every position costs
            about a quarter of an SFT step.
        Returns logits, or (logits, hidden (B, T, D) after the final norm) when return_hidden.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if doc_ids is not None and (cache is not None or key_mask is not None):
            raise ValueError("doc_ids is for packed training rows: not with a cache or a key_mask")
        if positions is None:
            if doc_ids is not None:
                t = torch.arange(T, device=idx.device).expand(B, T)
                new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
                new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
                positions = t - torch.where(new_doc, t, 0).cummax(-1).values  # index within the document
            elif key_mask is not None:
                positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                positions = torch.arange(past, past + T, device=idx.device)[None]
        # A padded batch may be wider than the context while every row's true positions fit (shared-prompt
        # reward batches are longest prompt + longest answer wide), so the RoPE tables bound the positions,
        # not the width; the exact (syncing) check runs only when the width is over.
        if past + T > self.cfg.max_seq_len and (n := int(positions.max()) + 1) > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {n} positions exceeds max_seq_len {self.cfg.max_seq_len}")
        cos = self.rope_cos[positions][:, None]  # (B|1, 1, T, hd/2)
        sin = self.rope_sin[positions][:, None]
        mask, causal = None, True
        if key_mask is not None:
            S = past + T
            causal_mask = torch.ones(T, S, dtype=torch.bool, device=idx.device).tril(past)  # query t sees keys <= past+t
            mask = causal_mask[None, None] & key_mask[:, None, None, :S]  # (B, 1, T, S)
            # a fully padded query row would give NaN in softmax; let it attend to itself harmlessly
            mask = mask | ~mask.any(-1, keepdim=True)
        elif doc_ids is not None:
            causal_mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (causal_mask & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]  # (B, 1, T, T)
        elif past > 0:
            if T == 1:
                causal = False  # one new query attends to every cached key
            else:
                mask = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(past)[None, None]
        x = self.drop(self.embed(idx))  # (B, T, D)
        recompute = self.checkpoint_activations and self.training and cache is None and torch.is_grad_enabled()
        for blk in self.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(blk, x, cos, sin, None, mask, causal, use_reentrant=False)
            else:
                x = blk(x, cos, sin, cache, mask, causal)
        if cache is not None:
            cache.length += T
        h = self.norm(x)  # (B, T, D)
        if select is not None:
            out = self.lm_head(h[select])  # (N, V)
        elif logits == "all":
            out = self.lm_head(h)  # (B, T, V)
        elif logits == "last":
            out = self.lm_head(h[:, -1:])  # (B, 1, V)
        elif logits == "none":
            out = None
        else:
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
        return (out, h) if return_hidden else out

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B): 6N + 12·L·H·d·T for a training step, a third for forward."""
        c = self.cfg
        T = seq_len or c.max_seq_len
        n = self.num_params(non_embedding=True)
        if c.tie_embeddings:
            n += self.embed.weight.numel()  # the tied head still does its matmul
        fwd = 2 * n + 4 * c.n_layer * c.n_head * c.head_dim * T
        return 3 * fwd if training else fwd
