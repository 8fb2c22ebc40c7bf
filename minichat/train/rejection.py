"""`minichat rsft`: rejection-sampling fine-tuning (Llama 2's step before PPO).

    prompts -> K samples each from the policy (temperature T) -> score every distinct answer:
        RM(x, y) + c·log π_ref(y | x) + penalty·[y never ended]      (the score PPO optimises)
    -> keep each prompt's best answer -> selected.jsonl -> fine-tune the policy on them (as `minichat sft`,
       with the same pretraining-loss mix) -> a checkpoint PPO can start from (with π_ref still the SFT model)

One round distils the reward model's best-of-K into the weights. On the built-in world (K = 16) the fine-tuned
model alone won 54–58% against SFT on 1,100 dev prompts, about what PPO wins, but PPO started from it did not
end reliably higher than PPO started from SFT (four runs: 59.5 / 58.2 / 55.3 / 53.2% against 57.4 / 56.9 / 55.2%),
so the pipeline leaves it off by default (bench/results/pipeline.md, sixth session).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minichat import config as C
from minichat import runtime
from minichat.errors import ConfigError, MinichatError
from minichat.train.loop import TrainConfig


@dataclass
class RSFTConfig:
    policy_from: str = "runs/sft"  # the model that samples and is fine-tuned (the SFT model)
    reward_from: str = "runs/reward"  # the reward model that judges the samples
    ref_from: str = ""  # the model whose log-likelihood enters the score; default: policy_from
    prompts: str = ""  # JSONL (prompt or messages) or .txt, one prompt a line (PPO's prompts)
    out_dir: str = "runs/rsft"  # selected.jsonl and the fine-tuned checkpoint (<out_dir>/final)
    samples: int = 16  # K answers sampled per prompt
    temperature: float = 1.0
    max_new_tokens: int = 48
    ref_logp_coef: float = 1.0  # c in the score (PPO's ppo.ref_logp_coef)
    unfinished_penalty: float = -1.0  # added to the score of an answer that hit max_new_tokens (as PPO)
    max_prompts: int = 0  # use only the first N prompts (0 = all)
    sample_batch: int = 256  # prompts decoded together (larger batches decode faster on a CPU)
    score_batch: int = 64
    # the fine-tuning (as `minichat sft`): 150 steps at 5e-4 -> 5e-5 on the built-in world's 2,000 prompts;
    # train.out_dir is ignored (the checkpoint goes to out_dir, beside selected.jsonl)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=150, batch_size=16, lr=5e-4, min_lr=5e-5, warmup_steps=10, weight_decay=0.0, eval_every=150,
        eval_batches=10, save_every=150, log_every=10))
    val_fraction: float = 0.05
    ptx_coef: float = 0.0  # a pretraining-loss mix, as SFT's (the pipeline keeps SFT's)
    ptx_data: str = ""
    ptx_batch: int = 4
    ptx_seq_len: int = 64
    progress: bool = True
    runtime: runtime.RuntimeConfig = field(default_factory=runtime.RuntimeConfig)

    def validate(self) -> None:
        if self.samples < 1:
            raise ConfigError("samples must be at least 1 (answers sampled per prompt)")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0 (greedy decoding gives K copies of one answer)")
        if self.max_new_tokens < 1 or self.max_prompts < 0 or self.sample_batch < 1 or self.score_batch < 1:
            raise ConfigError("max_new_tokens, sample_batch and score_batch must be positive; max_prompts >= 0")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError("val_fraction must be in [0, 0.5)")
        if self.ptx_coef < 0 or (self.ptx_coef > 0 and not self.ptx_data):
            raise ConfigError("ptx_coef must be >= 0, and ptx_coef > 0 needs ptx_data")


def preset_tiny() -> RSFTConfig:
    return RSFTConfig(out_dir="runs/rsft-tiny", samples=2, max_new_tokens=8, sample_batch=64, train=TrainConfig(
        max_steps=3, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.0, eval_every=3,
        eval_batches=2, save_every=0, log_every=1, progress=False))


PRESETS = {"default": RSFTConfig, "tiny": preset_tiny}


# ------------------------------------------------------------------------------------------------ pieces

def selection_score(reward: float, ref_logp: float, finished: bool, ref_logp_coef: float,
                    unfinished_penalty: float) -> float:
    """The score an answer is chosen by: the terminal score PPO maximises (RM + c·log π_ref, penalised if the
    answer never ended), so the fine-tuned model starts PPO where PPO wants to go."""
    return reward + ref_logp_coef * ref_logp + (0.0 if finished else unfinished_penalty)


def pick_best(answers: list[list[str]], scores: list[list[float]]) -> list[int | None]:
    """Per prompt, the index of its best-scoring non-empty answer (the first of equal best), or None when every
    answer is empty: an empty answer teaches nothing but to stop at once."""
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answer lists but {len(scores)} score lists")
    out: list[int | None] = []
    for ans, sc in zip(answers, scores):
        if len(ans) != len(sc):
            raise ValueError(f"{len(ans)} answers but {len(sc)} scores")
        best, best_s = None, -math.inf
        for j, (a, s) in enumerate(zip(ans, sc)):
            if a.strip() and not math.isnan(s) and s > best_s:
                best, best_s = j, s
        out.append(best)
    return out


def distinct_candidates(samples: list[list[tuple[str, bool]]]) -> list[list[tuple[str, bool]]]:
    """Each prompt's (answer, finished) samples without repeats (keeping first-seen order): identical samples
    score identically, and at T = 1 a small SFT model repeats itself often, so this saves scoring passes."""
    return [list(dict.fromkeys(group)) for group in samples]


# ------------------------------------------------------------------------------------------------ stage

def sample_candidates(model, tok, convs: list[list[dict]], cfg: RSFTConfig) -> list[list[tuple[str, bool]]]:
    """K samples per prompt as (answer text, ended on its own); pass j samples answer j of every prompt."""
    from minichat.eval.evaluate import generate

    prompts = [tok.render_chat(m, add_generation_prompt=True)[0] for m in convs]
    out: list[list[tuple[str, bool]]] = [[] for _ in convs]
    for j in range(cfg.samples):
        comps = generate(model, tok, prompts, cfg.max_new_tokens, cfg.temperature, cfg.runtime.seed + 1000 + 7919 * j,
                         batch=cfg.sample_batch, desc=f"rsft: sampling ({j + 1}/{cfg.samples})", progress=cfg.progress)
        for i, c in enumerate(comps):
            out[i].append((tok.decode(c.content_ids, skip_special=True).strip(), c.finish_reason == "stop"))
    return out


@torch.no_grad()
def score_candidates(rm, ref, tok, convs, cands: list[list[tuple[str, bool]]], cfg: RSFTConfig,
                     device) -> list[list[float]]:
    """The selection score of every candidate (reward model and reference likelihood, batched)."""
    from minichat.data.chat import encode_answer_turn
    from minichat.eval.evaluate import sequence_logprobs
    from minichat.heads import score_sequences

    flat, where = [], []
    T = min(rm.cfg.max_seq_len, ref.cfg.max_seq_len)
    for i, (m, group) in enumerate(zip(convs, cands)):
        for a, fin in group:
            p, x = encode_answer_turn(tok, m, a)
            x = x[-(T - 1):]  # a sampled answer fits the context; this only guards odd templates
            flat.append((p[-(T - len(x)):], x, fin))
            where.append(i)
    if not flat:
        return [[] for _ in convs]
    rewards: list[float] = []
    lps: list[float] = []
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(flat), desc="rsft: scoring", dynamic_ncols=True, leave=False)
    chunk = 4096  # large enough that sorting by length inside score_sequences still saves most padding
    for s in range(0, len(flat), chunk):
        part = flat[s:s + chunk]
        rewards += score_sequences(rm, [p + x for p, x, _ in part], tok.pad_id, cfg.score_batch, device).tolist()
        lps += sequence_logprobs(ref, [(p, x) for p, x, _ in part], tok.pad_id, cfg.score_batch) \
            if cfg.ref_logp_coef else [0.0] * len(part)
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    out: list[list[float]] = [[] for _ in convs]
    for i, r, lp, (_, _, fin) in zip(where, rewards, lps, flat):
        out[i].append(selection_score(r, lp, fin, cfg.ref_logp_coef, cfg.unfinished_penalty))
    return out


def _selection_key(cfg: RSFTConfig) -> dict:
    """What the selected data depends on: a rerun reuses selected.jsonl only if all of it is unchanged."""
    keys = ("policy_from", "reward_from", "ref_from", "prompts", "samples", "temperature", "max_new_tokens",
            "ref_logp_coef", "unfinished_penalty", "max_prompts")
    return {k: getattr(cfg, k) for k in keys} | {"seed": cfg.runtime.seed}


def select(cfg: RSFTConfig, device) -> tuple[Path, dict]:
    """Sample, score and keep the best answer per prompt; writes <out_dir>/selected.jsonl atomically (with
    selected.json, its settings and statistics). An existing selection made with the same settings is reused,
    so an interrupted stage resumes at its fine-tuning."""
    from minichat.checkpoint import atomic_write_text
    from minichat.data.chat import load_prompts, write_jsonl
    from minichat.gguf_import import load
    from minichat.heads import load_scalar_model
    from minichat.train.common import freeze_lm

    out = Path(cfg.out_dir)
    data, meta_path = out / "selected.jsonl", out / "selected.json"
    key = _selection_key(cfg)
    if data.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("key") == key:
            print(f"[rsft] reusing the selection in {data} ({meta.get('selected')} answers)")
            return data, meta

    if not cfg.prompts:
        raise MinichatError("set --prompts (the prompts to sample answers for: JSONL or .txt)")
    if not Path(cfg.prompts).is_file():
        raise MinichatError(f"prompt file {cfg.prompts} does not exist")
    for what, path in (("policy_from", cfg.policy_from), ("reward_from", cfg.reward_from)):
        if not path:
            raise MinichatError(f"set --{what}")
    policy, tok, _ = load(cfg.policy_from, device=device, verbose=False)
    if tok.im_start_id is None or tok.im_end_id is None:
        raise MinichatError(f"{cfg.policy_from}: its tokenizer has no chat tokens; start from an SFT model")
    convs = load_prompts(cfg.prompts, tok.meta.default_system)  # (rows with tools: as the server renders them)
    if cfg.max_prompts:
        convs = convs[:cfg.max_prompts]
    if not convs:
        raise MinichatError(f"{cfg.prompts}: no prompts")
    ref = policy
    if cfg.ref_from and cfg.ref_from != cfg.policy_from:
        ref, rtok, _ = load(cfg.ref_from, device=device, verbose=False)
        if rtok.vocab_size != tok.vocab_size:
            raise MinichatError(f"{cfg.ref_from} and {cfg.policy_from} use different tokenizers")
    freeze_lm(ref)
    rm, mtok, _ = load_scalar_model(cfg.reward_from, device, allow_lm=False)
    if mtok.vocab_size != tok.vocab_size:
        raise MinichatError(f"the reward model {cfg.reward_from} and {cfg.policy_from} use different tokenizers")
    rm.eval()
    print(f"[rsft] {len(convs):,} prompts x {cfg.samples} samples at temperature {cfg.temperature}; score = RM + "
          f"{cfg.ref_logp_coef:g}·log π_ref {cfg.unfinished_penalty:+g} if unfinished")

    t0 = time.perf_counter()
    cands = distinct_candidates(sample_candidates(policy, tok, convs, cfg))
    t1 = time.perf_counter()
    scores = score_candidates(rm, ref, tok, convs, cands, cfg, device)
    t2 = time.perf_counter()
    best = pick_best([[a for a, _ in g] for g in cands], scores)
    rows, chosen, firsts = [], [], []
    for m, g, sc, b in zip(convs, cands, scores, best):
        if b is None:
            continue
        rows.append({"messages": m + [{"role": "assistant", "content": g[b][0]}], "score": round(sc[b], 4),
                     "finished": g[b][1], "candidates": len(g)})
        chosen.append(sc[b])
        firsts.append(sc[0])  # the first sample: what one plain sample would have scored
    if not rows:
        raise MinichatError(f"every sampled answer for the {len(convs)} prompts was empty; nothing to fine-tune on")
    n_cands = [len(g) for g in cands]
    meta = {"key": key, "prompts": len(convs), "selected": len(rows),
            "distinct_per_prompt": sum(n_cands) / len(n_cands), "mean_best_score": sum(chosen) / len(chosen),
            "mean_first_score": sum(firsts) / len(firsts),
            "selected_finished": sum(r["finished"] for r in rows) / len(rows),
            "sample_s": round(t1 - t0, 1), "score_s": round(t2 - t1, 1)}
    write_jsonl(data, rows)
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    print(f"[rsft] kept {len(rows):,} answers ({meta['distinct_per_prompt']:.1f} distinct of {cfg.samples} per "
          f"prompt); mean score of the best {meta['mean_best_score']:.3f} vs one sample {meta['mean_first_score']:.3f}")
    return data, meta


def run(cfg: RSFTConfig) -> dict:
    from minichat.train.sft import SFTConfig, SFTDataConfig, run as sft_run

    cfg.validate()
    device, _, _ = runtime.setup(cfg.runtime)
    data, meta = select(cfg, device)
    from minichat.gguf_import import resolve_model
    from minichat.checkpoint import read_config

    max_len = int(read_config(resolve_model(cfg.policy_from, verbose=False))["model"]["max_seq_len"])
    sc = SFTConfig(init_from=cfg.policy_from,
                   data=SFTDataConfig(train=str(data), val_fraction=cfg.val_fraction, max_len=max_len),
                   train=dataclasses.replace(cfg.train, out_dir=cfg.out_dir), ptx_coef=cfg.ptx_coef,
                   ptx_data=cfg.ptx_data, ptx_batch=cfg.ptx_batch, ptx_seq_len=cfg.ptx_seq_len,
                   runtime=copy.deepcopy(cfg.runtime))
    t0 = time.perf_counter()
    result = sft_run(sc)
    result["finetune_s"] = round(time.perf_counter() - t0, 1)
    return {**{k: v for k, v in meta.items() if k != "key"}, **result}


def main(argv: list[str]) -> int:
    cfg, _ = C.build(RSFTConfig, argv, PRESETS, prog="minichat rsft",
                     description="Rejection-sampling fine-tuning: sample K answers per prompt, keep the reward "
                                 "model's favourite (plus the reference's likelihood), fine-tune on them.")
    run(cfg)
    return 0
