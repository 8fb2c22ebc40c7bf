"""`minichat perplexity`: sliding windows score every token once, and the figures are the model's own NLL."""
from __future__ import annotations

import json
import math

import pytest
import torch

from minichat.errors import MinichatError
from minichat.perplexity import main, score, score_engine, windows
from tests.engine.engine_util import make_tiny


@pytest.mark.parametrize("n,context,stride", [(10, 4, 2), (10, 4, 3), (10, 10, 5), (10, 20, 10), (10, 3, 1),
                                              (2, 2, 1), (57, 16, 5)])
def test_windows_score_each_target_once_with_context(n, context, stride):
    ids = list(range(n))
    seen = []
    for k, w in enumerate(windows(ids, context, stride)):
        assert 2 <= len(w.ids) <= context
        begin = w.ids[0]
        targets = w.ids[1:][w.scored_from:]
        seen += targets
        if k:  # after the first window, each scored token has at least context - stride tokens before it
            assert all(t - begin >= min(context - stride, t) for t in targets)
    assert seen == ids[1:]


def test_score_is_the_models_nll():
    model, tok = make_tiny(max_seq_len=64, seed=2)
    docs = [tok.encode("The capital of France is Paris. A cat sat on the mat."), tok.encode("Hello there!")]
    with torch.no_grad():
        ref = 0.0
        for d in docs:
            lp = torch.log_softmax(model(torch.tensor([d]))[0, :-1].float(), -1)
            ref -= float(lp.gather(-1, torch.tensor(d[1:])[:, None]).sum())
    nll, n = score(model, docs, context=64, stride=32, batch=2)
    assert n == sum(len(d) - 1 for d in docs)
    assert nll == pytest.approx(ref, rel=1e-5)
    # short windows: the same tokens, each with less context
    nll_short, n_short = score(model, docs, context=6, stride=3, batch=3)
    assert n_short == n and nll_short != pytest.approx(nll, rel=1e-6)
    # through the engine's decoding path: the same with fp32 weights, close with int8 ones
    from minichat.engine import Engine

    for weights, rel in (("fp32", 1e-5), ("int8", 2e-2)):
        e_nll, e_n = score_engine(Engine(model, tok, weights=weights), docs, context=6, stride=3, batch=3)
        assert e_n == n_short and e_nll == pytest.approx(nll_short, rel=rel), weights


def test_cli_on_a_checkpoint_and_jsonl(tiny_ckpt, tmp_path, capsys):
    from minichat.tokenizer import load_tokenizer

    texts = ["The capital of France is Paris.", "Unicode: héllo wörld 日本語", "", "A cat sat on the mat."]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts), encoding="utf-8")
    assert main(["--model", str(tiny_ckpt), "--data", str(data), "--text_field", "body", "--json",
                 "--context", "8", "--stride", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok = load_tokenizer(tiny_ckpt)
    assert out["documents"] == 3  # the empty line is skipped
    assert out["tokens"] == sum(len(tok.encode(t)) for t in texts if t)  # after <eos>, every token is predicted
    assert out["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    nll = out["nll_per_token"] * out["tokens"]
    assert out["perplexity"] == pytest.approx(math.exp(out["nll_per_token"]))
    assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / out["bytes"])
    assert main(["--model", str(tiny_ckpt), "--data", str(data), "--text_field", "body", "--json",
                 "--context", "8", "--stride", "4", "--weights", "fp32"]) == 0
    eng = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert eng["tokens"] == out["tokens"] and eng["precision"] == "engine weights fp32"
    assert eng["nll_per_token"] == pytest.approx(out["nll_per_token"], rel=1e-5)
    # --max_tokens cuts the corpus
    assert main(["--model", str(tiny_ckpt), "--data", str(data), "--text_field", "body", "--json",
                 "--max_tokens", "5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == 5


@pytest.mark.parametrize("args,msg", [
    (["--data", "/nonexistent/x.txt"], "does not exist"),
    (["--stride", "8", "--context", "8"], "--stride"),
    (["--context", "100000"], "--context"),
])
def test_cli_errors(tiny_ckpt, tmp_path, args, msg):
    data = tmp_path / "t.txt"
    data.write_text("Hello there! How are you today?", encoding="utf-8")
    base = ["--model", str(tiny_ckpt), "--json"] + (["--data", str(data)] if "--data" not in args else [])
    with pytest.raises(MinichatError, match=msg):
        main(base + args)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n', encoding="utf-8")
    with pytest.raises(MinichatError, match="no text"):
        main(["--model", str(tiny_ckpt), "--data", str(empty), "--json"])
