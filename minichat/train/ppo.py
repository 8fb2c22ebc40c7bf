"""`minichat ppo`: PPO-ptx against a reward model (InstructGPT step 3).

Each iteration:
  1. rollouts: the engine samples k answers (`samples_per_prompt`, usually 1) for each of a batch of prompts
     from the policy π
  2. scoring (no gradients): log π and entropy, log π_ref (the frozen SFT model), the reward model's score of
     each finished answer, and the value model's V(s_t) at every answer token
  3. rewards per token: −β·(log π − log π_ref), plus at the answer's last token the RM score (plus a penalty
     when the answer never ended); β fixed, or adapted toward a target KL (Ziegler et al. 2019). With a group
     baseline the terminal score is centred on the other k − 1 answers to the same prompt (leave-one-out)
  4. GAE (γ = 1, λ) -> advantages (whitened) and returns; baseline "group": no value model, the advantage of a
     token is the sum of the rewards from it to the answer's end (the centred score and the future KL penalties)
  5. several epochs over minibatches: clipped surrogate + clipped value loss + γ_ptx · pretraining NLL (PPO-ptx)
  6. optional EMA of the policy weights; metrics; periodic atomic checkpoints (policy + value + optimizer)

Memory: policy + reference + reward + value = four trunks, or three with `ppo.value_on_reward_trunk`
(the value head then reads the frozen reward trunk's hidden states; only the head trains), or three with
`ppo.baseline group` (no value model at all). With `--lora.rank r` the policy and the value model train
low-rank adapters only (no optimizer state for their frozen weights); the reference is the policy with its
adapters switched off, and the value model is the reward model with its own adapters switched on: two trunks.
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
from minichat.heads import read_scalar
from minichat.lora import LoRAConfig, add_lora, adapters_disabled
from minichat.losses import (KL_ESTIMATORS, entropy_from_logits, gae, group_centered, masked_mean, ppo_policy_loss,
                             ppo_value_loss, ptx_loss, token_logprobs, whiten)

# "value": GAE on a learned value model (InstructGPT); "group": no value model, the terminal score minus the
# leave-one-out mean of the other answers to the same prompt (RLOO's baseline, inside PPO's clipped objective);
# "group_value": the centred score and GAE on a value model
BASELINES = ("value", "group", "group_value")


@dataclass
class PPOAlgoConfig:
    iterations: int = 100
    rollout_batch: int = 16  # answers per iteration, all processes together (prompts: rollout_batch / k)
    samples_per_prompt: int = 1  # k answers sampled per prompt
    baseline: str = "value"  # one of BASELINES; "group" and "group_value" need samples_per_prompt >= 2
    group_scale: bool = False  # also divide the centred scores by their group's standard deviation (GRPO)
    # c: the score is RM(x, y) + c·log π_ref(y | x), adding the reference's likelihood of the whole answer. With
    # the KL penalty β the optimum is π ∝ π_ref^(1 + c/β)·exp(RM/β): the SFT model's own confidence counts as a
    # second judge (on held-out comparisons it orders answers like the labelers more often than a small RM)
    ref_logp_coef: float = 0.0
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
    # recompute each block in the backward pass: the saved activations of policy and value (~1.2 MB a token
    # for SmolLM2) dominate PPO's memory once LoRA has removed the optimizer state
    activation_checkpointing: bool = False

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
        if self.baseline not in BASELINES:
            raise ConfigError(f"ppo.baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.samples_per_prompt < 1 or self.rollout_batch % self.samples_per_prompt:
            raise ConfigError(f"ppo.samples_per_prompt ({self.samples_per_prompt}) must be at least 1 and divide "
                              f"ppo.rollout_batch ({self.rollout_batch})")
        if self.baseline != "value" and self.samples_per_prompt < 2:
            raise ConfigError(f"ppo.baseline {self.baseline} compares answers to the same prompt: it needs "
                              "ppo.samples_per_prompt >= 2")
        if self.baseline == "group" and self.value_on_reward_trunk:
            raise ConfigError("ppo.baseline group uses no value model, so ppo.value_on_reward_trunk has no meaning")

    @property
    def uses_value(self) -> bool:
        return self.baseline != "group"


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
    # --lora.rank 16: policy and value train adapters only; the reference is the policy with them off, the
    # reward the value model with them off
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    runtime: runtime.RuntimeConfig = field(default_factory=runtime.RuntimeConfig)

    def validate(self) -> None:
        if self.lora.rank and self.ppo.ema > 0:
            raise ConfigError("ppo.ema averages whole weights; with LoRA (--lora.rank) it is not available: "
                              "set --ppo.ema 0")


def preset_tiny() -> PPOConfig:
    return PPOConfig(out_dir="runs/ppo-tiny", save_every=2, ppo=PPOAlgoConfig(
        iterations=4, rollout_batch=8, max_new_tokens=16, minibatch=4, lr=1e-4, value_lr=1e-4))


def preset_lora() -> PPOConfig:
    """The lean PPO: adapters of rank 16 on every linear layer of the blocks (learning at 10x full
    fine-tuning's rate) and recomputed activations. SmolLM2-135M: 3.1-3.4 GiB peak instead of 10.1-10.3,
    at about the same time per iteration (bench/results/rlhf.md)."""
    cfg = PPOConfig(out_dir="runs/ppo-lora", lora=LoRAConfig(rank=16, alpha=32.0))
    cfg.ppo.lr, cfg.ppo.value_lr, cfg.ppo.activation_checkpointing = 1e-4, 1e-4, True
    return cfg


PRESETS = {"default": PPOConfig, "tiny": preset_tiny, "lora": preset_lora}


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
        return read_scalar(self.head, hidden)


class ValueOnAdaptedRewardTrunk(nn.Module):
    """V(s) = its own head on the reward model's weights plus the value's LoRA adapters. The reward is read with
    the adapters switched off, the values with them on, so the reward weights are held once (LoRA runs only).
    The trunk is the reward model's own module, so it follows the value's train/eval mode, as the policy's
    scoring pass does (models here train without dropout)."""

    def __init__(self, reward: nn.Module):
        super().__init__()
        self.trunk = reward
        self.head = copy.deepcopy(reward.head).requires_grad_(True)

    def forward(self, idx: torch.Tensor, key_mask: torch.Tensor | None = None, per_token: bool = True) -> torch.Tensor:
        h = self.trunk.hidden(idx, key_mask=key_mask)  # (B, T, D)
        return read_scalar(self.head, h if per_token else h[:, -1])


def _all_mean(values: list[float], dist: runtime.Dist, device) -> list[float]:
    if not dist.enabled:
        return values
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return (t / dist.world).tolist()


def _all_sum(dist: runtime.Dist):
    """A function summing a tensor over the processes (None for one process)."""
    if not dist.enabled:
        return None
    import torch.distributed as tdist

    def all_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        tdist.all_reduce(t)
        return t

    return all_sum


def _tensors_for_save(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    sd = module.state_dict()
    if isinstance(module, ValueOnAdaptedRewardTrunk):  # the reward's own weights come from reward_from
        sd = {k: v for k, v in sd.items() if k.startswith("head.") or ".lora_" in k}
    if getattr(getattr(module, "cfg", None), "tie_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied: stored once, as embed.weight
    return {prefix + k: v.detach().contiguous().cpu() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ the run

def run(cfg: PPOConfig) -> dict:
    C.validate(cfg)
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
    add_lora(policy, cfg.lora, cfg.runtime.seed)  # rank 0: nothing changes
    # with adapters the reference is the policy's own frozen weights (adapters off): not loaded twice
    ref = None
    if not cfg.lora.rank or cfg.ref_from not in ("", cfg.policy_from):
        ref = freeze_lm(load_lm(cfg.ref_from or cfg.policy_from, device)[0])
    ref_model = ref if ref is not None else policy  # read inside adapters_disabled: a no-op for a separate model
    reward, rtok, _ = load_scalar_model(cfg.reward_from, device, allow_lm=False)
    freeze_lm(reward)
    if rtok.vocab_size != tok.vocab_size or rtok.encode("hello world") != tok.encode("hello world"):
        raise MinichatError(f"the reward model {cfg.reward_from} and the policy {cfg.policy_from} use different "
                            "tokenizers; train the reward model from the SFT model")
    value: nn.Module | None = None
    if not a.uses_value:
        pass
    elif a.value_on_reward_trunk:
        value = ValueHeadOnTrunk(reward.head).to(device)
    elif cfg.lora.rank and cfg.value_from in ("", cfg.reward_from):
        add_lora(reward, cfg.lora, cfg.runtime.seed + 1)  # the value's adapters; the reward reads them off
        value = ValueOnAdaptedRewardTrunk(reward).train()
    else:
        value = load_scalar_model(cfg.value_from or cfg.reward_from, device)[0].train()
        if cfg.lora.rank:
            add_lora(value, cfg.lora, cfg.runtime.seed + 1)
            value.head.requires_grad_(True)  # the value head trains whole
    if a.activation_checkpointing:
        from minichat.model import Transformer

        for m in [*policy.modules(), *(value.modules() if value is not None else ())]:
            if isinstance(m, Transformer):
                m.checkpoint_activations = True
    policy.train()

    # prompts: rendered with the chat template and cut from the left to leave room for the answer
    report = DataReport("ppo")
    max_prompt = a.max_prompt_len or policy.cfg.max_seq_len - a.max_new_tokens
    if max_prompt < 4:
        raise ConfigError(f"ppo.max_new_tokens ({a.max_new_tokens}) leaves no room for prompts in a context of "
                          f"{policy.cfg.max_seq_len}")
    prompts = []
    for i, msgs in enumerate(load_prompts(require_file(cfg.prompts, "--prompts (a prompt file)"), tok.meta.default_system)):
        ids, _ = tok.render_chat(msgs, add_generation_prompt=True)
        if len(ids) > max_prompt:
            report.warn("prompts_truncated_from_the_left", f"prompt {i}")
            ids = ids[-max_prompt:]
        prompts.append(ids)
    ptx = PtxStream(a.ptx_data, tok, a.ptx_seq_len, cfg.runtime.seed) if a.ptx_coef > 0 else None

    k = a.samples_per_prompt
    if a.rollout_batch % (dist.world * k):
        raise ConfigError(f"ppo.rollout_batch ({a.rollout_batch}) must be divisible by the {dist.world} processes "
                          f"times ppo.samples_per_prompt ({k}): a prompt's answers stay on one process")
    pol_params = [p for p in policy.parameters() if p.requires_grad]
    val_params = [p for p in value.parameters() if p.requires_grad] if value is not None else []
    groups = [{"params": pol_params, "lr": a.lr}] + ([{"params": val_params, "lr": a.value_lr}] if val_params else [])
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.95),
                            fused=device.type in ("cpu", "cuda"))
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
        if value is not None:
            value.load_state_dict({n[6:]: v for n, v in extra.items() if n.startswith("value.")}, strict=False)
        if ema is not None:
            ema.update({n[4:]: v.float() for n, v in extra.items() if n.startswith("ema.")})
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

        fwd_policy, fwd_value = DDP(policy), (DDP(value) if value is not None else None)

    def save(final: bool = False) -> Path | None:
        if not dist.is_main:
            return None
        extra_cfg = {"kind": "lm", "stage": "ppo", "ppo": C.to_dict(cfg)}
        extra = _tensors_for_save(value, "value.") if value is not None else {}
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
        vdesc = ("none (group baseline)" if value is None else "head on the reward trunk" if a.value_on_reward_trunk
                 else "adapters and a head on the reward model's weights" if isinstance(value, ValueOnAdaptedRewardTrunk)
                 else cfg.value_from or cfg.reward_from)
        lora = (f" with LoRA rank {cfg.lora.rank} (reference: the same weights, adapters off)"
                if cfg.lora.rank and ref is None else f" with LoRA rank {cfg.lora.rank}" if cfg.lora.rank else "")
        n_adapt = sum(p.numel() for n, p in policy.named_parameters() if ".lora_" in n)
        n_pol = f"{policy.num_params() - n_adapt:,} parameters" + (f" (+ {n_adapt:,} in adapters)" if n_adapt else "")
        print(f"[ppo] policy {n_pol} from {cfg.policy_from}{lora}; reward {cfg.reward_from}; "
              f"value {vdesc}; {k} answers per prompt; "
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
        for grp, lr in zip(opt.param_groups, (a.lr, a.value_lr)):
            grp["lr"] = lr * warm

        # 1. rollouts
        t0 = time.perf_counter()
        idx = sampler.indices(it, a.rollout_batch // k, dist.rank, dist.world)
        # k answers per prompt, in consecutive groups (prompt 0's k answers, then prompt 1's, ...)
        comps = _sample(policy, tok, [prompts[i] for i in idx], a, seed=cfg.runtime.seed * 7919 + it * 131 + dist.rank)
        batch_prompts = [prompts[i] for i in idx for _ in range(k)]
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
            with adapters_disabled(ref_model):
                ref_logits, _ = answer_logits(ref_model, lay, temperature=a.temperature)
            ref_logp = token_logprobs(ref_logits, lay["ids"][:, P:P + R])
            del ref_logits
            with adapters_disabled(reward):  # the value's adapters, where they sit on the reward's weights
                h = reward.hidden(lay["ids"], key_mask=lay["key_mask"])
            last_pos = P + lay["lengths"] - 1
            score = read_scalar(reward.head, h[torch.arange(B, device=device), last_pos])
            trunk_h = None
            if value is None:
                old_values = torch.zeros(B, R, device=device)
            elif a.value_on_reward_trunk:
                trunk_h = h[:, P - 1:P + R - 1].float()
                old_values = value(trunk_h)
            else:
                old_values = value(lay["ids"], key_mask=lay["key_mask"], per_token=True)[:, P - 1:P + R - 1]
            del h
        # 3. rewards per token
        kl_tok = KL_ESTIMATORS[a.kl_estimator](old_logp, ref_logp) * mask
        ref_seq_logp = (ref_logp * mask).sum(1)
        penalised = score + a.ref_logp_coef * ref_seq_logp + a.unfinished_penalty * (1.0 - finished)
        terminal = group_centered(penalised, k, a.group_scale) if a.baseline != "value" else penalised
        rewards = -kl_ctl.beta * kl_tok
        rewards[torch.arange(B, device=device), lay["lengths"] - 1] += terminal
        # 4. advantages (no value model: λ = 1 and V = 0 make GAE the sum of the rewards still to come)
        adv, returns = gae(rewards, old_values * mask, mask, a.gamma, a.lam if value is not None else 1.0)
        if a.whiten_advantages:  # over every process's rollouts, as one process would
            adv = whiten(adv, mask, all_sum=_all_sum(dist))
        t_score = time.perf_counter() - t1

        # 5. PPO epochs over minibatches
        t2 = time.perf_counter()
        stats: dict[str, list[float]] = {n: [] for n in ("policy_loss", "value_loss", "ptx_loss", "clipfrac",
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
                    vl, vst = torch.zeros(()), {}
                    if value is not None:
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
                if value is not None:
                    stats["value_loss"].append(float(vl.detach()))
                stats["ptx_loss"].append(float(xl.detach()))
                for n, val in {**pst, **vst}.items():
                    stats[n].append(float(val))
        t_train = time.perf_counter() - t2
        # 6. EMA, KL controller, metrics, checkpoints
        if ema is not None:
            with torch.no_grad():
                sd = policy.state_dict()
                for n, v in ema.items():
                    v.mul_(a.ema).add_(sd[n].float(), alpha=1.0 - a.ema)
        seq_kl = float((kl_tok.sum(1)).mean())
        row = {n: sum(v) / len(v) for n, v in stats.items() if v}
        row.update(reward=float(score.mean()), reward_penalised=float(penalised.mean()), kl=seq_kl,
                   ref_logp=float(ref_seq_logp.mean()),
                   entropy=sum(entropies) / len(entropies), answer_len=float(lay["lengths"].float().mean()),
                   unfinished=float(1.0 - finished.mean()), kl_coef=kl_ctl.beta)
        if k > 1:  # how far apart the answers to one prompt score: the signal a group baseline works with
            row["reward_group_std"] = float(score.view(-1, k).std(1, unbiased=False).mean())
        keys = sorted(row)
        row = dict(zip(keys, _all_mean([row[n] for n in keys], dist, device)))
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

    return sample(policy, tok, prompts, n=a.samples_per_prompt, max_new_tokens=a.max_new_tokens,
                  temperature=a.temperature, seed=seed, logprobs=a.temperature == 1.0)


def _barrier(dist: runtime.Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()


def main(argv: list[str]) -> int:
    cfg, _ = C.build(PPOConfig, argv, PRESETS, prog="minichat ppo",
                     description="PPO-ptx: optimise the SFT policy against a reward model.")
    run(cfg)
    return 0
