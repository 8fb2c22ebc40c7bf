"""`minichat reward`: a reward model on rankings (InstructGPT step 2).

    rankings (K answers per prompt, best first, ties allowed) -> each prompt one batch element with all its
    C(K,2) ordered pairs -> ScalarModel (trunk + scalar head at the answer's last token)
    -> loss −1/C(K,2) Σ log σ(r_w − r_l) (or a hinge) -> shared loop -> held-out pairwise accuracy
    -> finally a bias so that reference demonstrations score 0 on average
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from minichat import config as C
from minichat import runtime
from minichat.errors import ConfigError, MinichatError
from minichat.lora import LoRAConfig, add_lora, lora_flops
from minichat.losses import ranking_loss
from minichat.train.loop import TrainConfig, Trainer


@dataclass
class RewardDataConfig:
    train: str = ""  # JSONL rankings, prompt/chosen/rejected, or HH transcripts
    val: str = ""  # held-out comparisons; empty: hold out val_fraction of train
    val_fraction: float = 0.1
    limit: int = 0  # use only the first N comparisons of the train file (0 = all)
    demos: str = ""  # reference demonstrations (SFT JSONL) whose mean reward becomes 0; empty: best answers of train
    max_len: int = 512  # prompt + answer tokens (capped by the model's context)

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError("data.val_fraction must be in [0, 0.5)")


@dataclass
class RewardConfig:
    init_from: str = "smollm2"  # InstructGPT starts the RM from the SFT model: a checkpoint, run folder or smollm2
    loss: str = "logsigmoid"  # logsigmoid (InstructGPT eq. 1) | hinge: max(0, margin − (r_w − r_l))
    margin: float = 1.0
    share_prompt: bool = True  # encode each prompt once for its K answers
    train_last_layers: int = -1  # -1: train the whole trunk; k >= 0: freeze all but the last k blocks (+ head)
    normalize: bool = True  # shift the head's bias so reference demonstrations score mean 0
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # adapters on every block instead of trained blocks
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/reward", max_steps=200, batch_size=8, lr=1e-5, min_lr=1e-6, warmup_steps=10, weight_decay=0.0,
        eval_every=50, eval_batches=50, save_every=100, log_every=10))
    runtime: runtime.RuntimeConfig = field(default_factory=runtime.RuntimeConfig)

    def validate(self) -> None:
        if self.loss not in ("logsigmoid", "hinge"):
            raise ConfigError(f"loss must be logsigmoid or hinge, got {self.loss!r}")
        if self.margin <= 0:
            raise ConfigError("margin must be positive")
        if self.lora.rank and self.train_last_layers >= 0:
            raise ConfigError("choose LoRA (--lora.rank) or --train_last_layers, not both: set --train_last_layers -1")


def preset_tiny() -> RewardConfig:
    cfg = RewardConfig()
    cfg.train = TrainConfig(out_dir="runs/reward-tiny", max_steps=20, batch_size=4, lr=1e-3, min_lr=1e-4,
                            warmup_steps=2, weight_decay=0.0, eval_every=10, eval_batches=20, save_every=10, log_every=5)
    cfg.data.max_len = 128
    return cfg


def preset_smollm2_hh() -> RewardConfig:
    """SmolLM2-135M on Anthropic HH harmless, affordable on a CPU: only the last 2 blocks and the head train."""
    cfg = RewardConfig(init_from="smollm2", train_last_layers=2)
    cfg.data = RewardDataConfig(train="../shared/data/preferences/hh_harmless_dev.jsonl.gz", val_fraction=0.15,
                                max_len=256)
    cfg.train = TrainConfig(out_dir="runs/reward-smollm2-hh", max_steps=150, batch_size=8, lr=1e-4, min_lr=1e-5,
                            warmup_steps=10, weight_decay=0.0, eval_every=50, eval_batches=100, save_every=50,
                            log_every=10)
    return cfg


PRESETS = {"default": RewardConfig, "tiny": preset_tiny, "smollm2-hh": preset_smollm2_hh}


def scores_of(model, rows, pad_id: int, device, share_prompt: bool, batch: int = 16) -> list[torch.Tensor]:
    """Rewards of every answer of every comparison, one tensor (K,) per comparison."""
    from minichat.data.chat import collate_rankings

    out = []
    for s in range(0, len(rows), batch):
        chunk = rows[s:s + batch]
        r = model(**_model_args(_to(collate_rankings(chunk, pad_id, share_prompt), device))).float().cpu()
        k = 0
        for row in chunk:
            out.append(r[k:k + len(row.answers)])
            k += len(row.answers)
    return out


def pairwise_accuracy(scores: list[torch.Tensor], rows) -> dict:
    """Fraction of ordered pairs the model orders like the labelers (a tie in score counts half)."""
    from minichat.losses import ranking_pairs

    right, n = 0.0, 0
    for r, row in zip(scores, rows):
        for i, j in ranking_pairs(row.ranks):
            right += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
            n += 1
    return {"accuracy": right / max(n, 1), "pairs": n}


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _model_args(b: dict) -> dict:
    keys = ("ids", "key_mask", "answers", "answer_lens", "owner")
    args = {k: b[k] for k in keys if k in b}
    args["idx"] = args.pop("ids")
    return args


def prepare(cfg: RewardConfig, tok, max_len: int):
    from minichat.data.chat import DataReport, encode_comparisons, load_comparisons, split_holdout
    from minichat.train.common import require_file

    report = DataReport("reward")
    system = tok.meta.default_system  # kept before the tools' description in rows with tools, as the server does
    comps = load_comparisons(require_file(cfg.data.train, "--data.train (comparisons, JSONL)"), report, cfg.data.limit,
                             system)
    if cfg.data.val:
        train_c, val_c = comps, load_comparisons(cfg.data.val, report, default_system=system)
    elif cfg.data.val_fraction > 0 and len(comps) > 1:
        train_c, val_c = split_holdout(comps, cfg.data.val_fraction, cfg.runtime.seed)
    else:
        train_c, val_c = comps, []
    train = encode_comparisons(train_c, tok, max_len, report)
    val = encode_comparisons(val_c, tok, max_len, report)
    if not train:
        raise MinichatError(f"no usable training comparisons ({report.summary()})")
    return train, val, train_c, report


def reference_sequences(cfg: RewardConfig, tok, max_len: int, train_c) -> list[list[int]]:
    """Token ids of reference demonstrations: the demos file, else each training prompt's best answer."""
    from minichat.data.chat import DataReport, encode_answer_turn, load_sft

    if cfg.data.demos:
        convs = load_sft(cfg.data.demos, DataReport("demos"))
        pairs = [(c[:-1], c[-1]["content"]) for c in convs if c[-1]["role"] == "assistant"]
    else:
        pairs = [(c.prompt, c.answers[c.ranks.index(min(c.ranks))]) for c in train_c]
    seqs = []
    for prompt, answer in pairs[:2000]:
        p, a = encode_answer_turn(tok, prompt, answer)
        seqs.append((p + a)[-max_len:])
    return seqs


