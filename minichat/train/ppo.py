"""`minichat ppo`: PPO-ptx against a reward model (InstructGPT step 3).

Each iteration:
  1. rollouts: the engine samples an answer for each of a batch of prompts from the policy π
  2. scoring (no gradients): log π and entropy, log π_ref (the frozen SFT model), the reward model's score of
     each finished answer, and the value model's V(s_t) at every answer token
  3. rewards per token: −β·(log π − log π_ref), plus at the answer's last token the RM score (plus a penalty
     when the answer never ended); β fixed, or adapted toward a target KL (Ziegler et al. 2019)
  4. GAE (γ = 1, λ) -> advantages (whitened) and returns
  5. several epochs over minibatches: clipped surrogate + clipped value loss + γ_ptx · pretraining NLL (PPO-ptx)
  6. optional EMA of the policy weights; metrics; periodic atomic checkpoints (policy + value + optimizer)

Memory: policy + reference + reward + value = four trunks, or three with `ppo.value_on_reward_trunk`
(the value head then reads the frozen reward trunk's hidden states; only the head trains).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from minichat import config as C
from minichat import runtime
from minichat.errors import ConfigError, MinichatError
from minichat.losses import (KL_ESTIMATORS, entropy_from_logits, gae, masked_mean, ppo_policy_loss, ppo_value_loss,
                             ptx_loss, token_logprobs, whiten)


@dataclass
class PPOAlgoConfig:
    iterations: int = 100
    rollout_batch: int = 16  # prompts (= answers) per iteration, all processes together
    max_new_tokens: int = 64
    temperature: float = 1.0
    epochs: int = 1  # passes over each batch of rollouts
    minibatch: int = 8  # answers per gradient step (per process)
    lr: float = 1e-5
    value_lr: float = 1e-5
    warmup_iterations: int = 2
    weight_decay: float = 0.0
    clip: float = 0.2  # ε of the clipped surrogate
    value_clip: float = 0.2
    vf_coef: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.02  # β
    kl_estimator: str = "k1"  # per-token penalty: k1 (log-ratio, as InstructGPT), k2 or k3
    adaptive_kl: bool = False
    target_kl: float = 6.0  # nats per answer, for the adaptive controller
    kl_horizon: float = 10000.0
    whiten_advantages: bool = True
    ptx_coef: float = 0.0  # γ_ptx; InstructGPT used 27.8 (with their own loss scaling); needs ptx_data
    ptx_data: str = ""  # pretraining text: a file, folder, .jsonl, or "builtin"
    ptx_batch: int = 4  # pretraining rows per minibatch
    ptx_seq_len: int = 64
    unfinished_penalty: float = -1.0  # added to the score of answers that hit max_new_tokens without ending
    ema: float = 0.0  # decay of an EMA of the policy weights (0 = off); the EMA becomes the final model
    grad_clip: float = 1.0
    value_on_reward_trunk: bool = False  # value = a head on the frozen reward trunk (one trunk less)
    max_prompt_len: int = 0  # 0: the context minus max_new_tokens

    def validate(self) -> None:
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"ppo.kl_estimator must be one of {', '.join(KL_ESTIMATORS)}")
        if self.iterations <= 0 or self.rollout_batch <= 0 or self.minibatch <= 0 or self.epochs <= 0:
            raise ConfigError("ppo.iterations, rollout_batch, minibatch and epochs must be positive")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError("ppo.ema must be in [0, 1)")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_data (pretraining text, or 'builtin')")
        if not 0.0 <= self.lam <= 1.0 or not 0.0 <= self.gamma <= 1.0:
            raise ConfigError("ppo.gamma and ppo.lam must be in [0, 1]")


@dataclass
class PPOConfig:
    policy_from: str = "runs/sft"  # the SFT model: the policy starts here and it is the frozen reference
    ref_from: str = ""  # default: policy_from
    reward_from: str = "runs/reward"
    value_from: str = ""  # default: reward_from (InstructGPT initialises the value function from the RM)
    prompts: str = ""  # JSONL (prompt or messages) or .txt, one prompt a line
    out_dir: str = "runs/ppo"
    save_every: int = 20  # iterations; 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: str = "auto"  # auto | never | a checkpoint path
    progress: bool = True
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    runtime: runtime.RuntimeConfig = field(default_factory=runtime.RuntimeConfig)


def preset_tiny() -> PPOConfig:
    return PPOConfig(out_dir="runs/ppo-tiny", save_every=2, ppo=PPOAlgoConfig(
        iterations=4, rollout_batch=8, max_new_tokens=16, minibatch=4, lr=1e-4, value_lr=1e-4))


PRESETS = {"default": PPOConfig, "tiny": preset_tiny}


# ------------------------------------------------------------------------------------------------ pieces

class AdaptiveKL:
    """β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon): a proportional controller toward the target KL."""

    def __init__(self, beta: float, target: float, horizon: float, adaptive: bool):
        self.beta, self.target, self.horizon, self.adaptive = beta, target, horizon, adaptive

    def update(self, kl: float, n_steps: int) -> None:
        if self.adaptive:
            err = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.beta *= 1.0 + err * n_steps / self.horizon


def layout(prompts: list[list[int]], answers: list[list[int]], pad_id: int, device) -> dict:
    """One row per rollout: [left-padded prompt | answer, right-padded]; P = longest prompt.

    Position P − 1 + t predicts answer token t, so logits/values for the answer are read at [P−1, P+R−1).
    """
    P = max(len(p) for p in prompts)
    R = max(len(a) for a in answers)
    B = len(prompts)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    key_mask = torch.zeros((B, P + R), dtype=torch.bool)
    amask = torch.zeros((B, R))
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + len(a)] = torch.tensor(a)
        key_mask[i, P - len(p):P + len(a)] = True
        amask[i, :len(a)] = 1.0
    lengths = torch.tensor([len(a) for a in answers])
    return {"ids": ids.to(device), "key_mask": key_mask.to(device), "mask": amask.to(device), "P": P, "R": R,
            "lengths": lengths.to(device)}


def answer_logits(policy, lay: dict, extra_rows: torch.Tensor | None = None, temperature: float = 1.0):
    """Logits (B, R, V) for the answer tokens only (the LM head is not run over prompt positions), divided by
    the sampling temperature (the distribution the answers were drawn from); with extra_rows (pretraining
    text), their raw logits too, from the same forward call (one call per step keeps DDP simple)."""
    ids, km, P, R = lay["ids"], lay["key_mask"], lay["P"], lay["R"]
    B = ids.shape[0]
    if extra_rows is not None:
        T = max(ids.shape[1], extra_rows.shape[1])
        pad = lambda t, fill: torch.nn.functional.pad(t, (0, T - t.shape[1]), value=fill)
        ids = torch.cat([pad(ids, 0), pad(extra_rows, 0)])
        km = torch.cat([pad(km, False), pad(torch.ones_like(extra_rows, dtype=torch.bool), False)])
    _, h = policy(ids, key_mask=km, return_hidden=True, logits="none")
    head = (policy.module if hasattr(policy, "module") else policy).lm_head
    ans = head(h[:B, P - 1:P + R - 1])
    if temperature > 0 and temperature != 1.0:
        ans = ans / temperature
    return ans, (head(h[B:, :extra_rows.shape[1]]) if extra_rows is not None else None)


class ValueHeadOnTrunk(nn.Module):
    """V(s) = head(h) on hidden states of the frozen reward trunk, computed once per rollout batch."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = copy.deepcopy(head)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).squeeze(-1).float()


