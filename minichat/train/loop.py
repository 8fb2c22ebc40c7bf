"""The training loop every stage shares: AdamW, warmup + cosine, accumulation, clipping, autocast, DDP,
periodic evaluation, atomic checkpoints with exact resume, a JSONL metrics log and a progress bar.

A stage supplies a model, `batch_fn(step, part, n_parts)` giving its slice of the global batch for a step,
`loss_fn(model, batch) -> (loss, metrics)` and optionally `eval_fn(model) -> metrics`. Batches depend only on
the step, so one process and N processes train on the same global batch, and a resumed run continues exactly.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from minichat import runtime
from minichat.checkpoint import CheckpointManager, load_weights, save_checkpoint
from minichat.errors import ConfigError, MinichatError


@dataclass
class TrainConfig:
    out_dir: str = "runs/pretrain"
    max_steps: int = 2000
    batch_size: int = 12  # global sequences per optimizer step: all ranks and accumulation steps together
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int = 0  # cosine decay length; 0 = max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 250
    eval_batches: int = 20
    save_every: int = 500  # 0 = only at the end
    log_every: int = 10
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto: continue from <out_dir>/checkpoints/latest if present; never; or a checkpoint path
    progress: bool = True
    time_budget_s: float = 0.0  # stop (and save) after this much training wall time; 0 = no limit
    peak_tflops: float = 0.0  # for MFU; 0 = measure this machine's matmul rate once
    # recompute each block's activations in the backward pass instead of keeping them: less memory, ~1/3 more
    # compute (bench/results/rlhf.md)
    activation_checkpointing: bool = False

    def validate(self) -> None:
        if self.max_steps <= 0:
            raise ConfigError("train.max_steps must be positive")
        if self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("train.batch_size and train.grad_accum must be positive")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.grad_accum ({self.grad_accum}) must divide train.batch_size ({self.batch_size})")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("need 0 <= train.min_lr <= train.lr and train.lr > 0")
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps must be >= 0")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr over decay_steps, then flat."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay = cfg.decay_steps or cfg.max_steps
    if step >= decay:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only (norm gains and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


_PEAK_CACHE: dict[str, float] = {}


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """A practical peak: the rate of a large matmul here (known data-sheet figures would overstate CPUs)."""
    key = f"{device}-{dtype}-{torch.get_num_threads()}"
    if key not in _PEAK_CACHE:
        # a GPU needs a big product to hide launch latency (1024³ is ~3 µs on an H100); best of 3 rounds, as a
        # busy CPU's single round can be several times slow
        n = 8192 if device.type == "cuda" else 1024
        a = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ a
        best = 0.0
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, k = time.perf_counter(), 8
            for _ in range(k):
                a @ a
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 * k / (time.perf_counter() - t))
        _PEAK_CACHE[key] = best
    return _PEAK_CACHE[key]


class MetricsLog:
    """Append-only JSONL of metrics (rank 0 only): one object per line, flushed as written."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **row: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        rt: runtime.RuntimeConfig,
        model: nn.Module,
        tokenizer,
        *,
        device: torch.device,
        dtype: torch.dtype,
        dist: runtime.Dist,
        batch_fn: Callable[[int, int, int], Any],
        loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]],
        eval_fn: Callable[[nn.Module], dict] | None = None,
        tokens_per_step: int = 0,
        flops_per_token: float = 0.0,
        checkpoint_config: dict | None = None,
        stage: str = "train",
        trainable: nn.Module | None = None,
    ):
        self.cfg, self.rt, self.tokenizer = cfg, rt, tokenizer
        self.device, self.dtype, self.dist = device, dtype, dist
        self.batch_fn, self.loss_fn, self.eval_fn = batch_fn, loss_fn, eval_fn
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.checkpoint_config = dict(checkpoint_config or {})
        self.stage = stage
        self.out = Path(cfg.out_dir)
        self.model = model.to(device)  # the bare model: what is saved and evaluated
        if cfg.activation_checkpointing:
            from minichat.model import Transformer

            for m in self.model.modules():
                if isinstance(m, Transformer):
                    m.checkpoint_activations = True
        self.opt = make_optimizer(trainable or self.model, cfg, device)
        self.ckpt = CheckpointManager(self.out, keep=cfg.keep_checkpoints)
        self.log = MetricsLog(self.out / "metrics.jsonl", dist.is_main)
        self.step = 0
        self.n_parts = cfg.grad_accum * dist.world
        if cfg.batch_size % self.n_parts:
            raise ConfigError(
                f"train.batch_size ({cfg.batch_size}) must be divisible by grad_accum x processes ({self.n_parts})"
            )
        self._maybe_resume()
        self.forward_model: nn.Module = self.model
        if rt.compile:
            self.forward_model = torch.compile(self.model)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.forward_model = DDP(self.forward_model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- checkpoints -------------------------------------------------------------------------------
    def _train_state(self) -> dict:
        return {"step": self.step, "optimizer": self.opt.state_dict(), "rng": runtime.rng_state(),
                "train_config": asdict(self.cfg), "stage": self.stage}

    def save(self) -> Path | None:
        path = None
        if self.dist.is_main:
            path = self.ckpt.save(self.step, model=self.model, tokenizer=self.tokenizer,
                                  extra_config=self.checkpoint_config, train_state=self._train_state(),
                                  extra_tensors=getattr(self.model, "extra_tensors", lambda: None)())
        self._barrier()
        return path

    def _maybe_resume(self) -> None:
        mode = self.cfg.resume
        if mode == "never":
            return
        path = self.ckpt.latest() if mode == "auto" else Path(mode)
        if path is None:
            return
        from minichat.checkpoint import read_config, resolve

        path = resolve(path)
        saved = read_config(path)
        mine = asdict(self.model.cfg) if hasattr(self.model, "cfg") else None
        if mine is not None and saved.get("model") != mine:
            diff = [k for k in mine if saved.get("model", {}).get(k) != mine[k]]
            raise MinichatError(
                f"cannot resume from {path}: its model config differs in {', '.join(diff) or 'fields'}; "
                f"use --train.resume never or a fresh --train.out_dir"
            )
        state = CheckpointManager.load_train_state(path)
        extra = load_weights(self.model, path)
        if extra and hasattr(self.model, "load_extra_tensors"):
            self.model.load_extra_tensors(extra)
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise MinichatError(f"cannot resume from {path}: optimizer state does not match ({e})") from None
        runtime.set_rng_state(state["rng"])
        self.step = int(state["step"])
        if self.dist.is_main:
            print(f"[{self.stage}] resumed from {path} at step {self.step}")

    def _barrier(self) -> None:
        if self.dist.enabled:
            import torch.distributed as tdist

            tdist.barrier()

    def _all_mean(self, x: float) -> float:
        if not self.dist.enabled:
            return x
        import torch.distributed as tdist

        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return float(t.item()) / self.dist.world

    # --- the loop ----------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        if self.eval_fn is None:
            return {}
        self.model.eval()
        with torch.no_grad(), runtime.autocast(self.device, self.dtype):
            out = self.eval_fn(self.model)
        self.model.train()
        return out

    def fit(self) -> dict:
        cfg = self.cfg
        self.model.train()
        peak = cfg.peak_tflops * 1e12 or measured_peak_flops(self.device, self.dtype)
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.stage, dynamic_ncols=True)
        last: dict = {}
        t_start = time.perf_counter()
        t_log, tokens_since = time.perf_counter(), 0
        ema_loss = None
        try:
            while self.step < cfg.max_steps:
                lr = lr_at(self.step, cfg)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                loss_sum, metrics = 0.0, {}
                for micro in range(cfg.grad_accum):
                    part = micro * self.dist.world + self.dist.rank
                    batch = self.batch_fn(self.step, part, self.n_parts)
                    sync = micro == cfg.grad_accum - 1 or not self.dist.enabled
                    ctx = self.forward_model.no_sync() if not sync else _null()
                    with ctx:
                        with runtime.autocast(self.device, self.dtype):
                            loss, metrics = self.loss_fn(self.forward_model, batch)
                        (loss / cfg.grad_accum).backward()
                    loss_sum += float(loss.detach()) / cfg.grad_accum
                if not math.isfinite(loss_sum):
                    good = self.ckpt.latest()
                    raise MinichatError(
                        f"loss became {loss_sum} at step {self.step}; stopped. "
                        + (f"The last good checkpoint is {good}." if good else "No checkpoint was saved yet.")
                        + " Try a lower --train.lr or --train.grad_clip 1.0."
                    )
                grad_norm = None
                if cfg.grad_clip > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                tokens_since += self.tokens_per_step
                if self.dist.enabled:
                    loss_sum = self._all_mean(loss_sum)
                ema_loss = loss_sum if ema_loss is None else 0.9 * ema_loss + 0.1 * loss_sum
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    dt = time.perf_counter() - t_log
                    tps = tokens_since / dt if dt > 0 else 0.0
                    mfu = tps * self.flops_per_token / peak if peak and self.flops_per_token else 0.0
                    row = {"stage": self.stage, "step": self.step, "loss": loss_sum, "lr": lr,
                           "tokens_per_s": tps, "mfu": mfu, "time_s": time.perf_counter() - t_start}
                    if grad_norm is not None:
                        row["grad_norm"] = grad_norm
                    row.update({k: float(v) for k, v in metrics.items()})
                    self.log.write(**row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{ema_loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.0%}")
                    t_log, tokens_since = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    ev = self.evaluate()
                    if ev:
                        last.update(ev)
                        self.log.write(stage=self.stage, step=self.step, **ev)
                        if bar is not None:
                            bar.write(f"[{self.stage}] step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save()
                if cfg.time_budget_s and time.perf_counter() - t_start > cfg.time_budget_s:
                    if bar is not None:
                        bar.write(f"[{self.stage}] time budget of {cfg.time_budget_s:.0f}s reached at step {self.step}")
                    break
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            self.save()
            print(f"[{self.stage}] interrupted at step {self.step}; saved, rerun the same command to resume")
            raise
        if bar is not None:
            bar.close()
        if "val_loss" not in last and self.eval_fn is not None:
            last.update(self.evaluate())
        self.save()
        if self.dist.is_main:
            save_checkpoint(self.out / "final", model=self.model, tokenizer=self.tokenizer,
                            extra_config=self.checkpoint_config,
                            extra_tensors=getattr(self.model, "extra_tensors", lambda: None)())
        self._barrier()
        last.update(step=self.step, loss=ema_loss, train_time_s=time.perf_counter() - t_start)
        return last


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
