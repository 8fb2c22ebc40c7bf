"""Token shards: a corpus tokenized once into packed uint16/uint32 memmaps, and deterministic (B, T) batches.

    <data_dir>/train.bin, val.bin   token ids back to back (documents separated by end-of-text for BPE)
    <data_dir>/meta.json            {"dtype", "vocab_size", "train_tokens", "val_tokens", "source"}

The validation split is the last `val_fraction` of the token stream, in file order (nanoGPT's split).
A batch depends only on (seed, step): every process of a DDP job draws the same global batch and takes its own
rows, so one process and N processes see the same data, and a resumed run sees the batches it would have seen.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minichat.errors import MinichatError


def _atomic_save(arr: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    arr.tofile(tmp)
    os.replace(tmp, path)


def build_shards(docs: list[str], tokenizer, out_dir: str | Path, val_fraction: float = 0.1, source: str = "") -> dict:
    """Tokenize documents into train/val shards; returns meta. Raises on an empty corpus."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = [d for d in docs if d]
    if not docs:
        raise MinichatError(f"corpus {source or ''} is empty".replace("  ", " "))
    eos = tokenizer.eos_id if tokenizer.meta.kind == "bpe" else None
    if hasattr(tokenizer, "encode_batch"):
        encoded = tokenizer.encode_batch(docs)
    else:
        encoded = [tokenizer.encode(d) for d in docs]
    total = sum(len(e) for e in encoded) + (len(encoded) if eos is not None else 0)
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    ids = np.empty(total, dtype=dtype)
    pos = 0
    for e in encoded:
        ids[pos:pos + len(e)] = e
        pos += len(e)
        if eos is not None:
            ids[pos] = eos
            pos += 1
    n_val = int(round(total * val_fraction))
    train, val = ids[: total - n_val], ids[total - n_val:]
    _atomic_save(train, out / "train.bin")
    _atomic_save(val, out / "val.bin")
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "train_tokens": int(len(train)),
            "val_tokens": int(len(val)), "source": source}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "meta.json")
    return meta


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) inputs
    y: torch.Tensor  # (B, T) next-token targets


class TokenLoader:
    """Random windows of block_size+1 tokens from one split; the global batch for `step` is fixed by the seed."""

    def __init__(self, data_dir: str | Path, split: str, block_size: int, seed: int = 0):
        d = Path(data_dir)
        meta_f = d / "meta.json"
        if not meta_f.is_file():
            raise MinichatError(f"{d} has no meta.json: build the shards first")
        self.meta = json.loads(meta_f.read_text())
        self.data = np.memmap(d / f"{split}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")
        self.block, self.seed, self.split = block_size, seed, split
        if len(self.data) < block_size + 2:
            raise MinichatError(
                f"the {split} split has {len(self.data)} tokens, fewer than one sequence of block_size+1 = "
                f"{block_size + 1}: use a larger corpus or a smaller --model.max_seq_len/--data.block_size"
            )

    def __len__(self) -> int:
        return len(self.data)

    def global_indices(self, step: int, global_batch: int) -> np.ndarray:
        tag = 0 if self.split == "train" else 1
        rng = np.random.default_rng([self.seed, tag, step])
        return rng.integers(0, len(self.data) - self.block - 1, size=global_batch)

    def get(self, step: int, global_batch: int, part: int = 0, n_parts: int = 1) -> Batch:
        """Rows part::n_parts of the global batch for `step` (part = micro-step·world + rank)."""
        ix = self.global_indices(step, global_batch)
        per = global_batch // n_parts
        ix = ix[part * per:(part + 1) * per]
        rows = np.stack([self.data[i:i + self.block + 1] for i in ix]).astype(np.int64)
        t = torch.from_numpy(rows)
        return Batch(t[:, :-1], t[:, 1:])
