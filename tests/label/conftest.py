"""Fixtures for the labeling tests: a store, accounts, a project, a tiny model saved by the test, and live
uvicorn servers on 127.0.0.1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

COLORS = ["red", "blue", "green", "black", "white", "yellow"]
QUALITY = ["good good", "fine", "meh", "bad bad"]  # best to worst: what the simulated labelers rank by
CORPUS = [f"tell me about {c}. {c} is {q}." for c in COLORS for q in QUALITY] + [
    "Write a haiku about the sea.", "Waves fold on the sand.", "Hello there, how are you? I am fine, thank you."]


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny untrained BPE chat model saved as an ordinary checkpoint folder (samples answers, starts the RM)."""
    from minichat.checkpoint import save_checkpoint
    from minichat.model import ModelConfig, Transformer
    from minichat.tokenizer import BPETokenizer

    tok = BPETokenizer.train(CORPUS * 20, 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=128))
    path = tmp_path_factory.mktemp("label_lm") / "tiny"
    save_checkpoint(path, model, tok)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def store(db_url):
    from minichat.serve.store import Store

    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture
def lab(store):
    from minichat.label.service import Labeling

    return Labeling(store)


def login(lab, name: str, role: str = "labeler", held_out: bool = False) -> dict:
    """A new account, logged in: the user dict the service and the web layer pass around."""
    _, secret = lab.add_user(name, role=role, held_out=held_out)
    token, _ = lab.login(name, secret)
    return lab.authenticate(token)


