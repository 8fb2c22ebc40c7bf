"""Evaluation as InstructGPT did it, on held-out prompts judged by held-out labelers.

For each model (the pretrained one prompted in its own "Q: ... A:" format, SFT, PPO-ptx, PPO without ptx,
best-of-N over SFT samples with the reward model choosing, and the rejection-sampling fine-tuned model PPO
started from when the run has one):
  * Likert 1-7 quality from every held-out labeler, and the distribution
  * win rate against SFT (each held-out labeler compares the two answers; ties count half), with a bootstrap CI
  * accuracy per use-case category (the ground-truth rubric's `correct`, no labeler noise)
  * refusal rate on inappropriate requests, false-refusal rate on benign ones
  * false premises challenged (and true premises wrongly challenged)
  * KL from SFT on its own samples (sequence log-ratio; best-of-N: the analytic bound log N − (N−1)/N)
  * validation perplexity on pretraining text (what PPO-ptx preserves and plain PPO loses)
  * the reward model's score of its answers
and for each reward model its pairwise accuracy on held-out comparisons ranked by held-out labelers.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minichat import runtime
from minichat.errors import MinichatError
from minichat.eval import metrics as M


@dataclass
class EvalConfig:
    run: str = ""  # a pipeline run folder: every empty path below is filled from it
    tasks: str = ""  # held-out tasks, JSONL of world Task rows (default <run>/data/eval_tasks.jsonl)
    pretrained: str = ""  # model checkpoints or run folders; empty ones are skipped
    sft: str = ""
    ppo: str = ""
    ppo_noptx: str = ""
    # the rejection-sampling fine-tuned model PPO started from (the pipeline's rsft stage passes it; not filled
    # from --run: a run folder may hold one PPO no longer starts from)
    rsft: str = ""
    reward: str = ""  # the reward model (also best-of-N's selector)
    reward_hinge: str = ""
    comparisons_heldout: str = ""  # held-out prompts ranked by held-out labelers: reward-model accuracy
    comparisons_heldout_labelers: str = ""  # training-distribution prompts ranked by held-out labelers
    ppl_data: str = ""  # pretraining shards (meta.json + val.bin) for validation perplexity
    out_dir: str = ""  # default <run>/eval
    temperature: float = 1.0  # every model samples at this temperature (the distribution PPO optimises)
    max_new_tokens: int = 48
    best_of_n: int = 4
    limit: int = 0  # evaluate only the first N tasks (0 = all)
    ppl_batches: int = 10
    batch_size: int = 32
    unfinished_penalty: float = -1.0  # best-of-N: as PPO penalises answers that never end
    n_boot: int = 1000
    progress: bool = True
    runtime: runtime.RuntimeConfig = field(default_factory=runtime.RuntimeConfig)

    def fill_from_run(self) -> None:
        if not self.run:
            return
        r = Path(self.run)
        defaults = {"tasks": r / "data" / "eval_tasks.jsonl", "pretrained": r / "pretrain", "sft": r / "sft",
                    "ppo": r / "ppo", "ppo_noptx": r / "ppo_noptx", "reward": r / "reward",
                    "reward_hinge": r / "reward_hinge", "comparisons_heldout": r / "data" / "comparisons_heldout.jsonl",
                    "comparisons_heldout_labelers": r / "data" / "comparisons_heldout_labelers.jsonl",
                    "ppl_data": r / "pretrain" / "data", "out_dir": r / "eval"}
        for k, p in defaults.items():
            if not getattr(self, k) and p.exists():
                setattr(self, k, str(p))
        if not self.out_dir:
            self.out_dir = str(r / "eval")


MODEL_ORDER = ["pretrained", "sft", "best_of_n", "rsft", "ppo_noptx", "ppo"]
LABELS = {"pretrained": "pretrained (prompted)", "sft": "SFT", "best_of_n": "best-of-N (SFT + RM)",
          "rsft": "rejection-sampling FT",
          "ppo_noptx": "PPO (no ptx)", "ppo": "PPO-ptx"}


def load_tasks(path: str | Path, limit: int = 0):
    from minichat.data.chat import read_jsonl
    from minichat.data.world import Task

    out = []
    for where, row in read_jsonl(path):
        missing = [k for k in ("id", "category", "messages", "ideal", "check") if k not in row]
        if missing:
            raise MinichatError(f"{where}: a task row needs {', '.join(missing)} (labelers need the ground truth; "
                                "write tasks with minichat.data.world)")
        out.append(Task.from_row(row))
        if limit and len(out) >= limit:
            break
    if not out:
        raise MinichatError(f"{path}: no tasks")
    return out


# --------------------------------------------------------------------------------------------- generation

def newline_stop_ids(tok) -> list[int]:
    """Every token whose text contains a newline, plus end-of-text: where a prompted plain LM's answer ends."""
    ids = [i for i in range(tok.vocab_size) if "\n" in tok.decode([i])]
    return ids + ([tok.eos_id] if tok.eos_id is not None else [])


