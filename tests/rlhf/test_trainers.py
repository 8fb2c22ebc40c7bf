"""SFT, reward, DPO, PPO and best-of-N end to end on a tiny model (seconds each)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from minichat.errors import ConfigError, MinichatError
from tests.rlhf.rlhf_util import write_jsonl


def _quiet(cfg_train):
    cfg_train.progress = False
    return cfg_train


def test_sft_lowers_held_out_loss_and_resumes(tiny_lm, sft_file, tmp_path):
    from minichat.train import sft

    cfg = sft.preset_tiny()
    cfg.init_from, cfg.data.train, cfg.data.val_fraction = str(tiny_lm), str(sft_file), 0.2
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.eval_every = str(tmp_path / "sft"), 2, 0
    _quiet(cfg.train)
    first = sft.run(cfg)
    cfg.train.max_steps = 40  # resumes at step 2 from the checkpoint the first run left
    res = sft.run(cfg)
    assert res["step"] == 40
    assert res["val_loss"] < first["val_loss"] - 0.5
    rows = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 2 and rows[-1]["stage"] == "sft"
    from minichat.checkpoint import load_model

    load_model(tmp_path / "sft")  # an ordinary LM checkpoint


def test_packed_sft_loss_equals_the_padded_loss(tiny_lm, sft_file):
    """Packing changes the batch layout, not the objective: summed over the same conversations, the packed
    rows' loss equals the padded rows' loss (attention and positions stay within each conversation)."""
    from minichat.checkpoint import load_model
    from minichat.data.chat import Sequences, encode_sft, load_sft
    from minichat.losses import masked_lm_loss

    model, tok, _ = load_model(tiny_lm)
    examples = encode_sft(load_sft(sft_file), tok, 95)
    packed, padded = Sequences(examples, 95, tok.pad_id, True), Sequences(examples, 95, tok.pad_id, False)
    assert len(packed) < len(padded) / 2
    with torch.no_grad():
        a = sum(float(masked_lm_loss(model(x, doc_ids=d), y, m, reduction="sum"))
                for x, y, m, d in packed.all_batches(4))
        b = sum(float(masked_lm_loss(model(x), y, m, reduction="sum")) for x, y, m in padded.all_batches(4))
    assert a == pytest.approx(b, rel=1e-5)


def test_sft_with_activation_checkpointing_trains_the_same_model(tiny_lm, sft_file, tmp_path):
    from minichat.checkpoint import load_model
    from minichat.train import sft

    for name, recompute in (("plain", False), ("recompute", True)):
        cfg = sft.preset_tiny()
        cfg.init_from, cfg.data.train, cfg.data.pack = str(tiny_lm), str(sft_file), True
        cfg.train.out_dir, cfg.train.max_steps, cfg.train.eval_every = str(tmp_path / name), 4, 0
        cfg.train.activation_checkpointing = recompute
        _quiet(cfg.train)
        sft.run(cfg)
    a, b = load_model(tmp_path / "plain")[0], load_model(tmp_path / "recompute")[0]
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=k)
    assert not torch.equal(a.layers[0].attn.wq.weight, load_model(tiny_lm)[0].layers[0].attn.wq.weight)


def test_sft_packing(tiny_lm, sft_file, tmp_path):
    from minichat.train import sft

    cfg = sft.preset_tiny()
    cfg.init_from, cfg.data.train, cfg.data.pack = str(tiny_lm), str(sft_file), True
    cfg.train.out_dir, cfg.train.max_steps = str(tmp_path / "sftp"), 5
    _quiet(cfg.train)
    assert sft.run(cfg)["step"] == 5


def test_sft_pretraining_mix_keeps_pretraining_loss_down(tiny_lm, sft_file, tmp_path):
    """ptx_coef > 0 adds the LM loss on pretraining text to every step: it is logged, and the model ends with a
    lower loss on that text than plain SFT from the same start."""
    from minichat.checkpoint import load_model
    from minichat.data.world import builtin_corpus
    from minichat.train import sft

    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in builtin_corpus(seed=3, n_docs=300)])

    def train(name, coef):
        cfg = sft.preset_tiny()
        cfg.init_from, cfg.data.train = str(tiny_lm), str(sft_file)
        cfg.ptx_coef, cfg.ptx_data, cfg.ptx_batch, cfg.ptx_seq_len = coef, str(corpus) if coef else "", 4, 48
        cfg.train.out_dir, cfg.train.max_steps, cfg.train.eval_every, cfg.train.log_every = str(tmp_path / name), 30, 0, 5
        _quiet(cfg.train)
        sft.run(cfg)
        model, tok, _ = load_model(tmp_path / name)
        ids = torch.tensor([t for d in builtin_corpus(seed=4, n_docs=20) for t in tok.encode(d)][:8 * 49]).view(8, 49)
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()))

    plain, mixed = train("plain", 0.0), train("mixed", 1.0)
    assert mixed < plain - 0.1
    rows = [json.loads(l) for l in (tmp_path / "mixed" / "metrics.jsonl").read_text().splitlines()]
    assert any("ptx_loss" in r for r in rows)


def test_sft_with_nothing_left_to_train_says_why(tiny_lm, tmp_path):
    """Every conversation longer than the context: a clear error naming the context, not an empty run."""
    from minichat.train import sft

    long = write_jsonl(tmp_path / "long.jsonl", [{"messages": [
        {"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}] * 3)
    cfg = sft.preset_tiny()
    cfg.init_from, cfg.data.train, cfg.data.val_fraction = str(tiny_lm), str(long), 0.0
    cfg.train.out_dir = str(tmp_path / "s")
    _quiet(cfg.train)
    with pytest.raises(MinichatError, match="no SFT training examples.*context of"):
        sft.run(cfg)


def test_sft_pretraining_mix_needs_data():
    from minichat import config as C
    from minichat.errors import ConfigError
    from minichat.train import sft

    with pytest.raises(ConfigError, match="ptx_data"):
        C.build(sft.SFTConfig, ["--ptx_coef", "0.5"], sft.PRESETS, prog="minichat sft")


@pytest.fixture(scope="module")
def reward_run(tiny_lm, tmp_path_factory):
    """A reward model trained once for the tests below."""
    import random

    from minichat.train import reward

    from tests.rlhf.rlhf_util import COLORS, write_jsonl

    d = tmp_path_factory.mktemp("rm")
    rng = random.Random(1)
    rows = []
    for i in range(90):
        c = rng.choice(COLORS)
        if i % 2:
            rows.append({"prompt": f"tell me about {c}", "answers": [f"{c} is good good", f"{c} is fine", f"{c} is bad bad"]})
        else:
            rows.append({"chosen": f"\n\nHuman: is {c} nice?\n\nAssistant: good, {c} good",
                         "rejected": f"\n\nHuman: is {c} nice?\n\nAssistant: bad, {c} bad"})
    prefs = write_jsonl(d / "prefs.jsonl", rows)
    cfg = reward.preset_tiny()
    cfg.init_from, cfg.data.train, cfg.data.val_fraction = str(tiny_lm), str(prefs), 0.2
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.lr = str(d / "run"), 40, 3e-3
    _quiet(cfg.train)
    return reward.run(cfg), d, prefs, cfg


def test_reward_model_learns_and_is_normalised(reward_run):
    from minichat.data.chat import encode_answer_turn
    from minichat.heads import load_scalar_model, score_sequences

    res, d, _, cfg = reward_run
    assert res["val_accuracy"] >= 0.9 and res["val_pairs"] > 20
    rm, tok, conf = load_scalar_model(d / "run")
    assert conf["kind"] == "reward" and conf["val_accuracy"] == pytest.approx(res["val_accuracy"])
    # the reference demonstrations (each prompt's best answer) now score 0 on average
    from minichat.data.chat import load_comparisons, split_holdout

    train_c, _ = split_holdout(load_comparisons(cfg.data.train), cfg.data.val_fraction, cfg.runtime.seed)
    seqs = [sum(encode_answer_turn(tok, c.prompt, c.answers[0]), []) for c in train_c]
    # scored at the run's precision (bf16 autocast where this CPU multiplies bf16 faster: its rounding alone
    # moves the mean by ~2e-3)
    from minichat import runtime

    cpu = torch.device("cpu")
    with torch.no_grad(), runtime.autocast(cpu, runtime.resolve_dtype(cfg.runtime.dtype, cpu)):
        assert abs(float(score_sequences(rm, seqs, tok.pad_id).mean())) < 1e-3
    # a good answer outscores a bad one on a prompt never seen
    good, bad = ([sum(encode_answer_turn(tok, [{"role": "user", "content": "tell me about cats"}], a), [])]
                 for a in ("cats is good good", "cats is bad bad"))
    assert score_sequences(rm, good, tok.pad_id) > score_sequences(rm, bad, tok.pad_id)


def test_shared_prompt_scores_equal_full_sequences(tiny_lm):
    from minichat.data.chat import EncodedComparison, collate_rankings
    from minichat.heads import load_scalar_model

    rm, tok, _ = load_scalar_model(tiny_lm)
    rows = [EncodedComparison([5, 6, 7, 8, 9], [[10, 11], [12, 13, 14, 15], [16]], [0, 1, 1]),
            EncodedComparison([7, 8], [[20, 21, 22], [23]], [1, 0])]
    a, b = collate_rankings(rows, tok.pad_id, True), collate_rankings(rows, tok.pad_id, False)
    with torch.no_grad():
        ra = rm(a["ids"], key_mask=a["key_mask"], answers=a["answers"], answer_lens=a["answer_lens"], owner=a["owner"])
        rb = rm(b["ids"], key_mask=b["key_mask"])
    torch.testing.assert_close(ra, rb, atol=1e-5, rtol=1e-5)
    assert a["pair_w"].tolist() == [0, 0, 4] and a["pair_l"].tolist() == [1, 2, 3] and a["pair_group"].tolist() == [0, 0, 1]
    assert a["n_tokens"] < b["n_tokens"]


def test_reward_hinge_option(tiny_lm, reward_run, tmp_path):
    from minichat.train import reward

    _, _, prefs, _ = reward_run
    cfg = reward.preset_tiny()
    cfg.init_from, cfg.data.train, cfg.loss, cfg.share_prompt = str(tiny_lm), str(prefs), "hinge", False
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.lr = str(tmp_path / "h"), 30, 3e-3
    _quiet(cfg.train)
    assert reward.run(cfg)["val_accuracy"] >= 0.8


def test_nan_stops_with_last_good_checkpoint(tiny_lm, reward_run, tmp_path):
    from minichat.checkpoint import CheckpointManager, load_weights
    from minichat.heads import ScalarModel
    from minichat.train import reward

    _, _, prefs, _ = reward_run
    cfg = reward.preset_tiny()
    cfg.init_from, cfg.data.train = str(tiny_lm), str(prefs)
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.save_every = str(tmp_path / "nan"), 30, 1
    cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps, cfg.train.grad_clip = 1e38, 0.0, 0, 0.0
    _quiet(cfg.train)
    with pytest.raises(MinichatError, match=r"loss became .* The last good checkpoint is .*step_"):
        reward.run(cfg)
    good = CheckpointManager(tmp_path / "nan").latest()
    from minichat.checkpoint import read_config

    from minichat.checkpoint import model_config_from_dict

    load_weights(ScalarModel(model_config_from_dict(read_config(good)["model"])), good)  # complete and loadable


def test_dpo_learns_preferences(tiny_lm, reward_run, tmp_path):
    from minichat.train import dpo

    _, _, prefs, _ = reward_run
    cfg = dpo.preset_tiny()
    cfg.init_from, cfg.data.train, cfg.data.val_fraction = str(tiny_lm), str(prefs), 0.2
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.lr = str(tmp_path / "dpo"), 30, 3e-3
    _quiet(cfg.train)
    res = dpo.run(cfg)
    assert res["val_reward_acc"] >= 0.9 and res["val_loss"] < 0.69


@pytest.fixture
def prompts_file(tmp_path):
    from tests.rlhf.rlhf_util import COLORS

    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"tell me about {c}" for c in COLORS) + "\n" + "very long prompt " * 40 + "\n")
    return p


@pytest.mark.parametrize("shared", [False, True])
def test_ppo_runs_logs_and_resumes(tiny_lm, reward_run, prompts_file, tmp_path, shared):
    from minichat.checkpoint import load_model
    from minichat.train import ppo

    _, d, _, _ = reward_run
    cfg = ppo.preset_tiny()
    cfg.policy_from, cfg.reward_from, cfg.prompts = str(tiny_lm), str(d / "run"), str(prompts_file)
    cfg.out_dir, cfg.progress = str(tmp_path / "ppo"), False
    cfg.ppo.value_on_reward_trunk, cfg.ppo.ema, cfg.ppo.adaptive_kl = shared, 0.5, True
    cfg.ppo.ptx_coef, cfg.ppo.ptx_data, cfg.ppo.ptx_seq_len = 2.0, "builtin", 32
    cfg.ppo.iterations = 2
    first = ppo.run(cfg)
    assert first["iteration"] == 2 and first["warnings"]["prompts_truncated_from_the_left"] == 1
    cfg.ppo.iterations = 3
    res = ppo.run(cfg)  # resumes from iteration 2
    rows = [json.loads(l) for l in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for key in ("reward", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "answer_len",
                "rollout_tokens_per_s", "train_tokens_per_s", "ptx_loss", "kl_coef"):
        assert key in res and res[key] == res[key], key  # present and not NaN
    assert rows[0]["kl_coef"] != rows[-1]["kl_coef"]  # the adaptive controller moved β
    assert res["ptx_loss"] > 0 and res["approx_kl"] >= 0
    load_model(tmp_path / "ppo")  # the final policy (the EMA) is an ordinary LM checkpoint


def test_ppo_iteration_improves_reward_of_a_trivial_task(tiny_lm, reward_run, prompts_file, tmp_path):
    """PPO iterations with a large learning rate must raise the reward-model score. The untrained policy
    rarely says what the reward model likes, so it takes ~20 iterations to find it (with 12, the first and last
    iterations' rewards were noise around the same mean); then the reward climbs by several points."""
    from minichat.train import ppo

    _, d, _, _ = reward_run
    cfg = ppo.preset_tiny()
    cfg.policy_from, cfg.reward_from, cfg.prompts = str(tiny_lm), str(d / "run"), str(prompts_file)
    cfg.out_dir, cfg.progress, cfg.save_every = str(tmp_path / "ppo2"), False, 0
    cfg.ppo.iterations, cfg.ppo.rollout_batch, cfg.ppo.minibatch, cfg.ppo.epochs = 30, 16, 8, 2
    cfg.ppo.lr, cfg.ppo.max_new_tokens, cfg.ppo.kl_coef, cfg.ppo.unfinished_penalty = 3e-3, 8, 0.0, 0.0
    ppo.run(cfg)
    rows = [json.loads(l) for l in (tmp_path / "ppo2" / "metrics.jsonl").read_text().splitlines()]
    early = sum(r["reward"] for r in rows[:3]) / 3
    late = sum(r["reward"] for r in rows[-3:]) / 3
    assert late > early + 1.0


def test_ppo_with_lora_learns_keeps_its_reference_and_resumes_exactly(tiny_lm, reward_run, prompts_file, tmp_path):
    """Adapters only: the reference is the policy with them off (no second copy), so the first iteration's KL
    is 0 and the frozen weights never move; the value model is the reward model with its own adapters on; the
    reward still climbs; a resume continues exactly (value adapters included); the final checkpoint is an
    ordinary model whose change from the SFT model has rank <= r per matrix."""
    from minichat.checkpoint import load_model, save_checkpoint
    from minichat.train import ppo

    _, d, _, _ = reward_run
    # the random tiny model's logits are nearly uniform (embeddings of std 0.02, tied to the head), and only
    # the embeddings could change that: larger ones give the adapters' changes to the hidden states a say
    sft, tok, _ = load_model(tiny_lm)
    with torch.no_grad():
        sft.embed.weight.mul_(20.0)
    save_checkpoint(tmp_path / "sft", sft, tok)

    def cfg_for(out, iterations):
        cfg = ppo.preset_lora()
        cfg.policy_from, cfg.reward_from, cfg.prompts = str(tmp_path / "sft"), str(d / "run"), str(prompts_file)
        cfg.out_dir, cfg.progress, cfg.save_every = str(out), False, 5
        cfg.lora.rank, cfg.lora.alpha = 4, 8.0
        a = cfg.ppo
        a.iterations, a.rollout_batch, a.minibatch, a.epochs, a.max_new_tokens = iterations, 16, 8, 2, 8
        a.lr, a.value_lr, a.kl_coef, a.unfinished_penalty, a.warmup_iterations = 1e-2, 3e-3, 0.0, 0.0, 1
        return cfg

    ppo.run(cfg_for(tmp_path / "a", 10))
    ppo.run(cfg_for(tmp_path / "a", 30))  # resumes at iteration 10
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 31))
    assert abs(rows[0]["kl"]) < 1e-4  # policy == reference at the start
    assert max(abs(r["kl"]) for r in rows[-5:]) > 0.01  # and it moved away through the adapters
    early, late = (sum(r["reward"] for r in rs) / 3 for rs in (rows[:3], rows[-3:]))
    assert late > early + 1.0

    # the value model is the reward model's weights plus its own adapters and head: only those are saved
    from safetensors.torch import load_file

    step = sorted((tmp_path / "a" / "checkpoints").glob("step_*"))[-1]
    value_keys = [k for k in load_file(str(step / "model.safetensors")) if k.startswith("value.")]
    assert value_keys and all(k.startswith("value.head.") or ".lora_" in k for k in value_keys)

    tuned, _, _ = load_model(tmp_path / "a")
    for (k, w), w0 in zip(tuned.state_dict().items(), sft.state_dict().values()):
        if k.endswith(("wq.weight", "w_down.weight")):
            assert 0 < torch.linalg.matrix_rank(w - w0) <= 4, k
        elif k.endswith(("embed.weight", "norm.weight")):
            assert torch.equal(w, w0), k
    ppo.run(cfg_for(tmp_path / "b", 30))
    for (k, w), w2 in zip(tuned.state_dict().items(), load_model(tmp_path / "b")[0].state_dict().values()):
        assert torch.equal(w, w2), k  # the resumed run is the uninterrupted one

    bad = cfg_for(tmp_path / "c", 1)
    bad.ppo.ema = 0.5
    with pytest.raises(ConfigError, match="ema"):
        ppo.run(bad)


