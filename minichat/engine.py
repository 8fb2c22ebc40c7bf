"""The inference engine: token ids in, token ids out.

    engine = Engine(model, tokenizer)                      # or Engine.from_pretrained("smollm2")
    outs = engine.generate([ids_a, ids_b], SamplingParams(temperature=0.7, max_tokens=64), n=4)
    for ev in engine.stream(ids, params): ...              # one TokenEvent per new token
    req = engine.submit(ids, params); engine.step(); engine.cancel(req)   # what a server drives

How it works. Every running sequence owns a *slot* (a row) of one preallocated KV cache
(n_layer, slots, n_kv_head, capacity, head_dim); a sequence's keys sit at columns [0, its length).
The requests admitted in one step are prefilled together straight into free slots: their prompts packed
into one (total tokens, D) matrix, so each linear is one big matmul, with attention per prompt (an
identical prompt submitted n times is prefilled once and its keys copied); they join the running batch
at the next decode step: continuous batching. A decode step feeds one token per running row; rows of
different lengths attend through a (B, 1, 1, S) mask and take their rotary positions from their own
lengths. A finished row is replaced by the last running row, so the running rows are always slots [0, B)
and every step works on plain views.

The engine runs its own forward pass over the model's weights, repacked for inference: Q/K/V and gate/up
projections fused into one matmul each, and per matrix two kernels: one for matmuls of at most `small_rows`
rows (decoding at small batch reads every weight once per token, so fewer bytes per weight win: int4/int8
weight-only) and one for bigger matmuls (prefill, big batches: arithmetic-bound: fp32, or W8A8 int8 in
weights="fast": int8 activations per row, with SmoothQuant factors calibrated at load). weights="fp32"
computes what `Transformer.forward` computes (tests prove it); the faster modes trade a little accuracy
(bench/results/engine.md; docs/parts/engine.md has the table of modes). With the int8/int4 modes a decode
step runs "fused": the element-wise chains between matmuls (RMSNorm + quantize, RoPE + KV-cache write,
SwiGLU, residual add) are one call each into minichat/kernels.c, compiled on first use; without a C
compiler the same math runs as torch ops. The cache holds fp32, or in fast mode bf16, or int8 with one scale
per position and head where every decode path attends in those kernels (`kv_cache`; at batch 32 attention
waits on reading the cache).

Log-probabilities are those of the model itself (log-softmax of the raw logits, before temperature,
penalties, top-k/top-p), i.e. log π(token | context), which is what ranking and PPO need.
"""
from __future__ import annotations

import itertools
import math
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from minichat import runtime
from minichat.errors import MinichatError
from minichat.kernels import KV_SCALE_BYTES, kv_head_dim  # an int8 cache row: head_dim values, then their scale

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"
WEIGHT_MODES = ("auto", "fast", "fp32", "bf16", "int8", "int4", "w8a8")
KV_CACHE_MODES = ("auto", "int8", "bf16", "fp32")  # auto: int8 in fast mode with the kernels, else bf16 / fp32


def _kv_quant(x: torch.Tensor) -> torch.Tensor:
    """Keys or values (..., hd) -> int8 cache rows (..., hd + 4): symmetric int8 with one scale per row, the
    scale max|x| / 127 rounded to bf16 (so that last-bit differences in x rarely reach the bytes) and stored as
    float32 after the values; the bytes kernels.c's kv_store_s8 writes."""
    x = x.float()
    scale = (x.abs().amax(-1, keepdim=True) / 127.0).to(torch.bfloat16).float()
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(x * inv).clamp(-127, 127).to(torch.int8)
    return torch.cat([q, scale.contiguous().view(torch.int8)], -1)


def _kv_dequant(c: torch.Tensor) -> torch.Tensor:
    """int8 cache rows (..., hd + 4) -> float32 (..., hd)."""
    hd = kv_head_dim(c)
    return c[..., :hd].float() * c[..., hd:].contiguous().view(torch.float32)


class ContextOverflowError(MinichatError):
    """The prompt leaves no room in the model's context window for even one new token."""


# ------------------------------------------------------------------------------------------ public types

@dataclass
class SamplingParams:
    """How to pick each next token. temperature 0 means greedy (argmax)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # drop tokens with probability < min_p · p(top token); 0: off
    seed: int | None = None  # per-request RNG; sample j of n uses seed + j
    presence_penalty: float = 0.0  # OpenAI: logit -= presence·[token already generated]
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency·count(token in the output)
    repetition_penalty: float = 1.0  # CTRL/HF: logits of prompt and output tokens divided (>0) or multiplied (<0)
    # DRY ("don't repeat yourself", as in llama.cpp and text-generation-webui): a token that would extend a
    # sequence already in the output loses multiplier·base^(length − allowed_length) from its logit
    # (dry_penalty()); single repeated words and short phrases go free, loops do not. 0 = off
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    stop_token_ids: list[int] | None = None  # None: the engine's end-of-turn tokens; [] never stops on a token
    stop_sequences: list[list[int]] = field(default_factory=list)  # token-id sequences that end the output
    min_tokens: int = 0  # stop tokens are forbidden before this many tokens
    logprobs: bool = False  # report log π(token) of each sampled token
    top_logprobs: int = 0  # and the k most likely alternatives at each step
    logit_bias: dict[int, float] | None = None  # OpenAI: added to a token's logit before sampling, in [-100, 100]
    # a grammar the output must follow (minichat.constrain.JSONGrammar): each request gets its own parser state,
    # tokens it rejects are masked, and the end-of-turn tokens only once the output is complete
    grammar: Any = None

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise MinichatError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise MinichatError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MinichatError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise MinichatError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise MinichatError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise MinichatError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (-2.0 <= v <= 2.0):
                raise MinichatError(f"{name} must be in [-2, 2], got {v}")
        if not (0.0 <= self.dry_multiplier <= 10.0) or not (1.0 < self.dry_base <= 4.0) or self.dry_allowed_length < 1:
            raise MinichatError("dry_multiplier must be in [0, 10] (0 = off), dry_base in (1, 4] and dry_allowed_length "
                                f">= 1, got {self.dry_multiplier}, {self.dry_base}, {self.dry_allowed_length}")
        if self.top_logprobs < 0 or self.top_logprobs > 20:
            raise MinichatError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.min_tokens < 0:
            raise MinichatError("min_tokens must be >= 0")
        if any(len(s) == 0 for s in self.stop_sequences):
            raise MinichatError("stop_sequences must not contain an empty sequence")
        if self.logit_bias and not all(-100.0 <= float(v) <= 100.0 for v in self.logit_bias.values()):
            raise MinichatError("logit_bias values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def _penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0


@dataclass
class TokenEvent:
    """One new token of one request, as returned by step() and stream()."""

    request: "Request"
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" once finished


@dataclass
class Completion:
    """A finished sequence. token_ids include the stop token or stop sequence that ended it (if any);
    `content_ids` leaves them out (what a chat shows)."""

    prompt_index: int
    index: int  # which of the n samples of its prompt
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    stop_reason: int | list[int] | None = None  # the stop token id or stop sequence that matched
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def content_ids(self) -> list[int]:
        if isinstance(self.stop_reason, int):
            return self.token_ids[:-1]
        if isinstance(self.stop_reason, list):
            return self.token_ids[: len(self.token_ids) - len(self.stop_reason)]
        return list(self.token_ids)


class Request:
    """A handle on one submitted sequence; its fields fill in as step() runs."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, stop_ids: list[int], seed: int | None,
                 prompt_index: int = 0, index: int = 0):
        self.id = next(Request._ids)
        self.prompt = prompt
        self.params = params
        self.stop_ids = set(stop_ids)
        self.prompt_index, self.index = prompt_index, index
        self.output: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs else None
        self.top_logprobs: list[list[tuple[int, float]]] | None = [] if params.top_logprobs else None
        self.finish_reason: str | None = None
        self.stop_reason: int | list[int] | None = None
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)
        self.row: int | None = None  # slot while running
        self._cancel = False
        self.constraint = params.grammar.start() if params.grammar is not None else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:  # tokens in the KV cache once running: prompt + output fed back
        return len(self.prompt) + len(self.output)

    def completion(self) -> Completion:
        return Completion(self.prompt_index, self.index, list(self.output), self.finish_reason or "",
                          len(self.prompt), self.stop_reason,
                          list(self.logprobs) if self.logprobs is not None else None,
                          list(self.top_logprobs) if self.top_logprobs is not None else None)

    def __repr__(self) -> str:
        return f"Request(id={self.id}, prompt={len(self.prompt)} tokens, output={len(self.output)}, finish={self.finish_reason})"


# ------------------------------------------------------------------------------------------ packed weights

PREFILL_CHUNK = 2048  # most prompt tokens packed into one prefill pass (activations: ~40 kB per token)
PREFIX_BLOCK = 8  # prompt prefixes are cached in blocks of this many tokens (SmolLM2's chat template shares 24)
# fast mode prefills a prompt's new tokens through the fused decode path up to this many (beyond, the ops path's
# SDPA wins: the decode attention kernel re-reads the prompt's keys per query row; TTFT at 1,024 / 2,048 tokens
# 1.0 / 3.5 s against 0.70 / 1.8 s, at 512 340 vs 317 ms, at ~21 new tokens 14 vs 24 ms)
FUSED_PREFILL_MAX = 256


