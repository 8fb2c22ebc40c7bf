"""The engine against a plain reference: Transformer.forward over the whole sequence, one token at a time."""
import math
import threading

import pytest
import torch

from minichat.engine import (
    Completion, ContextOverflowError, Detokenizer, Engine, SamplingParams, _kv_dequant, _kv_quant,
)
from minichat.errors import MinichatError

from tests.engine.engine_util import make_tiny


@torch.no_grad()
def ref_logits(model, ids):
    return model(torch.tensor([ids]))[0, -1].float()


@torch.no_grad()
def ref_greedy(model, ids, n, stop=(), penalties=None):
    """Greedy decoding without a KV cache; `penalties` = (presence, frequency, repetition) applied by hand."""
    ids, out = list(ids), []
    for _ in range(n):
        z = ref_logits(model, ids)
        if penalties:
            pres, freq, rep = penalties
            for t in set(out):
                z[t] -= pres + freq * out.count(t)
            for t in set(ids):
                z[t] = z[t] / rep if z[t] > 0 else z[t] * rep
        t = int(z.argmax())
        out.append(t)
        ids.append(t)
        if t in stop:
            break
    return out


def prompts(tok):
    return [tok.encode("Hello there!"), tok.encode("The capital of France is"),
            tok.encode("def add(a, b):\n    return"), tok.encode("A cat")]


def test_fp32_logits_equal_model_forward(tiny):
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32")
    for p in prompts(tok):
        torch.testing.assert_close(eng.logits(p), ref_logits(model, p), atol=1e-5, rtol=1e-5)


def test_fp32_greedy_batch_matches_reference(tiny):
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    ps = prompts(tok)  # different lengths: the batch decodes through the per-row mask and positions
    outs = eng.generate(ps, SamplingParams(temperature=0, max_tokens=20))
    assert [o.prompt_index for o in outs] == [0, 1, 2, 3]
    for p, o in zip(ps, outs):
        assert o.token_ids == ref_greedy(model, p, 20)
        assert o.finish_reason == "length" and o.prompt_tokens == len(p)
    assert not eng.has_unfinished()


def test_tied_embeddings_and_plain_attention():
    model, tok = make_tiny(tie=True, seed=3, n_kv_head=None)
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    p = tok.encode("The capital of Japan")
    assert eng.generate([p], SamplingParams(temperature=0, max_tokens=12))[0].token_ids == ref_greedy(model, p, 12)


def four_bit_copy(model):
    """The model with every block matrix rounded to 4-bit groups (as SmolLM2's Q4_1 weights are)."""
    import copy

    from minichat.engine import GROUP, _int4_groups

    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("layers.") and p.dim() == 2:
                q, sz, _ = _int4_groups(p.float())
                sz = sz.transpose(0, 1).float()  # (N, K/32, 2)
                w = (q.view(p.shape[0], -1, GROUP).float() - 8) * sz[..., :1] + sz[..., 1:]
                p.copy_(w.view_as(p))
    return m


@pytest.mark.parametrize("weights", ["int8", "int4", "auto", "bf16", "w8a8", "fast"])
def test_fast_weights_stay_close(tiny, weights):
    """The decoding path (score) of the fast modes stays close to fp32; int4 is exact up to bf16 rounding
    on weights that already are 4-bit groups, and auto picks it there."""
    model, tok = tiny
    if weights in ("int4", "auto", "fast"):
        model = four_bit_copy(model)
    ids = tok.encode("The capital of France is Paris. A cat sat on the mat; the dog sat on the log.")
    ref = Engine(model, tok, weights="fp32").score(ids)
    eng = Engine(model, tok, weights=weights)
    if weights in ("auto", "fast"):
        # int8x2 where the VNNI kernels take the head's shape; else auto's int8 weight-only, fast's W8A8 head
        head = ("int8x2", "int8" if weights == "auto" else "w8a8")
        assert eng.layers[0].qkv.kind == "int4" and eng.head.kind in head and eng.head.big.kind == ("fp32" if weights == "auto" else "w8a8")
    got = eng.score(ids)
    # log-prob units; int8 has one scale per row, and w8a8 rounds every activation to 8 bits too
    tol = {"int8": 0.15, "fast": 0.15, "w8a8": 0.2}.get(weights, 0.08)
    err = [abs(a - b) for a, b in zip(got, ref)]
    assert max(err) < tol and sum(err) / len(err) < tol / 2
    assert eng.logits(ids[:2]).shape == (model.cfg.vocab_size,)


def test_two_pass_int8_head_is_nearly_exact():
    """auto's head at small batch: int8 weights times activations carried as two int8 rows (the second the first's
    residual), through the VNNI matmul. Its logits match the int8 weights computed exactly to ~1e-3, where the
    int8 weight-only kernel (bf16 activations and results) is off by ~1e-1."""
    from minichat.engine import _Int8TwoPass, _Int8WeightOnly, _int8_rows
    from minichat.kernels import load

    kernels = load()
    torch.manual_seed(0)
    w = torch.randn(512, 96) * 0.05
    if not _Int8TwoPass.fits(w, kernels):
        pytest.skip("no VNNI kernels on this machine")
    x = torch.randn(3, 96) * 4
    x[:, 5] = 60.0  # an outlier channel, as a model's hidden states have
    q, scale = _int8_rows(w, kernels)
    exact = (x.double() @ q.double().T) * scale.double()
    two = _Int8TwoPass(w, kernels)(x)
    one = _Int8WeightOnly(w, kernels)(x)
    assert two.dtype == torch.float32 and two.shape == (3, 512)
    err_two = (two.double() - exact).abs().max().item()
    err_one = (one.double() - exact).abs().max().item()
    assert err_two < 2e-3 * exact.abs().max().item() and err_two < err_one / 10
    assert torch.equal(two.argmax(-1), exact.argmax(-1))


def test_auto_uses_int8_for_unquantized_weights(tiny):
    model, tok = tiny
    eng = Engine(model, tok, weights="auto")
    assert eng.layers[0].qkv.kind == "int8" and eng.layers[0].qkv.big.kind == "fp32"
    fast = Engine(model, tok, weights="fast")
    assert fast.layers[0].qkv.kind == "int8" and fast.layers[0].qkv.big.kind == "w8a8"


def test_joining_mid_flight_does_not_change_results(tiny):
    """Continuous batching: a request that joins a running batch gets what it would get alone."""
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    ps = prompts(tok)
    g = SamplingParams(temperature=0, max_tokens=15)
    a = eng.submit(ps[0], g)
    for _ in range(4):
        eng.step()
    b = eng.submit(ps[1], SamplingParams(temperature=0, max_tokens=6))
    c = eng.submit(ps[2], g)
    seen = []
    while eng.has_unfinished():
        seen.append(eng.num_running)
        eng.step()
    assert max(seen) == 3  # they really ran together
    for req, p in ((a, ps[0]), (b, ps[1]), (c, ps[2])):
        assert req.output == ref_greedy(model, p, req.params.max_tokens)


