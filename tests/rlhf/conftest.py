"""Tiny models and data files for the RLHF tests (no /work/shared, no network)."""
import json
import random

import pytest
import torch
from tests.rlhf.rlhf_util import COLORS, write_jsonl


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny untrained BPE chat model saved as an ordinary checkpoint folder."""
    from minichat.checkpoint import save_checkpoint
    from minichat.data.world import builtin_corpus
    from minichat.model import ModelConfig, Transformer
    from minichat.tokenizer import BPETokenizer

    tok = BPETokenizer.train(list(builtin_corpus(seed=0, n_docs=200)), 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=96))
    path = tmp_path_factory.mktemp("lm") / "ckpt"
    save_checkpoint(path, model, tok)
    return path


@pytest.fixture
def jsonl():
    return write_jsonl




@pytest.fixture
def sft_file(tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(40):
        c = rng.choice(COLORS)
        if i % 3 == 0:
            rows.append({"messages": [{"role": "user", "content": f"name a color like {c}"},
                                      {"role": "assistant", "content": f"{c} is a color"}]})
        elif i % 3 == 1:
            rows.append({"prompt": f"say {c}", "response": f"{c}"})
        else:
            rows.append({"instruction": "repeat the word", "input": c, "output": c})
    return write_jsonl(tmp_path / "sft.jsonl", rows)


@pytest.fixture
def pref_file(tmp_path):
    """Answers that say 'good' beat answers that say 'bad': learnable from the last few tokens."""
    rng = random.Random(1)
    rows = []
    for i in range(60):
        c = rng.choice(COLORS)
        if i % 3 == 0:
            rows.append({"prompt": f"tell me about {c}", "answers": [f"{c} is good good", f"{c} is fine", f"{c} is bad bad"],
                         "ranks": [0, 1, 2]})
        elif i % 3 == 1:
            rows.append({"chosen": f"\n\nHuman: is {c} nice?\n\nAssistant: good, {c} is good",
                         "rejected": f"\n\nHuman: is {c} nice?\n\nAssistant: bad, {c} is bad"})
        else:
            rows.append({"prompt": [{"role": "user", "content": f"what of {c}?"}], "chosen": "good good",
                         "rejected": [{"role": "assistant", "content": "bad bad"}]})
    return write_jsonl(tmp_path / "prefs.jsonl", rows)
