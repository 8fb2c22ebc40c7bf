"""The CUDA path: the same model, engine and pipeline on a GPU as on the CPU.

Skipped where no GPU is present (CI has none); `bench/gpu/check.sh` runs this file on a lent GPU machine.
"""
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_fp32():
    # TF32 matmuls differ from the CPU's in the 3rd digit; the comparisons below are of fp32 against fp32
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _model(vocab=300, seed=0):
    from minichat.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64, init_std=0.2)
    return Transformer(cfg).eval()


def test_forward_matches_cpu():
    m = _model()
    x = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x)
        got = m.to("cuda")(x.cuda()).cpu()
    assert got.shape == ref.shape == (3, 40, 300)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def test_engine_on_cuda_matches_cpu_logprobs():
    from minichat.engine import Engine, SamplingParams

    m = _model()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=True)
    cpu = Engine(m, weights="fp32", device="cpu").generate(prompts, params)
    gpu_engine = Engine(_model().to("cuda"), weights="fp32")
    assert gpu_engine.device.type == "cuda"
    gpu = gpu_engine.generate(prompts, params)
    for a, b in zip(cpu, gpu):
        # greedy over a random model can meet near-ties: compare up to the first differing token
        n = next((i for i, (s, t) in enumerate(zip(a.token_ids, b.token_ids)) if s != t), len(a.token_ids))
        assert n >= 4, (a.token_ids, b.token_ids)
        torch.testing.assert_close(torch.tensor(b.logprobs[:n]), torch.tensor(a.logprobs[:n]), atol=1e-3, rtol=1e-3)


def test_embeddings_on_cuda_match_cpu():
    """/v1/embeddings' Engine.embeddings on the GPU: fp32 as the CPU's; bf16 autocast (the default there) close."""
    from minichat.engine import Engine

    seqs = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
    ref = Engine(_model(), weights="fp32", device="cpu").embeddings(seqs)
    got = Engine(_model().to("cuda"), weights="fp32").embeddings(seqs)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    fast = Engine(_model().to("cuda")).embeddings(seqs)  # auto: bf16
    assert fast.device.type == "cpu" and ((fast * ref).sum(-1) > 0.99).all()


def test_engine_cuda_bf16_samples_batched():
    from minichat.engine import Engine, SamplingParams

    e = Engine(_model().to("cuda"))  # auto on a GPU: bf16 weights
    assert e.weights == "bf16"
    out = e.generate([[1, 2, 3]] * 8, SamplingParams(temperature=1.0, max_tokens=10, seed=3))
    assert [len(o.token_ids) for o in out] == [10] * 8  # no stop tokens in a bare engine
    again = e.generate([[1, 2, 3]] * 8, SamplingParams(temperature=1.0, max_tokens=10, seed=3))
    assert [o.token_ids for o in out] == [o.token_ids for o in again]  # seeded sampling is reproducible on the GPU


def test_engine_cuda_dry_matches_cpu():
    """DRY's penalties (worked out on the CPU from token ids) land on the GPU's logits as on the CPU's."""
    from minichat.engine import Engine, SamplingParams

    prompts = [[5, 6, 7, 8], [9, 10, 9, 10]]
    # strong and from single tokens on, so that a random model that repeats itself is penalised within 24 tokens
    dry = SamplingParams(temperature=0.0, max_tokens=24, dry_multiplier=5.0, dry_allowed_length=1)
    plain = Engine(_model(), weights="fp32", device="cpu").generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    cpu = Engine(_model(), weights="fp32", device="cpu").generate(prompts, dry)
    gpu = Engine(_model().to("cuda"), weights="fp32").generate(prompts, dry)
    assert [a.token_ids for a in cpu] != [a.token_ids for a in plain]  # a random model repeats itself: DRY acts
    for a, b in zip(cpu, gpu):
        n = next((i for i, (s, t) in enumerate(zip(a.token_ids, b.token_ids)) if s != t), len(a.token_ids))
        assert n >= 12, (a.token_ids, b.token_ids)


def test_engine_cuda_grammar_and_logit_bias():
    """Constrained decoding on the GPU: the masks (built on the CPU from token texts) hold on the GPU's logits."""
    from minichat.constrain import JSONGrammar, TokenVocab
    from minichat.engine import Engine, SamplingParams
    from minichat.tokenizer import BPETokenizer

    tok = BPETokenizer.train(['{"ok": true, "n": 12}', '{"ok": false, "n": 3}'] * 50, vocab_size=300)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    e = Engine(_model(vocab=tok.vocab_size).to("cuda"), tok, weights="fp32")
    out = e.generate([[1, 2, 3]] * 4, SamplingParams(temperature=1.0, max_tokens=60, seed=0, stop_token_ids=[],
                                                       grammar=JSONGrammar(TokenVocab(tok), schema)))
    for o in out:
        if o.finish_reason == "stop":
            value = json.loads(tok.decode(o.token_ids))
            assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool)
    assert any(o.finish_reason == "stop" for o in out)
    biased = e.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=3, logit_bias={7: 100.0}))
    assert biased[0].token_ids == [7, 7, 7]


def test_pipeline_tiny_on_cuda(tmp_path):
    """Every stage (pretrain, SFT, reward, PPO-ptx, evaluation) runs on the GPU with bf16 autocast."""
    from minichat import pipeline

    out = tmp_path / "run"
    rc = pipeline.main(["--preset", "tiny", "--out_dir", str(out), "--runtime.device", "cuda"])
    assert rc == 0
    state = json.loads((out / "pipeline.json").read_text())
    assert {"pretrain", "sft", "reward", "ppo"} <= set(state["stages"])
    assert "GPU" in (out / "report" / "report.md").read_text()