def test_cancel_frees_the_slot_and_others_continue(tiny):
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    ps = prompts(tok)
    g = SamplingParams(temperature=0, max_tokens=12)
    a, b, c = (eng.submit(p, g) for p in ps[:3])
    eng.step()
    eng.step()
    eng.cancel(a)  # row 0: the last row moves into its slot
    evs = eng.step()
    assert any(ev.request is a and ev.finish_reason == "cancelled" for ev in evs)
    assert a.finished and a.finish_reason == "cancelled" and eng.num_running == 2
    while eng.has_unfinished():
        eng.step()
    assert b.output == ref_greedy(model, ps[1], 12) and c.output == ref_greedy(model, ps[2], 12)
    w = eng.submit(ps[3], g)  # cancelling a waiting request finishes it at once
    eng.cancel(w)
    assert w.finish_reason == "cancelled" and not eng.has_unfinished()


def test_max_batch_queues_the_rest(tiny):
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", max_batch=2, stop_token_ids=[])
    ps = prompts(tok)
    outs = []
    outs = eng.generate(ps, SamplingParams(temperature=0, max_tokens=5))
    for p, o in zip(ps, outs):
        assert o.token_ids == ref_greedy(model, p, 5)


def test_stop_token_and_stop_sequence(tiny):
    model, tok = tiny
    p = prompts(tok)[1]
    full = ref_greedy(model, p, 10)
    eng = Engine(model, tok, weights="fp32")
    o = eng.generate([p], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[full[3]]))[0]
    k = full.index(full[3])
    assert o.finish_reason == "stop" and o.stop_reason == full[3]
    assert o.token_ids == full[: k + 1] and o.content_ids == full[:k]
    seq = full[4:6]
    o = eng.generate([p], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[], stop_sequences=[seq]))[0]
    assert o.finish_reason == "stop" and o.stop_reason == seq
    assert o.token_ids[-2:] == seq and o.content_ids == o.token_ids[:-2]
    # min_tokens forbids the stop token early
    o = eng.generate([p], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[full[0]], min_tokens=3))[0]
    assert o.token_ids[0] != full[0] and len(o.token_ids) >= 3


def test_context_end_and_overflow(tiny):
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    L = model.cfg.max_seq_len
    p = (tok.encode("A cat sat on the mat. ") * 40)[: L - 3]
    o = eng.generate([p], SamplingParams(temperature=0, max_tokens=50))[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 3  # the context is full
    with pytest.raises(ContextOverflowError, match="context window is 128"):
        eng.submit([5] * L)
    with pytest.raises(MinichatError, match="empty"):
        eng.generate([[]])
    with pytest.raises(MinichatError, match="outside the vocabulary"):
        eng.submit([10**6])
    with pytest.raises(MinichatError, match="list of prompts"):
        eng.generate([1, 2, 3])
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=0),
                dict(repetition_penalty=0), dict(top_logprobs=50), dict(presence_penalty=3)):
        with pytest.raises(MinichatError):
            eng.submit([1, 2], SamplingParams(**bad))


def test_logprobs_are_the_models(tiny):
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    p = prompts(tok)[0]
    o = eng.generate([p], SamplingParams(temperature=1.0, seed=7, max_tokens=8, logprobs=True, top_logprobs=3))[0]
    ids = list(p)
    for t, lp, top in zip(o.token_ids, o.logprobs, o.top_logprobs):
        ref = torch.log_softmax(ref_logits(model, ids), -1)
        assert math.isclose(lp, ref[t].item(), abs_tol=1e-4)
        vals, idx = ref.topk(3)
        assert [i for i, _ in top] == idx.tolist()
        assert all(math.isclose(v, r, abs_tol=1e-4) for (_, v), r in zip(top, vals.tolist()))
        ids.append(t)


def test_seed_reproducible_and_n_samples_differ(tiny):
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    p = prompts(tok)[:2]
    sp = SamplingParams(temperature=1.2, max_tokens=12, seed=123)
    a = eng.generate(p, sp, n=4)
    b = eng.generate(p, sp, n=4)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [(o.prompt_index, o.index) for o in a] == [(i, j) for i in range(2) for j in range(4)]
    assert len({tuple(o.token_ids) for o in a[:4]}) > 1  # sample j uses seed + j
    # the same seed gives the same tokens whether the request runs alone or in a batch
    alone = eng.generate([p[1]], SamplingParams(temperature=1.2, max_tokens=12, seed=125))[0]
    assert alone.token_ids == a[6].token_ids


def test_sampling_follows_the_distribution(tiny):
    """First-token frequencies over many samples match softmax(logits / T), restricted by top-k / top-p."""
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[], max_batch=256)
    p = prompts(tok)[3]
    z = ref_logits(model, p)
    N = 1500
    for T in (0.7, 1.5):
        outs = eng.generate([p], SamplingParams(temperature=T, max_tokens=1, seed=1), n=N)
        counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=z.numel()).float()
        probs = torch.softmax(z / T, -1)
        top = probs.topk(8).indices  # buckets: the 8 likeliest tokens and "the rest"
        emp = torch.cat([counts[top] / N, (1 - counts[top].sum() / N).view(1)])
        exp = torch.cat([probs[top], (1 - probs[top].sum()).view(1)])
        tv = 0.5 * (emp - exp).abs().sum().item()
        assert tv < 0.06, (T, tv)  # sampling noise at N=1500 is ~0.02
    top3 = set(z.topk(3).indices.tolist())
    outs = eng.generate([p], SamplingParams(temperature=2.0, top_k=3, max_tokens=1, seed=2), n=300)
    assert {o.token_ids[0] for o in outs} == top3
    probs = torch.softmax(z, -1)
    sp, si = probs.sort(descending=True)
    keep = int((sp.cumsum(0) < 0.5).sum()) + 1  # smallest set with mass >= 0.5
    outs = eng.generate([p], SamplingParams(temperature=1.0, top_p=0.5, max_tokens=1, seed=3), n=300)
    assert {o.token_ids[0] for o in outs} <= set(si[:keep].tolist())
    outs = eng.generate([p], SamplingParams(temperature=1.0, min_p=0.5, max_tokens=1, seed=4), n=100)
    assert {o.token_ids[0] for o in outs} <= set((probs >= 0.5 * probs.max()).nonzero()[:, 0].tolist())
    g = eng.generate([p], SamplingParams(temperature=0, max_tokens=1))[0]
    assert g.token_ids[0] == int(z.argmax())


