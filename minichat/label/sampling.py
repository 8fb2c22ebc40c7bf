"""Sampling the answers that ranking and rating tasks show, with the engine, from the project's model(s).

With several models the K answers of a task are split among them (model i samples K//M answers, the first
K%M models one more), so a ranking compares models as well as samples; the answers are then stored in a
shuffled order, and every labeler sees them in an order of their own.
"""
from __future__ import annotations

import logging
from typing import Callable

from minichat.errors import MinichatError
from minichat.label.service import Labeling

log = logging.getLogger("minichat.label")


def split(k: int, n_models: int) -> list[int]:
    return [k // n_models + (1 if i < k % n_models else 0) for i in range(n_models)]


def sample_project(lab: Labeling, project, *, models: list[str] | None = None, device: str = "cpu",
                   weights: str = "auto", batch: int = 16, loader: Callable | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Sample answers for every ranking/rating task of the project that has none. `models` overrides the
    project's; `loader(spec) -> (name, engine)` replaces loading through gguf_import (tests, the server)."""
    from minichat.engine import Engine, SamplingParams

    cfg = lab.project_config(project)
    specs = list(models or cfg.models)
    if not specs:
        raise MinichatError("no models to sample from: set the project's models or pass --model")
    todo = lab.tasks_needing_answers(project)
    if not todo:
        return {"tasks": 0, "answers": 0, "skipped": 0}
    engines = []
    for spec in specs:
        if loader is not None:
            engines.append(loader(spec))
            continue
        from minichat.gguf_import import load
        from minichat.serve.config import parse_model_spec

        name, path = parse_model_spec(spec)
        model, tok, _ = load(path, device=device, verbose=progress is not None)
        engines.append((name, Engine(model, tok, device=device, weights=weights, max_batch=batch)))
    answers: dict[int, list[dict]] = {t["task_id"]: [] for t in todo}
    skipped: set[int] = set()
    for mi, (name, engine) in enumerate(engines):
        tok = engine.tokenizer
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            prompts, owners = [], []
            for t in chunk:
                n = split(t["n"], len(engines))[mi]
                if n == 0 or t["task_id"] in skipped:
                    continue
                ids, _ = tok.render_chat(t["messages"], add_generation_prompt=True)
                if len(ids) + 1 >= engine.max_seq_len:
                    log.warning("task %s: the prompt (%d tokens) does not fit model %s; left without answers",
                                t["task_id"], len(ids), name)
                    skipped.add(t["task_id"])
                    continue
                prompts.append((ids, n))
                owners.append(t)
            # one generate() call per distinct n keeps the engine's n-per-prompt batching
            for n in sorted({n for _, n in prompts}):
                sel = [(ids, t) for (ids, m), t in zip(prompts, owners) if m == n]
                room = min(engine.max_seq_len - len(ids) for ids, _ in sel)
                params = SamplingParams(max_tokens=max(1, min(cfg.max_tokens, room)), temperature=cfg.temperature,
                                        top_p=cfg.top_p, seed=cfg.seed + start)
                outs = engine.generate([ids for ids, _ in sel], params, n=n)
                for c in outs:
                    t = sel[c.prompt_index][1]
                    answers[t["task_id"]].append({
                        "content": tok.decode(c.content_ids, skip_special=True).strip(), "model": name,
                        "settings": {"temperature": cfg.temperature, "top_p": cfg.top_p,
                                     "max_tokens": params.max_tokens, "seed": params.seed, "sample": c.index,
                                     "finish_reason": c.finish_reason}})
        if progress:
            progress(f"sampled answers from {name} for {len(todo) - len(skipped)} tasks")
    n_tasks = n_answers = 0
    for tid, got in answers.items():
        if tid in skipped or not got:
            continue
        n_answers += lab.add_answers(tid, got)
        n_tasks += 1
    return {"tasks": n_tasks, "answers": n_answers, "skipped": len(skipped)}