def test_ppo_group_baseline_without_value_model(tiny_lm, reward_run, prompts_file, tmp_path):
    """k answers per prompt and a leave-one-out group baseline: no value model is trained or saved, the
    first update is on-policy, and the run resumes."""
    from minichat.checkpoint import load_model
    from minichat.train import ppo

    _, d, _, _ = reward_run
    cfg = ppo.preset_tiny()
    cfg.policy_from, cfg.reward_from, cfg.prompts = str(tiny_lm), str(d / "run"), str(prompts_file)
    cfg.out_dir, cfg.progress, cfg.save_every = str(tmp_path / "ppo4"), False, 1
    cfg.ppo.iterations, cfg.ppo.rollout_batch, cfg.ppo.minibatch, cfg.ppo.epochs = 1, 8, 8, 1
    cfg.ppo.samples_per_prompt, cfg.ppo.baseline = 4, "group"
    res = ppo.run(cfg)
    assert res["approx_kl"] < 1e-6 and res["clipfrac"] == 0.0
    assert "value_loss" not in res and res["reward_group_std"] >= 0
    cfg.ppo.iterations = 2
    res = ppo.run(cfg)
    assert res["iteration"] == 2
    ckpt = sorted((tmp_path / "ppo4" / "checkpoints").glob("step_*"))[-1]
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert not [n for n in f.keys() if n.startswith("value.")]
    load_model(tmp_path / "ppo4")


