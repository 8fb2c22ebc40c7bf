"""The compiled kernels against the same math written as torch ops."""
import math

import pytest
import torch
import torch.nn.functional as F

from minichat import kernels
from minichat.engine import _kv_dequant, _kv_quant

K = kernels.load()
pytestmark = pytest.mark.skipif(K is None, reason="no C compiler here: the engine runs its torch path")


def ref_quant(h):
    """Per-row asymmetric int8 as torch ops: h ≈ s·q + z; returns (q, (M, 2) of s and z)."""
    lo, hi = h.amin(-1, keepdim=True), h.amax(-1, keepdim=True)
    z = (hi + lo) / 2
    s = ((hi - lo) / 254).clamp(min=1e-30)
    return torch.round((h - z) / s).to(torch.int8), torch.cat([s, z], -1)


def close_q(q, s, rq, rs):
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-6)
    assert (q.int() - rq.int()).abs().max() <= 1  # a rounding tie may go either way
    assert (q == rq).float().mean() > 0.99


@pytest.mark.parametrize("M,K_", [(1, 64), (7, 576), (32, 100)])
def test_norm_quant_matches_torch(M, K_):
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K_, generator=g) * 3
    w = torch.rand(K_, generator=g) + 0.5
    q, s = K.norm_quant(x, w, 1e-5)
    close_q(q, s, *ref_quant(F.rms_norm(x, (K_,), w, 1e-5)))
    q3, s3 = K.norm_quant(x, w, norm=False)  # a per-channel multiplier only
    close_q(q3, s3, *ref_quant(x * w))
    q2, s2 = K.norm_quant(x, None)
    close_q(q2, s2, *ref_quant(x))
    # the quantized rows reconstruct the input to within half a step
    assert ((q2.float() * s2[:, :1] + s2[:, 1:] - x).abs() <= s2[:, :1] * 0.5001).all()


def test_constant_rows_are_exact():
    x = torch.zeros(2, 16)
    x[1] = 3.5
    q, s = K.norm_quant(x, None)
    assert (q == 0).all() and torch.isfinite(s).all()
    assert torch.equal(q.float() * s[:, :1] + s[:, 1:], x)


def test_norm_bf16_matches_torch():
    x = torch.randn(3, 576)
    w = torch.rand(576)
    out = K.norm_bf16(x, w, 1e-5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.rms_norm(x, (576,), w, 1e-5).to(torch.bfloat16)) or \
        (out.float() - F.rms_norm(x, (576,), w, 1e-5).to(torch.bfloat16).float()).abs().max() <= 2 ** -7


@pytest.mark.parametrize("ytype", [torch.float32, torch.int32, torch.bfloat16])
def test_dequant_and_accumulate(ytype):
    M, N = 5, 40
    y = (torch.randn(M, N) * 100).to(ytype)
    rs, cs = torch.rand(M, 2), torch.rand(2, N)
    ref = y.float() * rs[:, :1] * cs[0] + rs[:, 1:] * cs[1] if ytype == torch.int32 else y.float()
    out = K.dequant(y, rs, cs) if ytype == torch.int32 else K.dequant(y)
    torch.testing.assert_close(out, ref)
    base = torch.randn(M, N)
    acc = base.clone()
    K.dequant(y, rs, cs, out=acc, accumulate=True)
    torch.testing.assert_close(acc, base + ref)


def test_swiglu_and_its_quantized_form():
    M, Fh = 4, 48
    y = torch.randint(-5000, 5000, (M, 2 * Fh), dtype=torch.int32)
    rs, cs = torch.rand(M, 2) * 1e-3, torch.rand(2, 2 * Fh)
    yf = y.float() * rs[:, :1] * cs[0] + rs[:, 1:] * cs[1]
    ref = F.silu(yf[:, :Fh]) * yf[:, Fh:]
    torch.testing.assert_close(K.swiglu(y, rs, cs), ref, rtol=1e-5, atol=1e-6)
    close_q(*K.swiglu_quant(y, rs, cs), *ref_quant(ref))
    mul = torch.rand(Fh) + 0.5
    close_q(*K.swiglu_quant(y, rs, cs, colmul=mul), *ref_quant(ref * mul))
    # gates far past exp's range (|g| up to ~150): silu is g or 0 there, never inf or nan
    big = torch.cat([rs[:, :1] * 30, rs[:, 1:]], 1)
    yb = y.float() * big[:, :1] * cs[0] + big[:, 1:] * cs[1]
    close_q(*K.swiglu_quant(y, big, cs), *ref_quant(F.silu(yb[:, :Fh]) * yb[:, Fh:]))


