"""Hugging Face folders both ways: `minichat export --format hf` read by transformers itself (weights, chat
template, tokenizer, greedy replies), and folders that transformers wrote loaded by minichat."""
import importlib.util
import json

import pytest
import torch

from minichat.checkpoint import save_checkpoint
from minichat.errors import MinichatError
from minichat.gguf_import import load
from minichat.hf_format import export_hf
from tests.engine.engine_util import make_tiny

if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed (pip install -e '.[test]')", allow_module_level=True)

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3? héllo 🙂"}],
    [{"role": "developer", "content": "Only French."}, {"role": "user", "content": "l'heure 'exacte'\\n?"}],
]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICHAT_CACHE_DIR", str(tmp_path / "cache"))


def _template_ids(hf_tok, conv, gen=True):
    ids = hf_tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _greedy(model, ids, n):
    cur = list(ids)
    with torch.no_grad():
        for _ in range(n):
            cur.append(int(model(torch.tensor([cur]))[0, -1].argmax()))
    return cur[len(ids):]


@pytest.mark.parametrize("tie, kv", [(True, 2), (False, 1)])
def test_transformers_runs_the_export_as_minichat_does(tmp_path, tie, kv):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = make_tiny(seed=3, tie=tie, n_kv_head=kv)
    tok.meta.default_system = "You're a tiny model.\nBe kind."
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok)
    r = export_hf(str(ckpt), tmp_path / "hf")
    assert r["parameters"] == model.num_params() and not list(tmp_path.glob(".hf.*"))  # no temporary left
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is tie
    hm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ht = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for conv in CONVERSATIONS:  # the chat template, as transformers renders and tokenizes it
        for gen in (True, False):
            assert _template_ids(ht, conv, gen) == tok.render_chat(conv, add_generation_prompt=gen)[0]
    text = "Ada's 12345 cats, héllo 🙂"  # (minichat never reads control tokens out of text; transformers does)
    assert ht.encode(text, add_special_tokens=False) == tok.encode(text)
    ids = tok.render_chat(CONVERSATIONS[1])[0]
    with torch.no_grad():
        theirs, ours = hm(torch.tensor([ids])).logits[0], model(torch.tensor([ids]))[0]
    assert float((theirs - ours).norm() / ours.norm()) < 1e-5
    out = hm.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=tok.pad_id)
    assert out[0, len(ids):].tolist() == _greedy(model, ids, 8)


@pytest.mark.parametrize("dtype, rel", [("bf16", 0.03), ("f16", 0.005)])
def test_half_precision_exports(tmp_path, dtype, rel):
    from transformers import AutoModelForCausalLM

    model, tok = make_tiny(seed=4)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok)
    export_hf(str(ckpt), tmp_path / "hf", dtype)
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size < 0.6 * (ckpt / "model.safetensors").stat().st_size
    hm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("the capital of france is paris")])
    with torch.no_grad():
        err = float((hm(ids).logits - model(ids)).norm() / model(ids).norm())
    assert 0 < err < rel
    back, _, _ = load(tmp_path / "hf", verbose=False)  # and minichat reads its own export back
    with torch.no_grad():
        assert torch.allclose(back(ids), hm(ids).logits, atol=1e-4)


def test_export_reads_back_exactly_and_is_imported_once(tmp_path, capsys):
    model, tok = make_tiny(seed=5, tie=True)
    tok.meta.default_system = "Be kind."
    export_hf(str(save_checkpoint(tmp_path / "ckpt", model, tok)), tmp_path / "hf")
    back, btok, cfg = load(tmp_path / "hf")
    assert "converting the Hugging Face folder" in capsys.readouterr().err
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert btok.meta.default_system == "Be kind." and cfg["source"]["importer"] == 1
    for conv in CONVERSATIONS:
        assert btok.render_chat(conv) == tok.render_chat(conv)
    load(tmp_path / "hf")
    assert "converting" not in capsys.readouterr().err  # the cached import is reused


