"""`minichat label export`: the labelers' work as the trainers' files.

    sft.jsonl       {"messages": [...prompt, {"role": "assistant", "content": demonstration}], "meta"}  -> minichat sft
    rankings.jsonl  {"prompt": [...], "answers": [best, ..., worst], "ranks": [0, 1, 1, 2], "meta"}   -> minichat reward
    pairs.jsonl     {"prompt": [...], "chosen": [{assistant}], "rejected": [{assistant}], "meta"}   -> reward, dpo
    ratings.jsonl   {"prompt", "answer", "model", "likert": 1..7, "flags": {...}, "comment", "meta"}
    summary.json    counts and the filters used

Held-out labelers' work is left out unless asked (`--held-out include|only`): it is for evaluation.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from minichat.label.service import Labeling, export_counts

FILES = {"sft": "sft.jsonl", "rankings": "rankings.jsonl", "pairs": "pairs.jsonl", "ratings": "ratings.jsonl"}


def _write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export(lab: Labeling, out_dir: str | Path, *, meta: bool = True, **filters) -> dict:
    """Write the four files (and summary.json) into out_dir; returns the counts."""
    rows = lab.export_rows(**filters)
    counts = export_counts(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for key, name in FILES.items():
        lines = [json.dumps(r if meta else {k: v for k, v in r.items() if k != "meta"}, ensure_ascii=False) + "\n"
                 for r in rows[key]]
        _write_atomic(out / name, lines)
    shown = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in filters.items()}
    _write_atomic(out / "summary.json", [json.dumps({"counts": counts, "filters": shown,
                                                     "files": {k: str(out / v) for k, v in FILES.items()}},
                                                    indent=2) + "\n"])
    return counts
