"""`minichat pretrain`: next-token prediction on a text corpus, from scratch (or continuing a checkpoint).

    corpus -> tokenizer (trained here, or reused) -> packed shards -> Transformer -> shared loop -> samples
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from minichat import config as C
from minichat import runtime
from minichat.errors import ConfigError, MinichatError
from minichat.model import ModelConfig, Transformer
from minichat.train.loop import TrainConfig, Trainer


@dataclass
class DataConfig:
    corpus: str = "builtin"  # a file, a folder, .txt.gz, .jsonl (field `text`), "builtin", or hf:NAME[:CONFIG][@SPLIT]
    tokenizer: str = "bpe"  # bpe (train one), char, or a folder/checkpoint holding a tokenizer to reuse
    vocab_size: int = 2048  # for a trained BPE
    val_fraction: float = 0.1
    text_field: str = "text"
    data_dir: str = ""  # where shards go; default <out_dir>/data

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError("data.val_fraction must be in (0, 0.5)")


@dataclass
class SampleConfig:
    num_samples: int = 2
    max_new_tokens: int = 120
    temperature: float = 0.8
    top_k: int = 50
    prompt: str = ""


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=4, n_head=4, d_model=128, max_seq_len=128))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/pretrain", max_steps=300, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=30,
        eval_every=100, eval_batches=10, save_every=100))
    runtime: runtime.RuntimeConfig = field(default_factory=runtime.RuntimeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    init_from: str = ""  # start from this checkpoint's weights and tokenizer instead of from scratch


def preset_shakespeare_char() -> PretrainConfig:
    """nanoGPT's shakespeare_char CPU configuration (4 layers, 4 heads, width 128, block 64, batch 12)."""
    return PretrainConfig(
        model=ModelConfig(n_layer=4, n_head=4, d_model=128, max_seq_len=64, dropout=0.0),
        data=DataConfig(corpus="../shared/data/tinyshakespeare.txt", tokenizer="char"),
        train=TrainConfig(out_dir="runs/shakespeare-char", max_steps=2000, batch_size=12, lr=1e-3, min_lr=1e-4,
                          warmup_steps=100, decay_steps=2000, beta2=0.99, eval_every=250, eval_batches=20,
                          save_every=1000, log_every=50),
        sample=SampleConfig(num_samples=2, max_new_tokens=300, prompt="\n"),
    )


def preset_small_bpe() -> PretrainConfig:
    """A small BPE model on the built-in corpus: a few minutes on a laptop CPU."""
    return PretrainConfig(
        model=ModelConfig(n_layer=6, n_head=6, n_kv_head=2, d_model=192, max_seq_len=256),
        data=DataConfig(corpus="builtin", tokenizer="bpe", vocab_size=4096),
        train=TrainConfig(out_dir="runs/small-bpe", max_steps=2000, batch_size=32, lr=1.5e-3, min_lr=1.5e-4,
                          warmup_steps=100, eval_every=250, eval_batches=20, save_every=500),
    )


def preset_tiny() -> PretrainConfig:
    """Seconds: for tests and smoke runs."""
    return PretrainConfig(
        model=ModelConfig(n_layer=2, n_head=2, d_model=32, max_seq_len=32),
        data=DataConfig(corpus="builtin", tokenizer="bpe", vocab_size=300),
        train=TrainConfig(out_dir="runs/tiny", max_steps=20, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                          eval_every=10, eval_batches=2, save_every=10, log_every=5),
        sample=SampleConfig(num_samples=1, max_new_tokens=20),
    )


PRESETS = {"default": PretrainConfig, "shakespeare-char": preset_shakespeare_char, "small-bpe": preset_small_bpe,
           "tiny": preset_tiny}


def prepare_tokenizer(cfg: PretrainConfig, docs: list[str], out: Path):
    from minichat.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

    if cfg.init_from:  # a checkpoint, smollm2, a .gguf or a Hugging Face folder
        from minichat.gguf_import import resolve_model

        return load_tokenizer(resolve_model(cfg.init_from, verbose=False))
    saved = out / "tokenizer"
    if saved.is_dir():  # a rerun or resume must reuse the very same ids
        return load_tokenizer(saved)
    kind = cfg.data.tokenizer
    if kind == "char":
        tok = CharTokenizer.train(docs)
    elif kind == "bpe":
        tok = BPETokenizer.train(docs, cfg.data.vocab_size)
    else:
        from minichat.checkpoint import resolve

        p = Path(kind)
        tok = load_tokenizer(p if (p / "tokenizer.json").exists() or (p / "tokenizer_char.json").exists() else resolve(p))
    tok.save(saved)
    return tok


