import pytest
import torch

from minichat.errors import ConfigError
from minichat.model import KVCache, ModelConfig, Transformer, apply_rope, attention_reference, rope_tables


def tiny(**kw):
    cfg = dict(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=48)
    cfg.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**cfg)).eval()


def test_reference_attention_equals_sdpa():
    m = tiny()
    x = torch.randint(0, 61, (3, 20))
    fast = m(x)
    m.set_attention("reference")
    slow = m(x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_attention_reference_is_the_formula():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    # by hand: weights_ij = exp(q_i·k_j/2) / sum_j exp(q_i·k_j/2), sqrt(d_k) = 2
    s = (q[0, 0] @ k[0, 0].T) / 2.0
    w = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
    torch.testing.assert_close(attention_reference(q, k, v)[0, 0], w @ v[0, 0])
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(attention_reference(q, k, v, mask), sdpa, atol=1e-6, rtol=1e-6)


def test_causality_future_tokens_do_not_change_past_logits():
    m = tiny()
    x = torch.randint(0, 61, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 7) % 61
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_shapes_rope_and_gqa():
    m = tiny()
    blk = m.layers[0].attn
    assert blk.wq.weight.shape == (32, 32)
    assert blk.wk.weight.shape == (2 * 8, 32)  # 2 KV heads of head_dim 8
    logits, h = m(torch.randint(0, 61, (2, 5)), return_hidden=True)
    assert logits.shape == (2, 5, 61) and h.shape == (2, 5, 32)
    cos, sin = rope_tables(8, 10, 10000.0)
    assert cos.shape == (10, 4)
    x = torch.randn(1, 1, 10, 8)
    r = apply_rope(x, cos[None, None], sin[None, None])
    # a rotation preserves the norm of every pair, hence of every vector
    torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1))
    # position 0 is not rotated
    torch.testing.assert_close(r[..., 0, :], x[..., 0, :])


def test_rope_relative_position():
    # q·k after RoPE depends only on the distance between positions
    cos, sin = rope_tables(8, 32, 100.0)
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)

    def rot(v, p):
        return apply_rope(v[None, None, None], cos[p][None, None, None], sin[p][None, None, None])[0, 0, 0]

    assert torch.allclose(rot(q, 5) @ rot(k, 2), rot(q, 13) @ rot(k, 10), atol=1e-5)


def test_kv_cache_decoding_matches_full_forward():
    m = tiny()
    x = torch.randint(0, 61, (2, 12))
    full = m(x)
    cache = m.new_cache(2)
    parts = [m(x[:, :5], cache=cache)]
    for t in range(5, 12):
        parts.append(m(x[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 12


def test_left_padded_batch_matches_unpadded():
    m = tiny()
    a = torch.randint(0, 61, (1, 9))
    b = torch.randint(0, 61, (1, 6))
    pad = torch.zeros(1, 3, dtype=torch.long)
    x = torch.cat([a, torch.cat([pad, b], 1)])
    km = torch.ones(2, 9, dtype=torch.bool)
    km[1, :3] = False
    cache = m.new_cache(2)
    out = m(x, cache=cache, key_mask=km, logits="last")
    torch.testing.assert_close(out[1, -1], m(b)[0, -1], atol=1e-5, rtol=1e-5)
    nxt = torch.tensor([[5], [7]])
    km2 = torch.cat([km, torch.ones(2, 1, dtype=torch.bool)], 1)
    step = m(nxt, cache=cache, key_mask=km2)
    torch.testing.assert_close(step[1, -1], m(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_packed_row_computes_each_document_alone(impl):
    """doc_ids: three documents and padding in one row give exactly the logits of each document run alone."""
    m = tiny()
    m.set_attention(impl)
    docs = [torch.randint(0, 61, (1, n)) for n in (7, 4, 9)]
    row = torch.cat(docs + [torch.zeros(1, 3, dtype=torch.long)], 1)  # (1, 23)
    ids = torch.tensor([[0] * 7 + [1] * 4 + [2] * 9 + [-1] * 3])
    out = m(row, doc_ids=ids)
    torch.testing.assert_close(out[:, :7], m(docs[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 7:11], m(docs[1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 11:20], m(docs[2]), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    # without doc_ids the later documents see the earlier ones: different logits
    assert not torch.allclose(m(row)[:, 7:11], out[:, 7:11], atol=1e-3)
    with pytest.raises(ValueError, match="doc_ids"):
        m(row, cache=m.new_cache(1), doc_ids=ids)


def test_activation_checkpointing_gives_the_same_gradients():
    ref, m = tiny(dropout=0.1), tiny(dropout=0.1)
    m.checkpoint_activations = True
    x = torch.randint(0, 61, (2, 12))
    grads = []
    for model in (ref, m):
        model.train()
        torch.manual_seed(5)  # the same dropout masks: checkpointing replays the RNG in the recomputation
        model(x, doc_ids=torch.tensor([[0] * 5 + [1] * 7, [0] * 12])).float().pow(2).mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_cache_overflow_and_long_input_errors():
    m = tiny(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 9, dtype=torch.long))
    c = KVCache(m.cfg, 1, 4)
    with pytest.raises(ValueError, match="full"):
        m(torch.zeros(1, 5, dtype=torch.long), cache=c)


@pytest.mark.parametrize("bad,msg", [
    (dict(n_head=5), "must divide"),
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(d_model=0), "positive"),
    (dict(dropout=1.5), "dropout"),
])
def test_invalid_configs_are_explained(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        tiny(**bad)


def test_param_count_and_flops():
    m = tiny(tie_embeddings=True)
    assert m.num_params() == sum(p.numel() for p in set(m.parameters()))
    n = m.num_params(non_embedding=True)
    # training FLOPs per token = 3 x forward; forward = 2N (+ the tied head) + attention
    fwd = m.flops_per_token(48, training=False)
    assert m.flops_per_token(48) == 3 * fwd
    assert fwd == 2 * (n + 61 * 32) + 4 * 2 * 4 * 8 * 48