def cache_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values (..., D) as a cache of `dtype` holds them (int8: the engine's rows with their scales)."""
    return _kv_quant(x) if dtype == torch.int8 else x.to(dtype)


def cache_floats(c: torch.Tensor) -> torch.Tensor:
    return _kv_dequant(c) if c.dtype == torch.int8 else c.float()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_qkv_rope_cache_matches_torch(cache_dtype, q_dtype):
    M, H, Hkv, D, slots, cap = 3, 6, 2, 16, 4, 20
    g = torch.Generator().manual_seed(0)
    y = torch.randn(M, (H + 2 * Hkv) * D, generator=g)
    ang = torch.rand(cap, D // 2, generator=g) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([-ang.sin(), ang.sin()], -1)
    pos = torch.tensor([0, 7, 19])
    kc = torch.zeros(slots, Hkv, cap, D + (4 if cache_dtype == torch.int8 else 0), dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    scale = 1 / math.sqrt(D)
    q = K.qkv_rope_cache(y, None, None, H, Hkv, cos, sin, pos, 19, scale, kc, vc, q_dtype=q_dtype)
    # the reference: rotate-half RoPE as the model defines it (pairs j, j + D/2), q scaled
    qk = y[:, : (H + Hkv) * D].view(M, H + Hkv, D)
    a = ang[pos][:, None]  # (M, 1, D/2)
    x1, x2 = qk[..., : D // 2], qk[..., D // 2:]
    rot = torch.cat([x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()], -1)
    torch.testing.assert_close(q.float(), (rot[:, :H] * scale).to(q_dtype).float(), rtol=1e-5, atol=1e-5)
    v = y[:, (H + Hkv) * D:].view(M, Hkv, D)
    for m in range(M):
        if cache_dtype == torch.int8:  # the keys within half a step of their int8 grid; values byte for byte
            row = kc[m, :, pos[m]]
            step = row[:, D:].contiguous().view(torch.float32)  # the stored scale: max|k| / 127 in bf16
            torch.testing.assert_close(step, (rot[m, H:].abs().amax(-1, keepdim=True) / 127), rtol=2 ** -8, atol=0)
            assert ((cache_floats(row) - rot[m, H:]).abs() <= step * 0.5 + 1e-6).all()
        else:
            torch.testing.assert_close(kc[m, :, pos[m]].float(), rot[m, H:].to(cache_dtype).float(), rtol=1e-5,
                                       atol=1e-5)
        assert torch.equal(vc[m, :, pos[m]], cache_rows(v[m], cache_dtype))
    # nothing else in the cache was touched
    written = torch.zeros(slots, Hkv, cap, dtype=torch.bool)
    written[torch.arange(M), :, pos] = True
    assert (kc.float().abs().sum(-1)[~written] == 0).all() and (vc.float().abs().sum(-1)[~written] == 0).all()


@pytest.mark.parametrize("D", [64, 32, 24])  # 24: not a multiple of 16, the portable loop instead of AVX-512
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_attend_decode_matches_masked_softmax_attention(D, cache_dtype):
    """Against softmax attention over the cache's own numbers (int8: its values times their scales)."""
    M, H, Hkv, slots, cap = 4, 6, 2, 5, 40
    g = torch.Generator().manual_seed(1)
    kc = cache_rows(torch.randn(slots, Hkv, cap, D, generator=g), cache_dtype)
    vc = cache_rows(torch.randn(slots, Hkv, cap, D, generator=g), cache_dtype)
    q = torch.randn(M, H, D, generator=g) / math.sqrt(D)
    pos = torch.tensor([0, 5, 39, 17])  # each row attends to its own positions 0..pos[m]
    out = K.attend_decode(q, kc, vc, pos, 39)
    for m in range(M):
        n = int(pos[m]) + 1
        keys = cache_floats(kc[m, :, :n]).repeat_interleave(H // Hkv, 0)  # query head h reads kv head h // (H/Hkv)
        vals = cache_floats(vc[m, :, :n]).repeat_interleave(H // Hkv, 0)
        ref = torch.softmax(q[m, :, None] @ keys.transpose(-1, -2), -1) @ vals  # (H, 1, D)
        torch.testing.assert_close(out[m], ref[:, 0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):  # a position past the cache
        K.attend_decode(q, kc, vc, torch.tensor([0, 5, 40, 17]), 40)
    with pytest.raises(ValueError):  # keys and values of different shapes
        K.attend_decode(q, kc, vc[:, :1].contiguous(), pos, 39)


def test_bad_inputs_are_refused_before_any_write():
    kc = torch.zeros(1, 1, 4, 8)
    y = torch.randn(2, 3 * 8)
    cos = torch.ones(4, 8)
    with pytest.raises(ValueError):  # two rows, one cache slot
        K.qkv_rope_cache(y, None, None, 1, 1, cos, cos, torch.tensor([0, 1]), 1, 1.0, kc, kc.clone())
    with pytest.raises(ValueError):  # position past the cache
        K.qkv_rope_cache(y[:1], None, None, 1, 1, cos, cos, torch.tensor([4]), 4, 1.0, kc, kc.clone())
    with pytest.raises(ValueError):  # not contiguous
        K.norm_quant(torch.randn(8, 4).t(), None)


def test_swiglu_in_bf16():
    y = torch.randn(3, 64)
    ref = F.silu(y[:, :32]) * y[:, 32:]
    out = K.swiglu(y, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -8, atol=1e-6)  # within bf16's rounding


def test_argmax_matches_torch_including_ties():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 1000, generator=g)
    x[1, 10] = x[1, 500] = 99.0  # a tie: the first place wins, as in torch
    x[2, -1] = 50.0  # the last column
    x[3, 0] = 50.0  # the first column
    x[4] = -1.0  # all equal
    assert torch.equal(K.argmax(x), x.argmax(-1))


def test_sample_is_the_inverse_cdf_of_the_tempered_softmax():
    g = torch.Generator().manual_seed(2)
    M, V = 12, 1003  # a ragged last block of 16
    x = torch.randn(M, V, generator=g) * 3
    inv = torch.rand(M, generator=g) + 0.5
    u = torch.rand(M, generator=g)
    cdf = torch.softmax(x.double() * inv.double()[:, None], -1).cumsum(-1)
    lo = torch.searchsorted(cdf, (u.double() - 1e-5)[:, None] * cdf[:, -1:], right=True)[:, 0]
    hi = torch.searchsorted(cdf, (u.double() + 1e-5)[:, None] * cdf[:, -1:], right=True)[:, 0]
    got = K.sample(x, inv, u)
    assert ((got >= lo) & (got <= hi)).all()  # the same place, up to float rounding of the cumulative sum


def test_sample_frequencies_and_forbidden_tokens():
    g = torch.Generator().manual_seed(3)
    row = torch.randn(40, generator=g) * 2
    row[[3, 17, 39]] = float("-inf")  # e.g. stop tokens before min_tokens: never drawn
    N = 100_000
    ids = K.sample(row.expand(N, 40).contiguous(), torch.full((N,), 1 / 0.7), torch.rand(N, generator=g))
    freq = torch.bincount(ids, minlength=40).double() / N
    p = torch.softmax(row.double() / 0.7, -1)
    assert freq[[3, 17, 39]].sum() == 0
    assert (freq - p).abs().max() < 0.01  # ~5 standard errors at these sizes


def test_sample_edge_rows():
    x = torch.full((4, 33), float("-inf"))
    x[0, 5] = 1.0  # one possible token, whatever u is
    x[2, 31] = 2.0  # the last block's tail
    x[3] = 0.0  # uniform; u close to 1 takes the last token
    u = torch.tensor([0.999999, 0.5, 0.0, 0.99999994])
    got = K.sample(x, torch.ones(4), u)
    assert got[0] == 5 and got[1] == 0 and got[2] == 31 and got[3] == 32  # row 1 (all -inf): 0
    with pytest.raises(ValueError):
        K.sample(x, torch.ones(3), u)


def test_int4_groups_match_the_torch_version():
    from minichat.engine import _int4_groups

    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 96, generator=g)
    q, sz, err = K.int4_groups(w)
    rq, rsz, rerr = _int4_groups(w)
    assert torch.equal(q, rq) and torch.equal(sz, rsz) and err == pytest.approx(rerr, rel=1e-5)
    # a matrix made of 4-bit groups (as a Q4_1 GGUF's) reconstructs almost exactly
    back = ((q.view(24, 3, 32) - 8) * sz[..., 0].t()[..., None].float() + sz[..., 1].t()[..., None].float()).view(24, 96)
    assert K.int4_groups(back)[2] < 1e-2 < err


def test_int8_rows_match_torch():
    w = torch.randn(10, 70) * torch.rand(10, 1)
    w[3] = 0.0
    q, t = K.int8_rows(w)
    rt = w.abs().amax(1).clamp(min=1e-12) / 127
    assert torch.equal(t, rt)
    assert torch.equal(q, torch.round(w / rt[:, None]).clamp(-127, 127).to(torch.int8))


def test_a_failing_compiler_means_the_torch_path_not_an_error(tmp_path, monkeypatch):
    """A compiler that fails (here: `false`) leaves load() returning None with a warning, so engines fall
    back to torch ops instead of refusing to start."""
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("MINICHAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    with pytest.warns(UserWarning, match="compiled kernels are unavailable"):
        assert kernels.load() is None
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written was left behind


def test_a_new_build_replaces_earlier_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICHAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    stale = tmp_path / "kernels" / "kernels-0123456789abcdef.so"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an old build")
    k = kernels.load()
    assert k is not None and not stale.exists()
    assert len(list((tmp_path / "kernels").glob("kernels-*.so"))) == 1
    assert torch.equal(k.argmax(torch.tensor([[0.0, 3.0, 1.0]])), torch.tensor([1]))


def test_a_compiler_without_openmp_still_builds_the_kernels(tmp_path, monkeypatch):
    """Where -fopenmp fails (a compiler without an OpenMP runtime), the kernels build without it and run on
    one thread; the failure is remembered, so later starts do not pay for the failing compile again."""
    import shutil

    cc = tmp_path / "cc-no-openmp"
    cc.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {shutil.which("cc") or shutil.which("gcc")} "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("MINICHAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    k = kernels.load()
    assert k is not None and not k.openmp and not k.lib.mc_openmp()
    assert len(list((tmp_path / "kernels").glob("kernels-*.failed"))) == 1
    assert torch.equal(k.argmax(torch.tensor([[0.0, 3.0, 1.0]])), torch.tensor([1]))
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.load() is not None and len(list((tmp_path / "kernels").glob("kernels-*"))) == 2


@pytest.mark.skipif(K is None or not K.openmp, reason="the kernels were built without OpenMP here")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8])
def test_attention_split_over_threads_is_the_same(cache_dtype):
    """The attention kernel splits (row, kv head) pairs over torch's OpenMP threads: same result as one thread."""
    g = torch.Generator().manual_seed(2)
    kc = cache_rows(torch.randn(9, 3, 50, 64, generator=g), cache_dtype)
    vc = cache_rows(torch.randn(9, 3, 50, 64, generator=g), cache_dtype)
    q = torch.randn(9, 9, 64, generator=g) / 8
    pos = torch.arange(9) * 5 + 3
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = K.attend_decode(q, kc, vc, pos, int(pos.max()))
        torch.set_num_threads(2)
        two = K.attend_decode(q, kc, vc, pos, int(pos.max()))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


@pytest.mark.skipif(K is None or not K.openmp, reason="the kernels were built without OpenMP here")
def test_row_kernels_split_over_threads_are_the_same():
    """Big row loops (norm + quantize, dequantize, SwiGLU, argmax) split over torch's threads: same results."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(32, 1024, generator=g), torch.rand(1024, generator=g) + 0.5
    y = torch.randn(32, 2048, generator=g)
    old = torch.get_num_threads()
    outs = []
    try:
        torch.set_num_threads(2)
        for allow in (0, 1):
            K.lib.mc_allow_threads(allow)
            acc = y.clone()
            outs.append([*K.norm_quant(x, w, 1e-5), K.dequant(y, out=acc, accumulate=True), *K.swiglu_quant(y),
                         K.argmax(y)])
    finally:
        K.lib.mc_allow_threads(int(K.openmp))
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