class PrefixCache:
    """Keys and values of prompt prefixes, so that a prompt starting like an earlier one is only prefilled
    from where they differ: a chat's system prompt and template, and in a multi-turn chat the whole history
    that every turn sends again. Blocks of PREFIX_BLOCK tokens are keyed by a hash chain over all tokens up to
    the block's end (a block is reused only after the very same prefix) and evicted least recently used
    beyond `capacity` tokens. A block's keys and values depend only on its prefix, so reusing them gives the
    same result as computing them again (int8 matmuls are exact integer sums; float ones agree to rounding)."""

    def __init__(self, capacity: int):
        from collections import OrderedDict

        self.max_blocks = capacity // PREFIX_BLOCK
        self.blocks: "OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
        self.reused_tokens = 0

    @staticmethod
    def _keys(tokens: Sequence[int], n: int) -> list[bytes]:
        import hashlib

        keys, h = [], b""
        for b in range(n):
            block = tokens[b * PREFIX_BLOCK:(b + 1) * PREFIX_BLOCK]
            h = hashlib.blake2b(h + b"".join(int(t).to_bytes(4, "little") for t in block), digest_size=16).digest()
            keys.append(h)
        return keys

    def keys(self, prompt: Sequence[int]) -> list[bytes]:
        """The keys of the prompt's full blocks (for lookup and insert, computed once)."""
        return self._keys(prompt, len(prompt) // PREFIX_BLOCK)

    def lookup(self, prompt: Sequence[int], keys: list[bytes] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cached blocks that start `prompt`, leaving at least its last token to compute (its logits)."""
        found = []
        keys = self.keys(prompt) if keys is None else keys
        for key in keys[:(len(prompt) - 1) // PREFIX_BLOCK]:
            kv = self.blocks.get(key)
            if kv is None:
                break
            self.blocks.move_to_end(key)
            found.append(kv)
        self.reused_tokens += len(found) * PREFIX_BLOCK
        return found

    def insert(self, prompt: Sequence[int], k: torch.Tensor, v: torch.Tensor, keys: list[bytes] | None = None) -> None:
        """Store the full blocks of `prompt` from one cache row: k, v (n_layer, n_kv, >= len(prompt), hd)."""
        for b, key in enumerate(self.keys(prompt) if keys is None else keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            sl = slice(b * PREFIX_BLOCK, (b + 1) * PREFIX_BLOCK)
            self.blocks[key] = (k[:, :, sl].clone(), v[:, :, sl].clone())
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)
GROUP = 32  # int4 group size along the input dimension (llama.cpp's Q4_1 block size)


def _int4_groups(w: torch.Tensor):
    """Asymmetric 4-bit groups of 32 along each row: w ≈ (q - 8)·scale + zero, q in 0..15 (torch's
    int4 layout). Returns (q int32 (N, K), scales_and_zeros bf16 (K/32, N, 2), relative error)."""
    N, K = w.shape
    g = w.view(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    d = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((g - lo) / d).clamp(0, 15)
    sz = torch.cat([d, lo + 8 * d], -1).to(torch.bfloat16)  # (N, K/32, 2)
    back = (q - 8) * sz[..., :1].float() + sz[..., 1:].float()
    err = ((back - g).abs().amax() / g.abs().amax().clamp(min=1e-12)).item()
    return q.view(N, K).to(torch.int32), sz.transpose(0, 1).contiguous(), err


class _F32:
    kind = "fp32"

    def __init__(self, w):
        self.w = w

    def __call__(self, x):
        return F.linear(x, self.w)


class _BF16:
    kind = "bf16"

    def __init__(self, w):
        self.w = w.to(torch.bfloat16)

    def __call__(self, x):
        return F.linear(x.to(torch.bfloat16), self.w).float()


def _int8_rows(w: torch.Tensor, kernels=None):
    """Symmetric int8 per row: (q (N, K), scales (N,)), w ≈ q·scale (the compiled kernel: one pass)."""
    if kernels is not None and w.device.type == "cpu":
        return kernels.int8_rows(w.contiguous())
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale


class _Int8WeightOnly:
    """int8 weights with one scale per output row; activations in bf16 (the kernel's requirement)."""

    kind = "int8"

    def __init__(self, w, kernels=None):
        self.q, scale = _int8_rows(w, kernels)
        self.scale = scale.to(torch.bfloat16)

    def __call__(self, x):
        return self.raw(x.to(torch.bfloat16)).float()

    def raw(self, xb):  # bf16 in, bf16 out: the fused decode path's form
        return torch.ops.aten._weight_int8pack_mm(xb, self.q, self.scale)


class _Int4WeightOnly:
    """4-bit weights in groups of 32 with a scale and a zero each (exactly Q4_1's shape of quantization)."""

    kind = "int4"

    def __init__(self, w, groups=None):
        q, self.sz, _ = groups if groups is not None else _int4_groups(w)
        self.q = torch._convert_weight_to_int4pack_for_cpu(q, 1)

    def __call__(self, x):
        return self.raw(x.to(torch.bfloat16)).float()

    def raw(self, xb):  # bf16 in, bf16 out: the fused decode path's form
        return torch._weight_int4pack_mm_for_cpu(xb, self.q, GROUP, self.sz)


_FBGEMM_RANGE: dict[str, bool] = {}


def _fbgemm_reduce_range() -> bool | None:
    """None where fbgemm's quantized linear is unavailable; else whether activations must use 7 bits: without
    VNNI, fbgemm's u8·s8 products are summed in pairs into saturating int16 (a one-off probe finds out)."""
    if "v" not in _FBGEMM_RANGE:
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            _FBGEMM_RANGE["v"] = None
        else:
            w = torch.ones(8, 64)
            x = torch.ones(2, 64)
            x[0, 0] = -1.0  # puts the zero point mid-range, so most activations quantize to ~255
            y = torch.ops.quantized.linear_dynamic(x, _fbgemm_pack(w), False)
            _FBGEMM_RANGE["v"] = bool((y - x @ w.t()).abs().max() > 1.0)
    return _FBGEMM_RANGE["v"]


def _fbgemm_pack(w: torch.Tensor):
    """int8 weights, one scale per row, packed for fbgemm's dynamic-quantization linear."""
    scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).double()
    with warnings.catch_warnings():  # torch ≥ 2.10 marks quantized tensors deprecated; the kernel is current
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


class _W8A8Fbgemm:
    """int8 weights (per row) times int8 activations in one op per matmul: fbgemm's dynamic linear (VNNI),
    which quantizes its input with one scale per tensor. One scale for a whole batch would let a row with
    big activations blur every other row (+8% perplexity at batch 32, measured), so each row is first
    scaled to max |x| = 1 and the output scaled back: per-row symmetric int8 in three cheap extra ops."""

    kind = "w8a8"

    def __init__(self, w):
        self.packed = _fbgemm_pack(w)
        self.reduce_range = bool(_fbgemm_reduce_range())

    def __call__(self, x):
        if x.shape[0] == 1:  # one row: per tensor is per row
            return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)
        r = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)
        y = torch.ops.quantized.linear_dynamic(x * r.reciprocal(), self.packed, self.reduce_range)
        return y.mul_(r)


DRY_MAX_MATCH = 64  # longer matches are not looked for (the penalty is already prohibitive)
# a token whose text holds one of these ends a match: labels, quotes and markdown repeat them legitimately.
# llama.cpp's defaults also break at a newline; with it, the built-in model looped line by line (a poem of
# "A time to cherish," lines) and a blind judge preferred the replies without it (bench/results/chat.md)
DRY_BREAKERS = ':"*'


def dry_penalty(context, breakers, multiplier: float, base: float, allowed_length: int,
                search_from: int = 0) -> dict[int, float]:
    """DRY's penalty per next token, from the token ids of the context so far (prompt and output).

    For every earlier position (from `search_from` on) where the context's last token occurred, the match
    length L is how many tokens before and including it equal the context's own last L tokens (a breaker token,
    such as a colon or a quote, ends a match). The token that followed there would repeat a sequence of
    L + 1 tokens; if L >= allowed_length it loses multiplier·base^(L − allowed_length), keeping the longest match
    per token.
    `breakers`: a boolean array over the vocabulary.
    """
    import numpy as np

    ctx = np.asarray(context, dtype=np.int64)
    n = len(ctx)
    if n < 2 or breakers[ctx[-1]]:
        return {}
    pos = np.flatnonzero(ctx[search_from:-1] == ctx[-1]) + search_from
    if not len(pos):
        return {}
    length = np.ones(len(pos), dtype=np.int64)
    live = np.ones(len(pos), dtype=bool)
    for k in range(1, min(DRY_MAX_MATCH, n - 1)):
        mine = ctx[n - 1 - k]
        if breakers[mine]:
            break
        j = pos - k
        live &= j >= 0
        live[live] &= ctx[j[live]] == mine
        if not live.any():
            break
        length[live] += 1
    out: dict[int, float] = {}
    for nxt, m in zip(ctx[pos + 1].tolist(), length.tolist()):
        if m >= allowed_length and m > out.get(nxt, 0):
            out[nxt] = m
    return {t: multiplier * base ** (m - allowed_length) for t, m in out.items()}


def _nucleus(probs: torch.Tensor, tp: torch.Tensor, k0: int = 256) -> torch.Tensor:
    """Top-p: each row keeps its most likely tokens while the mass of the strictly more likely ones is below
    tp (B, 1) times the row's total; rows with tp >= 1 keep everything. Sorting 49k probabilities per row cost
    ~2 ms a row (61 ms of a batch-32 step at top_p 0.95, twice the model's own time), and a nucleus nearly
    always lies within the k0 most likely tokens: those come from topk, and only rows whose top k0 hold less
    than tp of the mass are sorted in full. Same result as sorting every row (up to the order of ties)."""
    B, V = probs.shape
    k0 = min(k0, V)
    total = probs.sum(-1, keepdim=True)
    limit = tp * total
    out = torch.zeros_like(probs)
    tv, ti = probs.topk(k0, dim=-1)  # descending
    before = tv.cumsum(-1) - tv  # mass of strictly more likely tokens
    out.scatter_(1, ti, tv.masked_fill(before >= limit, 0.0))
    wide = (tv.sum(-1, keepdim=True) < limit)[:, 0]  # the nucleus reaches beyond the top k0
    if bool(wide.any()):
        w = wide.nonzero()[:, 0]
        sp, si = probs[w].sort(dim=-1, descending=True)
        sp = sp.masked_fill(sp.cumsum(-1) - sp >= limit[w], 0.0)
        out[w] = torch.zeros_like(sp).scatter_(1, si, sp)
    keep_all = (tp >= 1.0)[:, 0]
    if bool(keep_all.any()):
        out[keep_all] = probs[keep_all]
    return out


class _W8A8IntMM:
    """int8 weights (per row) times int8 activations quantized per row with an offset, with int32 accumulation:
    minichat.kernels.gemm_s8 (AVX-512 VNNI, prepacked weights) where the CPU has it, else torch._int_mm
    (oneDNN). From ~5 rows up it beats fbgemm's dynamic linear (12.7 vs 19.5 ms per batch-32 step for
    _int_mm; gemm_s8 ~1.7× faster again); the fused decode path calls `mm`/`scale` directly, with quantization
    and dequantization done by minichat.kernels (without them, the same math as torch ops below)."""

    kind = "w8a8"

    def __init__(self, w, kernels=None, smooth: torch.Tensor | None = None):
        # SmoothQuant: a few input channels carry activations far bigger than the rest, and a per-row int8 scale
        # set by them rounds every other channel coarsely. With per-channel factors c, x·Wᵀ = (x/c)·(W·c)ᵀ:
        # dividing the inputs by c moves part of that range into the weights (measured on SmolLM2: the
        # quantized output error of qkv 3.0% -> 1.2%, gate/up 2.3% -> 1.4%)
        if smooth is not None:
            w = w * smooth[None, :]
        self.inv_c = None if smooth is None else (1.0 / smooth).float().contiguous()  # (K,) multiplies inputs
        q, scale = _int8_rows(w, kernels)
        # the compiled VNNI matmul's prepacked panels where it can take them (then no (K, N) copy is kept)
        self.packed = kernels.pack_s8(q) if kernels is not None and q.device.type == "cpu" else None
        self.qt = None if self.packed is not None else q.t()  # (K, N)
        # activations are quantized per row with an offset, x ≈ s·q + z, so x·Wᵀ ≈ s·(q·Wqᵀ)·scale + z·Σ_k W:
        # the output needs the (dequantized) weight rows' sums too
        self.scale = torch.stack([scale, q.sum(1, dtype=torch.float32) * scale]).contiguous()  # (2, N)
        self.kernels = kernels

    def mm(self, xq: torch.Tensor) -> torch.Tensor:
        """int8 activations (M, K) times the weights: int32 (M, N)."""
        if self.packed is not None:
            return self.kernels.gemm_s8(xq, *self.packed)
        return torch._int_mm(xq, self.qt)

    def __call__(self, x):
        if self.kernels is not None and x.dtype == torch.float32 and x.is_contiguous():
            xq, sz = self.kernels.norm_quant(x, self.inv_c, norm=False)
            return self.kernels.dequant(self.mm(xq), sz, self.scale)
        if self.inv_c is not None:
            x = x * self.inv_c
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        z = (hi + lo) * 0.5
        s = ((hi - lo) / 254).clamp_(min=1e-30)
        xq = torch.round((x - z) / s).to(torch.int8)
        return self.mm(xq.contiguous()).float().mul_(s * self.scale[0]).add_(z * self.scale[1])


