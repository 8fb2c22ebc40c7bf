"""Fixtures for the serving tests: tiny checkpoints written by the tests, and live uvicorn servers on loopback.

Three tiny models share one BPE tokenizer:
  tiny    random weights (sampling, seeds, n, logprobs, batching)
  script  weights set by hand so that, at temperature 0, after any chat prompt it says SCRIPT and stops:
          every block's output projections are zero (the residual stream is just the token's embedding), and
          the untied head maps token t's embedding to the logit of the next token of the script. So the
          next token depends only on the current one, and a script whose tokens are all distinct is a chain.
  bad     the same, saying BAD (a harmless start, then a threat the moderation rules flag mid-stream)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

SCRIPT = "Sure! Here is my answer: the sky looks blue because air scatters sunlight."
BAD = "Okay, let me explain my plan for today: I will kill you and your family tonight!"
CORPUS = [
    SCRIPT, BAD, "Hello there, how are you? I am fine, thank you.", "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n", "Paris is the capital of France. Berlin is the capital of Germany.",
]


def _tokenizer():
    from minichat.tokenizer import BPETokenizer

    return BPETokenizer.train(CORPUS * 30, vocab_size=420)


def _scripted(tok, text: str, d: int = 96):
    from minichat.model import ModelConfig, Transformer

    ids = tok.encode(text)
    assert len(set(ids)) == len(ids), f"script tokens repeat: {[tok.decode([i]) for i in ids]}"
    nl = tok.encode("\n")
    assert len(nl) == 1
    chain = nl + ids + [tok.im_end_id]
    assert len(set(chain)) == len(chain)
    g = torch.Generator().manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=d, max_seq_len=256,
                      tie_embeddings=False)
    m = Transformer(cfg)
    with torch.no_grad():
        m.embed.weight.copy_(torch.randn(tok.vocab_size, d, generator=g))
        for blk in m.layers:
            blk.attn.wo.weight.zero_()
            blk.mlp.w_down.weight.zero_()
        m.lm_head.weight.zero_()
        for a, b in zip(chain[:-1], chain[1:]):
            # logit(b | a) = e_a·e_a/rms ≈ d·√d, far above e_a·e_x for any other token
            m.lm_head.weight[b] = m.embed.weight[a]
    return m


@dataclass
class ModelFiles:
    tiny: Path
    script: Path
    bad: Path
    script_text: str = SCRIPT
    bad_text: str = BAD

    def specs(self) -> list[str]:
        return [f"tiny={self.tiny}", f"script={self.script}", f"bad={self.bad}"]


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> ModelFiles:
    from minichat.checkpoint import save_checkpoint
    from minichat.model import ModelConfig, Transformer

    root = tmp_path_factory.mktemp("serve_models")
    tok = _tokenizer()
    torch.manual_seed(0)
    tiny = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=64, max_seq_len=1024))
    save_checkpoint(root / "tiny", tiny, tok)
    save_checkpoint(root / "script", _scripted(tok, SCRIPT), tok)
    save_checkpoint(root / "bad", _scripted(tok, BAD), tok)
    return ModelFiles(root / "tiny", root / "script", root / "bad")


from tests.live import LiveServer


def make_server(model_files: ModelFiles, tmp_path: Path, *, moderation: bool = True, moderation_process: bool = False,
                **cfg_fields):
    """create_app with the tiny models (rules-only moderation, so verdicts are deterministic); with
    moderation_process, the checks run in a child process as `minichat serve` runs them."""
    from minichat.moderation import Moderator
    from minichat.serve.app import create_app
    from minichat.serve.config import EngineSettings, ServeConfig
    from minichat.serve.models import ModelRegistry
    from minichat.serve.store import Store

    engine = cfg_fields.pop("engine", EngineSettings(device="cpu", weights="fp32", max_batch=8))
    cfg_fields.setdefault("store_url", f"sqlite:///{tmp_path / 'store.db'}")
    cfg = ServeConfig(models=model_files.specs(), engine=engine, **cfg_fields)
    cfg.validate()
    models = ModelRegistry.load(cfg.models, cfg.engine, max_queue=cfg.max_queue)
    store = Store(cfg.store_url)
    moderator = Moderator.load(learned=False) if moderation else None
    if moderator is not None and moderation_process:
        from minichat.moderation.process import ModeratorProcess

        moderator = ModeratorProcess(moderator)
    app = create_app(cfg, models, store, moderator)
    srv = LiveServer(app)
    srv.moderator = moderator
    return srv, store


@pytest.fixture(scope="module")
def live(model_files, tmp_path_factory):
    """The default test server: three models, store, moderation on (in a child process, as `minichat serve`
    runs it), no API keys."""
    srv, store = make_server(model_files, tmp_path_factory.mktemp("live"), moderation_process=True)
    srv.start()
    srv.store = store
    yield srv
    srv.stop()
    store.close()
    srv.moderator.close()


@pytest.fixture
def client(live):
    from openai import OpenAI

    c = OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()
