"""Metrics for `minichat moderate --eval` and the bench: precision, recall, F1 and AUPRC per category."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minichat.errors import MinichatError
from minichat.moderation.categories import EVAL_KEYS, PARENT

OVERALL = "overall (labelled categories)"  # any of the categories the file labels, and their sub-categories
OVERALL_ALL = "overall (all 13 categories)"  # any category the moderator flags, illicit included


def binary_metrics(y: list[int], score: list[float], flagged: list[bool]) -> dict:
    from sklearn.metrics import average_precision_score

    y_a = np.asarray(y, dtype=int)
    f_a = np.asarray(flagged, dtype=bool)
    tp = int((f_a & (y_a == 1)).sum())
    fp = int((f_a & (y_a == 0)).sum())
    fn = int((~f_a & (y_a == 1)).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    pos = int(y_a.sum())
    auprc = float(average_precision_score(y_a, score)) if 0 < pos < len(y_a) else float("nan")
    return {"n": len(y_a), "positive": pos, "precision": p, "recall": r, "f1": f1, "auprc": auprc}


def read_eval_file(path: str | Path) -> list[dict]:
    """OpenAI moderation-eval JSONL: {"prompt": ..., "S": 0|1, ...}; a missing key means unknown."""
    p = Path(path)
    if not p.is_file():
        raise MinichatError(f"eval file {p} does not exist")
    rows = []
    with open(p, encoding="utf-8", errors="strict") as f:
        try:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MinichatError(f"{p}, line {i}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise MinichatError(f"{p}, line {i}: expected an object with a string 'prompt'")
                for k in EVAL_KEYS:
                    if k in row and row[k] not in (0, 1, None):
                        raise MinichatError(f"{p}, line {i}: {k} must be 0 or 1, got {row[k]!r}")
                rows.append(row)
        except UnicodeDecodeError as e:
            raise MinichatError(f"{p} is not valid UTF-8 ({e.reason})") from None
    if not rows:
        raise MinichatError(f"{p} has no examples")
    return rows


def evaluate_rows(moderator, rows: list[dict], batch: int = 256) -> dict:
    results = []
    for i in range(0, len(rows), batch):
        results += moderator.check_many([r["prompt"] for r in rows[i:i + batch]], source="eval")
    report: dict = {"categories": {}}
    any_y, any_s, any_f = [], [], []
    for key, cat in EVAL_KEYS.items():
        idx = [i for i, r in enumerate(rows) if r.get(key) is not None]
        if not idx or cat not in results[0].category_scores:
            continue
        report["categories"][f"{cat} ({key})"] = binary_metrics(
            [rows[i][key] for i in idx], [results[i].category_scores[cat] for i in idx],
            [results[i].categories[cat] for i in idx])
    # "any": a text is positive when one of its labelled categories is. The moderator's own verdict on the file's
    # categories (with their sub-categories) is the fair comparison: OpenAI's eval set labels no illicit
    # category, so a request to steal a car is a negative there; the verdict over all 13 is reported beside it
    lab_s, lab_f = [], []
    for r, res in zip(rows, results):
        keys = [k for k in EVAL_KEYS if r.get(k) is not None]
        if not keys:
            continue
        cats = {EVAL_KEYS[k] for k in keys}
        cats |= {c for c, parent in PARENT.items() if parent in cats}
        cats &= set(res.category_scores)
        any_y.append(int(any(r[k] for k in keys)))
        lab_s.append(max((res.category_scores[c] for c in cats), default=0.0))
        lab_f.append(any(res.categories[c] for c in cats))
        any_s.append(max(res.category_scores.values()))
        any_f.append(res.flagged)
    if any_y:
        report[OVERALL] = binary_metrics(any_y, lab_s, lab_f)
        report[OVERALL_ALL] = binary_metrics(any_y, any_s, any_f)
    return report


def format_report(report: dict) -> str:
    lines = [f"{'category':<28}{'n':>6}{'pos':>6}{'prec':>8}{'recall':>8}{'F1':>8}{'AUPRC':>8}"]
    items = list(report["categories"].items()) + [(k, report[k]) for k in (OVERALL, OVERALL_ALL) if k in report]
    for name, m in items:
        lines.append(f"{name:<28}{m['n']:>6}{m['positive']:>6}{m['precision']:>8.3f}{m['recall']:>8.3f}"
                     f"{m['f1']:>8.3f}{m['auprc']:>8.3f}")
    return "\n".join(lines)
