"""The RLHF math as small pure functions on tensors (no models, no state), each checked by hand in the tests
(tests/rlhf/test_losses.py) and against its definition on random inputs (test_loss_properties.py, hypothesis).

Shapes: B rows (sequences), T positions, V vocabulary. A `mask` is a float or bool tensor with 1 on positions
that count. Log-probabilities are natural logs.

    masked_lm_loss   -(1/n) Σ_t m_t log p(y_t | y_<t)                        SFT, ptx
    selected_lm_loss the same from logits computed only where m_t = 1       SFT (the head skips the rest)
    ranking_loss     -(1/C) Σ_{w≻l} log σ(r_w − r_l), one term per prompt     InstructGPT eq. 1
    hinge_loss       max(0, m − (r_w − r_l))                                  the alternative it asks about
    kl_k1/k2/k3      per-token estimators of KL(π‖π_ref) from samples of π    (Schulman, "Approximating KL")
    gae              A_t = Σ_l (γλ)^l δ_{t+l},  δ_t = r_t + γ V_{t+1} − V_t    (Schulman et al. 2016)
    ppo_policy_loss  −E[min(ρA, clip(ρ, 1±ε)A)],  ρ = π/π_old                  (Schulman et al. 2017)
    ppo_value_loss   ½ E[max((V − R)², (clip(V, V_old ± ε_v) − R)²)]
    group_centered   r_i − mean_{j≠i} r_j over the k answers to one prompt     (RLOO, Ahmadian et al. 2024)
    ptx_loss         −γ_ptx E_pretrain[log π(x)]                               InstructGPT eq. 2
    dpo_loss         −log σ(β[(log π_w − log π_ref,w) − (log π_l − log π_ref,l)])  (Rafailov et al. 2023)
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 scores (autocast) up to fp32 for the loss; fp64 stays fp64 (`.float()` would round it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) per position: logits (B, T, V), targets (B, T) -> (B, T), computed in fp32."""
    return -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = −Σ_v p_v log p_v per position: (B, T, V) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    """Negative log-likelihood of the masked target tokens: 'mean' per counted token, or 'sum'.

    SFT trains only on assistant tokens: mask comes from the chat template, shifted to align with targets.
    """
    nll = -token_logprobs(logits, targets) * mask.float()
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.sum() / mask.float().sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def selected_lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                     reduction: str = "mean") -> torch.Tensor:
    """masked_lm_loss for logits computed only where mask is True (`Transformer(select=mask)`): logits (N, V),
    targets and mask (B, T). Equal to masked_lm_loss on the full logits for a 0/1 mask."""
    sel = mask.bool()
    nll = F.cross_entropy(logits.float(), targets[sel], reduction="sum")
    if reduction == "sum":
        return nll
    if reduction == "mean":
        return nll / sel.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


# --- reward model ---------------------------------------------------------------------------------------

def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """All ordered pairs (winner, loser) of one prompt's K answers; rank 0 is best, equal ranks are ties
    (tied answers give no pair). K answers without ties give C(K, 2) pairs."""
    return [(i, j) if ranks[i] < ranks[j] else (j, i)
            for i, j in itertools.combinations(range(len(ranks)), 2) if ranks[i] != ranks[j]]


def ranking_loss(r_w: torch.Tensor, r_l: torch.Tensor, group: torch.Tensor | None = None,
                 kind: str = "logsigmoid", margin: float = 1.0) -> torch.Tensor:
    """InstructGPT's eq. 1 over pairs (P,) of rewards; `group` (P,) names each pair's prompt.

    Every prompt contributes one term, the mean over its own pairs: −1/C(K,2) Σ log σ(r_w − r_l). The loss is
    the mean of those terms over prompts, so a prompt with K = 9 answers (36 pairs) weighs as much as one
    with K = 2, which is what keeps InstructGPT's ranking data from overfitting (Ouyang et al. 2022, §3.5).
    kind='hinge' uses max(0, margin − (r_w − r_l)) instead of −log σ(r_w − r_l).
    """
    if kind == "logsigmoid":
        per_pair = -F.logsigmoid(at_least_fp32(r_w) - at_least_fp32(r_l))
    elif kind == "hinge":
        per_pair = hinge_loss(r_w, r_l, margin)
    else:
        raise ValueError(f"kind must be 'logsigmoid' or 'hinge', got {kind!r}")
    if group is None:
        return per_pair.mean()
    n = int(group.max()) + 1 if group.numel() else 0
    sums = torch.zeros(n, dtype=per_pair.dtype, device=per_pair.device).index_add_(0, group, per_pair)
    counts = torch.zeros(n, dtype=per_pair.dtype, device=per_pair.device).index_add_(0, group, torch.ones_like(per_pair))
    used = counts > 0
    return (sums[used] / counts[used]).mean()


