"""`minichat sft`: supervised fine-tuning on demonstrations (InstructGPT step 1).

    conversations (JSONL) -> chat template -> (ids, assistant mask) -> padded or packed rows
    -> loss = −mean log p(assistant token | everything before it) -> shared loop -> held-out loss
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from minichat import config as C
from minichat import runtime
from minichat.errors import ConfigError, MinichatError
from minichat.lora import LoRAConfig, add_lora, lora_flops
from minichat.losses import masked_lm_loss, selected_lm_loss
from minichat.train.loop import TrainConfig, Trainer


@dataclass
class SFTDataConfig:
    train: str = ""  # JSONL: messages, prompt/response or Alpaca rows
    val: str = ""  # held-out conversations; empty: hold out val_fraction of train
    val_fraction: float = 0.05
    pack: bool = False  # several whole conversations per row (fewer pad tokens); attention stays within each
    max_len: int = 512  # tokens per row (capped by the model's context)

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError("data.val_fraction must be in [0, 0.5)")
        if self.max_len <= 1:
            raise ConfigError("data.max_len must be > 1")


@dataclass
class SFTConfig:
    init_from: str = "smollm2"  # the pretrained model: checkpoint, run folder, .gguf or smollm2
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/sft", max_steps=200, batch_size=8, lr=3e-5, min_lr=3e-6, warmup_steps=10, weight_decay=0.0,
        eval_every=50, eval_batches=10, save_every=100, log_every=10))
    # A pretraining-loss mix (as PPO-ptx): ptx_coef · NLL on ptx_batch windows of pretraining text per step.
    # Small demonstration sets otherwise wipe what pretraining taught: on the built-in world, plain SFT forgot
    # the facts of every person its demonstrations never mention (recall 100% -> 32%).
    ptx_coef: float = 0.0
    ptx_data: str = ""  # pretraining text: a file, folder, .jsonl, or "builtin"
    ptx_batch: int = 4
    ptx_seq_len: int = 64
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # --lora.rank 16: train low-rank adapters only
    runtime: runtime.RuntimeConfig = field(default_factory=runtime.RuntimeConfig)

    def validate(self) -> None:
        if self.ptx_coef < 0:
            raise ConfigError("ptx_coef must be >= 0")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("ptx_coef > 0 needs ptx_data (pretraining text, or 'builtin')")
        if self.ptx_batch < 1 or self.ptx_seq_len < 2:
            raise ConfigError("ptx_batch must be >= 1 and ptx_seq_len >= 2")


def preset_tiny() -> SFTConfig:
    """Seconds, on a tiny model: tests and the built-in world."""
    cfg = SFTConfig()
    cfg.train = TrainConfig(out_dir="runs/sft-tiny", max_steps=20, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=2,
                            weight_decay=0.0, eval_every=10, eval_batches=2, save_every=10, log_every=5)
    cfg.data.max_len = 128
    return cfg


def preset_lora() -> SFTConfig:
    """LoRA adapters of rank 16 on every linear layer of the blocks. Adapters want a far higher learning rate
    than full fine-tuning: on SmolLM2 and HH demonstrations 5e-4 beat 2e-4 (bench/results/rlhf.md)."""
    cfg = SFTConfig()
    cfg.lora = LoRAConfig(rank=16, alpha=32.0)
    cfg.train.out_dir, cfg.train.lr, cfg.train.min_lr = "runs/sft-lora", 5e-4, 5e-5
    return cfg


PRESETS = {"default": SFTConfig, "tiny": preset_tiny, "lora": preset_lora}


def prepare(cfg: SFTConfig, tok, max_len: int):
    from minichat.data.chat import DataReport, Sequences, encode_sft, load_sft, split_holdout
    from minichat.train.common import require_file

    report = DataReport("sft")
    system = tok.meta.default_system
    convs = load_sft(require_file(cfg.data.train, "--data.train (SFT conversations, JSONL)"), report, system)
    if cfg.data.val:
        train_c, val_c = convs, load_sft(cfg.data.val, report, system)
    elif cfg.data.val_fraction > 0 and len(convs) > 1:
        train_c, val_c = split_holdout(convs, cfg.data.val_fraction, cfg.runtime.seed)
    else:
        train_c, val_c = convs, []
    examples = encode_sft(train_c, tok, max_len, report)
    if not examples:
        raise MinichatError(f"no SFT training examples left in {cfg.data.train} ({len(train_c)} conversations read; "
                            f"{report.summary()}). Rows are cut to the model's context of {max_len} tokens, and a "
                            "conversation with no assistant tokens left has nothing to train on.")
    train = Sequences(examples, max_len, tok.pad_id, cfg.data.pack, cfg.runtime.seed)
    val = Sequences(encode_sft(val_c, tok, max_len, report), max_len, tok.pad_id, False) if val_c else None
    return train, val, report


def run(cfg: SFTConfig) -> dict:
    device, dtype, dist = runtime.setup(cfg.runtime)
    try:
        from minichat.train.common import PtxStream, context_len, load_lm

        model, tok, _ = load_lm(cfg.init_from, device)
        total = model.num_params()
        trainable = add_lora(model, cfg.lora, cfg.runtime.seed)
        max_len = context_len(model.cfg.max_seq_len, cfg.data.max_len)
        train, val, report = prepare(cfg, tok, max_len)
        B = cfg.train.batch_size
        ptx = (PtxStream(cfg.ptx_data, tok, min(cfg.ptx_seq_len, max_len), cfg.runtime.seed)
               if cfg.ptx_coef > 0 else None)

        def batch_fn(step: int, part: int, n_parts: int):
            x, y, mask, *docs = train.batch(step, B, part, n_parts)
            docs = docs[0].to(device) if docs else None  # packed rows: which conversation each token belongs to
            ptx_rows = ptx.batch([step, part, dist.rank], cfg.ptx_batch, device) if ptx is not None else None
            return x.to(device), y.to(device), mask.to(device), docs, ptx_rows

        def loss_fn(m, batch):
            x, y, mask, docs, ptx_rows = batch
            loss = selected_lm_loss(m(x, doc_ids=docs, select=mask.bool()), y, mask)  # head at trained targets only
            stats = {"trained_tokens": float(mask.sum())}
            if ptx_rows is not None:
                px, py = ptx_rows
                lm = masked_lm_loss(m(px), py, torch.ones_like(py, dtype=torch.float32))
                stats["ptx_loss"] = float(lm.detach())
                loss = loss + cfg.ptx_coef * lm
            return loss, stats

        def eval_fn(m) -> dict:
            tot, n = 0.0, 0.0
            for i, (x, y, mask) in enumerate(val.all_batches(B)):
                if i >= cfg.train.eval_batches:
                    break
                x, y, mask = x.to(device), y.to(device), mask.to(device)
                tot += float(selected_lm_loss(m(x, select=mask.bool()), y, mask, reduction="sum"))
                n += float(mask.sum())
            return {"val_loss": tot / max(n, 1.0)}

        avg_len = train.num_tokens() / max(1, len(train))
        trainer = Trainer(
            cfg.train, cfg.runtime, model, tok, device=device, dtype=dtype, dist=dist,
            batch_fn=batch_fn, loss_fn=loss_fn, eval_fn=eval_fn if val is not None else None,
            tokens_per_step=int(B * avg_len) // dist.world,
            flops_per_token=lora_flops(model, int(avg_len), trainable / total) if cfg.lora.rank
            else model.flops_per_token(int(avg_len)),
            checkpoint_config={"kind": "lm", "stage": "sft", "sft": C.to_dict(cfg)}, stage="sft",
        )
        if dist.is_main:
            lora = f" (LoRA rank {cfg.lora.rank}: {trainable:,} trained)" if cfg.lora.rank else ""
            print(f"[sft] {total:,} parameters{lora} from {cfg.init_from}; {len(train):,} train rows "
                  f"({'packed' if cfg.data.pack else 'padded'}, {avg_len:.0f} tokens on average), "
                  f"{len(val) if val else 0:,} held out; device {device}, processes {dist.world}")
            print(report.summary())
            if cfg.lora.rank and cfg.train.lr < 1e-4:
                print(f"[sft] note: LoRA at lr {cfg.train.lr:g}; adapters usually want about 10x full fine-tuning's "
                      "rate (--preset lora uses 5e-4)")
        result = trainer.fit()
        if dist.is_main:
            print(f"[sft] done: step {result.get('step')}, val_loss {result.get('val_loss', float('nan')):.4f}; "
                  f"checkpoint {Path(cfg.train.out_dir) / 'final'}")
        result["warnings"] = dict(report.counts)
        return result
    finally:
        runtime.shutdown_distributed()


def main(argv: list[str]) -> int:
    cfg, _ = C.build(SFTConfig, argv, PRESETS, prog="minichat sft",
                     description="Supervised fine-tuning on demonstrations (assistant tokens only).")
    run(cfg)
    return 0