def test_penalties_match_reference(tiny):
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    ps = prompts(tok)
    for pen in ((0.0, 0.0, 1.3), (0.5, 0.3, 1.0), (1.0, 0.0, 1.2)):
        sp = SamplingParams(temperature=0, max_tokens=15, presence_penalty=pen[0], frequency_penalty=pen[1],
                            repetition_penalty=pen[2])
        outs = eng.generate(ps[:2], sp)  # a batch: penalties are per row
        for p, o in zip(ps, outs):
            assert o.token_ids == ref_greedy(model, p, 15, penalties=pen)
    plain = eng.generate([ps[0]], SamplingParams(temperature=0, max_tokens=15))[0].token_ids
    harsh = eng.generate([ps[0]], SamplingParams(temperature=0, max_tokens=15, frequency_penalty=2.0))[0].token_ids
    assert max(harsh.count(t) for t in harsh) <= max(plain.count(t) for t in plain)


def test_dry_penalty_by_hand():
    import numpy as np

    from minichat.engine import dry_penalty

    br = np.zeros(20, dtype=bool)
    br[9] = True  # a breaker, like a colon
    # "1 2 3" was followed by 4 before: 4 would repeat "1 2 3 4", a match of 3 tokens: 0.8 * 1.75^(3-2)
    assert dry_penalty([1, 2, 3, 4, 5, 1, 2, 3], br, 0.8, 1.75, 2) == pytest.approx({4: 1.4})
    assert dry_penalty([1, 2, 3, 4, 5, 7, 2, 3], br, 0.8, 1.75, 2) == pytest.approx({4: 0.8})  # match of 2
    assert dry_penalty([1, 2, 3, 4, 5, 7, 8, 3], br, 0.8, 1.75, 2) == {}  # 1 token: allowed
    assert dry_penalty([1, 9, 3, 4, 5, 1, 9, 3], br, 0.8, 1.75, 2) == {}  # the breaker ends the match
    assert dry_penalty([1, 2, 3, 9, 5, 1, 2, 9], br, 0.8, 1.75, 2) == {}  # nothing follows a breaker's match
    # two earlier matches followed by different tokens; each keeps its own length
    assert dry_penalty([1, 2, 6, 7, 2, 8, 1, 2], br, 1.0, 2.0, 2) == pytest.approx({6: 1.0})
    assert dry_penalty([5, 5, 5, 5], br, 1.0, 2.0, 2) == pytest.approx({5: 2.0})  # a run: the longest match, 3
    # only earlier occurrences from search_from on count (the prompt may be copied)
    assert dry_penalty([1, 2, 3, 4, 1, 2, 3], br, 0.8, 1.75, 2, search_from=4) == {}
    assert dry_penalty([1, 2, 3, 4, 1, 2, 3], br, 0.8, 1.75, 2, search_from=0) == pytest.approx({4: 1.4})


def test_dry_matches_reference_and_breaks_loops(tiny):
    import numpy as np

    from minichat.engine import DRY_BREAKERS, dry_penalty

    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    p = prompts(tok)[0]
    sp = SamplingParams(temperature=0, max_tokens=40, dry_multiplier=2.0, dry_base=2.0, dry_allowed_length=2)
    got = eng.generate([p], sp)[0].token_ids
    br = np.array([any(c in tok.decode([i]) for c in DRY_BREAKERS) for i in range(model.cfg.vocab_size)])
    ids, want = list(p), []
    with torch.no_grad():
        for _ in range(40):
            z = ref_logits(model, ids)
            for t, v in dry_penalty(ids, br, 2.0, 2.0, 2, search_from=len(p)).items():
                z[t] -= v
            want.append(int(z.argmax()))
            ids.append(want[-1])
    assert got == want
    with pytest.raises(MinichatError, match="dry_multiplier"):
        eng.submit([1, 2], SamplingParams(dry_multiplier=-1))


def test_dry_breaks_a_loop():
    """A model taught one repeating 5-token cycle loops under greedy decoding; with DRY it leaves the cycle."""
    import copy

    model, tok = make_tiny(seed=3)
    model = copy.deepcopy(model)
    cycle = [i for i in range(30, 90) if not any(c in tok.decode([i]) for c in ':"*')][:5]  # no breakers
    x = torch.tensor([cycle * 12])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    eng = Engine(model.eval(), tok, weights="fp32", stop_token_ids=[])
    plain = eng.generate([cycle], SamplingParams(temperature=0, max_tokens=30))[0].token_ids
    assert plain == (cycle * 7)[:30]  # it learned the loop
    dry = eng.generate([cycle], SamplingParams(temperature=0, max_tokens=30, dry_multiplier=1.0))[0].token_ids
    # the first cycle in the output is a copy of the prompt (allowed); a second one in the output is not
    assert dry[:5] == cycle and dry[5:10] != cycle


def test_stream_matches_generate_and_closing_cancels(tiny):
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    p = prompts(tok)[2]
    sp = SamplingParams(temperature=0, max_tokens=10)
    evs = list(eng.stream(p, sp))
    assert [e.token_id for e in evs] == eng.generate([p], sp)[0].token_ids
    assert evs[-1].finished and evs[-1].finish_reason == "length" and not any(e.finished for e in evs[:-1])
    it = eng.stream(p, sp)
    next(it)
    it.close()
    assert not eng.has_unfinished()


def test_submit_from_another_thread(tiny):
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    ps = prompts(tok)
    reqs = []
    th = [threading.Thread(target=lambda p=p: reqs.append(eng.submit(p, SamplingParams(temperature=0, max_tokens=4))))
          for p in ps]
    for t in th:
        t.start()
    for t in th:
        t.join()
    while eng.has_unfinished():
        eng.step()
    for r in reqs:
        assert r.output == ref_greedy(model, r.prompt, 4)


def test_completion_content_ids():
    c = Completion(0, 0, [5, 6, 7], "stop", 3, stop_reason=7)
    assert c.content_ids == [5, 6]
    assert Completion(0, 0, [5, 6, 7], "stop", 3, stop_reason=[6, 7]).content_ids == [5]
    assert Completion(0, 0, [5, 6], "length", 3).content_ids == [5, 6]


# ----------------------------------------------------------------------------------------------- text helper