@pytest.mark.parametrize("change, msg", [
    ({"baseline": "group"}, "samples_per_prompt >= 2"),
    ({"baseline": "mean"}, "ppo.baseline must be one of"),
    ({"samples_per_prompt": 3}, "divide"),
    ({"samples_per_prompt": 4, "baseline": "group", "value_on_reward_trunk": True}, "no value model"),
])
def test_ppo_group_options_are_validated(change, msg):
    from minichat.errors import ConfigError
    from minichat.train.ppo import PPOAlgoConfig

    with pytest.raises(ConfigError, match=msg):
        PPOAlgoConfig(rollout_batch=8, **change).validate()


def test_best_of_n_picks_the_highest_reward(tiny_lm, reward_run):
    from minichat.bestofn import best_of_n
    from minichat.gguf_import import load
    from minichat.heads import load_scalar_model

    _, d, _, _ = reward_run
    policy, tok, _ = load(str(tiny_lm))
    rm, _, _ = load_scalar_model(d / "run")
    convs = [[{"role": "user", "content": "tell me about red"}], [{"role": "user", "content": "hi"}]]
    out = best_of_n(policy, rm, tok, convs, n=4, max_new_tokens=8, seed=1)
    assert len(out) == 2
    for ch in out:
        assert len(ch.scores) == 4 and ch.score == max(ch.scores) and ch.text in ch.candidates
    again = best_of_n(policy, rm, tok, convs, n=4, max_new_tokens=8, seed=1)
    assert [c.scores for c in again] == [c.scores for c in out]  # seeded


