"""Fixtures: a tiny model + tokenizer, and the same saved as a checkpoint (see engine_util)."""
import pytest

from tests.engine.engine_util import make_tiny
from minichat.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def tiny():
    return make_tiny()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A saved checkpoint with a long context, so a reply can run long enough to be interrupted."""
    model, tok = make_tiny(max_seq_len=4096, seed=1)
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(d, model, tok)
    return d