def test_detokenizer_whole_characters_and_stop_strings(tiny):
    _, tok = tiny
    text = "Unicode: héllo wörld, 日本語 🙂! STOP here"
    ids = tok.encode(text)
    d = Detokenizer(tok)
    pieces = [d.push(t) for t in ids]
    pieces.append(d.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    d = Detokenizer(tok, stop=["STOP", "never"])
    shown = ""
    for t in ids:
        shown += d.push(t)
        assert "ST" not in shown  # a possible start of a stop string is held back
        if d.stopped:
            break
    shown += d.flush()
    assert d.stopped and d.stop_string == "STOP"
    assert shown == text[: text.index("STOP")]
    # a held-back prefix that turns out not to be a stop string is released
    d = Detokenizer(tok, stop=["emoji!"])
    out = "".join(d.push(t) for t in tok.encode("an emoj and more")) + d.flush()
    assert out == "an emoj and more" and not d.stopped


def test_rlhf_style_usage(tiny):
    """What minichat.rollout does: per-request seeds, n samples, logprobs of the sampled tokens."""
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", max_batch=8)
    p = prompts(tok)[:2]
    reqs = [eng.submit(q, SamplingParams(max_tokens=6, logprobs=True), seed=i * 10 + j, prompt_index=i, index=j)
            for i, q in enumerate(p) for j in range(3)]
    while any(not r.finished for r in reqs):
        eng.step()
    for r in reqs:
        c = r.completion()
        assert len(c.logprobs) == len(c.token_ids) > 0 and all(lp <= 0 for lp in c.logprobs)


def test_score_is_teacher_forced_logprobs(tiny):
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32")
    ids = tok.encode("The capital of France is Paris.")
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    want = [ref[t - 1, ids[t]].item() for t in range(1, len(ids))]
    assert eng.score(ids) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("weights", ["auto", "fast"])
def test_big_batches_switch_kernels_and_stay_close(tiny, weights):
    """Above small_rows rows a decode step runs on the `big` kernels (fp32 for auto, w8a8 for fast);
    the log-probs of what was sampled stay close to the fp32 model's."""
    model, tok = tiny
    eng = Engine(model, tok, weights=weights, small_rows=2, stop_token_ids=[])
    ps = prompts(tok)
    outs = eng.generate(ps, SamplingParams(temperature=0, max_tokens=8, logprobs=True))
    for p, o in zip(ps, outs):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([p + o.token_ids]))[0].float(), -1)
        want = [ref[len(p) - 1 + i, t].item() for i, t in enumerate(o.token_ids)]
        # the first token comes from the prompt's last row alone, i.e. the small (int8) head
        assert abs(o.logprobs[0] - want[0]) < 0.15
        assert max(abs(a - b) for a, b in zip(o.logprobs[1:], want[1:])) < (1e-4 if weights == "auto" else 0.3)


