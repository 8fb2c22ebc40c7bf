"""Checkpoints: a folder with safetensors weights, JSON config, the tokenizer, and (for training) the state to resume.

    <ckpt>/model.safetensors   weights (tied embeddings stored once)
    <ckpt>/config.json         {"model": ModelConfig fields, "kind": "lm" | "reward" | ..., "minichat": version, ...}
    <ckpt>/tokenizer.json (+ tokenizer_meta.json) or tokenizer_char.json
    <ckpt>/train_state.pt      optimizer, scheduler, step, RNG and data position (training checkpoints only)

A training run keeps <run>/checkpoints/step_NNNNNNN/ folders and a <run>/checkpoints/latest file naming the
newest complete one. Every folder is written under a temporary name and renamed into place, and `latest` is
replaced atomically afterwards, so a kill during a save never leaves a broken latest checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from minichat.errors import MinichatError
from minichat.model import ModelConfig, Transformer
from minichat.tokenizer import BaseTokenizer, load_tokenizer


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def model_config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise MinichatError(f"checkpoint config has unknown model fields: {', '.join(sorted(unknown))}")
    cfg = ModelConfig(**d)
    cfg.validate()
    return cfg


def _state_dict_for_save(model: torch.nn.Module, merge_adapters: bool) -> dict[str, torch.Tensor]:
    from minichat.lora import has_lora, merge_lora_tensors

    sd = model.state_dict()
    if merge_adapters and has_lora(sd):
        sd = merge_lora_tensors(sd)
    # tied weights: keep one name so safetensors never sees two views of one buffer
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    tokenizer: BaseTokenizer | None,
    extra_config: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    merge_adapters: bool = True,
) -> Path:
    """Write a checkpoint folder atomically (temp folder, then rename over any old one). LoRA adapters are
    folded into their weights unless merge_adapters=False (a stage's resumable checkpoints keep them apart)."""
    from safetensors.torch import save_file

    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        tensors = _state_dict_for_save(model, merge_adapters)
        if extra_tensors:
            tensors.update({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()})
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        from minichat import __version__

        cfg = {"model": asdict(model.cfg), "kind": "lm", "minichat": __version__}
        cfg.update(extra_config or {})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if final.exists():
            old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, a run folder (uses its final/ or checkpoints/latest), or a `latest` file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MinichatError(f"checkpoint {p} does not exist")
    if p.is_file() and p.name == "latest":
        p = p.parent
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if (p / "final" / "config.json").is_file():
        return p / "final"
    latest = p / "checkpoints" / "latest" if (p / "checkpoints").is_dir() else p / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        q = latest.parent / name
        if (q / "config.json").is_file():
            return q
        raise MinichatError(f"{latest} names {name}, which is not a complete checkpoint")
    raise MinichatError(f"{p} is not a minichat checkpoint (no config.json + model.safetensors)")


def read_config(path: str | Path) -> dict[str, Any]:
    p = resolve(path)
    try:
        return json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise MinichatError(f"{p / 'config.json'} is corrupted: {e}") from None


def load_weights(model: torch.nn.Module, path: str | Path, strict: bool = True) -> dict[str, torch.Tensor]:
    """Load model.safetensors into `model`; returns tensors that belong to no module parameter (e.g. heads)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = resolve(path) / "model.safetensors"
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise MinichatError(f"{f} is corrupted or unreadable: {e}") from None
    own = model.state_dict()
    from minichat.lora import has_lora, merge_lora_tensors

    if has_lora(tensors) and not has_lora(own):  # a LoRA stage's resumable checkpoint, read as a plain model
        tensors = merge_lora_tensors(tensors)
    extra = {k: v for k, v in tensors.items() if k not in own}
    sd = {k: v for k, v in tensors.items() if k in own}
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False) and "embed.weight" in sd:
        sd["lm_head.weight"] = sd["embed.weight"]
    missing = [k for k in own if k not in sd]
    if missing and strict:
        raise MinichatError(f"{f} does not match the model: missing {', '.join(missing[:5])}")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise MinichatError(f"{f} does not match the model: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=False)
    return extra


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, BaseTokenizer, dict[str, Any]]:
    """(model in eval mode, tokenizer, config dict) from any minichat checkpoint folder or run folder."""
    p = resolve(path)
    cfg = read_config(p)
    if "model" not in cfg:
        raise MinichatError(f"{p / 'config.json'} has no 'model' section")
    model = Transformer(model_config_from_dict(cfg["model"]))
    load_weights(model, p, strict=True)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    return model, load_tokenizer(p), cfg


class CheckpointManager:
    """Numbered training checkpoints under <run>/checkpoints with an atomically updated `latest` pointer."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        f = self.dir / "latest"
        if not f.is_file():
            return None
        p = self.dir / f.read_text().strip()
        return p if (p / "config.json").is_file() else None

    def save(self, step: int, **kwargs) -> Path:
        name = f"step_{step:07d}"
        path = save_checkpoint(self.dir / name, merge_adapters=False, **kwargs)
        atomic_write_text(self.dir / "latest", name + "\n")
        old = sorted(d for d in self.dir.glob("step_*") if d.is_dir() and d.name != name)
        for d in old[: max(0, len(old) - (self.keep - 1))]:
            shutil.rmtree(d, ignore_errors=True)
        return path

    @staticmethod
    def load_train_state(path: str | Path) -> dict[str, Any]:
        f = Path(path) / "train_state.pt"
        if not f.is_file():
            raise MinichatError(f"{path} has no train_state.pt to resume from")
        try:
            return torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:
            raise MinichatError(f"{f} is corrupted: {e}") from None
