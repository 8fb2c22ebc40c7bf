import pytest

from minichat import config as C
from minichat.errors import ConfigError
from minichat.train.pretrain import PRESETS, PretrainConfig


def build(argv):
    return C.build(PretrainConfig, argv, PRESETS)[0]


def test_overrides_and_presets():
    cfg = build(["--preset", "shakespeare-char", "--model.n_layer", "6", "--train.lr=3e-4", "--runtime.compile"])
    assert cfg.model.n_layer == 6 and cfg.train.lr == 3e-4 and cfg.runtime.compile is True
    assert cfg.data.tokenizer == "char" and cfg.model.max_seq_len == 64


def test_unknown_field_named():
    with pytest.raises(ConfigError, match="n_layers"):
        build(["--model.n_layers", "3"])
    with pytest.raises(ConfigError, match="unknown config field"):
        build(["--nope.x", "3"])


def test_invalid_values_named():
    with pytest.raises(ConfigError, match="model.n_layer: expected an integer"):
        build(["--model.n_layer", "many"])
    with pytest.raises(ConfigError, match="must divide"):
        build(["--model.n_head", "5"])
    with pytest.raises(ConfigError, match="grad_accum"):
        build(["--train.batch_size", "10", "--train.grad_accum", "3"])


def test_files_yaml_toml_json(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  n_layer: 3\ntrain:\n  lr: 0.01\n")
    t = tmp_path / "c.toml"
    t.write_text("[model]\nd_model = 64\n")
    cfg = build(["--config", str(y), "--config", str(t), "--model.n_head", "2"])
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.train.lr) == (3, 64, 2, 0.01)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        build(["--config", str(bad)])
    unk = tmp_path / "u.json"
    unk.write_text('{"model": {"width": 3}}')
    with pytest.raises(ConfigError, match="width"):
        build(["--config", str(unk)])


def test_auto_precision_on_cpu_follows_the_measured_bf16_speed(monkeypatch):
    """auto: bf16 autocast on a CPU with AMX or where bf16 matmuls measured >= 1.5x faster; explicit names win."""
    import torch

    from minichat import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 0.5)  # a Xeon with AMX hidden
    assert runtime.resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 1.4)  # within the margin: stay exact
    assert runtime.resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 3.8)  # an EPYC with avx512_bf16
    assert runtime.resolve_dtype("auto", cpu) == torch.bfloat16
    assert runtime.resolve_dtype("fp32", cpu) == torch.float32
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 0.5)
    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: True)
    assert runtime.resolve_dtype("auto", cpu) == torch.bfloat16


def test_bf16_speedup_probe_is_timed_once():
    from minichat import runtime

    first = runtime.cpu_bf16_speedup()
    assert first > 0 and runtime.cpu_bf16_speedup() == first  # cached: one probe per process