def test_batched_prefill_matches_one_by_one(tiny, monkeypatch):
    """Prompts admitted together are prefilled as one packed matrix (attention kept per prompt): the same
    next-token logits and KV cache rows as prefilling each alone, the same greedy tokens, also when the
    pack is split into chunks and when n samples of a prompt share its prefill."""
    import minichat.engine as engine_mod

    model, tok = tiny
    ps = prompts(tok) + [tok.encode("Numbers like 12345 and 3.14159 split into digits. Unicode: héllo")]
    assert len({len(p) for p in ps}) == len(ps)  # all different lengths
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    alone = [eng.logits(p) for p in ps]
    alone_k = []
    for p in ps:
        eng.logits(p)
        alone_k.append(eng._k[:, 0, :, :len(p)].clone())
    for chunk in (engine_mod.PREFILL_CHUNK, 16):  # 16 tokens: several packs, a long prompt alone
        monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", chunk)
        eng._ensure_cache(len(ps), 64)
        with torch.inference_mode():
            got = eng._prefill_many(ps, list(range(len(ps))))
        for i, p in enumerate(ps):
            torch.testing.assert_close(got[i], alone[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[i], ref_logits(model, p), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(eng._k[:, i, :, :len(p)], alone_k[i], atol=1e-5, rtol=1e-5)
    g = SamplingParams(temperature=0, max_tokens=12)
    together = eng.generate(ps, g, n=2)
    for i, p in enumerate(ps):
        one = eng.generate([p], g)[0].token_ids
        assert together[2 * i].token_ids == together[2 * i + 1].token_ids == one == ref_greedy(model, p, 12)


@pytest.mark.parametrize("kv_cache", ["bf16", "int8"])
def test_w8a8_prefill_keeps_position_zero_exact(tiny, kv_cache):
    """weights="fast" prefills prompts with int8 activations except the rows at position 0 (an attention
    sink with huge activations), which stay fp32: position 0's keys equal the fp32 engine's, later ones are close."""
    model, tok = tiny
    ps = prompts(tok)
    ref = Engine(model, tok, weights="fp32")
    if kv_cache == "int8" and not Engine(model, tok, weights="fast")._fuse_big:
        pytest.skip("no compiled kernels here: an int8 cache needs them")
    fast = Engine(model, tok, weights="fast", small_rows=2, kv_cache=kv_cache)
    for e in (ref, fast):
        e._ensure_cache(len(ps), 64)
        with torch.inference_mode():
            e._prefill_many(ps, list(range(len(ps))))
    # position 0 is exact up to the cache's own rounding
    store = (lambda x: x.to(torch.bfloat16)) if kv_cache == "bf16" else _kv_quant
    load = (lambda c: c.float()) if kv_cache == "bf16" else _kv_dequant
    assert fast._k.dtype == {"bf16": torch.bfloat16, "int8": torch.int8}[kv_cache]
    for i, p in enumerate(ps):
        for got, want in ((fast._k, ref._k), (fast._v, ref._v)):  # (fp32 sums in another order: last bits)
            torch.testing.assert_close(load(got[:, i, :, 0]), load(store(want[:, i, :, 0])), rtol=1e-5, atol=1e-6)
        later = (load(fast._k[:, i, :, 1:len(p)]) - ref._k[:, i, :, 1:len(p)]).abs().max()
        assert 0 < later < 0.1 * ref._k[:, i, :, 1:len(p)].abs().max()


def test_kv_cache_modes():
    """auto: int8 where fast mode's compiled kernels do all the attending, else bf16 (fast) or fp32; int8
    where they cannot is refused with a clear error."""
    model, tok = make_tiny()
    fast = Engine(model, tok, weights="fast")
    assert fast.kv_dtype == (torch.int8 if fast._fuse_big and fast._fuse_small else torch.bfloat16)
    assert Engine(model, tok, weights="fast", kv_cache="bf16").kv_dtype == torch.bfloat16
    assert Engine(model, tok, weights="fp32").kv_dtype == torch.float32
    with pytest.raises(MinichatError, match="kv_cache='int8' needs"):
        Engine(model, tok, weights="fp32", kv_cache="int8")
    with pytest.raises(MinichatError, match="kv_cache must be one of"):
        Engine(model, tok, weights="fast", kv_cache="fp8")
    if fast.kv_dtype == torch.int8:  # the torch-ops decode cannot read int8 rows: a clear error, not garbage
        fast._fuse_big = fast._fuse_small = False
        with pytest.raises(MinichatError, match="int8 KV cache is read by the compiled kernels only"):
            fast.generate([tok.encode("Hello there!")], SamplingParams(temperature=0, max_tokens=3))


def test_bf16_cache_attention_paths_agree(tiny):
    """fast mode's bf16 KV cache is read by SDPA at batch >= sdpa_min_batch and through fp32 copies below:
    both give nearly the same logits for the same cache."""
    model, tok = tiny
    ps = prompts(tok)
    outs = {}
    for name, threshold in (("sdpa", 1), ("copies", 10**9)):
        eng = Engine(model, tok, weights="fast", small_rows=2, kv_cache="bf16")
        eng.sdpa_min_batch = threshold
        eng._ensure_cache(len(ps), 64)
        with torch.inference_mode():
            first = eng._prefill_many(ps, list(range(len(ps))))
            tokens = first.argmax(-1)
            outs[name] = eng._decode(tokens, [len(p) for p in ps])
    # bf16 arithmetic in SDPA vs fp32 on the same bf16 values: differences of the size of fast mode's
    # own int8 rounding (about 2% of the logits' spread here), and the same greedy choices
    d = (outs["sdpa"] - outs["copies"]).abs()
    assert d.mean() < 0.05 * outs["copies"].std() and d.max() < 0.25 * outs["copies"].std()
    assert torch.equal(outs["sdpa"].argmax(-1), outs["copies"].argmax(-1))


def test_prefix_cache_reuses_prefixes_with_the_same_result(tiny):
    """Prompts that start like an earlier one compute only from where they differ (in blocks of PREFIX_BLOCK
    tokens, always leaving the last token to compute), with the same logits as a full prefill (fp32: to
    rounding); the cache stays within its capacity, least recently used blocks going first."""
    from minichat.engine import PREFIX_BLOCK

    model, tok = tiny
    base = tok.encode("System: you are a helpful assistant. Answer briefly and kindly. " * 2)
    ps = [base + tok.encode(" User: hello there"), base + tok.encode(" User: what is two plus two?"),
          tok.encode("A cat"), base[:40] + tok.encode(" zz"), base[:PREFIX_BLOCK * 3]]
    plain = Engine(model, tok, weights="fp32", stop_token_ids=[])
    cached = Engine(model, tok, weights="fp32", stop_token_ids=[], prefix_cache=1024)
    sp = SamplingParams(temperature=0, max_tokens=6, logprobs=True)
    for _ in range(2):  # the second round finds every prompt's prefix
        for p in ps:
            a, b = plain.generate([p], sp)[0], cached.generate([p], sp)[0]
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    pc = cached.prefix_cache
    total = 2 * sum(len(p) for p in ps)
    assert plain.prefill_tokens == total and cached.prefill_tokens + pc.reused_tokens == total
    # round 1 reuses the shared start of prompts 2, 4, 5; round 2 all but each prompt's last partial block
    assert pc.reused_tokens >= sum((len(p) - 1) // PREFIX_BLOCK * PREFIX_BLOCK for p in ps)
    small = Engine(model, tok, weights="fp32", stop_token_ids=[], prefix_cache=PREFIX_BLOCK * 4)
    small.generate([ps[0]], sp)
    assert len(small.prefix_cache.blocks) == 4  # capacity, in blocks
    with pytest.raises(MinichatError, match="prefix_cache"):
        Engine(model, tok, weights="fp32", prefix_cache=-1)


def test_fast_prefill_after_a_cached_prefix_runs_fused_and_agrees(tiny):
    """In fast mode a prompt's tokens after position 0 are prefilled through the fused decode path (as rows at
    consecutive positions of its cache slot, attending causally through the cache), several prompts at once
    included; the next-token distribution agrees with the ops path's to int8 rounding."""
    from minichat import kernels

    if kernels.load() is None:
        pytest.skip("no C compiler here: no fused path")
    model, tok = tiny
    base = tok.encode("System: you are a helpful assistant. Answer briefly and kindly. ")
    ps = [base + tok.encode(t) for t in (" User: hello there, how are you today?", " User: what is two plus two?",
                                         " User: name a cat and a dog and a bird")]
    fused = Engine(model, tok, weights="fast", stop_token_ids=[], prefix_cache=1024)
    plain = Engine(model, tok, weights="fast", stop_token_ids=[], prefix_cache=1024)
    plain._fuse_big = False  # the ops path for prefills (and decodes) of more than small_rows rows
    taken = []
    orig = fused._decode_fused
    fused._decode_fused = lambda *a: taken.append(len(a) > 2 and a[2] is not None) or orig(*a)
    sp = SamplingParams(temperature=0, max_tokens=1, logprobs=True, top_logprobs=5)
    for eng in (fused, plain):
        eng.generate([base + tok.encode(" warm")], sp)  # caches the shared start
    a, b = fused.generate(ps, sp), plain.generate(ps, sp)  # three prompts prefilled together
    assert any(taken) and fused.prefix_cache.reused_tokens > 0
    # each row's arithmetic depends only on its input and the cache: with or without the prefix cache, alone or
    # packed with other prompts, a prompt gets bit-identical logits (a repeated request repeats its answer)
    fresh = Engine(model, tok, weights="fast", stop_token_ids=[])
    for p, x in zip(ps, a):
        y = fresh.generate([p], sp)[0]
        assert y.token_ids == x.token_ids and y.logprobs == x.logprobs and y.top_logprobs == x.top_logprobs
    six = [tok.encode(t) for t in ("A cat sat on", "The dog ran to the", "Hello there my", "One two three four",
                                   "Red green blue and", "Paris is the capital of")]
    together = Engine(model, tok, weights="fast", stop_token_ids=[]).generate(six, sp)  # more than small_rows
    for p, x in zip(six, together):
        assert Engine(model, tok, weights="fast", stop_token_ids=[]).generate([p], sp)[0].logprobs == x.logprobs
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert abs(x.logprobs[0] - y.logprobs[0]) < 0.15  # W8A8 rounding on both sides, in different places
        tx, ty = dict(x.top_logprobs[0]), dict(y.top_logprobs[0])
        shared = set(tx) & set(ty)
        assert len(shared) >= 4 and all(abs(tx[t] - ty[t]) < 0.15 for t in shared)


def test_fast_prefill_of_many_new_tokens_takes_the_ops_path(tiny, monkeypatch):
    """Beyond FUSED_PREFILL_MAX new tokens a prompt is prefilled by the ops path (SDPA beats the decode kernel
    on long prompts), alone or packed with short ones, and agrees with the fused path to int8 rounding."""
    from minichat import engine as E, kernels

    if kernels.load() is None:
        pytest.skip("no C compiler here: no fused path")
    model, tok = tiny
    ps = [tok.encode("A cat sat on the mat and the dog sat on the log"), tok.encode("Hi there")]
    sp = SamplingParams(temperature=0, max_tokens=1, logprobs=True, top_logprobs=5)
    fused = Engine(model, tok, weights="fast", stop_token_ids=[]).generate(ps, sp)
    monkeypatch.setattr(E, "FUSED_PREFILL_MAX", 4)
    eng = Engine(model, tok, weights="fast", stop_token_ids=[])
    calls = []
    orig = eng._prefill_ops
    eng._prefill_ops = lambda pr, *a: calls.append([len(p) for p in pr]) or orig(pr, *a)
    ops = eng.generate(ps, sp)
    assert [len(ps[0])] in calls  # the long prompt whole; the short one's position 0 only
    for x, y in zip(fused, ops):
        assert x.token_ids == y.token_ids and abs(x.logprobs[0] - y.logprobs[0]) < 0.15
    assert ops[1].logprobs == fused[1].logprobs  # the short prompt still took the fused path


def test_score_many_is_score_of_each(tiny):
    model, tok = tiny
    seqs = [tok.encode(t) for t in ("The capital of France is Paris.", "A cat", "def add(a, b):\n    return a + b")]
    eng = Engine(model, tok, weights="fp32")
    many = eng.score_many(seqs)
    assert [len(m) for m in many] == [len(s) - 1 for s in seqs]
    for s, m in zip(seqs, many):
        assert m == pytest.approx(eng.score(s), abs=1e-4)
    with pytest.raises(MinichatError, match="max_batch"):
        Engine(model, tok, weights="fp32", max_batch=2).score_many(seqs)


@pytest.mark.parametrize("weights", ["auto", "fast"])
@pytest.mark.parametrize("batch", [1, 3, 6])
def test_fused_decode_matches_the_torch_ops_path(tiny, weights, batch):
    """With the compiled kernels (minichat/kernels.c) a decode step runs fused: small batches on bf16-in/out
    weight-only kernels, fast mode's big batches on int8 x int8. Same math as the torch ops: the logits and
    cache rows written agree up to rounding, and the greedy tokens are the same."""
    from minichat import kernels

    if kernels.load() is None:
        pytest.skip("no C compiler here: only the torch ops path exists")
    model, tok = tiny
    ps = (prompts(tok) * 3)[:batch]
    fused = Engine(model, tok, weights=weights, small_rows=4, stop_token_ids=[])
    plain = Engine(model, tok, weights=weights, small_rows=4, stop_token_ids=[], kernels=False)
    assert fused._fuse_small and not plain._fuse_small and plain.kernels is None
    assert fused._fuse_big == (weights == "fast")
    taken = []
    for name in ("_decode_small_fused", "_decode_fused"):
        orig = getattr(fused, name)
        def spy(*a, _o=orig, _n=name):
            if len(a) == 2:  # a decode step (fast mode's prefills run through _decode_fused too, with slots)
                taken.append(_n)
            return _o(*a)

        setattr(fused, name, spy)
    sp = SamplingParams(temperature=0, max_tokens=6, logprobs=True)
    a, b = fused.generate(ps, sp), plain.generate(ps, sp)
    if batch <= 4:
        assert set(taken) == {"_decode_small_fused"}
    else:  # auto mode's big batches run fp32 matmuls, never fused
        assert set(taken) == ({"_decode_fused"} if weights == "fast" else set())
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        # fast: the fused path attends in fp32 over its int8 cache, the torch path (no kernels: a bf16 cache)
        # with bf16 SDPA; each is 0.10-0.17 nats from fp32 here (independent roundings), so they may differ by
        # about as much
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < (0.02 if weights == "auto" else 0.15)


def test_nucleus_from_topk_equals_the_full_sort():
    """Top-p keeps each row's most likely tokens while the mass of the strictly more likely ones is below
    top_p; the engine takes them from topk(256) and sorts in full only rows whose nucleus is wider. Peaked
    rows (within the top 256), flat rows (the full sort), rows without top-p, and a row's mass below 1
    (after min_p) all match sorting every row."""
    from minichat.engine import _nucleus

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5000, generator=g) * torch.tensor([8.0, 8.0, 0.3, 0.3, 8.0, 2.0, 5.0, 0.1])[:, None]
    probs = torch.softmax(logits, -1)
    probs[6] *= 0.5  # a row whose mass is not 1
    tp = torch.tensor([0.9, 0.5, 0.9, 1.0, 1.0, 0.95, 0.8, 0.05])[:, None]
    sp, si = probs.sort(dim=-1, descending=True)
    drop = (sp.cumsum(-1) - sp >= tp * sp.sum(-1, keepdim=True)) & (tp < 1.0)
    expect = torch.zeros_like(probs).scatter_(1, si, sp.masked_fill(drop, 0.0))
    got = _nucleus(probs, tp)
    assert torch.equal(got, expect)
    kept = (got > 0).sum(-1)
    assert kept[2] > 256 and kept[0] < 256 and kept[3] == 5000  # both paths taken; no top-p keeps all
    # the kept mass reaches top_p, and dropping the least likely kept token would fall short
    for i in (0, 1, 2, 5, 6):
        assert got[i].sum() >= tp[i, 0] * probs[i].sum() - 1e-6
        assert got[i].sum() - got[i][got[i] > 0].min() < tp[i, 0] * probs[i].sum()


@pytest.mark.parametrize("threads", [1, 2])
def test_vnni_matmul_equals_int_mm(threads):
    """kernels.gemm_s8 on prepacked weights returns exactly torch._int_mm's integers: rows in tiles of 6 with a
    ragged last tile, blocks of 128 rows, extreme values (-128 and 127 in both operands), one thread or two."""
    from minichat import kernels

    K = kernels.load()
    if K is None or not K.vnni:
        pytest.skip("no compiled VNNI kernel on this machine (the engine uses torch._int_mm)")
    g = torch.Generator().manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for M, Kd, N in [(1, 64, 64), (5, 576, 128), (6, 8, 64), (13, 192, 384), (32, 1536, 576), (131, 64, 256)]:
            q = torch.randint(-128, 128, (N, Kd), dtype=torch.int8, generator=g)
            a = torch.randint(-128, 128, (M, Kd), dtype=torch.int8, generator=g)
            a[0], q[0] = -128, -128  # the largest products: no saturation anywhere
            panels, comp = K.pack_s8(q)
            assert panels.shape == (N // 64, Kd // 4, 64, 4)
            ints = K.gemm_s8(a, panels, comp)
            assert torch.equal(ints, torch._int_mm(a, q.t().contiguous())), (M, Kd, N)
            # dequantized as it is stored: the same floats as dequant's separate pass
            rs = torch.rand(M, 2, generator=g) - 0.5
            cs = torch.rand(2, N, generator=g) - 0.5
            assert torch.equal(K.gemm_s8(a, panels, comp, rs, cs), K.dequant(ints, rs, cs)), (M, Kd, N)
    finally:
        torch.set_num_threads(old)
    assert K.pack_s8(torch.zeros(300, 64, dtype=torch.int8)) is None  # N not a multiple of 64: _int_mm instead
    assert K.pack_s8(torch.zeros(64, 30, dtype=torch.int8)) is None
    with pytest.raises(ValueError, match="do not fit"):
        K.gemm_s8(torch.zeros(2, 32, dtype=torch.int8), *K.pack_s8(torch.zeros(64, 64, dtype=torch.int8)))
    with pytest.raises(ValueError, match="both"):
        K.gemm_s8(torch.zeros(2, 64, dtype=torch.int8), *K.pack_s8(torch.zeros(64, 64, dtype=torch.int8)),
                  torch.zeros(2, 2))


@pytest.mark.parametrize("use_kernels", [True, False])
def test_smoothing_moves_outlier_channels_into_the_weights(use_kernels):
    """SmoothQuant in the W8A8 kernel: x·Wᵀ = (x/c)·(W·c)ᵀ, so with one outlier input channel the int8
    output gets closer to the exact product than without the factors."""
    from minichat import kernels
    from minichat.engine import _W8A8IntMM

    K = kernels.load() if use_kernels else None
    if use_kernels and K is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.05
    x = torch.randn(16, 64, generator=g)
    x[:, 5] *= 60.0  # an outlier channel, as LLM activations have
    c = (x.abs().amax(0) ** 0.5 / w.abs().amax(0) ** 0.5)
    exact = x @ w.t()
    plain, smooth = _W8A8IntMM(w, K), _W8A8IntMM(w, K, smooth=c)
    err = lambda y: ((y - exact).norm() / exact.norm()).item()
    assert err(smooth(x)) < 0.6 * err(plain(x))
    assert err(smooth(x)) < 0.02


def test_smoothing_factors_come_from_the_model(tiny):
    from minichat.engine import _smoothing

    model, tok = tiny
    f = _smoothing(model, tok)
    assert len(f["layers"]) == model.cfg.n_layer
    D = model.cfg.d_model
    assert f["layers"][0]["qkv"].shape == (D,) and f["layers"][0]["down"].shape == (model.cfg.ff_dim,)
    assert f["head"].shape == (D,)
    assert all(torch.isfinite(v).all() and (v > 0).all() for L in f["layers"] for v in L.values())


def test_sampling_follows_the_distribution_and_seeds_reproduce(tiny):
    """The sampler (inverse CDF, one uniform number per row) draws tokens with the softmax's frequencies,
    never draws a token top-k removed, and a seeded row draws the same as its twin whatever else is batched."""
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
    V = model.cfg.vocab_size
    reqs = [eng.submit([1, 2], SamplingParams(temperature=1.0, max_tokens=1)) for _ in range(48)]
    reqs += [eng.submit([1, 2], SamplingParams(temperature=1.0, max_tokens=1, top_k=3)) for _ in range(8)]
    logits = torch.full((V,), -4.0)
    logits[:5] = torch.tensor([2.0, 1.0, 0.0, 0.5, -1.0])
    want = torch.softmax(logits, -1)
    counts = torch.zeros(V)
    top_k_tokens = set()
    for _ in range(60):
        out = eng._draw(reqs, logits.expand(len(reqs), V).clone(), [False] * len(reqs))
        counts += torch.bincount(out[:48], minlength=V).float()
        top_k_tokens |= set(out[48:].tolist())
    freq = counts / counts.sum()
    assert (freq[:5] - want[:5]).abs().max() < 0.03  # 2,880 draws: ~4 standard errors
    assert top_k_tokens <= {0, 1, 3}
    a = eng.submit([1, 2], SamplingParams(temperature=1.0, max_tokens=1), seed=7)
    b = eng.submit([1, 2], SamplingParams(temperature=1.0, max_tokens=1), seed=7)
    flat = torch.zeros(V)  # uniform: any difference between the twins would show
    out = [eng._draw([a, b] + reqs[:3], flat.expand(5, V).clone(), [False] * 5) for _ in range(20)]
    assert all(o[0] == o[1] for o in out) and len({int(o[0]) for o in out}) > 5


def test_fast_mode_sampler_follows_the_distribution_and_seeds_reproduce(tiny):
    """Fast mode draws plain temperature samples in one compiled pass (kernels.sample); same contract."""
    model, tok = tiny
    eng = Engine(model, tok, weights="fast", stop_token_ids=[])
    if eng.kernels is None:
        pytest.skip("no C compiler: fast mode samples with the torch ops tested above")
    V = model.cfg.vocab_size
    reqs = [eng.submit([1, 2], SamplingParams(temperature=0.8, max_tokens=1)) for _ in range(48)]
    logits = torch.full((V,), -4.0)
    logits[:5] = torch.tensor([2.0, 1.0, 0.0, 0.5, -1.0])
    logits[5] = float("-inf")  # a forbidden token (a stop token before min_tokens)
    want = torch.softmax(logits / 0.8, -1)
    counts = torch.zeros(V)
    for _ in range(60):
        counts += torch.bincount(eng._draw(reqs, logits.expand(48, V).clone(), [False] * 48), minlength=V).float()
    freq = counts / counts.sum()
    assert (freq[:5] - want[:5]).abs().max() < 0.03 and freq[5] == 0
    a = eng.submit([1, 2], SamplingParams(temperature=1.0, max_tokens=1), seed=7)
    b = eng.submit([1, 2], SamplingParams(temperature=1.0, max_tokens=1), seed=7)
    flat = torch.zeros(V)
    out = [eng._draw([a, b] + reqs[:3], flat.expand(5, V).clone(), [False] * 5) for _ in range(20)]
    assert all(o[0] == o[1] for o in out) and len({int(o[0]) for o in out}) > 5


def test_fast_mode_new_prompts_join_the_running_decode_pass_with_the_same_results(tiny):
    """At big batch in fast mode a new prompt's tokens run as extra rows of the running rows' decode pass
    (mix_prefill); every row's numbers are its own, so the tokens and logprobs equal separate passes', for the
    running requests and the joining ones, sampled or greedy, with or without a cached prefix."""
    from minichat import kernels

    if kernels.load() is None:
        pytest.skip("no C compiler here: no fused path")
    model, tok = tiny
    base = tok.encode("System: be brief. ")
    first = [base + tok.encode(t) for t in ("A cat sat on", "The dog ran to the", "Hello there my", "One two three",
                                            "Red green blue and", "Paris is the capital of")]
    later = [base + tok.encode(t) for t in (" User: hi", " User: what is two plus two?", " Tell me a story")]

    def run(mix: bool):
        eng = Engine(model, tok, weights="fast", stop_token_ids=[], prefix_cache=1024)
        eng.mix_prefill = mix
        passes = []
        orig = eng._decode_fused
        eng._decode_fused = lambda *a: passes.append(len(a[1])) or orig(*a)
        reqs = [eng.submit(p, SamplingParams(temperature=0.8, max_tokens=12, logprobs=True), seed=i)
                for i, p in enumerate(first)]
        for _ in range(3):
            eng.step()
        reqs += [eng.submit(p, SamplingParams(temperature=0.0 if i else 0.9, max_tokens=10, logprobs=True,
                                              top_logprobs=3), seed=50 + i) for i, p in enumerate(later)]
        reqs.append(eng.submit(later[0], SamplingParams(temperature=0.7, max_tokens=6), seed=9))  # a twin prompt
        while eng.has_unfinished():
            eng.step()
        return [(r.output, r.logprobs, r.top_logprobs) for r in reqs], passes

    mixed, mixed_passes = run(True)
    apart, apart_passes = run(False)
    assert mixed == apart
    # the joining prompts' rows (their tokens after the cached "System: be brief. ") rode in a decode pass
    assert len(mixed_passes) < len(apart_passes) and max(mixed_passes) > len(first)


def test_fast_mode_layer_stack_in_one_call_gives_the_same_numbers(tiny, monkeypatch):
    """Fast mode runs all layers of its fused pass as one compiled call (kernels.decode_layers, without the
    GIL): the same kernels in the same order as one call per kernel, so tokens, log-probs and the cache are
    bit-identical, for decode steps, packed prefills (rows in cache slots) and mixed steps alike."""
    from minichat import kernels

    K = kernels.load()
    if K is None or not K.vnni:
        pytest.skip("no compiled VNNI kernels here: fast mode calls torch per layer")
    model, tok = tiny
    base = tok.encode("System: be brief. ")
    first = [base + tok.encode(t) for t in ("A cat sat on", "The dog ran to the", "Hello there my", "One two three",
                                            "Red green blue and", "Paris is the capital of")]
    later = [base + tok.encode(t) for t in (" User: hi", " Tell me a story")]
    calls = []
    orig = K.decode_layers
    monkeypatch.setattr(K, "decode_layers", lambda *a, **k: calls.append(a[1].shape[0]) or orig(*a, **k))

    def run(one_call: bool):
        eng = Engine(model, tok, weights="fast", stop_token_ids=[], prefix_cache=1024)
        assert eng._layers_c is not None
        eng.use_layers_c = one_call
        reqs = [eng.submit(p, SamplingParams(temperature=0.8, max_tokens=10, logprobs=True, top_logprobs=3), seed=i)
                for i, p in enumerate(first)]
        for _ in range(3):
            eng.step()
        reqs += [eng.submit(p, SamplingParams(temperature=0.0, max_tokens=8, logprobs=True), seed=50 + i)
                 for i, p in enumerate(later)]
        while eng.has_unfinished():
            eng.step()
        return [(r.output, r.logprobs, r.top_logprobs) for r in reqs], eng._k.clone()

    (one, k1), n_one = run(True), len(calls)
    (per, k2) = run(False)
    assert n_one > 5 and len(calls) == n_one  # the one-call path ran, the other did not call it
    assert one == per and torch.equal(k1, k2)
    with pytest.raises(ValueError, match="shapes"):
        eng = Engine(model, tok, weights="fast", stop_token_ids=[])
        eng._ensure_cache(2, 64)
        K.decode_layers(eng._layers_c, torch.zeros(2, 64), eng.H, eng.Hkv, eng._ffn, torch.zeros(3, dtype=torch.long),
                        0, eng._k, eng._v, eng.rope_cos, eng.rope_sin, 1.0, 1e-5)


def test_engine_step_follows_a_thread_tuner(tiny):
    """With engine.thread_tuner set, step() sets the calling thread's torch threads to the tuner's choice and
    reports each step's time and rows to it; the tokens do not depend on it."""
    from minichat.runtime import ThreadTuner

    model, tok = tiny
    prev = torch.get_num_threads()
    sp = SamplingParams(temperature=0, max_tokens=12)
    try:
        torch.set_num_threads(2)
        plain = Engine(model, tok, weights="fp32", stop_token_ids=[]).generate(prompts(tok), sp)
        eng = Engine(model, tok, weights="fp32", stop_token_ids=[])
        eng.thread_tuner = ThreadTuner(2, probe=2, interval=1e-9)
        seen = []
        orig = eng.thread_tuner.record
        eng.thread_tuner.record = lambda s, r, t: seen.append((torch.get_num_threads(), r)) or orig(s, r, t)
        tuned = eng.generate(prompts(tok), sp)
        assert [o.token_ids for o in tuned] == [o.token_ids for o in plain]
        assert {k for k, _ in seen} == {1, 2}  # it probed one thread between steps at two
        assert seen[0][1] == len(prompts(tok))  # rows: the waiting prompts of the first step
    finally:
        torch.set_num_threads(prev)


def test_bf16_weights_use_bf16_big_matmuls_only_where_the_cpu_is_faster_in_bf16(tiny, monkeypatch):
    from minichat import runtime

    model, tok = tiny
    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: False)
    for speedup, big in ((0.5, "fp32"), (3.8, "bf16")):
        monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda s=speedup: s)
        eng = Engine(model, tok, weights="bf16")
        assert eng.layers[0].qkv.big.kind == big and eng.layers[0].qkv.small.kind == "bf16"
        p = (prompts(tok)[0] * 8)[:40]  # longer than small_rows: the prompt goes through the big matmuls
        ref = Engine(model, tok, weights="fp32").generate([p], SamplingParams(temperature=0, max_tokens=1, logprobs=True))[0]
        got = eng.generate([p], SamplingParams(temperature=0, max_tokens=1, logprobs=True))[0]
        assert got.token_ids == ref.token_ids and abs(got.logprobs[0] - ref.logprobs[0]) < 0.05


def test_embeddings_mean_and_last_token(tiny):
    """Engine.embeddings: the final hidden states pooled per sequence, unit length, the same alone or in a
    right-padded batch, while a generation is running; bad ids and pooling are clear errors."""
    model, tok = tiny
    eng = Engine(model, tok, weights="fp32")
    seqs = prompts(tok)
    r = eng.submit(seqs[0], SamplingParams(max_tokens=4))  # running requests do not matter: own weights
    eng.step()
    with torch.no_grad():
        hs = [model(torch.tensor([s]), logits="none", return_hidden=True)[1][0] for s in seqs]
    for pooling, pick in (("mean", lambda h: h.mean(0)), ("last", lambda h: h[-1])):
        got = eng.embeddings(seqs, pooling=pooling, batch=3)
        ref = torch.stack([torch.nn.functional.normalize(pick(h), dim=-1) for h in hs])
        assert got.shape == (len(seqs), 64)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(eng.embeddings([seqs[3]], pooling=pooling)[0], got[3], atol=1e-6, rtol=0)
    assert not r.finished
    with pytest.raises(MinichatError, match="pooling"):
        eng.embeddings(seqs, pooling="cls")
    with pytest.raises(MinichatError, match="outside the vocabulary"):
        eng.embeddings([[10 ** 6]])
    with pytest.raises(MinichatError, match="empty"):
        eng.embeddings([[]])