def prepare_data(cfg: PretrainConfig, dist: runtime.Dist):
    """Tokenizer and shards, built by rank 0 and then read by every rank."""
    from minichat.data.corpus import iter_documents
    from minichat.data.shards import build_shards

    out = Path(cfg.train.out_dir)
    data_dir = Path(cfg.data.data_dir) if cfg.data.data_dir else out / "data"
    meta_f = data_dir / "meta.json"
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        fresh = not meta_f.is_file() or json.loads(meta_f.read_text()).get("source") != cfg.data.corpus
        docs = None
        if fresh or not (out / "tokenizer").is_dir():
            docs = [d for d in iter_documents(cfg.data.corpus, cfg.data.text_field, cfg.runtime.seed) if d]
            if not docs or not any(d.strip() for d in docs):
                raise MinichatError(f"corpus {cfg.data.corpus} is empty")
        tok = prepare_tokenizer(cfg, docs or [], out)
        if fresh:
            if cfg.data.tokenizer == "char" and not cfg.init_from:
                docs = ["\n\n".join(docs)]  # one stream: nanoGPT splits the raw text 90/10 in file order
            build_shards(docs, tok, data_dir, cfg.data.val_fraction, source=cfg.data.corpus)
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()
    from minichat.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer") if not cfg.init_from else prepare_tokenizer(cfg, [], out)
    return tok, data_dir


def run(cfg: PretrainConfig) -> dict:
    device, dtype, dist = runtime.setup(cfg.runtime)
    try:
        tok, data_dir = prepare_data(cfg, dist)
        from minichat.data.shards import TokenLoader

        if cfg.init_from:
            from minichat.checkpoint import load_model
            from minichat.gguf_import import resolve_model

            model, _, _ = load_model(resolve_model(cfg.init_from, verbose=False))
            cfg.model = model.cfg
        else:
            cfg.model.vocab_size = tok.vocab_size
            model = Transformer(cfg.model)
        T = cfg.model.max_seq_len
        train = TokenLoader(data_dir, "train", T, cfg.runtime.seed)
        val = TokenLoader(data_dir, "val", T, cfg.runtime.seed)
        B = cfg.train.batch_size

        def batch_fn(step: int, part: int, n_parts: int):
            b = train.get(step, B, part, n_parts)
            return b.x.to(device, non_blocking=True), b.y.to(device, non_blocking=True)

        def loss_fn(m, batch):
            x, y = batch
            logits = m(x)  # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), {}

        def eval_fn(m) -> dict:
            losses = []
            for i in range(cfg.train.eval_batches):
                b = val.get(i, B)
                losses.append(float(F.cross_entropy(m(b.x.to(device)).flatten(0, 1).float(), b.y.to(device).flatten())))
            return {"val_loss": sum(losses) / len(losses)}

        trainer = Trainer(
            cfg.train, cfg.runtime, model, tok, device=device, dtype=dtype, dist=dist,
            batch_fn=batch_fn, loss_fn=loss_fn, eval_fn=eval_fn,
            tokens_per_step=B * T, flops_per_token=model.flops_per_token(T),
            checkpoint_config={"kind": "lm", "stage": "pretrain", "pretrain": C.to_dict(cfg)}, stage="pretrain",
        )
        if dist.is_main:
            print(f"[pretrain] {model.num_params():,} parameters, vocab {tok.vocab_size}, {len(train):,} train tokens, "
                  f"device {device}, precision {str(dtype).replace('torch.', '')}, threads {torch.get_num_threads()}, "
                  f"processes {dist.world}")
        result = trainer.fit()
        if dist.is_main and cfg.sample.num_samples > 0:
            from minichat.sample import sample_text

            model.eval()
            print("--- samples ---")
            for i in range(cfg.sample.num_samples):
                text = sample_text(model, tok, cfg.sample.prompt, max_new_tokens=cfg.sample.max_new_tokens,
                                   temperature=cfg.sample.temperature, top_k=cfg.sample.top_k,
                                   seed=cfg.runtime.seed + i, device=device)
                print(text.strip() + "\n---")
        if dist.is_main:
            print(f"[pretrain] done: step {result.get('step')}, val_loss {result.get('val_loss', float('nan')):.4f}; "
                  f"checkpoint {Path(cfg.train.out_dir) / 'final'}")
        return result
    finally:
        runtime.shutdown_distributed()


def main(argv: list[str]) -> int:
    cfg, _ = C.build(PretrainConfig, argv, PRESETS, prog="minichat pretrain",
                     description="Pretrain a Transformer by next-token prediction.")
    run(cfg)
    return 0