def hinge_loss(r_w: torch.Tensor, r_l: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Per pair max(0, m − (r_w − r_l)): zero once the winner leads by the margin (no further push)."""
    return F.relu(margin - (at_least_fp32(r_w) - at_least_fp32(r_l)))


# --- KL between the policy and the reference -------------------------------------------------------------

def kl_k1(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """log π − log π_ref: unbiased for KL(π‖π_ref) when tokens are sampled from π; can be negative."""
    return logp - logp_ref


def kl_k2(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """½ (log π − log π_ref)²: biased, low variance, never negative."""
    return 0.5 * (logp - logp_ref) ** 2


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """(ρ − 1) − log ρ with ρ = π_ref/π: unbiased and never negative."""
    log_ratio = logp_ref - logp
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


# --- PPO -----------------------------------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over right-aligned-from-0 answer tokens.

    rewards, values, mask: (B, T); positions with mask 0 come after an answer's end and count as terminal
    (value 0). Returns (advantages, returns = advantages + values), both zero where mask is 0.
    """
    mask = mask.to(values.dtype)
    B, T = values.shape
    adv = torch.zeros_like(values)
    last = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x − mean) / std over the masked positions (keeping the mean when shift_mean is False).
    all_sum: sums a tensor over processes (DDP), so every process whitens by the statistics of the whole batch,
    as one process holding all of it would."""
    if all_sum is None:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
    else:
        m = mask.to(x.dtype)
        n, total = all_sum(torch.stack([m.sum(), (x * m).sum()]))
        n = n.clamp(min=1)
        mean = total / n
        var = all_sum(((x - mean) ** 2 * m).sum()) / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate −min(ρA, clip(ρ, 1−ε, 1+ε)A), averaged over answer tokens.

    Also returns the clip fraction and the approximate KL(π_old‖π) (k3 estimator) for logging.
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped < unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """½ max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²): the value may not move far from its rollout value."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).float(), mask)
    return loss, {"value_clipfrac": clipfrac}


def group_centered(scores: torch.Tensor, k: int, scale: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Each score minus the leave-one-out mean of the other k − 1 scores to the same prompt.

    scores (B,) holds B/k consecutive groups of k answers to one prompt. A reward model trained on within-prompt
    comparisons fixes only differences between answers to the same prompt, not each prompt's level; this
    baseline removes that level without a value model, and leaves each answer's own score out so it is not
    biased toward the answer itself. r_i − mean_{j≠i} r_j = k/(k−1)·(r_i − mean_j r_j). With scale, the result
    is divided by the group's standard deviation (population, + eps), as GRPO does. k = 1: the scores unchanged.
    """
    if k < 1 or scores.shape[0] % k:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of k = {k}")
    if k == 1:
        return scores
    g = at_least_fp32(scores).view(-1, k)
    mean = g.mean(1, keepdim=True)
    out = (g - mean) * (k / (k - 1))
    if scale:
        out = out / (g.std(1, unbiased=False, keepdim=True) + eps)
    return out.view(-1).to(scores.dtype)


def ptx_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_ptx: float,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """The pretraining term of PPO-ptx as a loss: −γ_ptx · mean log π(x_t | x_<t) on pretraining text."""
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.float32)
    return gamma_ptx * masked_lm_loss(logits, targets, mask)


def dpo_loss(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on sequence log-probabilities (B,) of chosen (w) and rejected (l) answers.

    The implicit reward is β(log π − log π_ref); the loss is −log σ(r_w − r_l) (with label smoothing ε:
    −(1−ε) log σ(z) − ε log σ(−z), the conservative DPO of Mitchell 2023).
    """
    r_w = beta * (at_least_fp32(pi_w) - at_least_fp32(ref_w))
    r_l = beta * (at_least_fp32(pi_l) - at_least_fp32(ref_l))
    z = r_w - r_l
    loss = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    with torch.no_grad():
        stats = {"reward_chosen": r_w.mean(), "reward_rejected": r_l.mean(), "reward_acc": (z > 0).float().mean(),
                 "reward_margin": z.mean()}
    return loss.mean(), stats
