"""LoRA: adapters start as a no-op, only they train, merging is exact, and SFT/DPO checkpoints stay plain."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from minichat.errors import ConfigError
from minichat.lora import LoRAConfig, LoRALinear, add_lora, merge_lora
from minichat.model import ModelConfig, Transformer


def _tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=32))


def test_adapters_start_as_a_no_op_and_only_they_train():
    model, x = _tiny(), torch.randint(0, 50, (2, 10))
    before = model(x)
    n = add_lora(model, LoRAConfig(rank=4, targets="wq,wv,w_down"))
    torch.testing.assert_close(model(x), before)  # B = 0
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"layers.{i}.{m}.lora_{ab}" for i in range(2)
                       for m in ("attn.wq", "attn.wv", "mlp.w_down") for ab in "AB"}
    # wq, wv: A (4, 32) + B (32, 4); w_down: A (4, 128) + B (32, 4)
    assert n == 2 * (2 * (4 * 32 + 32 * 4) + (4 * 128 + 32 * 4))
    model(x).sum().backward()
    assert all(p.grad is None for k, p in model.named_parameters() if k not in trained)


def _adapted(model):
    """Rank-3 adapters (alpha / rank = 2) with B drawn at random, so they change what the model computes."""
    add_lora(model, LoRAConfig(rank=3, alpha=6.0))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    return model


def test_merged_model_computes_what_the_adapted_one_does():
    model, x = _adapted(_tiny()), torch.randint(0, 50, (2, 10))
    adapted = model(x)
    base_wq = model.layers[0].attn.wq.weight.clone()
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)
    delta = model.layers[0].attn.wq.weight - base_wq
    assert torch.linalg.matrix_rank(delta) == 3  # a rank-3 update, scaled by alpha / rank = 2


@pytest.mark.parametrize("bad, msg", [
    (dict(rank=-1), "rank"), (dict(rank=4, alpha=0), "alpha"), (dict(rank=4, targets="wq,lm_head"), "lm_head"),
    (dict(rank=4, dropout=1.0), "dropout"),
])
def test_bad_settings_are_explained(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        LoRAConfig(**bad).validate()


def test_sft_with_lora_trains_adapters_merges_and_resumes_exactly(tiny_lm, sft_file, tmp_path):
    from minichat.checkpoint import load_model
    from minichat.train import sft

    def cfg_for(out, steps):
        cfg = sft.preset_tiny()
        cfg.init_from, cfg.data.train, cfg.data.val_fraction = str(tiny_lm), str(sft_file), 0.2
        cfg.lora.rank, cfg.lora.alpha = 4, 8.0
        cfg.train.out_dir, cfg.train.max_steps, cfg.train.eval_every, cfg.train.progress = str(out), steps, 0, False
        cfg.train.lr, cfg.train.min_lr, cfg.train.decay_steps = 3e-2, 3e-3, 30  # a stop at 2 as a kill would
        return cfg

    first = sft.run(cfg_for(tmp_path / "a", 2))
    res = sft.run(cfg_for(tmp_path / "a", 30))  # resumes at step 2
    assert res["val_loss"] < first["val_loss"] - 0.05  # a random tiny base learns slowly through rank 4
    sft.run(cfg_for(tmp_path / "b", 30))
    for (k, a), b in zip(load_model(tmp_path / "a")[0].state_dict().items(),
                         load_model(tmp_path / "b")[0].state_dict().values()):
        assert torch.equal(a, b), k  # the resume was exact

    # the final checkpoint is an ordinary model; the resumable one keeps the adapters apart
    final = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    assert not any("lora" in k for k in final)
    step = sorted((tmp_path / "a" / "checkpoints").glob("step_*"))[-1]
    assert any(k.endswith("lora_A") for k in load_file(str(step / "model.safetensors")))
    tuned, _, _ = load_model(tmp_path / "a")
    from_step, _, _ = load_model(step)  # merged on reading
    base, _, _ = load_model(tiny_lm)
    for (k, a), b, c in zip(tuned.state_dict().items(), from_step.state_dict().values(), base.state_dict().values()):
        torch.testing.assert_close(a, b)
        if k.endswith(("wq.weight", "w_up.weight")):
            assert 0 < torch.linalg.matrix_rank(a - c) <= 4
        elif k.endswith(("embed.weight", "norm.weight")):
            assert torch.equal(a, c)  # not adapted: untouched


def test_dpo_with_lora(tiny_lm, pref_file, tmp_path):
    from minichat.checkpoint import load_model
    from minichat.train import dpo

    cfg = dpo.preset_tiny()
    cfg.init_from, cfg.data.train = str(tiny_lm), str(pref_file)
    cfg.lora.rank = 4
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.progress = str(tmp_path / "dpo"), 10, False
    res = dpo.run(cfg)
    assert res["step"] == 10
    load_model(tmp_path / "dpo")


def test_reward_model_with_lora(tiny_lm, tmp_path):
    """The trunk frozen under adapters, the scalar head trained whole; the final checkpoint is an ordinary
    reward model (PPO's value model starts from it)."""
    import random

    from minichat.heads import load_scalar_model
    from minichat.train import reward
    from tests.rlhf.rlhf_util import COLORS, write_jsonl

    rng = random.Random(2)
    rows = [{"prompt": f"tell me about {c}", "answers": [f"{c} is good good", f"{c} is bad bad"]}
            for c in (rng.choice(COLORS) for _ in range(60))]
    cfg = reward.preset_tiny()
    cfg.init_from, cfg.data.train, cfg.data.val_fraction = str(tiny_lm), str(write_jsonl(tmp_path / "p.jsonl", rows)), 0.2
    cfg.lora.rank, cfg.lora.alpha = 8, 16.0
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.lr, cfg.train.progress = str(tmp_path / "rm"), 30, 3e-3, False
    res = reward.run(cfg)
    assert res["val_accuracy"] >= 0.9
    rm, _, _ = load_scalar_model(tmp_path / "rm")
    assert not any("lora" in k for k in rm.state_dict())
    cfg.train_last_layers = 2
    with pytest.raises(ConfigError, match="not both"):
        cfg.validate()


def test_adapters_switch_off_exactly_and_the_engine_samples_the_merged_weights():
    """PPO's reference is the policy with its adapters off, and its rollouts come from the engine: both must
    compute what the frozen and the merged model do."""
    from minichat.engine import Engine, SamplingParams
    from minichat.lora import adapters_disabled

    model, x = _tiny(), torch.randint(0, 50, (2, 10))
    base = model(x)
    adapted = _adapted(model)(x)
    with adapters_disabled(model):
        assert torch.equal(model(x), base)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)  # switched back on

    merged = merge_lora(copy.deepcopy(model))

    def greedy(m):
        eng = Engine(m, weights="fp32", max_batch=2)
        reqs = [eng.submit([1, 2, 3], SamplingParams(max_tokens=8, temperature=0.0, logprobs=True)),
                eng.submit([4, 5], SamplingParams(max_tokens=8, temperature=0.0, logprobs=True))]
        while any(not r.finished for r in reqs):
            eng.step()
        return [r.completion() for r in reqs]

    for a, b in zip(greedy(model), greedy(merged)):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
    with adapters_disabled(model):
        frozen = greedy(model)
    assert any(a.token_ids != b.token_ids for a, b in zip(frozen, greedy(merged)))