def run(cfg: RewardConfig) -> dict:
    device, dtype, dist = runtime.setup(cfg.runtime)
    try:
        from minichat.data.chat import EpochSampler, collate_rankings
        from minichat.heads import load_scalar_model, score_sequences

        model, tok, _ = load_scalar_model(cfg.init_from, device)
        model.train()
        max_len = min(model.cfg.max_seq_len, cfg.data.max_len)
        train, val, train_c, report = prepare(cfg, tok, max_len)
        if cfg.train_last_layers >= 0:
            model.freeze_trunk(cfg.train_last_layers)
        if cfg.lora.rank:
            add_lora(model, cfg.lora, cfg.runtime.seed)
            model.head.requires_grad_(True)  # the scalar head is new: it trains whole
        sampler = EpochSampler(len(train), cfg.runtime.seed)
        B, pad = cfg.train.batch_size, tok.pad_id

        def batch_fn(step: int, part: int, n_parts: int):
            rows = [train[i] for i in sampler.indices(step, B, part, n_parts)]
            return _to(collate_rankings(rows, pad, cfg.share_prompt), device)

        def loss_fn(m, b):
            r = m(**_model_args(b))
            r_w, r_l = r[b["pair_w"]], r[b["pair_l"]]
            loss = ranking_loss(r_w, r_l, b["pair_group"], cfg.loss, cfg.margin)
            return loss, {"train_acc": float((r_w > r_l).float().mean().detach()), "pairs": float(len(r_w)),
                          "reward_mean": float(r.detach().mean())}

        def eval_fn(m) -> dict:
            rows = val[:cfg.train.eval_batches * B]
            scores = scores_of(m, rows, pad, device, cfg.share_prompt, B)
            acc = pairwise_accuracy(scores, rows)
            return {"val_accuracy": acc["accuracy"], "val_pairs": float(acc["pairs"])}

        n_tok = sum(len(r.prompt) + sum(len(a) for a in r.answers) for r in train) / len(train)
        # a frozen block runs forward only: FLOPs ≈ forward · (1 + 2 · the trained share of the weights), or the
        # MFU of a reward model that trains its last 2 of 30 blocks read ~2.7x too high (over 100%)
        share = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(p.numel() for p in model.parameters())
        if cfg.lora.rank:
            flops = lora_flops(model, int(n_tok), share)
        elif cfg.train_last_layers >= 0:
            flops = model.flops_per_token(int(n_tok), training=False) * (1 + 2 * share)
        else:
            flops = model.flops_per_token(int(n_tok))
        trainer = Trainer(
            cfg.train, cfg.runtime, model, tok, device=device, dtype=dtype, dist=dist,
            batch_fn=batch_fn, loss_fn=loss_fn, eval_fn=eval_fn if val else None,
            tokens_per_step=int(B * n_tok) // dist.world, flops_per_token=flops,
            checkpoint_config={"kind": "reward", "stage": "reward", "reward": C.to_dict(cfg)}, stage="reward",
        )
        n_pairs = sum(len(_pairs(r.ranks)) for r in train)
        if dist.is_main:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"[reward] {model.num_params():,} parameters ({trainable:,} trained) from {cfg.init_from}; "
                  f"{len(train):,} train comparisons ({n_pairs:,} pairs), {len(val):,} held out; "
                  f"loss {cfg.loss}; device {device}, processes {dist.world}")
            print(report.summary())
        result = trainer.fit()
        model.eval()
        final = Path(cfg.train.out_dir) / "final"
        if cfg.normalize:
            # InstructGPT: "normalized so that the labeler demonstrations achieve a mean score of 0"
            refs = reference_sequences(cfg, tok, max_len, train_c)
            if dist.is_main:  # minutes for a large model on a CPU: say what the pause is
                print(f"[reward] normalising: scoring {len(refs):,} reference answers", flush=True)
            with torch.no_grad(), runtime.autocast(device, dtype):
                ref = score_sequences(model, refs, pad, B, device)
            offset = float(ref.mean())
            with torch.no_grad():
                model.head.bias -= offset
            result["bias_offset"] = offset
        if val and len(val) > cfg.train.eval_batches * B:  # the loop's last evaluation saw only part of it
            # (a constant bias shift never changes pairwise order, so this may come after normalising)
            with torch.no_grad(), runtime.autocast(device, dtype):
                acc = pairwise_accuracy(scores_of(model, val, pad, device, cfg.share_prompt, B), val)
            result["val_accuracy"], result["val_pairs"] = acc["accuracy"], acc["pairs"]
        if dist.is_main:
            from minichat.checkpoint import save_checkpoint

            save_checkpoint(final, model=model, tokenizer=tok, extra_config={
                "kind": "reward", "stage": "reward", "reward": C.to_dict(cfg),
                "bias_offset": result.get("bias_offset", 0.0), "val_accuracy": result.get("val_accuracy")})
            print(f"[reward] done: step {result.get('step')}, held-out pairwise accuracy "
                  f"{result.get('val_accuracy', float('nan')):.3f} on {int(result.get('val_pairs', 0)):,} pairs; "
                  f"checkpoint {final}")
        result["warnings"] = dict(report.counts)
        return result
    finally:
        runtime.shutdown_distributed()


def _pairs(ranks):
    from minichat.losses import ranking_pairs

    return ranking_pairs(ranks)


def main(argv: list[str]) -> int:
    cfg, _ = C.build(RewardConfig, argv, PRESETS, prog="minichat reward",
                     description="Train a reward model on ranked answers (InstructGPT eq. 1).")
    run(cfg)
    return 0
