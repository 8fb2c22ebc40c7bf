"""`minichat export`: a model as GGUF. Read back by our importer (always), and by llama.cpp itself where
llama-cpp-python is installed (tokens, chat template, logits and greedy replies)."""
import jinja2
import pytest
import torch

from minichat.checkpoint import save_checkpoint
from minichat.errors import MinichatError
from minichat.gguf_export import chatml_template, export_gguf
from minichat.gguf_import import _default_system, read_gguf
from tests.engine.engine_util import make_tiny

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "developer", "content": "Only French."}, {"role": "user", "content": "l'heure 'exacte'\\n?"}],
]


@pytest.fixture
def tiny_ckpt_path(tmp_path):
    model, tok = make_tiny(seed=3, tie=True)
    tok.meta.default_system = "You're a tiny model.\nBe kind."
    return model, tok, save_checkpoint(tmp_path / "ckpt", model, tok)


def test_f32_export_reads_back_exactly(tiny_ckpt_path, tmp_path):
    model, tok, ckpt = tiny_ckpt_path
    out = tmp_path / "m.gguf"
    r = export_gguf(str(ckpt), out, "f32")
    assert out.is_file() and r["parameters"] == model.num_params()
    assert not list(tmp_path.glob(".m.gguf.*"))  # written through a temporary file
    cfg, sd, otok, info = read_gguf(out)
    assert cfg.tie_embeddings and cfg.n_kv_head == 2 and "lm_head.weight" not in sd  # tied: no output.weight
    for k, v in model.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(sd[k], v), k  # the Q/K permutation undone exactly
    text = "Ada's 12345 cats <|im_end|> héllo"
    assert otok.encode(text) == tok.encode(text)
    assert otok.meta.default_system == tok.meta.default_system
    for conv in CONVERSATIONS:
        assert otok.render_chat(conv) == tok.render_chat(conv)


def test_chat_template_renders_as_minichat_does(tiny_ckpt_path):
    _, tok, _ = tiny_ckpt_path
    for system in (None, tok.meta.default_system):
        tok.meta.default_system = system
        template = jinja2.Environment().from_string(chatml_template(system))
        for conv in CONVERSATIONS:
            for gen in (True, False):
                assert template.render(messages=conv, add_generation_prompt=gen) == tok.render_chat_text(conv, gen)
        assert _default_system(chatml_template(system)) == system


@pytest.mark.parametrize("dtype, rel", [("f16", 0.005), ("bf16", 0.03), ("q8_0", 0.08)])
def test_low_precision_exports_stay_close(tiny_ckpt_path, tmp_path, dtype, rel):
    from minichat.gguf_import import load

    model, tok, ckpt = tiny_ckpt_path
    out = tmp_path / f"m-{dtype}.gguf"
    export_gguf(str(ckpt), out, dtype)
    assert out.stat().st_size < (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    back, _, _ = load(out, verbose=False)
    ids = torch.tensor([tok.encode("the capital of france is paris")])
    with torch.no_grad():
        ours, ref = back(ids), model(ids)
    assert 0 < float((ours - ref).norm() / ref.norm()) < rel  # relative error of the logits


@pytest.mark.parametrize("dtype", ["q4_1", "q5_0"])
def test_four_and_five_bit_exports_hold_exactly_the_rounded_weights(tiny_ckpt_path, tmp_path, dtype):
    """Each matrix read back is gguf's own rounding of ours (blocks of 32 along a row, so Q/K's row permutation
    commutes with it); the embeddings, also the tied output layer, stay at 8 bits as in SmolLM2's Q4_1 file."""
    import gguf

    model, _, ckpt = tiny_ckpt_path
    export_gguf(str(ckpt), tmp_path / "m.gguf", dtype)
    _, sd, _, _ = read_gguf(tmp_path / "m.gguf")

    def rounded(t, q):
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), q), q))

    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        want = v if v.ndim == 1 else rounded(v, gguf.GGMLQuantizationType.Q8_0 if k == "embed.weight"
                                             else gguf.GGMLQuantizationType[dtype.upper()])
        assert torch.equal(sd[k], want), k


def test_bad_requests_are_explained(tmp_path):
    from minichat.model import ModelConfig, Transformer
    from minichat.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["abc def"])
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=16))
    ckpt = save_checkpoint(tmp_path / "char", model, tok)
    with pytest.raises(MinichatError, match="character tokenizer"):
        export_gguf(str(ckpt), tmp_path / "x.gguf")
    with pytest.raises(MinichatError, match="dtype"):
        export_gguf(str(ckpt), tmp_path / "x.gguf", "q4_k")
    with pytest.raises(MinichatError, match="does not exist"):
        export_gguf(str(tmp_path / "nothing"), tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_cli(tiny_ckpt_path, tmp_path, capsys):
    from minichat.cli import main

    _, _, ckpt = tiny_ckpt_path
    assert main(["export", str(ckpt), str(tmp_path / "cli.gguf"), "--dtype", "q8_0"]) == 0
    assert "as q8_0" in capsys.readouterr().out and (tmp_path / "cli.gguf").is_file()


def test_llama_cpp_runs_the_export_as_minichat_does(tiny_ckpt_path, tmp_path):
    """The real consumer: llama.cpp tokenizes the chat template's output as we do, and its logits and greedy
    reply match ours (skipped where llama-cpp-python is not installed, as in CI)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model, tok, ckpt = tiny_ckpt_path
    out = tmp_path / "m.gguf"
    export_gguf(str(ckpt), out, "f32")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    conv = CONVERSATIONS[1]
    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                              bos_token="<|im_start|>")
    text = fmt(messages=conv).prompt
    assert text == tok.render_chat_text(conv)
    ids = tok.render_chat(conv)[0]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    theirs = torch.from_numpy(llm.scores[:len(ids)].copy())
    assert float((theirs - ours).norm() / ours.norm()) < 1e-3  # llama.cpp's own kernels: rounding only
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    greedy = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        greedy.append(t)
        if len(greedy) == 8:
            break
    cur = list(ids)
    with torch.no_grad():
        for _ in range(8):
            cur.append(int(model(torch.tensor([cur]))[0, -1].argmax()))
    llm.close()
    assert greedy == cur[len(ids):]