class _Int8TwoPass(_W8A8IntMM):
    """int8 weights with one scale per row, times activations carried as two int8 rows: x ≈ (s₁·q₁ + z₁) +
    (s₂·q₂ + z₂), the second row quantizing the first one's residual (an error of ~1/65,000 of the row's range),
    summed in int32 by the VNNI matmul, fp32 out. The head at small batch: SmolLM2's 49,152 × 576 head took
    1.69 ms per token through torch's int8 weight-only kernel on one thread and takes 0.67 ms so, and where that
    kernel rounds the activations and the logits to bf16 (max error 0.16 on SmolLM2's logits) this one is off
    by 0.003 (one-pass W8A8: 0.74). The weights are _W8A8IntMM's, without smoothing."""

    kind = "int8x2"

    @staticmethod
    def fits(w, kernels) -> bool:
        return kernels is not None and kernels.vnni and w.device.type == "cpu" and w.shape[0] % 64 == 0 \
            and w.shape[1] % 4 == 0

    def __call__(self, x):
        K, M = self.kernels, x.shape[0]
        x = x.float().contiguous()
        q1, r1 = K.norm_quant(x, None, norm=False)  # x ≈ s·q + z per row; r = (s, z)
        q2, r2 = K.norm_quant((x - (q1.float() * r1[:, :1] + r1[:, 1:])).contiguous(), None, norm=False)
        out = K.gemm_s8(torch.cat([q1, q2]), *self.packed, torch.cat([r1, r2]), self.scale)
        return out[:M].add_(out[M:])


def _w8a8(w):
    return _W8A8Fbgemm(w) if _fbgemm_reduce_range() is not None else _W8A8IntMM(w)


_KERNELS = {"fp32": _F32, "bf16": _BF16, "int8": _Int8WeightOnly, "int4": _Int4WeightOnly, "w8a8": _w8a8,
            "w8a8-rows": _W8A8IntMM}