def test_reward_under_torchrun_ddp(tiny_lm, reward_run, tmp_path):
    """Two processes (gloo) train the same global batches as one."""
    _, _, prefs, _ = reward_run
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "minichat.cli", "reward", "--preset", "tiny", "--init_from", str(tiny_lm),
           "--data.train", str(prefs), "--train.out_dir", str(out), "--train.max_steps", "6", "--train.progress", "false",
           "--runtime.threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "processes 2" in r.stdout and (out / "final" / "model.safetensors").is_file()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6


def test_sft_lora_packed_under_torchrun_ddp(tiny_lm, sft_file, tmp_path):
    """LoRA adapters (the rest frozen) and packed rows with document masks, in two processes (gloo)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "minichat.cli", "sft", "--preset", "tiny", "--init_from", str(tiny_lm), "--data.train", str(sft_file),
           "--data.pack", "true", "--lora.rank", "4", "--train.out_dir", str(out), "--train.max_steps", "6",
           "--train.progress", "false", "--runtime.threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "processes 2" in r.stdout and "LoRA rank 4" in r.stdout and "packed" in r.stdout
    from minichat.checkpoint import load_model

    tuned, base = load_model(out)[0], load_model(tiny_lm)[0]
    assert not torch.equal(tuned.layers[0].attn.wq.weight, base.layers[0].attn.wq.weight)
    assert torch.equal(tuned.embed.weight, base.embed.weight)


def test_ppo_lora_preset_under_torchrun_ddp(tiny_lm, reward_run, prompts_file, tmp_path):
    """The lean PPO (adapters, the reference as adapters off, recomputed activations) in two processes."""
    _, d, _, _ = reward_run
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535",
           "-m", "minichat.cli", "ppo", "--preset", "lora", "--policy_from", str(tiny_lm), "--reward_from",
           str(d / "run"), "--prompts", str(prompts_file), "--out_dir", str(out), "--ppo.iterations", "2",
           "--ppo.rollout_batch", "8", "--ppo.minibatch", "4", "--ppo.max_new_tokens", "8", "--progress", "false",
           "--runtime.threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "processes 2" in r.stdout and "LoRA rank 16 (reference: the same weights, adapters off)" in r.stdout
    from minichat.checkpoint import load_model

    tuned, base = load_model(out)[0], load_model(tiny_lm)[0]
    assert not torch.equal(tuned.layers[0].attn.wq.weight, base.layers[0].attn.wq.weight)
    assert torch.equal(tuned.embed.weight, base.embed.weight)


def test_cli_reports_bad_input_without_traceback(tiny_lm, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answers": ["x", "y"]}\n{"prompt": oops}\n')
    r = subprocess.run([sys.executable, "-m", "minichat.cli", "reward", "--init_from", str(tiny_lm), "--data.train",
                        str(bad), "--train.out_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{bad}:2: malformed JSON" in r.stderr and "Traceback" not in r.stderr


def test_ppo_old_logprobs_match_the_training_forward(tiny_lm, reward_run, prompts_file, tmp_path):
    """The first update of an iteration sees ratio π/π_old = 1: the engine's log-probabilities of the sampled
    tokens equal the trainer's forward pass (else the clipped objective would be biased)."""
    from minichat.train import ppo

    _, d, _, _ = reward_run
    cfg = ppo.preset_tiny()
    cfg.policy_from, cfg.reward_from, cfg.prompts = str(tiny_lm), str(d / "run"), str(prompts_file)
    cfg.out_dir, cfg.progress, cfg.save_every = str(tmp_path / "ppo3"), False, 0
    cfg.ppo.iterations, cfg.ppo.rollout_batch, cfg.ppo.minibatch, cfg.ppo.epochs = 1, 8, 8, 1
    res = ppo.run(cfg)
    assert res["approx_kl"] < 1e-6 and res["clipfrac"] == 0.0
