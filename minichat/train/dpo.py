"""`minichat dpo`: direct preference optimisation (Rafailov et al. 2023), the common alternative to RM + PPO.

    comparisons -> ordered pairs (chosen, rejected) -> reference log-probs computed once (then the reference
    is freed) -> loss −log σ(β[(log π_w − log π_ref,w) − (log π_l − log π_ref,l)]) -> shared loop
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from minichat import config as C
from minichat import runtime
from minichat.errors import ConfigError, MinichatError
from minichat.lora import LoRAConfig, add_lora, lora_flops
from minichat.losses import dpo_loss, ranking_pairs
from minichat.train.loop import TrainConfig, Trainer
from minichat.train.reward import RewardDataConfig


@dataclass
class DPOConfig:
    init_from: str = "smollm2"  # the SFT policy; also the reference unless ref_from is set
    ref_from: str = ""
    beta: float = 0.1
    label_smoothing: float = 0.0
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/dpo", max_steps=200, batch_size=8, lr=5e-6, min_lr=5e-7, warmup_steps=10, weight_decay=0.0,
        eval_every=50, eval_batches=20, save_every=100, log_every=10))
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # --lora.rank 16: train low-rank adapters only
    runtime: runtime.RuntimeConfig = field(default_factory=runtime.RuntimeConfig)

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError("beta must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing must be in [0, 0.5)")


def preset_tiny() -> DPOConfig:
    cfg = DPOConfig()
    cfg.train = TrainConfig(out_dir="runs/dpo-tiny", max_steps=20, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=2,
                            weight_decay=0.0, eval_every=10, eval_batches=5, save_every=10, log_every=5)
    cfg.data.max_len = 128
    return cfg


PRESETS = {"default": DPOConfig, "tiny": preset_tiny}


def to_pairs(rows) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) for every ordered pair of every ranking (ties give none)."""
    return [(r.prompt, r.answers[i], r.answers[j]) for r in rows for i, j in ranking_pairs(r.ranks)]


def pair_batch(pairs, pad_id: int):
    """Chosen rows then rejected rows, right-padded together: (x, y, mask) of 2B rows."""
    from minichat.train.common import collate_answers

    return collate_answers([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], pad_id)


@torch.no_grad()
def reference_logprobs(ref, pairs, pad_id: int, device, batch: int) -> torch.Tensor:
    """(N, 2): reference log π(chosen), log π(rejected) for every pair."""
    from minichat.train.common import sequence_logprobs

    out = []
    for s in range(0, len(pairs), batch):
        chunk = pairs[s:s + batch]
        x, y, m = (t.to(device) for t in pair_batch(chunk, pad_id))
        lp = sequence_logprobs(ref, x, y, m).float().cpu()
        out.append(torch.stack([lp[:len(chunk)], lp[len(chunk):]], 1))
    return torch.cat(out)


def run(cfg: DPOConfig) -> dict:
    device, dtype, dist = runtime.setup(cfg.runtime)
    try:
        from minichat.data.chat import EpochSampler
        from minichat.train.common import freeze_lm, load_lm, sequence_logprobs
        from minichat.train.reward import RewardConfig, prepare

        model, tok, _ = load_lm(cfg.init_from, device)
        max_len = min(model.cfg.max_seq_len, cfg.data.max_len)
        train_rows, val_rows, _, report = prepare(RewardConfig(data=cfg.data, runtime=cfg.runtime), tok, max_len)
        report.name = "dpo"
        train, val = to_pairs(train_rows), to_pairs(val_rows)
        if not train:
            raise MinichatError("no ordered pairs to train on")
        # the reference is needed only for these numbers: compute them once and free it
        ref = freeze_lm(load_lm(cfg.ref_from or cfg.init_from, device)[0])
        B, pad = cfg.train.batch_size, tok.pad_id
        with runtime.autocast(device, dtype):
            ref_train = reference_logprobs(ref, train, pad, device, B)
            ref_val = reference_logprobs(ref, val, pad, device, B) if val else None
        del ref
        total = model.num_params()
        trainable = add_lora(model, cfg.lora, cfg.runtime.seed)
        sampler = EpochSampler(len(train), cfg.runtime.seed)

        def batch_fn(step: int, part: int, n_parts: int):
            idx = sampler.indices(step, B, part, n_parts)
            x, y, m = pair_batch([train[i] for i in idx], pad)
            return x.to(device), y.to(device), m.to(device), ref_train[idx].to(device)

        def loss_fn(m, b):
            x, y, mask, ref_lp = b
            lp = sequence_logprobs(m, x, y, mask)
            n = ref_lp.shape[0]
            loss, stats = dpo_loss(lp[:n], lp[n:], ref_lp[:, 0], ref_lp[:, 1], cfg.beta, cfg.label_smoothing)
            return loss, {k: float(v) for k, v in stats.items()}

        def eval_fn(m) -> dict:
            losses, accs = [], []
            for s in range(0, min(len(val), cfg.train.eval_batches * B), B):
                x, y, mask = (t.to(device) for t in pair_batch(val[s:s + B], pad))
                lp = sequence_logprobs(m, x, y, mask)
                n = x.shape[0] // 2
                r = ref_val[s:s + n].to(device)
                loss, st = dpo_loss(lp[:n], lp[n:], r[:, 0], r[:, 1], cfg.beta, cfg.label_smoothing)
                losses.append(float(loss) * n)
                accs.append(float(st["reward_acc"]) * n)
            n = min(len(val), cfg.train.eval_batches * B)
            return {"val_loss": sum(losses) / n, "val_reward_acc": sum(accs) / n}

        avg = sum(2 * len(p) + len(c) + len(r) for p, c, r in train) / len(train)  # tokens per pair (two rows)
        trainer = Trainer(
            cfg.train, cfg.runtime, model, tok, device=device, dtype=dtype, dist=dist,
            batch_fn=batch_fn, loss_fn=loss_fn, eval_fn=eval_fn if val else None,
            tokens_per_step=int(B * avg) // dist.world,
            flops_per_token=lora_flops(model, int(avg / 2), trainable / total) if cfg.lora.rank
            else model.flops_per_token(int(avg / 2)),
            checkpoint_config={"kind": "lm", "stage": "dpo", "dpo": C.to_dict(cfg)}, stage="dpo",
        )
        if dist.is_main:
            lora = f" (LoRA rank {cfg.lora.rank}: {trainable:,} trained)" if cfg.lora.rank else ""
            print(f"[dpo] {total:,} parameters{lora} from {cfg.init_from}; {len(train):,} train pairs, "
                  f"{len(val):,} held out; beta {cfg.beta}; device {device}, processes {dist.world}")
            print(report.summary())
        result = trainer.fit()
        if dist.is_main:
            print(f"[dpo] done: step {result.get('step')}, held-out implicit-reward accuracy "
                  f"{result.get('val_reward_acc', float('nan')):.3f}; checkpoint {Path(cfg.train.out_dir) / 'final'}")
        result["warnings"] = dict(report.counts)
        return result
    finally:
        runtime.shutdown_distributed()


def main(argv: list[str]) -> int:
    cfg, _ = C.build(DPOConfig, argv, PRESETS, prog="minichat dpo",
                     description="Direct preference optimisation on pairwise data.")
    run(cfg)
    return 0