def test_a_folder_transformers_wrote_loads_and_generates(tmp_path):
    """A Llama model that transformers made and saved (sharded, chat_template.jinja beside the tokenizer): the
    same logits, and minichat's engine decodes what transformers decodes."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from minichat.engine import Engine, SamplingParams

    _, tok = make_tiny()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, rope_theta=500.0, max_position_embeddings=64,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.2)
    hm = LlamaForCausalLM(cfg).eval()
    hm.save_pretrained(tmp_path / "native", max_shard_size="100KB")
    assert (tmp_path / "native" / "model.safetensors.index.json").is_file()
    ht = PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token="<|im_end|>")
    ht.chat_template = CHATML
    ht.save_pretrained(tmp_path / "native")
    model, mtok, _ = load(tmp_path / "native", verbose=False)
    assert model.cfg.rope_theta == 500.0 and model.cfg.kv_heads == 1 and model.cfg.norm_eps == 1e-6
    ids = mtok.render_chat(CONVERSATIONS[0])[0]
    assert ids == _template_ids(ht, CONVERSATIONS[0])
    with torch.no_grad():
        assert torch.allclose(model(torch.tensor([ids])), hm(torch.tensor([ids])).logits, atol=1e-5)
    ref = hm.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(ids):].tolist()
    got = Engine(model, mtok, weights="fp32").generate([ids], SamplingParams(temperature=0, max_tokens=10,
                                                                             stop_token_ids=[]))[0]
    assert got.token_ids == ref


def _hf_folder(tmp_path, **changes):
    model, tok = make_tiny(seed=6)
    d = tmp_path / "src"
    export_hf(str(save_checkpoint(tmp_path / "ckpt", model, tok)), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "not supported"),
    ({"attention_bias": True}, "biases"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 8}, "head_dim"),
    ({"num_hidden_layers": 3}, "missing"),
    ({"intermediate_size": 128}, "shape"),
])
def test_folders_minichat_cannot_hold_are_refused_by_name(tmp_path, changes, message):
    d = _hf_folder(tmp_path, **changes)
    with pytest.raises(MinichatError, match=message):
        load(d, verbose=False)


def test_other_bad_folders_and_requests(tmp_path):
    from minichat.model import ModelConfig, Transformer
    from minichat.tokenizer import CharTokenizer

    d = _hf_folder(tmp_path)
    good = (d / "tokenizer_config.json").read_text()
    cfg = json.loads(good)
    cfg["chat_template"] = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MinichatError, match="ChatML"):
        load(d, verbose=False)
    (d / "tokenizer_config.json").write_text(good)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(MinichatError, match="only safetensors"):
        load(d, verbose=False)
    # exporting: a folder in the way, a character tokenizer, a GGUF-only type
    model, tok = make_tiny()
    ckpt = save_checkpoint(tmp_path / "ok", model, tok)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(MinichatError, match="not an empty folder"):
        export_hf(str(ckpt), busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    with pytest.raises(MinichatError, match="f32, f16, bf16"):
        export_hf(str(ckpt), tmp_path / "q", "q8_0")
    ctok = CharTokenizer.train(["abc def"])
    cm = Transformer(ModelConfig(vocab_size=ctok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=16))
    with pytest.raises(MinichatError, match="character tokenizer"):
        export_hf(str(save_checkpoint(tmp_path / "char", cm, ctok)), tmp_path / "c")
    assert not (tmp_path / "q").exists() and not (tmp_path / "c").exists()


def test_cli_picks_the_format_from_the_name(tmp_path, capsys):
    from minichat.cli import main

    model, tok = make_tiny()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok)
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    assert "Hugging Face" in capsys.readouterr().out and (tmp_path / "out" / "config.json").is_file()
    assert main(["export", str(ckpt), str(tmp_path / "m.gguf")]) == 0
    assert "as f16" in capsys.readouterr().out and (tmp_path / "m.gguf").is_file()
    assert main(["export", str(ckpt), str(tmp_path / "x.bin"), "--format", "gguf"]) == 0
    assert (tmp_path / "x.bin").is_file()


def test_other_verbs_take_a_folder(tmp_path, capsys):
    """`minichat sample` and continued pretraining (`--init_from`) read a Hugging Face folder as well."""
    from minichat.cli import main

    model, tok = make_tiny(seed=7)
    export_hf(str(save_checkpoint(tmp_path / "ckpt", model, tok)), tmp_path / "hf")
    assert main(["sample", "--model", str(tmp_path / "hf"), "--prompt", "The cat", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The cat")
    corpus = tmp_path / "c.txt"
    corpus.write_text("A cat sat on the mat; the dog sat on the log.\n" * 200)
    assert main(["pretrain", "--preset", "tiny", "--init_from", str(tmp_path / "hf"), "--data.corpus", str(corpus),
                 "--train.out_dir", str(tmp_path / "cont"), "--train.max_steps", "2", "--train.progress", "false"]) == 0
    back, _, _ = load(tmp_path / "cont", verbose=False)
    assert back.cfg.d_model == model.cfg.d_model and back.cfg.n_kv_head == model.cfg.n_kv_head