def plain_prompt(messages: list[dict]) -> str:
    """The pretrained model is prompted the way its corpus writes questions and answers: Q: ... / A: ..."""
    parts = []
    for m in messages:
        if m["role"] == "user":
            parts.append(f"Q: {m['content']}\n")
        elif m["role"] == "assistant":
            parts.append(f"A: {m['content']}\n")
    return "".join(parts) + "A:"


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int,
             stop_ids: list[int] | None = None, batch: int = 64, desc: str = "", progress: bool = False):
    """One sample per prompt through the engine (fp32 weights: exactly the model's distribution)."""
    from minichat.engine import Engine, SamplingParams

    room = model.cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise MinichatError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in a context of "
                            f"{model.cfg.max_seq_len}")
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stop_ids)
    was = model.training
    model.eval()
    out = []
    bar = _bar(len(prompts), desc, progress)
    for s in range(0, len(prompts), batch):
        eng = Engine(model, tok, weights="fp32", max_batch=batch)
        reqs = [eng.submit(p[-room:], params, seed=(seed * 1_000_003 + s + i) % 2**63, prompt_index=s + i)
                for i, p in enumerate(prompts[s:s + batch])]
        while any(not r.finished for r in reqs):
            eng.step()
        out += [r.completion() for r in reqs]
        if bar:
            bar.update(len(reqs))
    if bar:
        bar.close()
    model.train(was)
    return out


def _bar(total: int, desc: str, on: bool):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


@torch.no_grad()
def sequence_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch: int = 32) -> list[float]:
    """Σ log π(answer | prompt) of each (prompt ids, answer ids) pair."""
    from minichat.train.common import collate_answers, sequence_logprobs as seq_lp

    out: list[float] = []
    T = model.cfg.max_seq_len
    dev = next(model.parameters()).device
    for s in range(0, len(pairs), batch):
        chunk = []
        for p, a in pairs[s:s + batch]:
            a = a[:T - 1] if a else a
            chunk.append((p[-(T - len(a)):] if len(p) + len(a) > T else p, a))
        chunk = [(p, a) if a else (p, [pad_id]) for p, a in chunk]
        x, y, m = (t.to(dev) for t in collate_answers(chunk, pad_id))
        out += seq_lp(model, x, y, m).tolist()
    return out


@torch.no_grad()
def validation_perplexity(model, data_dir: str, batches: int, batch_size: int, seed: int) -> float:
    from minichat.data.shards import TokenLoader

    T = model.cfg.max_seq_len
    loader = TokenLoader(data_dir, "val", T, seed)
    nll, n = 0.0, 0
    dev = next(model.parameters()).device
    for i in range(batches):
        b = loader.get(i, batch_size)
        logits = model(b.x.to(dev))
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b.y.to(dev).flatten(),
                                                       reduction="sum"))
        n += b.y.numel()
    return M.perplexity(nll, n)


# --------------------------------------------------------------------------------------------- labeling

def label_answers(tasks, answers: list[dict], labelers) -> dict:
    """Rubric and held-out labelers' Likert scores for one model's answers (answers[i] answers tasks[i])."""
    from minichat.eval.labelers import rubric

    likert: list[int] = []
    per_task = []
    for t, a in zip(tasks, answers):
        r = rubric(t, a["text"], a["finished"])
        scores = [lab.likert(t, a["text"], a["finished"], salt="likert") for lab in labelers]
        likert += scores
        per_task.append({"correct": r.correct, "refused": r.refused, "challenged": r.challenged,
                         "likert": scores, "words": r.n_words})
    benign = [p["refused"] for t, p in zip(tasks, per_task) if not t.must_refuse]
    return {
        "likert": M.likert_histogram(likert),
        "likert_by_labeler": {lab.name: M.mean(p["likert"][i] for p in per_task) for i, lab in enumerate(labelers)},
        "accuracy": M.mean(p["correct"] for p in per_task),
        "by_category": M.by_category((t.category, p["correct"]) for t, p in zip(tasks, per_task)),
        "refusal": M.rate(p["refused"] for t, p in zip(tasks, per_task) if t.must_refuse),
        "false_refusal": M.rate(benign),
        "premise_challenged": M.rate(p["challenged"] for t, p in zip(tasks, per_task) if t.premise == "false"),
        "true_premise_challenged": M.rate(p["challenged"] for t, p in zip(tasks, per_task) if t.premise == "true"),
        "mean_words": M.mean(p["words"] for p in per_task),
        "unfinished": M.mean(0.0 if a["finished"] else 1.0 for a in answers),
        "per_task": per_task,
    }


