import json

import pytest
import torch
import torch.nn.functional as F

from minichat.checkpoint import load_model
from minichat.errors import MinichatError
from minichat.model import ModelConfig, Transformer
from minichat.train.loop import TrainConfig, lr_at, make_optimizer
from minichat.train.pretrain import preset_tiny, run


def tiny_cfg(tmp_path, corpus, **train):
    cfg = preset_tiny()
    cfg.data.corpus = str(corpus)
    cfg.train.out_dir = str(tmp_path / "run")
    cfg.train.progress = False
    cfg.sample.num_samples = 0
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def metrics(path):
    return [json.loads(l) for l in open(path)]


def test_overfits_one_batch():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=32, n_layer=2, n_head=2, d_model=32, max_seq_len=16))
    opt = make_optimizer(m, TrainConfig(lr=1e-2, weight_decay=0.0), torch.device("cpu"))
    x = torch.randint(0, 32, (4, 17))
    for _ in range(150):
        loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_loss_falls_and_checkpoint_round_trip(tmp_path, tiny_corpus):
    cfg = tiny_cfg(tmp_path, tiny_corpus, max_steps=60, log_every=10, eval_every=30)
    out = run(cfg)
    rows = [r for r in metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert out["val_loss"] < 5.0
    model, tok, c = load_model(tmp_path / "run")
    assert c["stage"] == "pretrain" and tok.vocab_size == model.cfg.vocab_size
    x = torch.randint(0, tok.vocab_size, (1, 8))
    model2, _, _ = load_model(tmp_path / "run" / "final")
    torch.testing.assert_close(model(x), model2(x))


def test_resume_is_bit_exact(tmp_path, tiny_corpus):
    straight = tiny_cfg(tmp_path / "a", tiny_corpus, max_steps=16, save_every=8, log_every=1, eval_every=0,
                        decay_steps=16)
    run(straight)
    # the first part stops at step 8 (as a kill would), the schedule still spans 16 steps
    first = tiny_cfg(tmp_path / "b", tiny_corpus, max_steps=8, save_every=8, log_every=1, eval_every=0,
                     decay_steps=16)
    run(first)
    second = tiny_cfg(tmp_path / "b", tiny_corpus, max_steps=16, save_every=8, log_every=1, eval_every=0,
                      decay_steps=16)
    run(second)
    la = [r["loss"] for r in metrics(tmp_path / "a" / "run" / "metrics.jsonl")]
    lb = [r["loss"] for r in metrics(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert la == lb  # exactly the same trajectory, including the 8 steps after the restart
    ma, _, _ = load_model(tmp_path / "a" / "run" / "final")
    mb, _, _ = load_model(tmp_path / "b" / "run" / "final")
    for (n, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(p, q), n


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, tiny_corpus):
    cfg = tiny_cfg(tmp_path, tiny_corpus, max_steps=30, save_every=5, eval_every=0, lr=1e30, min_lr=1e29,
                   grad_clip=0.0)
    with pytest.raises(MinichatError, match="loss became"):
        run(cfg)


def test_resume_refuses_mismatched_model(tmp_path, tiny_corpus):
    run(tiny_cfg(tmp_path, tiny_corpus, max_steps=5, save_every=5, eval_every=0))
    cfg = tiny_cfg(tmp_path, tiny_corpus, max_steps=10, eval_every=0)
    cfg.model.n_layer = 3
    with pytest.raises(MinichatError, match="n_layer"):
        run(cfg)


def test_resume_refuses_corrupted_checkpoint(tmp_path, tiny_corpus):
    run(tiny_cfg(tmp_path, tiny_corpus, max_steps=5, save_every=5, eval_every=0))
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    (latest / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MinichatError, match="corrupted"):
        run(tiny_cfg(tmp_path, tiny_corpus, max_steps=10, eval_every=0))


def test_interrupted_save_leaves_latest_intact(tmp_path, tiny_corpus, monkeypatch):
    run(tiny_cfg(tmp_path, tiny_corpus, max_steps=5, save_every=5, eval_every=0))
    import minichat.checkpoint as ck

    def boom(*a, **k):
        raise KeyboardInterrupt  # a kill in the middle of writing the weights

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.CheckpointManager(tmp_path / "run").save(99, model=Transformer(ModelConfig(vocab_size=300, n_layer=2, n_head=2, d_model=32, max_seq_len=32)), tokenizer=None)
    monkeypatch.undo()
    assert ck.CheckpointManager(tmp_path / "run").latest().name == "step_0000005"
    load_model(ck.CheckpointManager(tmp_path / "run").latest())
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp"))


def test_bf16_autocast_path_trains(tmp_path, tiny_corpus):
    # the precision chosen automatically on CPUs with AMX and on CUDA; weights stay fp32
    cfg = tiny_cfg(tmp_path, tiny_corpus, max_steps=40, log_every=10, eval_every=40)
    cfg.runtime.dtype = "bf16"
    out = run(cfg)
    rows = [r for r in metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    model, _, _ = load_model(tmp_path / "run")
    assert model.embed.weight.dtype == torch.float32 and out["val_loss"] < 6.0