class _Linear:
    """y = x Wᵀ with the weight stored for inference in two forms: `small` for matmuls of at most
    `small_rows` rows (decoding at small batch: bound by reading the weights, so fewer bytes per weight
    win) and `big` for larger ones (prefill, big batches: bound by arithmetic)."""

    def __init__(self, w: torch.Tensor, small: str, big: str, device: torch.device, small_rows: int,
                 exact_first: bool = False, kernels=None, smooth: torch.Tensor | None = None, int4_groups=None):
        w = w.detach().to(device=device, dtype=torch.float32).contiguous()
        if small == "int4" and w.shape[1] % GROUP:
            small = "int8"  # int4 groups need whole groups of 32 inputs
        self.big = _KERNELS[big](w, kernels, smooth) if big == "w8a8-rows" else _KERNELS[big](w)
        if small == "int4":
            self.small = _Int4WeightOnly(w, int4_groups)
        elif small == "int8":
            self.small = _Int8WeightOnly(w, kernels)
        elif small == "int8x2":
            self.small = _Int8TwoPass(w, kernels)
        else:
            self.small = self.big if small == big else _KERNELS[small](w)
        # fp32 for the rows of position 0 in prompts: a prompt's first token carries activations ~1000x the
        # others' (an attention sink), which int8 activations cannot represent (+3% perplexity if quantized)
        self.exact = _F32(w) if exact_first and big != "fp32" else None
        self.small_rows = small_rows
        self.kind = self.small.kind

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.small if x.shape[0] <= self.small_rows else self.big)(x)

    def prefill(self, x: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """x: rows of whole prompts; `first` indexes the rows at position 0."""
        if self.exact is not None and first is not None and len(first) == x.shape[0]:
            return self.exact(x)  # only position-0 rows (fast mode's sink pass): exact however many there are
        if x.shape[0] <= self.small_rows:
            return self.small(x)
        y = self.big(x)
        if self.exact is not None and first is not None:
            y[first] = self.exact(x[first])
        return y


def _auto_small(w: torch.Tensor, kernels=None):
    """("int4", its groups) when the matrix already is 4-bit group-quantized (SmolLM2's Q4_1 weights:
    lossless up to bf16 scales), else ("int8", None)."""
    if w.shape[1] % GROUP:
        return "int8", None
    w = w.detach().float().contiguous()
    groups_of = kernels.int4_groups if kernels is not None and w.device.type == "cpu" else _int4_groups
    if groups_of(w[:64])[2] >= 1e-2:  # a matrix of another origin fails on its first rows already
        return "int8", None
    groups = groups_of(w)
    return ("int4", groups) if groups[2] < 1e-2 else ("int8", None)


def _block_weights(blk) -> dict[str, torch.Tensor]:
    """A block's matrices as the engine applies them: q, k, v stacked, gate and up stacked; LoRA adapters
    (PPO trains through them) merged in."""
    from minichat.lora import effective_weight as w

    a, m = blk.attn, blk.mlp
    return {"qkv": torch.cat([w(a.wq), w(a.wk), w(a.wv)]), "wo": w(a.wo),
            "gate_up": torch.cat([w(m.w_gate), w(m.w_up)]), "down": w(m.w_down)}


class _Layer:
    def __init__(self, blk, small, big, device, small_rows, exact_first=False, kernels=None, smooth=None):
        smooth = smooth or {}

        def lin(w, name):
            kind, groups = _auto_small(w, kernels) if small == "auto" else (small, None)
            return _Linear(w, kind, big, device, small_rows, exact_first, kernels, smooth.get(name), groups)

        self.attn_norm = blk.attn_norm.weight.detach().float().to(device)
        self.mlp_norm = blk.mlp_norm.weight.detach().float().to(device)
        w = _block_weights(blk)
        self.qkv = lin(w["qkv"], "qkv")
        self.wo = lin(w["wo"], "wo")
        self.gate_up = lin(w["gate_up"], "gate_up")
        self.down = lin(w["down"], "down")
        # the norm weights the fused big-batch path applies before quantizing: smoothing folded in
        self.attn_norm_big = _fold(self.attn_norm, self.qkv.big)
        self.mlp_norm_big = _fold(self.mlp_norm, self.gate_up.big)


def _fold(norm_weight: torch.Tensor, kernel) -> torch.Tensor:
    inv_c = getattr(kernel, "inv_c", None)
    return norm_weight if inv_c is None else (norm_weight * inv_c).contiguous()


CALIBRATION_TEXT = (
    "The sun rose over the quiet town, and the baker opened her shop at six. Q: What is 12 times 7? A: 84.\n"
    "def mean(xs):\n    return sum(xs) / len(xs)\n"
    "User: Can you explain why the sky is blue? Assistant: Sunlight scatters off air molecules, and blue light "
    "scatters the most. Dates like 14 July 1789, prices like $3.50, and words in other languages (café, 東京)."
)


@torch.no_grad()
def _smoothing(model, tokenizer, alpha: float = 0.5) -> dict:
    """SmoothQuant factors c_j = max|x_j|^α / max|W_j|^(1-α) per input channel of every linear, from the
    activations of one fixed calibration text (outlier channels are a property of the model, not the text).
    Returns {"layers": [{"qkv": c, "wo": c, "gate_up": c, "down": c}, ...], "head": c}."""
    n = min(model.cfg.max_seq_len, 128)
    if tokenizer is not None:
        ids = tokenizer.encode(CALIBRATION_TEXT)[:n]
    else:
        ids = torch.randint(0, model.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    amax, hooks = {}, []

    def watch(key, module):
        def hook(mod, inp, out):
            a = inp[0].detach().float().reshape(-1, inp[0].shape[-1]).abs().amax(0)
            amax[key] = torch.maximum(amax[key], a) if key in amax else a
        hooks.append(module.register_forward_hook(hook))

    for i, b in enumerate(model.layers):
        watch((i, "qkv"), b.attn.wq)
        watch((i, "wo"), b.attn.wo)
        watch((i, "gate_up"), b.mlp.w_gate)
        watch((i, "down"), b.mlp.w_down)
    watch("head", model.lm_head)
    try:
        model(torch.tensor([ids], device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()

    def factor(key, w):
        wmax = w.detach().float().abs().amax(0).clamp(min=1e-5)
        return (amax[key].clamp(min=1e-5) ** alpha / wmax ** (1 - alpha)).clamp(1e-3, 1e3)

    layers = []
    for i, b in enumerate(model.layers):
        layers.append({name: factor((i, name), w) for name, w in _block_weights(b).items()})
    return {"layers": layers, "head": factor("head", model.lm_head.weight)}


# ------------------------------------------------------------------------------------------ the engine

class Engine:
    """Batched, streaming generation over a minichat Transformer. See the module docstring."""

    def __init__(self, model, tokenizer=None, *, device: str | torch.device | None = None, weights: str = "auto",
                 max_batch: int = 64, stop_token_ids: Sequence[int] | None = None, small_rows: int | None = None,
                 kernels: bool = True, prefix_cache: int = 0, kv_cache: str = "auto"):
        if weights not in WEIGHT_MODES:
            raise MinichatError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
        if max_batch < 1:
            raise MinichatError("max_batch must be >= 1")
        if prefix_cache < 0:
            raise MinichatError("prefix_cache (tokens) must be >= 0")
        if kv_cache not in KV_CACHE_MODES:
            raise MinichatError(f"kv_cache must be one of {', '.join(KV_CACHE_MODES)}, got {kv_cache!r}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if weights == "auto" and self.device.type != "cpu":
            weights = "bf16"
        if weights == "fast" and self.device.type != "cpu":
            weights = "bf16"
        if weights in ("int8", "int4", "w8a8") and self.device.type != "cpu":
            raise MinichatError(f"{weights} weights are implemented for the CPU only; use weights='bf16' or 'fp32'")
        self.weights = weights
        if small_rows is None:
            # where the big-batch kernels take over: fast mode's int8 x int8 matmuls beat the int4 weight-only
            # kernel from ~5 rows (batch 8: +30% tokens/s), auto's exact fp32 matmuls only from ~17
            small_rows = 4 if weights == "fast" else 16
        self.model, self.tokenizer = model, tokenizer
        self._dry_breakers = None  # DRY's sequence breakers over the vocabulary, built on first use
        self.cfg = cfg = model.cfg
        self.max_seq_len = cfg.max_seq_len
        self.max_batch = max_batch
        if stop_token_ids is None:
            stop_token_ids = tokenizer.stop_ids if tokenizer is not None else []
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        # compiled element-wise kernels (minichat/kernels.c) for decoding with int8/int4 weights; None without
        # a C compiler (or with kernels=False), and then the same math runs as torch ops
        self.kernels = None
        if kernels and weights not in ("fp32", "bf16") and self.device.type == "cpu":
            from minichat import kernels as kernels_mod

            self.kernels = kernels_mod.load()
        self._pack(model, small_rows)
        self._lock = threading.Lock()  # guards the waiting queue (submit/cancel may come from other threads)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # row i of the batch is _running[i]
        self._k = self._v = None  # KV cache (n_layer, slots, n_kv, capacity, hd), int8: hd + 4 (see _kv_quant)
        self.kv_dtype = self._kv_dtype(kv_cache)
        # the torch-ops decode path (no compiled kernels; the fused paths attend in kernels.c): batches this big
        # attend with SDPA on a bf16 cache, smaller ones with matmul + softmax on fp32 copies. SDPA wins at every
        # batch size here: batch 1, 400 positions, bf16 cache: 39 vs 69 µs per layer, fp32 cache: 31 vs 39
        self.sdpa_min_batch = 1
        self._counts: torch.Tensor | None = None  # (slots, V) output-token counts, for penalties
        self._seen: torch.Tensor | None = None  # (slots, V) prompt+output membership, for repetition penalty
        self._rng = torch.Generator().manual_seed(torch.seed() % 2**63)
        # keys and values of recent prompts' prefixes (0: off): a chat server's requests share their system
        # prompt, and each turn of a conversation resends the history
        self.prefix_cache = PrefixCache(prefix_cache) if prefix_cache >= PREFIX_BLOCK else None
        self.prefill_tokens = 0  # prompt tokens prefilled (computed), not counting reused prefixes
        self.prefill_seconds = 0.0  # time step() spent prefilling
        # fast mode at big batch: new prompts' tokens join the running rows' decode pass (see step())
        self.mix_prefill = True
        # fast mode: the fused pass's layers in one compiled call (False: one call per kernel, the same numbers)
        self.use_layers_c = True
        self.thread_tuner = None  # a runtime.ThreadTuner: step() sets the calling thread's torch threads by it
        # called right before the fused pass's GIL-free call: a server hands the last step's tokens on then, so
        # that its event loop streams them while this step computes, not while this thread needs the GIL
        self.before_compute: Callable[[], None] | None = None

    def _kv_dtype(self, mode: str) -> torch.dtype:
        """The KV cache's element type. Decode attention at big batch waits on reading the cache (~70 MB per
        step at batch 32, ~100 positions, bf16): fast mode keeps it in bf16 (half fp32's bytes; 30 layers with
        SDPA 13 vs 19 ms) and, where every decode path attends in the compiled kernel, in int8 with a scale per
        position and head (half bf16's bytes again; bench/results/engine.md has its speed and perplexity)."""
        int8_ok = self._fuse_big and self._fuse_small and self.device.type == "cpu"
        if mode == "auto":
            mode = ("int8" if int8_ok else "bf16") if (self.weights == "fast" and self.device.type == "cpu") else "fp32"
        if mode == "int8" and not int8_ok:
            raise MinichatError("kv_cache='int8' needs weights='fast' on the CPU with the compiled kernels "
                                "(every decode path must attend in them); use 'bf16' or 'fp32'")
        return {"int8": torch.int8, "bf16": torch.bfloat16, "fp32": torch.float32}[mode]

    def _kv_write(self, li: int, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys and values (n_kv, P, hd) of positions start.. into layer li of cache row `row`."""
        P = k.shape[1]
        if self.kv_dtype == torch.int8:
            k, v = _kv_quant(k), _kv_quant(v)
        self._k[li, row, :, start:start + P] = k
        self._v[li, row, :, start:start + P] = v

    def _kv_read(self, li: int, row: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys and values (n_kv, n, hd) of positions 0..n-1 of layer li, row `row`, as `dtype`."""
        k, v = self._k[li, row, :, :n], self._v[li, row, :, :n]
        if self.kv_dtype == torch.int8:
            return _kv_dequant(k).to(dtype), _kv_dequant(v).to(dtype)
        return k.to(dtype), v.to(dtype)

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters()) / 1e6
        return (f"{getattr(self, 'name', 'model')}: {n:.0f}M parameters, context {self.max_seq_len}, "
                f"weights {self.weights}, KV cache {str(self.kv_dtype).removeprefix('torch.')}, {self.device.type}")

    @classmethod
    def from_pretrained(cls, name_or_path: str = "smollm2", device: str = "cpu", **kwargs) -> "Engine":
        from minichat.gguf_import import load

        model, tok, _ = load(name_or_path, device=device)
        return cls(model, tok, **kwargs)

    def _pack(self, model, small_rows: int) -> None:
        c, dev, mode = self.cfg, self.device, self.weights
        self.embed = model.embed.weight.detach().float().to(dev)
        # (kernel for matmuls of <= small_rows rows, kernel for bigger ones); "auto" picks int4 or int8 per matrix
        small, big = {
            "fp32": ("fp32", "fp32"), "int8": ("int8", "fp32"), "int4": ("int4", "fp32"), "w8a8": ("w8a8", "w8a8"),
            "auto": ("auto", "fp32"), "fast": ("auto", "w8a8-rows"),
            # big bf16 matmuls on a CPU only where it multiplies bf16 faster: on an EPYC with avx512_bf16 a
            # 1,000-token prefill of SmolLM2-135M took 0.69 s instead of 1.50 (a Xeon with AMX hidden: half speed)
            "bf16": ("bf16", "bf16" if dev.type != "cpu" or runtime.cpu_prefers_bf16() else "fp32"),
        }[mode]
        exact_first = big.startswith("w8a8")
        smooth = _smoothing(model, self.tokenizer) if big == "w8a8-rows" else {"layers": [None] * len(model.layers)}
        self.layers = [_Layer(b, small, big, dev, small_rows, exact_first, self.kernels, sm)
                       for b, sm in zip(model.layers, smooth["layers"])]
        self.norm = model.norm.weight.detach().float().to(dev)
        # the head's rows are the (Q8_0) embeddings: int8 per row, never 4 bits. At small batch its input goes as
        # two int8 rows where the VNNI kernels take them (_Int8TwoPass): as fast at batch 1 as fast mode's one-pass
        # W8A8 head and nearly exact (SmolLM2's logits off by 0.003, against W8A8's 0.74 and the int8 weight-only
        # kernel's 0.16). Elsewhere fast mode keeps the W8A8 head and auto the int8 weight-only one.
        head_small = small
        if small in ("auto", "int4"):
            head_small = "int8x2" if _Int8TwoPass.fits(model.lm_head.weight, self.kernels) else \
                ("w8a8" if mode == "fast" else "int8")
        self.head = _Linear(model.lm_head.weight, head_small, big, dev, small_rows, kernels=self.kernels,
                            smooth=smooth.get("head"))
        self.norm_big = _fold(self.norm, self.head.big)
        # which fused decode paths apply: small batches need bf16-in/bf16-out weight-only kernels, big ones
        # fast mode's int8 x int8 matmuls
        lins = [lin for L in self.layers for lin in (L.qkv, L.wo, L.gate_up, L.down)]
        self._fuse_small = self.kernels is not None and all(hasattr(lin.small, "raw") for lin in lins)
        self._fuse_big = self.kernels is not None and all(isinstance(lin.big, _W8A8IntMM) for lin in lins + [self.head])
        # the whole layer stack of the fused big-batch pass as one compiled call, where every matrix is prepacked
        self._layers_c = None
        if self._fuse_big and getattr(self.kernels, "nogil", None) is not None \
                and all(lin.big.packed is not None for lin in lins):
            from minichat.kernels import LayerW8A8

            def ptr(t):
                return None if t is None else t.data_ptr()

            self._layers_c = (LayerW8A8 * len(self.layers))(*[LayerW8A8(
                ptr(L.attn_norm_big), ptr(L.wo.big.inv_c), ptr(L.mlp_norm_big), ptr(L.down.big.inv_c),
                *(ptr(lin.big.packed[0]) for lin in (L.qkv, L.wo, L.gate_up, L.down)),
                *(ptr(lin.big.packed[1]) for lin in (L.qkv, L.wo, L.gate_up, L.down)),
                *(ptr(lin.big.scale) for lin in (L.qkv, L.wo, L.gate_up, L.down))) for L in self.layers])
            self._ffn = self.layers[0].gate_up.big.scale.shape[1] // 2
        cos, sin = model.rope_cos.float().to(dev), model.rope_sin.float().to(dev)  # (max_len, hd/2)
        # rotate-half RoPE as x·cos + roll(x, hd/2)·sin_signed: pairs (x_i, x_{i+hd/2}) rotate together
        self.rope_cos = torch.cat([cos, cos], -1)
        self.rope_sin = torch.cat([-sin, sin], -1)
        self.H, self.Hkv, self.hd = c.n_head, c.kv_heads, c.head_dim
        self._qk_scale = torch.ones(self.H + self.Hkv, 1, device=dev)
        self._qk_scale[: self.H] = 1.0 / math.sqrt(self.hd)
        self.eps = c.norm_eps

    # ---------------------------------------------------------------------------------------- forward

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (T, heads, hd) with cos/sin (T, 1, hd) of the positions -> rotated."""
        return torch.addcmul(x * cos, torch.roll(x, self.hd // 2, dims=-1), sin)

    def _prefill(self, ids: list[int], row: int) -> torch.Tensor:
        """Run a whole prompt for the sequence in `row`; fills its cache columns [0, P); returns (V,) logits."""
        return self._prefill_many([ids], [row])[0]

    def _prefill_many(self, prompts: list[list[int]], rows: list[int], decode=None):
        """Prefill several prompts (prompt i into cache row rows[i]); returns (n, V) next-token logits.
        A prompt's cached prefix (prefix_cache) is copied into its row and only the rest is computed. Prompts are
        packed into chunks of at most PREFILL_CHUNK new tokens (a longer prompt goes alone), which bounds
        activation memory while keeping every matmul big. With `decode` (the running rows' tokens and lengths)
        the running rows' decode joins the (single) chunk's fused pass: returns (prompt logits, decode logits)."""
        t0 = time.perf_counter()
        pc = self.prefix_cache
        starts = [0] * len(prompts)
        keys = [pc.keys(p) for p in prompts] if pc is not None else []
        if pc is not None:
            for i, (p, row) in enumerate(zip(prompts, rows)):
                blocks = pc.lookup(p, keys[i])
                if blocks:
                    n = len(blocks) * PREFIX_BLOCK
                    self._k[:, row, :, :n] = torch.cat([k for k, _ in blocks], 2)
                    self._v[:, row, :, :n] = torch.cat([v for _, v in blocks], 2)
                    starts[i] = n
        out, i, dec = [], 0, None
        merged_rows = len(decode[1]) if decode is not None else 0
        new_tokens = sum(len(p) - s0 for p, s0 in zip(prompts, starts))
        if decode is not None and new_tokens > PREFILL_CHUNK:
            dec, decode = self._decode(*decode), None  # several chunks: the decode goes alone, first
        while i < len(prompts):
            j, T = i + 1, len(prompts[i]) - starts[i]
            while j < len(prompts) and T + len(prompts[j]) - starts[j] <= PREFILL_CHUNK:
                T += len(prompts[j]) - starts[j]
                j += 1
            if decode is not None:  # the only chunk
                logits, dec = self._prefill_packed(prompts[i:j], rows[i:j], starts[i:j], decode)
                out.append(logits)
            else:
                out.append(self._prefill_packed(prompts[i:j], rows[i:j], starts[i:j]))
            i = j
        self.prefill_tokens += new_tokens
        if pc is not None:
            for p, row, ks in zip(prompts, rows, keys):
                pc.insert(p, self._k[:, row], self._v[:, row], ks)
        logits = out[0] if len(out) == 1 else torch.cat(out)
        if not merged_rows:
            return logits  # (step() times this call)
        # with the running rows' decode: the prompts' share of the time, by rows, counts as prefill time
        self.prefill_seconds += (time.perf_counter() - t0) * new_tokens / (new_tokens + merged_rows)
        return logits, dec

    def _prefill_packed(self, prompts: list[list[int]], rows: list[int], done: list[int] | None = None,
                        decode=None):
        """Prefill prompts (prompt i into cache row rows[i], from position done[i]: before it, a reused prefix);
        returns each prompt's next-token logits (n, V).

        Fast mode (the fused decode path available): the token at position 0 runs through the ops path (the
        attention sink's activations, ~1,700x the others', need its exact rows: W8A8 cannot hold them); every
        later token runs as a row of the fused decode path, at its own position of the prompt's slot,
        attending causally through the cache. Each row's arithmetic then depends only on its own input and the
        cache, so a prompt gives bit-identical logits whether its prefix came from the prefix cache or not (a
        repeated request at temperature 0 repeats its answer), and a served prompt's ~20 new tokens take ~15
        ms instead of ~24. A prompt with more than FUSED_PREFILL_MAX new tokens takes the ops path instead.
        `decode` (tokens, lengths of running rows 0..B-1): their decode step runs as the first B rows of the
        same fused pass; returns (prompt logits, decode logits) then."""
        done = list(done or [0] * len(prompts))
        if not self._fuse_big:
            logits = self._prefill_ops(prompts, rows, done)
            return logits if decode is None else (logits, self._decode(*decode))
        out: list[torch.Tensor | None] = [None] * len(prompts)
        long = [i for i, (p, d) in enumerate(zip(prompts, done)) if len(p) - d > FUSED_PREFILL_MAX]
        # many new tokens: the ops path. Their logits may differ from a run whose prefix came from the prefix
        # cache: the ops path attends over the prompt's own unrounded keys, a cached run over the cache's
        # rounded ones (bf16 or int8; measured on an 886-token prompt, the greedy answers parted at token 19 with
        # bf16 and at the first token with int8, both sensible)
        if long:
            logits = self._prefill_ops([prompts[i] for i in long], [rows[i] for i in long], [done[i] for i in long])
            for j, i in enumerate(long):
                out[i], done[i] = logits[j], len(prompts[i])
        fresh = [i for i, (p, d) in enumerate(zip(prompts, done)) if d == 0]
        if fresh:
            sink = self._prefill_ops([prompts[i][:1] for i in fresh], [rows[i] for i in fresh], [0] * len(fresh))
            for j, i in enumerate(fresh):
                out[i], done[i] = sink[j], 1
        rest = [i for i, (p, d) in enumerate(zip(prompts, done)) if len(p) > d]  # (a long prompt has none left)
        dec = None
        if rest:
            lens = [len(prompts[i]) - done[i] for i in rest]
            ends = list(itertools.accumulate(lens))
            ids = torch.tensor([t for i in rest for t in prompts[i][done[i]:]], device=self.device)
            positions = [q for i in rest for q in range(done[i], len(prompts[i]))]
            slots = [rows[i] for i, P in zip(rest, lens) for _ in range(P)]
            last = [e - 1 for e in ends]
            B = 0
            if decode is not None:  # running row b is slot b at its own length; its logits come first
                B = len(decode[1])
                ids = torch.cat([decode[0].to(ids.device), ids])
                positions, slots = list(decode[1]) + positions, list(range(B)) + slots
                last = list(range(B)) + [B + e for e in last]
            logits = self._decode_fused(ids, positions, slots, last)
            if decode is not None:
                dec, logits = logits[:B], logits[B:]
            for j, i in enumerate(rest):
                out[i] = logits[j]
        elif decode is not None:
            dec = self._decode(*decode)
        return torch.stack(out) if decode is None else (torch.stack(out), dec)

    def _prefill_ops(self, prompts: list[list[int]], rows: list[int], done: list[int]) -> torch.Tensor:
        """All prompts' new tokens as one (T, D) matrix: every linear is one matmul over all their tokens;
        attention runs per prompt (causal, within the prompt), writing each prompt's keys into its row. done[i]:
        positions of prompt i already in its cache row (a reused prefix); its tokens from there are computed."""
        H, Hkv, hd = self.H, self.Hkv, self.hd
        lens = [len(p) - d for p, d in zip(prompts, done)]
        starts = list(itertools.accumulate(lens, initial=0))
        T = starts[-1]
        dev = self.device
        x = self.embed[torch.tensor([t for p, d in zip(prompts, done) for t in p[d:]], device=dev)]  # (T, D)
        if len(prompts) == 1 and not done[0]:
            cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]  # (T, 1, hd)
        else:
            pos = torch.cat([torch.arange(d, d + P, device=dev) for d, P in zip(done, lens)])
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]
        at0 = [s for s, d in zip(starts, done) if d == 0]  # rows at position 0
        first = torch.tensor(at0, device=dev) if at0 else None
        for li, L in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), L.attn_norm, self.eps)
            qkv = L.qkv.prefill(h, first)  # (T, (H + 2·Hkv)·hd)
            qk = self._rope(qkv[:, : (H + Hkv) * hd].view(T, H + Hkv, hd), cos, sin)
            v = qkv[:, (H + Hkv) * hd:].view(T, Hkv, hd)
            ys = []
            for s, P, row, d in zip(starts, lens, rows, done):
                q = qk[s:s + P, :H].transpose(0, 1)  # (H, P, hd)
                k = qk[s:s + P, H:].transpose(0, 1)  # (Hkv, P, hd)
                vp = v[s:s + P].transpose(0, 1)
                self._kv_write(li, row, d, k, vp)
                if d == 0:
                    y = F.scaled_dot_product_attention(q[None], k[None], vp[None], is_causal=True, enable_gqa=Hkv != H)
                else:  # after a reused prefix: all of it, then causal within the new tokens
                    ck, cv = self._kv_read(li, row, d, k.dtype)
                    keys, vals = torch.cat([ck, k], 1), torch.cat([cv, vp], 1)
                    allowed = torch.arange(d + P, device=dev)[None] <= torch.arange(d, d + P, device=dev)[:, None]
                    y = F.scaled_dot_product_attention(q[None], keys[None], vals[None], attn_mask=allowed,
                                                       enable_gqa=Hkv != H)
                ys.append(y[0].transpose(0, 1).reshape(P, H * hd))
            x = x + L.wo.prefill(ys[0] if len(ys) == 1 else torch.cat(ys), first)
            h = F.rms_norm(x, (x.shape[-1],), L.mlp_norm, self.eps)
            gu = L.gate_up.prefill(h, first)
            f = gu.shape[-1] // 2
            x = x + L.down.prefill(F.silu(gu[:, :f]) * gu[:, f:], first)
        last = x[[s - 1 for s in starts[1:]]]  # each prompt's last position
        return self.head.prefill(F.rms_norm(last, (x.shape[-1],), self.norm, self.eps))

    def _decode(self, tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """One token per running row (rows 0..B-1, row b has lengths[b] cached positions) -> (B, V) logits.
        Written for few Python-level ops per layer: at batch 1 their overhead is a good part of a step."""
        if self._fuse_big and len(lengths) > self.head.small_rows:
            return self._decode_fused(tokens, lengths)
        if self._fuse_small and len(lengths) <= self.head.small_rows:
            return self._decode_small_fused(tokens, lengths)
        if self.kv_dtype == torch.int8:  # (only reachable by switching the fused paths off after building)
            raise MinichatError("the int8 KV cache is read by the compiled kernels only; build the engine with "
                                "kv_cache='bf16' to decode through torch ops")
        B, H, Hkv, hd = len(lengths), self.H, self.Hkv, self.hd
        nqk = (H + Hkv) * hd
        pos, S, bias, kv_bias = self._step_mask(lengths)
        uniform = bias is None
        if uniform:
            col = lengths[0]
        else:
            rows = torch.arange(B, device=self.device)
        # rotary tables for this step, with 1/√hd folded into the query heads
        cos = self.rope_cos[pos][:, None] * self._qk_scale  # (B, H + Hkv, hd)
        sin = self.rope_sin[pos][:, None] * self._qk_scale
        x = self.embed[tokens]  # (B, D)
        for li, L in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), L.attn_norm, self.eps)
            qkv = L.qkv(h)
            qk = qkv[:, :nqk].view(B, H + Hkv, hd)
            # rotate-half RoPE: swap the halves of each head (flip), then x·cos + swapped·(-sin, sin)
            qk = torch.addcmul(qk * cos, qk.view(B, H + Hkv, 2, hd // 2).flip(-2).view(B, H + Hkv, hd), sin)
            v = qkv[:, nqk:].view(B, Hkv, hd)
            kc, vc = self._k[li], self._v[li]
            if uniform:
                kc[:B, :, col] = qk[:, H:]
                vc[:B, :, col] = v
            else:
                kc[rows, :, pos] = qk[:, H:].to(kc.dtype)
                vc[rows, :, pos] = v.to(vc.dtype)
            # grouped-query attention for one query per row: query head h reads key/value head h // (H/Hkv)
            q = qk[:, :H].view(B, Hkv, H // Hkv, hd)
            keys, values = kc[:B, :, :S], vc[:B, :, :S]
            if keys.dtype != torch.float32 and B >= self.sdpa_min_batch:
                # a group's query heads on SDPA's query axis (1/√hd is already in q): its bf16 kernel reads the
                # cache once; at small batch its fixed cost outweighs that, so small batches take fp32 copies
                y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, scale=1.0,
                                                   attn_mask=kv_bias).float()
            else:
                if keys.dtype != torch.float32:
                    keys, values = keys.float(), values.float()
                att = torch.matmul(q, keys.transpose(-1, -2))
                if bias is not None:
                    att = att + bias
                y = torch.matmul(torch.softmax(att, dim=-1), values)  # (B, Hkv, H/Hkv, hd)
            x = x + L.wo(y.reshape(B, H * hd))
            h = F.rms_norm(x, (x.shape[-1],), L.mlp_norm, self.eps)
            gu = L.gate_up(h)
            f = gu.shape[-1] // 2
            x = x + L.down(F.silu(gu[:, :f]) * gu[:, f:])
        return self.head(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps))

    def _attend(self, q: torch.Tensor, li: int, pos: torch.Tensor, max_pos: int, slots=None,
                max_slot: int = -1) -> torch.Tensor:
        """The fused paths' decode attention: q (B, H, hd) float32, already scaled, against each row's own cached
        positions 0..pos[b] of layer li, in the compiled kernel (no mask needed): (B, H·hd) float32. At batch 32
        and ~100 positions 0.23 ms per layer against SDPA's 0.38 (1 thread); 0.05 against 0.16 at 20 positions."""
        B = q.shape[0]
        return self.kernels.attend_decode(q, self._k[li], self._v[li], pos, max_pos, slots,
                                          max_slot).view(B, self.H * self.hd)

    def _step_mask(self, lengths: list[int]):
        """Positions (B,), attended columns S, and the (B, 1, 1, S) additive mask in fp32 and in the cache's
        dtype (None when every row has the same length)."""
        S = max(lengths) + 1
        pos = torch.tensor(lengths, device=self.device)
        if min(lengths) == max(lengths):
            return pos, S, None, None
        keep = torch.arange(S, device=self.device)[None] <= pos[:, None]
        bias = torch.zeros(len(lengths), 1, 1, S, device=self.device).masked_fill_(~keep[:, None, None], float("-inf"))
        return pos, S, bias, bias.to(self.kv_dtype)

    def _decode_small_fused(self, tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """_decode for small batches with weight-only int4/int8 matmuls (bf16 in, bf16 out), the chains between
        them one compiled kernel each: RMSNorm to bf16; RoPE + KV-cache write; SwiGLU; residual add.
        ~15 ops per layer instead of ~30: at batch 1 the op overhead is a good part of a step."""
        K, B, H, Hkv, hd = self.kernels, len(lengths), self.H, self.Hkv, self.hd
        pos, top = torch.tensor(lengths), max(lengths)
        scale = 1.0 / math.sqrt(hd)
        x = self.embed[tokens]  # (B, D), a fresh tensor: the residual stream, updated in place
        for li, L in enumerate(self.layers):
            q = K.qkv_rope_cache(L.qkv.small.raw(K.norm_bf16(x, L.attn_norm, self.eps)), None, None, H, Hkv,
                                 self.rope_cos, self.rope_sin, pos, top, scale, self._k[li], self._v[li])
            y = self._attend(q, li, pos, top)
            K.dequant(L.wo.small.raw(y.to(torch.bfloat16)), out=x, accumulate=True)
            m = K.swiglu(L.gate_up.small.raw(K.norm_bf16(x, L.mlp_norm, self.eps)), dtype=torch.bfloat16)
            K.dequant(L.down.small.raw(m), out=x, accumulate=True)
        return self.head(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps))

    def _decode_fused(self, tokens: torch.Tensor, lengths: list[int], slots: list[int] | None = None,
                      last: list[int] | None = None) -> torch.Tensor:
        """_decode for fast mode's big batches: every linear is an int8 x int8 matmul (`_W8A8IntMM.mm`), and the
        chains between them are one compiled kernel each: RMSNorm + quantize; dequantize + RoPE + KV-cache
        write; SwiGLU + quantize; dequantize + residual add. ~12 ops per layer instead of ~35.
        Also fast mode's prefill (`_prefill_packed`): row m is then a prompt's token at position lengths[m] of
        cache slot slots[m], attending causally through the cache; `last` picks the rows that get logits."""
        K, B, H, Hkv, hd = self.kernels, len(lengths), self.H, self.Hkv, self.hd
        pos, top = torch.tensor(lengths), max(lengths)
        sl, top_slot = (None, -1) if slots is None else (torch.tensor(slots), max(slots))
        scale = 1.0 / math.sqrt(hd)
        x = self.embed[tokens]  # (B, D), a fresh tensor: the residual stream, updated in place
        if self._layers_c is not None and self.use_layers_c:  # every layer in one call, without the GIL
            if self.before_compute is not None:
                self.before_compute()
            K.decode_layers(self._layers_c, x, H, Hkv, self._ffn, pos, top, self._k, self._v, self.rope_cos,
                            self.rope_sin, scale, self.eps, sl, top_slot)
        else:
            for li, L in enumerate(self.layers):
                qkv, wo, gu, down = L.qkv.big, L.wo.big, L.gate_up.big, L.down.big
                xq, xs = K.norm_quant(x, L.attn_norm_big, self.eps)
                q = K.qkv_rope_cache(qkv.mm(xq), xs, qkv.scale, H, Hkv, self.rope_cos, self.rope_sin,
                                     pos, top, scale, self._k[li], self._v[li], slots=sl, max_slot=top_slot)
                y = self._attend(q, li, pos, top, sl, top_slot)
                yq, ys = K.norm_quant(y, wo.inv_c, norm=False)
                K.dequant(wo.mm(yq), ys, wo.scale, out=x, accumulate=True)
                hq, hs = K.norm_quant(x, L.mlp_norm_big, self.eps)
                mq, ms = K.swiglu_quant(gu.mm(hq), hs, gu.scale, down.inv_c)
                K.dequant(down.mm(mq), ms, down.scale, out=x, accumulate=True)
        head = self.head.big
        if last is not None:
            x = x[last]
        hq, hs = K.norm_quant(x, self.norm_big, self.eps)
        if head.packed is not None:  # dequantized as the matmul stores it: one pass over (B, vocab), not three
            return K.gemm_s8(hq, *head.packed, hs, head.scale)
        return K.dequant(head.mm(hq), hs, head.scale)

    # ---------------------------------------------------------------------------------------- cache

    def _ensure_cache(self, slots: int, columns: int) -> None:
        """Grow the KV cache (copying what is there) to at least `slots` rows and `columns` positions."""
        c = self.cfg
        cur_s = 0 if self._k is None else self._k.shape[1]
        cur_c = 0 if self._k is None else self._k.shape[3]
        if slots <= cur_s and columns <= cur_c:
            return
        new_s = min(self.max_batch, max(slots, cur_s, 2 * cur_s if slots > cur_s else 0))
        new_c = min(self.max_seq_len, max(columns, cur_c, int(1.5 * cur_c) if columns > cur_c else 0))
        new_c = min(self.max_seq_len, ((new_c + 63) // 64) * 64)
        row = c.head_dim + (KV_SCALE_BYTES if self.kv_dtype == torch.int8 else 0)  # int8: the scale after the values
        shape = (c.n_layer, new_s, c.kv_heads, new_c, row)
        k = torch.zeros(shape, device=self.device, dtype=self.kv_dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.kv_dtype)
        if self._k is not None:
            B = len(self._running)
            used = max([r.length for r in self._running], default=0)
            k[:, :B, :, :used] = self._k[:, :B, :, :used]
            v[:, :B, :, :used] = self._v[:, :B, :, :used]
        self._k, self._v = k, v
        if self._counts is not None:
            self._counts = _grow_rows(self._counts, new_s)
            self._seen = _grow_rows(self._seen, new_s)

    def _move_row(self, src: int, dst: int, length: int) -> None:
        self._k[:, dst, :, :length] = self._k[:, src, :, :length]
        self._v[:, dst, :, :length] = self._v[:, src, :, :length]
        if self._counts is not None:
            self._counts[dst] = self._counts[src]
            self._seen[dst] = self._seen[src]

    # ---------------------------------------------------------------------------------------- requests

    def check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise MinichatError("the prompt is empty: give at least one token")
        V = self.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise MinichatError(f"prompt token id {bad[0]} is outside the vocabulary (0..{V - 1})")
        if len(ids) >= self.max_seq_len:
            raise ContextOverflowError(
                f"the prompt has {len(ids)} tokens but the model's context window is {self.max_seq_len}; "
                "it must leave room for at least one new token (shorten the prompt or the conversation)"
            )
        return ids

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
               seed: int | None = None, prompt_index: int = 0, index: int = 0) -> Request:
        """Queue one sequence; it starts at the next step(). seed overrides params.seed."""
        params = params or SamplingParams()
        params.validate()
        ids = self.check_prompt(prompt_ids)
        V = self.cfg.vocab_size
        bad = [t for t in (params.logit_bias or {}) if not 0 <= int(t) < V]
        if bad:
            raise MinichatError(f"logit_bias names token id {bad[0]}, outside the vocabulary (0..{V - 1})")
        stop = self.stop_token_ids if params.stop_token_ids is None else [int(t) for t in params.stop_token_ids]
        req = Request(ids, params, stop, params.seed if seed is None else seed, prompt_index, index)
        with self._lock:
            self._waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request; it finishes with reason "cancelled" at the next step() (at once if still waiting)."""
        with self._lock:
            if req in self._waiting:
                self._waiting.remove(req)
                req.finish_reason = FINISH_CANCELLED
                return
        req._cancel = True

    def calls_before_compute_next(self) -> bool:
        """Whether the next step() will call `before_compute` (its batch runs the one-call fused pass)."""
        return (self.before_compute is not None and self._layers_c is not None and self.use_layers_c
                and len(self._running) > self.head.small_rows)

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ---------------------------------------------------------------------------------------- stepping

    def step(self) -> list[TokenEvent]:
        """Advance every running request by one token and start waiting ones (up to max_batch running).
        Returns one event per request that got a token (or was cancelled). Call from one thread at a time.
        With `thread_tuner` set, the calling thread's torch threads follow it (runtime.ThreadTuner)."""
        tuner = self.thread_tuner
        if tuner is None:
            return self._step()
        if tuner.threads() != torch.get_num_threads():
            torch.set_num_threads(tuner.threads())
        rows, t0 = len(self._running) + len(self._waiting), time.perf_counter()
        events = self._step()
        tuner.record(time.perf_counter() - t0, rows, time.monotonic())
        return events

    @torch.inference_mode()
    def _step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        # cancelled rows leave first, so their slots can be reused now
        for req in [r for r in self._running if r._cancel]:
            self._finish(req, FINISH_CANCELLED)
            events.append(TokenEvent(req, -1, finished=True, finish_reason=FINISH_CANCELLED))
        old = list(self._running)
        decode = None
        if old:
            lengths = [r.length - 1 for r in old]  # the last output token is not in the cache yet
            tokens = torch.tensor([r.output[-1] for r in old], device=self.device)
            decode = (tokens, lengths)
        # fast mode at big batch: new prompts' tokens ride along as extra rows of the running rows' decode pass
        # (the weights are read once for both; each row's numbers are the same as in separate passes). The new
        # requests are admitted before the running ones sample, so a slot freed in this step is reused from
        # the next one; requests that arrive during a step wait for the next step's pass.
        mix = bool(old) and self.mix_prefill and self._fuse_big and len(old) > self.head.small_rows
        if mix and self._waiting:
            new = self._admit()
            if new:
                prompt_logits, logits = self._prefill_groups(new, decode)
                events += self._sample_and_advance(old, logits)
                return events + self._sample_new(new, prompt_logits)
        if old:
            events += self._sample_and_advance(old, self._decode(*decode))
        if mix and self._running:
            return events
        new = self._admit()
        if new:
            t0 = time.perf_counter()
            logits = self._prefill_groups(new)  # one row per distinct prompt
            self.prefill_seconds += time.perf_counter() - t0
            events += self._sample_new(new, logits)
        return events

    def _sample_new(self, groups: list[list[Request]], logits: torch.Tensor) -> list[TokenEvent]:
        reqs = [r for g in groups for r in g]
        rows = torch.tensor([i for i, g in enumerate(groups) for _ in g], device=self.device)
        return self._sample_and_advance(reqs, logits[rows])

    def _admit(self) -> list[list[Request]]:
        """Move waiting requests into free slots; group identical prompts so each is prefilled once."""
        with self._lock:
            take = []
            while self._waiting and len(self._running) + len(take) < self.max_batch:
                r = self._waiting.popleft()
                if r._cancel:
                    r.finish_reason = FINISH_CANCELLED
                    continue
                take.append(r)
        if not take:
            return []
        need_cols = max(min(self.max_seq_len, r.length + r.params.max_tokens) for r in take + self._running)
        self._ensure_cache(len(self._running) + len(take), need_cols)
        if any(r.params._penalised for r in take) and self._counts is None:
            n = self._k.shape[1]
            self._counts = torch.zeros(n, self.cfg.vocab_size, device=self.device)
            self._seen = torch.zeros(n, self.cfg.vocab_size, dtype=torch.bool, device=self.device)
        groups: dict[tuple[int, ...], list[Request]] = {}
        for r in take:
            r.row = len(self._running)
            self._running.append(r)
            if self._counts is not None:
                self._counts[r.row].zero_()
                self._seen[r.row].zero_()
                self._seen[r.row, torch.tensor(r.prompt, device=self.device)] = True
            groups.setdefault(tuple(r.prompt), []).append(r)
        return list(groups.values())

    def _prefill_groups(self, groups: list[list[Request]], decode=None):
        """Prefill every new distinct prompt in one packed pass; n samples of one prompt share its prefill.
        With `decode` (tokens, lengths of the running rows): also that step's decode, in the same pass where
        possible; returns (prompt logits, decode logits) then."""
        logits = self._prefill_many([g[0].prompt for g in groups], [g[0].row for g in groups], decode)
        if decode is not None:
            logits, dec = logits
        for g in groups:
            first, P = g[0], len(g[0].prompt)
            for r in g[1:]:
                self._k[:, r.row, :, :P] = self._k[:, first.row, :, :P]
                self._v[:, r.row, :, :P] = self._v[:, first.row, :, :P]
        return logits if decode is None else (logits, dec)

    def _finish(self, req: Request, reason: str, stop_reason=None) -> None:
        req.finish_reason = reason
        req.stop_reason = stop_reason
        row = req.row
        last = len(self._running) - 1
        if row is not None:
            if row != last:  # keep running rows contiguous: the last row takes the free slot
                moved = self._running[last]
                self._move_row(last, row, moved.length)
                moved.row = row
                self._running[row] = moved
            self._running.pop()
        req.row = None

    def _sample_and_advance(self, reqs: list[Request], logits: torch.Tensor) -> list[TokenEvent]:
        tokens, lp, top = self._sample(reqs, [r.row for r in reqs], logits.float())
        events, done = [], []
        for i, r in enumerate(reqs):
            t = tokens[i]
            r.output.append(t)
            ev = TokenEvent(r, t)
            if r.logprobs is not None:
                r.logprobs.append(lp[i])
                ev.logprob = lp[i]
            if r.top_logprobs is not None:
                r.top_logprobs.append(top[i])
                ev.top_logprobs = top[i]
            if self._counts is not None:
                self._counts[r.row, t] += 1
                self._seen[r.row, t] = True
            if r.constraint is not None and t not in r.stop_ids:
                r.constraint.advance(t)
            reason, stop_reason = self._check_stop(r, t)
            if reason is not None:
                ev.finished, ev.finish_reason = True, reason
                done.append((r, reason, stop_reason))
            events.append(ev)
        # finish after the loop: finishing moves rows, and the loop above used the pre-move rows
        for r, reason, stop_reason in done:
            self._finish(r, reason, stop_reason)
        return events

    def _check_stop(self, r: Request, t: int):
        if t in r.stop_ids:
            return FINISH_STOP, t
        for seq in r.params.stop_sequences:
            if len(r.output) >= len(seq) and r.output[-len(seq):] == list(seq):
                return FINISH_STOP, list(seq)
        if len(r.output) >= r.params.max_tokens or r.length >= self.max_seq_len:
            return FINISH_LENGTH, None
        if r.constraint is not None and not r.stop_ids and (r.constraint.finished or r.constraint.dead):
            # no end-of-turn token to wait for, and the grammar is complete (or can go no further)
            return FINISH_STOP, None
        return None, None

    def _sample(self, reqs: list[Request], rows: list[int], logits: torch.Tensor):
        """Pick one token per row. Returns (tokens, logprobs or None, top alternatives or None)."""
        B, V = logits.shape
        want_lp = any(r.logprobs is not None for r in reqs)
        k_top = max((r.params.top_logprobs for r in reqs), default=0)
        lp_list = top_list = None
        if want_lp or k_top:
            logp = torch.log_softmax(logits, dim=-1)
        # per row: stop tokens forbidden before min_tokens, the logit bias added, and which rows a grammar masks
        constrained = []
        for i, r in enumerate(reqs):
            if r.params.min_tokens and len(r.output) < r.params.min_tokens and r.stop_ids:
                logits[i, list(r.stop_ids)] = float("-inf")
            if r.params.logit_bias:
                ids = torch.tensor([int(t) for t in r.params.logit_bias], device=logits.device)
                logits[i, ids] += torch.tensor([float(b) for b in r.params.logit_bias.values()], dtype=logits.dtype,
                                               device=logits.device)
            if r.constraint is not None:
                constrained.append(i)
        if constrained:
            self._constrain([reqs[i] for i in constrained], constrained, logits)
        if any(r.params._penalised for r in reqs):
            logits = self._penalise(reqs, rows, logits)
        if any(r.params.dry_multiplier for r in reqs):
            self._dry(reqs, logits)
        greedy = [r.params.greedy for r in reqs]
        if all(greedy):
            chosen = self._argmax(logits)
        else:
            chosen = self._draw(reqs, logits, greedy)
        tokens = chosen.tolist()
        if want_lp:
            lp_list = logp.gather(1, chosen[:, None])[:, 0].tolist()
        if k_top:
            vals, idx = logp.topk(k_top, dim=-1)
            vals, idx = vals.tolist(), idx.tolist()
            top_list = [list(zip(idx[i][: r.params.top_logprobs], vals[i][: r.params.top_logprobs])) for i, r in enumerate(reqs)]
        return tokens, lp_list, top_list

    @staticmethod
    def _constrain(reqs: list[Request], rows: list[int], logits: torch.Tensor) -> None:
        """Mask, in place, the tokens each request's grammar rejects now; end-of-turn only once it is complete
        (or when nothing else is allowed: ending beats emitting junk)."""
        V = logits.shape[1]
        for r, i in zip(reqs, rows):
            c = r.constraint
            if c.unconstrained:  # e.g. tool_choice "auto" while the reply is text
                continue
            rejected = c.rejected()  # (the tokenizer's vocabulary,) bool; cached and shared: never written to
            stops = [t for t in r.stop_ids if t < V]
            dead = c.dead
            if dead and not stops:
                continue  # only at the first token (later, _check_stop ends such a request): left as it is
            if rejected.shape[0] != V or (stops and (c.can_end or dead)):
                m = torch.ones(V, dtype=torch.bool)
                m[:min(V, rejected.shape[0])] = rejected[:V]
                if stops and (c.can_end or dead):
                    m[stops] = False
                rejected = m
            logits[i].masked_fill_(rejected.to(logits.device), float("-inf"))

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and logits.dtype == torch.float32 and logits.is_contiguous():
            return self.kernels.argmax(logits)
        return logits.argmax(dim=-1)

    def _penalise(self, reqs, rows, logits):
        dev = self.device
        idx = torch.tensor(rows, device=dev)
        counts, seen = self._counts[idx], self._seen[idx]
        pres = torch.tensor([r.params.presence_penalty for r in reqs], device=dev)[:, None]
        freq = torch.tensor([r.params.frequency_penalty for r in reqs], device=dev)[:, None]
        rep = torch.tensor([r.params.repetition_penalty for r in reqs], device=dev)[:, None]
        logits = logits - pres * (counts > 0) - freq * counts
        repd = torch.where(logits > 0, logits / rep, logits * rep)
        return torch.where(seen, repd, logits)

    def _dry(self, reqs, logits) -> None:
        """DRY penalties, in place, for the rows whose request asks for them."""
        if self._dry_breakers is None:
            import numpy as np

            vocab = self.cfg.vocab_size
            texts = [self.tokenizer.decode([i]) if self.tokenizer is not None else "" for i in range(vocab)]
            self._dry_breakers = np.array([any(c in t for c in DRY_BREAKERS) for t in texts], dtype=bool)
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for i, r in enumerate(reqs):
            p = r.params
            if not p.dry_multiplier:
                continue
            # only repeats of the output's own earlier text: a rewrite, an extraction or a quote copies the
            # prompt on purpose (the match may still reach back into the prompt)
            pen = dry_penalty(r.prompt + r.output, self._dry_breakers, p.dry_multiplier, p.dry_base,
                              p.dry_allowed_length, search_from=len(r.prompt))
            rows += [i] * len(pen)
            cols += pen
            vals += pen.values()
        if rows:
            # one scatter for the whole batch: a write per row cost ~0.1 ms each on a GPU (batch 32 decoded 18%
            # slower with DRY there); each (row, token) pair occurs once, so the update is exact
            idx = torch.tensor([rows, cols], device=logits.device)
            logits.index_put_((idx[0], idx[1]), torch.tensor(vals, dtype=logits.dtype, device=logits.device).neg(),
                              accumulate=True)

    def _draw(self, reqs: list[Request], logits: torch.Tensor, greedy: list[bool]) -> torch.Tensor:
        dev = self.device
        u = self._uniforms(reqs, greedy)
        top_k = [r.params.top_k for r in reqs]
        min_p = [r.params.min_p for r in reqs]
        top_p = [r.params.top_p for r in reqs]
        if (self.kernels is not None and logits.dtype == torch.float32 and logits.is_contiguous()
                and not any(top_k) and not any(min_p) and all(p >= 1.0 for p in top_p)):
            # plain temperature sampling, the same inverse CDF in one C pass per row (~3x faster at 32 rows)
            inv = torch.tensor([1.0 / (r.params.temperature or 1.0) for r in reqs], dtype=torch.float32)
            out = self.kernels.sample(logits, inv, u)
        else:
            out = self._draw_torch(reqs, logits, u, top_k, min_p, top_p)
        if any(greedy):
            rows = [i for i in range(len(reqs)) if greedy[i]]
            out[rows] = self._argmax(logits[rows].contiguous())
        return out

    def _uniforms(self, reqs: list[Request], greedy: list[bool]) -> torch.Tensor:
        """One uniform number per row, from the request's own generator when it has a seed (so seeded requests
        are reproducible whatever else is in the batch)."""
        u = torch.zeros(len(reqs))
        plain = [i for i, r in enumerate(reqs) if r.generator is None and not greedy[i]]
        if plain:
            u[plain] = torch.rand(len(plain), generator=self._rng)
        for i, r in enumerate(reqs):
            if r.generator is not None and not greedy[i]:
                u[i] = torch.rand(1, generator=r.generator)[0]
        return u

    def _draw_torch(self, reqs, logits, u, top_k, min_p, top_p) -> torch.Tensor:
        dev = self.device
        temps = torch.tensor([r.params.temperature or 1.0 for r in reqs], device=dev)[:, None]
        x = logits / temps
        if any(top_k):
            kmax = min(max(top_k), x.shape[-1])
            kth = x.topk(kmax, dim=-1).values  # (B, kmax) descending
            ks = torch.tensor([min(k, kmax) if k else kmax for k in top_k], device=dev)
            thresh = kth.gather(1, (ks - 1)[:, None])
            thresh = torch.where(torch.tensor(top_k, device=dev)[:, None] > 0, thresh, torch.full_like(thresh, -math.inf))
            x = x.masked_fill(x < thresh, -math.inf)
        probs = torch.softmax(x, dim=-1)
        if any(min_p):
            mp = torch.tensor(min_p, device=dev)[:, None]
            probs = probs.masked_fill(probs < mp * probs.amax(-1, keepdim=True), 0.0)
        if any(p < 1.0 for p in top_p):
            probs = _nucleus(probs, torch.tensor(top_p, device=dev, dtype=probs.dtype)[:, None])
        # inverse-CDF sampling: the row's uniform number against its cumulative probabilities. torch.multinomial
        # draws one exponential per vocabulary entry instead: ~0.5 ms per row for 49k tokens, 40% of a serving
        # step at 32 streams (measured with py-spy)
        cdf = probs.cumsum(-1)
        return torch.searchsorted(cdf, (u.to(dev) * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)

    # ---------------------------------------------------------------------------------------- convenience

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, n: int = 1,
                 on_event=None) -> list[Completion]:
        """n completions per prompt, returned prompt by prompt (prompt 0's n samples, then prompt 1's, ...).
        Drives step() itself; do not run it while another thread drives step() on this engine."""
        params = params or SamplingParams()
        if n < 1:
            raise MinichatError("n must be >= 1")
        if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int):
            raise MinichatError("generate() takes a list of prompts (lists of token ids); wrap a single prompt in a list")
        for p in prompts:
            self.check_prompt(p)
        reqs = []
        try:
            for pi, p in enumerate(prompts):
                for j in range(n):
                    seed = None if params.seed is None else params.seed + j
                    reqs.append(self.submit(p, params, seed=seed, prompt_index=pi, index=j))
            while any(not r.finished for r in reqs):
                evs = self.step()
                if on_event is not None:
                    for ev in evs:
                        on_event(ev)
        finally:
            for r in reqs:
                if not r.finished:
                    self.cancel(r)
            if any(not r.finished for r in reqs):
                self.step()  # let the cancellations free their slots
        return [r.completion() for r in reqs]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Yield a TokenEvent per new token of one prompt; closing the iterator early cancels it."""
        req = self.submit(prompt_ids, params)
        try:
            while not req.finished:
                for ev in self.step():
                    if ev.request is req and ev.token_id >= 0:
                        yield ev
        finally:
            if not req.finished:
                self.cancel(req)
                self.step()

    @torch.inference_mode()
    def score(self, ids: Sequence[int]) -> list[float]:
        """log π(ids[t] | ids[:t]) for t ≥ 1, fed one token at a time through the decoding path, i.e. with
        exactly the numerics sampling uses (for perplexity of the fast weight modes, or PPO's old log-probs)."""
        return self.score_many([ids])[0]

    @torch.inference_mode()
    def score_many(self, seqs: Sequence[Sequence[int]]) -> list[list[float]]:
        """score() of several sequences decoded together as one batch, i.e. with the numerics of batched
        sampling (above `small_rows` rows the big-batch kernels run)."""
        seqs = [self.check_prompt(s) for s in seqs]
        if self._running:
            raise MinichatError("score() needs an idle engine")
        if len(seqs) > self.max_batch:
            raise MinichatError(f"score_many() takes at most max_batch={self.max_batch} sequences, got {len(seqs)}")
        if not seqs:
            return []
        B, L = len(seqs), max(len(s) for s in seqs)
        self._ensure_cache(B, L)
        ids = torch.zeros(B, L, dtype=torch.long, device=self.device)  # rows past their end feed token 0
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, device=self.device)
        lp = torch.zeros(B, L - 1, device=self.device)
        logits = self._prefill_many([s[:1] for s in seqs], list(range(B)))
        for t in range(1, L):
            lp[:, t - 1] = torch.log_softmax(logits.float(), -1).gather(1, ids[:, t:t + 1])[:, 0]
            if t < L - 1:
                logits = self._decode(ids[:, t], [t] * B)
        rows = lp.tolist()
        return [rows[i][: len(s) - 1] for i, s in enumerate(seqs)]

    @torch.inference_mode()
    def embeddings(self, seqs: Sequence[Sequence[int]], pooling: str = "mean", batch: int = 16,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """(N, d_model) float32 unit vectors, one per token sequence: the final (normed) hidden states, averaged
        over the sequence's tokens ("mean") or taken at its last token ("last"), as llama.cpp's --pooling.
        Runs the model's own weights (not the decoding path's packed ones), so it needs no idle engine: a
        server calls it from another thread while generation goes on. dtype: the autocast type; by default
        fp32 for weights="fp32", else bf16 where this device multiplies it clearly faster (runtime.resolve_dtype)."""
        from minichat.runtime import autocast, resolve_dtype

        if pooling not in ("mean", "last"):
            raise MinichatError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        if dtype is None:
            if getattr(self, "_embed_dtype", None) is None:
                self._embed_dtype = torch.float32 if self.weights == "fp32" else resolve_dtype("auto", self.device)
            dtype = self._embed_dtype
        seqs = [self.check_prompt(s) for s in seqs]
        out = torch.zeros(len(seqs), self.cfg.d_model)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            L = len(seqs[rows[-1]])
            ids = torch.zeros(len(rows), L, dtype=torch.long)
            real = torch.zeros(len(rows), L)
            for r, i in enumerate(rows):
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                real[r, :len(seqs[i])] = 1
            # right padding: with causal attention no real token sees a pad, so no mask is needed
            with autocast(self.device, dtype):
                _, h = self.model(ids.to(self.device), logits="none", return_hidden=True)  # (B, L, D)
            h = h.float().cpu()
            if pooling == "mean":
                v = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)
            else:
                v = h[torch.arange(len(rows)), real.sum(1).long() - 1]
            out[rows] = torch.nn.functional.normalize(v, dim=-1)
        return out

    @torch.inference_mode()
    def logits(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Next-token logits (V,) after a prompt, through the engine's own forward (used by tests/benchmarks)."""
        ids = self.check_prompt(prompt_ids)
        if self._running:
            raise MinichatError("logits() needs an idle engine")
        self._ensure_cache(1, len(ids))
        return self._prefill(ids, 0).float().clone()


def _grow_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] >= n:
        return t
    out = torch.zeros((n,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


# ------------------------------------------------------------------------------------------ text helpers

class Detokenizer:
    """Turns a stream of token ids into text safely: never emits half a UTF-8 character, and holds back
    text that might be the start of a stop string, so a stop string never reaches the user.

        d = Detokenizer(tokenizer, stop=["\\nUser:"])
        for ev in engine.stream(...):
            print(d.push(ev.token_id), end="")
            if d.stopped: break          # then cancel the request
        print(d.flush())
    """

    def __init__(self, tokenizer, stop: Iterable[str] = (), skip_special: bool = True):
        self.tok = tokenizer
        self.stops = [s for s in stop if s]
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.text = ""  # all decoded text so far (cut at a stop string once found)
        self._emitted = 0  # characters of self.text already returned
        self._prefix = 0  # ids[_prefix:_read] decode to text we already have; re-decoding from there is safe
        self._read = 0
        self.stopped = False
        self.stop_string: str | None = None

    def push(self, token_id: int) -> str:
        """Add one token; returns the new text that is safe to show now."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[self._prefix:self._read], skip_special=self.skip_special)
        now = self.tok.decode(self.ids[self._prefix:], skip_special=self.skip_special)
        if now.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.text += now[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.stops:
            start = max(0, self._emitted - max(len(s) for s in self.stops))
            hits = [(self.text.find(s, start), s) for s in self.stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[:i]
                self.stopped, self.stop_string = True, s
                return self._take(len(self.text))
            # hold back a tail that is a prefix of some stop string
            hold = 0
            for s in self.stops:
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            return self._take(len(self.text) - hold)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self.text[self._emitted:upto]
        self._emitted = upto
        return out

    def flush(self) -> str:
        """At the end of generation: whatever text was held back."""
        if not self.stopped and self._read < len(self.ids):  # a dangling incomplete character
            self.text += self.tok.decode(self.ids[self._prefix:], skip_special=self.skip_special)[
                len(self.tok.decode(self.ids[self._prefix:self._read], skip_special=self.skip_special)):]
            self._read = len(self.ids)
        return self._take(len(self.text))