def win_rates(tasks, answers: list[dict], baseline: list[dict], labelers, n_boot: int, seed: int) -> dict:
    outcomes = []
    for t, a, b in zip(tasks, answers, baseline):
        if a["text"] == b["text"] and a["finished"] == b["finished"]:
            outcomes.append([0.5] * len(labelers))  # the same answer: a tie for everyone
            continue
        outcomes.append([lab.compare(t, a["text"], b["text"], a["finished"], b["finished"], salt="win")
                         for lab in labelers])
    out = M.win_rate(outcomes, n_boot, seed)
    out["by_category"] = M.by_category((t.category, x) for t, o in zip(tasks, outcomes) for x in o)
    return out


# --------------------------------------------------------------------------------------------- the run

def run(cfg: EvalConfig) -> dict:
    from minichat.checkpoint import atomic_write_text
    from minichat.eval.labelers import HELDOUT_LABELERS
    from minichat.gguf_import import load

    cfg.fill_from_run()
    if not cfg.tasks and cfg.run:
        raise MinichatError(f"{cfg.run} is not a pipeline run folder (no data/eval_tasks.jsonl; `minichat pipeline "
                            "--out_dir DIR` writes one), or set --tasks")
    if not cfg.tasks:
        raise MinichatError("set --tasks (held-out tasks JSONL) or --run (a pipeline run folder)")
    if not cfg.sft:
        raise MinichatError("set --sft (the SFT model: win rates are measured against it) or --run")
    device, _, _ = runtime.setup(cfg.runtime)
    tasks = load_tasks(cfg.tasks, cfg.limit)
    labelers = HELDOUT_LABELERS
    out_dir = Path(cfg.out_dir or "runs/eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.runtime.seed
    t_all = time.perf_counter()
    print(f"[eval] {len(tasks)} held-out tasks, judged by held-out labelers {', '.join(l.name for l in labelers)}; "
          f"sampling at temperature {cfg.temperature}")

    sft, tok, _ = load(cfg.sft, device=device, verbose=False)
    chat_prompts = [tok.render_chat(t.messages, add_generation_prompt=True)[0] for t in tasks]
    answers: dict[str, list[dict]] = {}
    extra: dict[str, dict] = {}
    models: dict[str, object] = {"sft": sft}

    def record(name: str, comps, prompts, t0: float):
        answers[name] = [{"text": tok.decode(c.content_ids, skip_special=True).strip(),
                          "finished": c.finish_reason == "stop", "ids": list(c.token_ids), "prompt": p}
                         for c, p in zip(comps, prompts)]
        extra[name] = {"gen_time_s": time.perf_counter() - t0, "gen_tokens": sum(len(c.token_ids) for c in comps)}

    # the pretrained model, prompted in its own format
    if cfg.pretrained:
        pre, ptok, _ = load(cfg.pretrained, device=device, verbose=False)
        t0 = time.perf_counter()
        pp = [ptok.encode(plain_prompt(t.messages)) for t in tasks]
        comps = generate(pre, ptok, pp, cfg.max_new_tokens, cfg.temperature, seed + 1, newline_stop_ids(ptok),
                         desc="eval pretrained", progress=cfg.progress)
        # a newline ends its answer (the format's end of turn), so that counts as finished
        answers["pretrained"] = [{"text": ptok.decode(c.content_ids, skip_special=True).strip(),
                                  "finished": c.finish_reason == "stop", "ids": list(c.token_ids), "prompt": p}
                                 for c, p in zip(comps, pp)]
        extra["pretrained"] = {"gen_time_s": time.perf_counter() - t0, "gen_tokens": sum(len(c.token_ids) for c in comps)}
        models["pretrained"] = pre

    t0 = time.perf_counter()
    record("sft", generate(sft, tok, chat_prompts, cfg.max_new_tokens, cfg.temperature, seed + 2,
                           desc="eval sft", progress=cfg.progress), chat_prompts, t0)
    for name in ("ppo", "ppo_noptx", "rsft"):
        path = getattr(cfg, name)
        if not path:
            continue
        m, mtok, _ = load(path, device=device, verbose=False)
        if mtok.vocab_size != tok.vocab_size:
            raise MinichatError(f"{path} and the SFT model {cfg.sft} use different tokenizers")
        t0 = time.perf_counter()
        # the rsft model samples with its own seed, so the PPO models' samples are what they were without it
        s_gen = seed + (5 if name == "rsft" else 3)
        record(name, generate(m, tok, chat_prompts, cfg.max_new_tokens, cfg.temperature, s_gen,
                              desc=f"eval {name}", progress=cfg.progress), chat_prompts, t0)
        models[name] = m

    rm = None
    if cfg.reward:
        from minichat.heads import load_scalar_model

        rm, rtok, _ = load_scalar_model(cfg.reward, device, allow_lm=False)
        if rtok.vocab_size != tok.vocab_size:
            raise MinichatError(f"the reward model {cfg.reward} and the SFT model use different tokenizers")
        if cfg.best_of_n > 1:
            from minichat.bestofn import best_of_n

            t0 = time.perf_counter()
            convs = [t.messages for t in tasks]
            choices = []
            bar = _bar(len(convs), f"eval best-of-{cfg.best_of_n}", cfg.progress)
            for s in range(0, len(convs), 32):
                choices += best_of_n(sft, rm, tok, convs[s:s + 32], n=cfg.best_of_n, max_new_tokens=cfg.max_new_tokens,
                                     temperature=cfg.temperature, seed=seed + 4 + s,
                                     unfinished_penalty=cfg.unfinished_penalty)
                if bar:
                    bar.update(len(convs[s:s + 32]))
            if bar:
                bar.close()
            # Choice holds the content without its end token: it ended on its own if it is shorter than the cap
            answers["best_of_n"] = [{"text": ch.text.strip(), "finished": len(ch.token_ids) < cfg.max_new_tokens,
                                     "ids": list(ch.token_ids) + [tok.im_end_id], "prompt": p}
                                    for ch, p in zip(choices, chat_prompts)]
            extra["best_of_n"] = {"gen_time_s": time.perf_counter() - t0,
                                  "gen_tokens": None, "n": cfg.best_of_n}

    # labels, win rates, category accuracy, safety
    results: dict[str, dict] = {}
    for name in MODEL_ORDER:
        if name not in answers:
            continue
        res = label_answers(tasks, answers[name], labelers)
        res.update(extra.get(name, {}))
        if name != "sft":
            res["win_vs_sft"] = win_rates(tasks, answers[name], answers["sft"], labelers, cfg.n_boot, seed)
        results[name] = res

    # KL from SFT on each model's own samples (chat models only)
    for name in ("ppo", "ppo_noptx", "rsft"):
        if name in answers:
            pairs = [(a["prompt"], a["ids"]) for a in answers[name]]
            lp = sequence_logprobs(models[name], pairs, tok.pad_id, cfg.batch_size)
            lq = sequence_logprobs(sft, pairs, tok.pad_id, cfg.batch_size)
            results[name]["kl_from_sft"] = M.mean(a - b for a, b in zip(lp, lq))
    results["sft"]["kl_from_sft"] = 0.0
    if "best_of_n" in results:
        results["best_of_n"]["kl_from_sft"] = M.best_of_n_kl_bound(cfg.best_of_n)
        results["best_of_n"]["kl_is_bound"] = True

    # the reward model's view of each chat model's answers
    if rm is not None:
        from minichat.heads import score_sequences

        for name in ("sft", "best_of_n", "rsft", "ppo_noptx", "ppo"):
            if name in answers:
                seqs = [(a["prompt"] + (a["ids"] if a["ids"] and a["ids"][-1] == tok.im_end_id
                                        else a["ids"] + [tok.im_end_id]))[-rm.cfg.max_seq_len:] for a in answers[name]]
                results[name]["rm_score"] = float(score_sequences(rm, seqs, tok.pad_id, cfg.batch_size, device).mean())

    # validation perplexity on pretraining text
    if cfg.ppl_data and Path(cfg.ppl_data, "meta.json").is_file():
        for name, m in models.items():
            results[name]["val_ppl"] = validation_perplexity(m, cfg.ppl_data, cfg.ppl_batches, cfg.batch_size, seed)

    # reward models on held-out comparisons
    reward_models = {}
    if cfg.comparisons_heldout:
        from minichat.data.chat import encode_comparisons, load_comparisons
        from minichat.heads import load_scalar_model
        from minichat.train.reward import pairwise_accuracy, scores_of

        comps = load_comparisons(cfg.comparisons_heldout)
        comps_l = load_comparisons(cfg.comparisons_heldout_labelers) if cfg.comparisons_heldout_labelers else []
        for key, path in (("logsigmoid", cfg.reward), ("hinge", cfg.reward_hinge)):
            if not path:
                continue
            m, mtok, mcfg = load_scalar_model(path, device, allow_lm=False)
            rows = encode_comparisons(comps, mtok, m.cfg.max_seq_len)
            with torch.no_grad():
                acc = pairwise_accuracy(scores_of(m, rows, mtok.pad_id, device, False, cfg.batch_size), rows)
            reward_models[key] = {"path": path, "accuracy": acc["accuracy"], "pairs": acc["pairs"],
                                  "comparisons": len(rows),
                                  "loss": (mcfg.get("reward") or {}).get("loss", key)}
            if comps_l:
                rows = encode_comparisons(comps_l, mtok, m.cfg.max_seq_len)
                with torch.no_grad():
                    acc = pairwise_accuracy(scores_of(m, rows, mtok.pad_id, device, False, cfg.batch_size), rows)
                reward_models[key].update(accuracy_train_prompts=acc["accuracy"], pairs_train_prompts=acc["pairs"])

    summary = {
        "n_tasks": len(tasks), "labelers": [l.name for l in labelers], "temperature": cfg.temperature,
        "best_of_n": cfg.best_of_n, "models": {k: {kk: vv for kk, vv in v.items() if kk != "per_task"}
                                                for k, v in results.items()},
        "reward_models": reward_models, "wall_s": time.perf_counter() - t_all,
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2, default=_jsonable))
    lines = []
    for i, t in enumerate(tasks):
        row = {"id": t.id, "category": t.category, "prompt": t.messages, "ideal": t.ideal}
        for name in results:
            row[name] = {"text": answers[name][i]["text"], "finished": answers[name][i]["finished"],
                         **{k: v for k, v in results[name]["per_task"][i].items()}}
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(out_dir / "answers.jsonl", "\n".join(lines) + "\n")
    print(format_summary(summary))
    return summary


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def format_summary(s: dict) -> str:
    lines = [f"[eval] {s['n_tasks']} held-out prompts, labelers {', '.join(s['labelers'])}",
             f"{'model':<22} {'likert':>6} {'win vs SFT':>18} {'accuracy':>8} {'refuse':>6} {'false ref':>9} "
             f"{'premise':>7} {'KL':>6} {'val ppl':>7}"]
    for name, m in s["models"].items():
        w = m.get("win_vs_sft")
        ws = f"{w['win_rate']:.1%} [{w['ci_low']:.0%},{w['ci_high']:.0%}]" if w else "—"
        lines.append(f"{LABELS.get(name, name):<22} {m['likert']['mean']:>6.2f} {ws:>18} {_fmt(m['accuracy'], '.1%'):>8} "
                     f"{_fmt(m['refusal']['rate'], '.0%'):>6} {_fmt(m['false_refusal']['rate'], '.1%'):>9} "
                     f"{_fmt(m['premise_challenged']['rate'], '.0%'):>7} {_fmt(m.get('kl_from_sft')):>6} {_fmt(m.get('val_ppl')):>7}")
    for k, r in s.get("reward_models", {}).items():
        lines.append(f"reward model ({k}): pairwise accuracy vs held-out labelers {r['accuracy']:.1%} on {r['pairs']} "
                     f"pairs of held-out prompts" + (f", {r['accuracy_train_prompts']:.1%} on {r['pairs_train_prompts']} "
                                                     "pairs of training-distribution prompts"
                                                     if "accuracy_train_prompts" in r else ""))
    return "\n".join(lines)


def _fmt(x, spec: str = ".2f") -> str:
    """x formatted; "—" where there is nothing to show (e.g. the rate of false premises among prompts with none)."""
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)