def _all_mean(values: list[float], dist: runtime.Dist, device) -> list[float]:
    if not dist.enabled:
        return values
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return (t / dist.world).tolist()


def _tensors_for_save(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    sd = module.state_dict()
    if getattr(getattr(module, "cfg", None), "tie_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied: stored once, as embed.weight
    return {prefix + k: v.detach().contiguous().cpu() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ the run

def run(cfg: PPOConfig) -> dict:
    device, dtype, dist = runtime.setup(cfg.runtime)
    try:
        return _run(cfg, device, dtype, dist)
    finally:
        runtime.shutdown_distributed()


def _run(cfg: PPOConfig, device, dtype, dist) -> dict:
    from minichat.checkpoint import CheckpointManager, load_weights, save_checkpoint
    from minichat.data.chat import DataReport, EpochSampler, load_prompts
    from minichat.heads import load_scalar_model
    from minichat.train.common import PtxStream, freeze_lm, load_lm, require_file
    from minichat.train.loop import MetricsLog

    a = cfg.ppo
    out = Path(cfg.out_dir)
    policy, tok, _ = load_lm(cfg.policy_from, device)
    ref = freeze_lm(load_lm(cfg.ref_from or cfg.policy_from, device)[0])
    reward, rtok, _ = load_scalar_model(cfg.reward_from, device, allow_lm=False)
    freeze_lm(reward)
    if rtok.vocab_size != tok.vocab_size or rtok.encode("hello world") != tok.encode("hello world"):
        raise MinichatError(f"the reward model {cfg.reward_from} and the policy {cfg.policy_from} use different "
                            "tokenizers; train the reward model from the SFT model")
    if a.value_on_reward_trunk:
        value: nn.Module = ValueHeadOnTrunk(reward.head).to(device)
    else:
        value = load_scalar_model(cfg.value_from or cfg.reward_from, device)[0].train()
    policy.train()

    # prompts: rendered with the chat template and cut from the left to leave room for the answer
    report = DataReport("ppo")
    max_prompt = a.max_prompt_len or policy.cfg.max_seq_len - a.max_new_tokens
    if max_prompt < 4:
        raise ConfigError(f"ppo.max_new_tokens ({a.max_new_tokens}) leaves no room for prompts in a context of "
                          f"{policy.cfg.max_seq_len}")
    prompts = []
    for i, msgs in enumerate(load_prompts(require_file(cfg.prompts, "--prompts (a prompt file)"))):
        ids, _ = tok.render_chat(msgs, add_generation_prompt=True)
        if len(ids) > max_prompt:
            report.warn("prompts_truncated_from_the_left", f"prompt {i}")
            ids = ids[-max_prompt:]
        prompts.append(ids)
    ptx = PtxStream(a.ptx_data, tok, a.ptx_seq_len, cfg.runtime.seed) if a.ptx_coef > 0 else None

    if a.rollout_batch % dist.world:
        raise ConfigError(f"ppo.rollout_batch ({a.rollout_batch}) must be divisible by the {dist.world} processes")
    per_rank = a.rollout_batch // dist.world
    pol_params = [p for p in policy.parameters() if p.requires_grad]
    val_params = [p for p in value.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": pol_params, "lr": a.lr}, {"params": val_params, "lr": a.value_lr}],
                            lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.95), fused=device.type in ("cpu", "cuda"))
    kl_ctl = AdaptiveKL(a.kl_coef, a.target_kl, a.kl_horizon, a.adaptive_kl)
    tied = policy.cfg.tie_embeddings
    ema = None
    if a.ema > 0:  # tied lm_head is embed: tracked once
        ema = {k: v.detach().clone().float() for k, v in policy.state_dict().items() if not (tied and k == "lm_head.weight")}
    ckpt = CheckpointManager(out, keep=cfg.keep_checkpoints)
    it = 0

    # resume: policy weights in model.safetensors; value (and EMA) beside them under prefixes
    path = None if cfg.resume == "never" else (ckpt.latest() if cfg.resume == "auto" else Path(cfg.resume))
    if path is not None:
        extra = load_weights(policy, path)
        value.load_state_dict({k[6:]: v for k, v in extra.items() if k.startswith("value.")}, strict=False)
        if ema is not None:
            ema.update({k[4:]: v.float() for k, v in extra.items() if k.startswith("ema.")})
        state = CheckpointManager.load_train_state(path)
        opt.load_state_dict(state["optimizer"])
        kl_ctl.beta = state["kl_coef"]
        it = int(state["step"])
        runtime.set_rng_state(state["rng"])
        if dist.is_main:
            print(f"[ppo] resumed from {path} at iteration {it}")

    fwd_policy, fwd_value = policy, value
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd_policy, fwd_value = DDP(policy), DDP(value)

    def save(final: bool = False) -> Path | None:
        if not dist.is_main:
            return None
        extra_cfg = {"kind": "lm", "stage": "ppo", "ppo": C.to_dict(cfg)}
        extra = _tensors_for_save(value, "value.")
        if ema is not None:
            extra.update({"ema." + k: v.contiguous() for k, v in ema.items()})
        state = {"step": it, "optimizer": opt.state_dict(), "rng": runtime.rng_state(), "kl_coef": kl_ctl.beta,
                 "ppo_config": asdict(cfg), "stage": "ppo"}
        if final:
            model = policy
            if ema is not None:  # the EMA weights are the final policy
                model = copy.deepcopy(policy)
                model.load_state_dict(ema, strict=not tied)
            return save_checkpoint(out / "final", model=model, tokenizer=tok, extra_config=extra_cfg)
        return ckpt.save(it, model=policy, tokenizer=tok, extra_config=extra_cfg, train_state=state, extra_tensors=extra)

    log = MetricsLog(out / "metrics.jsonl", dist.is_main)
    sampler = EpochSampler(len(prompts), cfg.runtime.seed)
    if dist.is_main:
        n_tr = sum(p.numel() for p in pol_params) + sum(p.numel() for p in val_params)
        print(f"[ppo] policy {policy.num_params():,} parameters from {cfg.policy_from}; reward {cfg.reward_from}; "
              f"value {'head on the reward trunk' if a.value_on_reward_trunk else (cfg.value_from or cfg.reward_from)}; "
              f"{n_tr:,} trained; {len(prompts):,} prompts; device {device}, processes {dist.world}")
        print(report.summary())
    bar = None
    if cfg.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=a.iterations, initial=it, desc="ppo", dynamic_ncols=True)
    t_start = time.perf_counter()
    last: dict = {}
    pad = tok.pad_id
    while it < a.iterations:
        warm = min(1.0, (it + 1) / max(1, a.warmup_iterations))
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = a.lr * warm, a.value_lr * warm

        # 1. rollouts
        t0 = time.perf_counter()
        idx = sampler.indices(it, a.rollout_batch, dist.rank, dist.world)
        batch_prompts = [prompts[i] for i in idx]
        comps = _sample(policy, tok, batch_prompts, a, seed=cfg.runtime.seed * 7919 + it * 131 + dist.rank)
        engine_logp = a.temperature == 1.0 and dtype == torch.float32 and all(c.logprobs is not None for c in comps)
        answers = [c.token_ids if c.token_ids else [tok.im_end_id] for c in comps]
        finished = torch.tensor([c.finish_reason == "stop" for c in comps], dtype=torch.float32, device=device)
        t_roll = time.perf_counter() - t0
        n_gen = sum(len(x) for x in answers)

        # 2. scoring without gradients
        t1 = time.perf_counter()
        lay = layout(batch_prompts, answers, pad, device)
        mask, P, R = lay["mask"], lay["P"], lay["R"]
        B = len(answers)
        with torch.no_grad(), runtime.autocast(device, dtype):
            if engine_logp:  # the engine reports log π(token) of the very weights being trained: no extra pass
                old_logp = torch.zeros(B, R, device=device)
                for i, c in enumerate(comps):
                    old_logp[i, :len(c.logprobs)] = torch.tensor(c.logprobs[:R])
            else:
                logits, _ = answer_logits(policy, lay, temperature=a.temperature)
                old_logp = token_logprobs(logits, lay["ids"][:, P:P + R])
                del logits
            ref_logits, _ = answer_logits(ref, lay, temperature=a.temperature)
            ref_logp = token_logprobs(ref_logits, lay["ids"][:, P:P + R])
            del ref_logits
            h = reward.hidden(lay["ids"], key_mask=lay["key_mask"])
            last_pos = P + lay["lengths"] - 1
            score = reward.head(h[torch.arange(B, device=device), last_pos]).squeeze(-1).float()
            if a.value_on_reward_trunk:
                trunk_h = h[:, P - 1:P + R - 1].float()
                old_values = value(trunk_h)
            else:
                trunk_h = None
                old_values = value(lay["ids"], key_mask=lay["key_mask"], per_token=True)[:, P - 1:P + R - 1]
            del h
        # 3. rewards per token
        kl_tok = KL_ESTIMATORS[a.kl_estimator](old_logp, ref_logp) * mask
        penalised = score + a.unfinished_penalty * (1.0 - finished)
        rewards = -kl_ctl.beta * kl_tok
        rewards[torch.arange(B, device=device), lay["lengths"] - 1] += penalised
        # 4. advantages
        adv, returns = gae(rewards, old_values * mask, mask, a.gamma, a.lam)
        if a.whiten_advantages:
            adv = whiten(adv, mask)
        t_score = time.perf_counter() - t1

        # 5. PPO epochs over minibatches
        t2 = time.perf_counter()
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "ptx_loss", "clipfrac",
                                                           "approx_kl", "value_clipfrac")}
        trained_tokens = 0
        entropies: list[float] = []
        g = torch.Generator().manual_seed(cfg.runtime.seed + 104729 * it + dist.rank)
        for epoch in range(a.epochs):
            perm = torch.randperm(B, generator=g).tolist()
            for s in range(0, B, a.minibatch):
                mb = perm[s:s + a.minibatch]
                sub = {"ids": lay["ids"][mb], "key_mask": lay["key_mask"][mb], "P": P, "R": R}
                m = mask[mb]
                with runtime.autocast(device, dtype):
                    extra_rows = None
                    if ptx is not None:
                        extra_rows, ptx_y = ptx.batch([it, epoch, s, dist.rank], a.ptx_batch, device)
                    logits, ptx_logits = answer_logits(fwd_policy, sub, extra_rows, a.temperature)
                    logp = token_logprobs(logits, sub["ids"][:, P:P + R])
                    if epoch == 0:  # policy entropy of the rollout distribution, from the first pass over it
                        with torch.no_grad():
                            entropies.append(masked_mean(entropy_from_logits(logits.detach()), m).item())
                    pl, pst = ppo_policy_loss(logp, old_logp[mb], adv[mb], m, a.clip)
                    if a.value_on_reward_trunk:
                        v = fwd_value(trunk_h[mb])
                    else:
                        v = fwd_value(sub["ids"], key_mask=sub["key_mask"], per_token=True)[:, P - 1:P + R - 1]
                    vl, vst = ppo_value_loss(v, old_values[mb], returns[mb], m, a.value_clip)
                    loss = pl + a.vf_coef * vl
                    xl = ptx_loss(ptx_logits, ptx_y, a.ptx_coef) if ptx is not None else torch.zeros(())
                    loss = loss + xl
                if not math.isfinite(float(loss.detach())):
                    good = ckpt.latest()
                    raise MinichatError(
                        f"the PPO loss became {float(loss.detach())} at iteration {it}; stopped. "
                        + (f"The last good checkpoint is {good}." if good else "No checkpoint was saved yet.")
                        + " Try a lower --ppo.lr or a larger --ppo.kl_coef.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if a.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(pol_params + val_params, a.grad_clip)
                opt.step()
                trained_tokens += int(sub["key_mask"].sum()) + (extra_rows.numel() if extra_rows is not None else 0)
                stats["policy_loss"].append(float(pl.detach()))
                stats["value_loss"].append(float(vl.detach()))
                stats["ptx_loss"].append(float(xl.detach()))
                for k, val in {**pst, **vst}.items():
                    stats[k].append(float(val))
        t_train = time.perf_counter() - t2
        # 6. EMA, KL controller, metrics, checkpoints
        if ema is not None:
            with torch.no_grad():
                sd = policy.state_dict()
                for k, v in ema.items():
                    v.mul_(a.ema).add_(sd[k].float(), alpha=1.0 - a.ema)
        seq_kl = float((kl_tok.sum(1)).mean())
        row = {k: sum(v) / len(v) for k, v in stats.items()}
        row.update(reward=float(score.mean()), reward_penalised=float(penalised.mean()), kl=seq_kl,
                   entropy=sum(entropies) / len(entropies), answer_len=float(lay["lengths"].float().mean()),
                   unfinished=float(1.0 - finished.mean()), kl_coef=kl_ctl.beta)
        keys = sorted(row)
        row = dict(zip(keys, _all_mean([row[k] for k in keys], dist, device)))
        kl_ctl.update(row["kl"], a.rollout_batch)
        it += 1
        row.update(stage="ppo", iteration=it, rollout_tokens_per_s=n_gen * dist.world / max(t_roll, 1e-9),
                   train_tokens_per_s=trained_tokens * dist.world / max(t_train, 1e-9), rollout_s=t_roll,
                   score_s=t_score, train_s=t_train, iteration_s=t_roll + t_score + t_train,
                   time_s=time.perf_counter() - t_start)
        last = row
        if it % cfg.log_every == 0 or it == a.iterations:
            log.write(**row)
        if bar is not None:
            bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.3f}", len=f"{row['answer_len']:.0f}")
            bar.update(1)
        if cfg.save_every and it % cfg.save_every == 0 and it < a.iterations:
            save()
            _barrier(dist)
    if bar is not None:
        bar.close()
    save()
    save(final=True)
    _barrier(dist)
    if dist.is_main:
        print(f"[ppo] done: iteration {it}, reward {last.get('reward', float('nan')):.3f}, "
              f"KL {last.get('kl', float('nan')):.3f}; checkpoint {out / 'final'}")
    last["warnings"] = dict(report.counts)
    return last


def _sample(policy, tok, prompts, a: PPOAlgoConfig, seed: int):
    from minichat.rollout import sample

    return sample(policy, tok, prompts, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=seed,
                  logprobs=a.temperature == 1.0)


def _barrier(dist: runtime.Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()


def main(argv: list[str]) -> int:
    cfg, _ = C.build(PPOConfig, argv, PRESETS, prog="minichat ppo",
                     description="PPO-ptx: optimise the SFT policy against a reward model.")
    run(cfg)
    return 0
