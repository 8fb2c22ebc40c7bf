"""Reading prompt files for a labeling project: JSONL or CSV, every problem reported with its file:line.

JSONL, one object a line:
    {"prompt": "text" | [messages], "category"?: "open qa", "metadata"?: {...}, "answers"?: ["...", ...]}
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ..., {"role": "user", ...}], ...}
  A conversation must end with a user turn: the labeler writes (or the models sample) the assistant's reply to
  it. Other keys (e.g. "id", "source") are kept as metadata. "answers" (strings, or {"content", "model"}) are
  answers sampled elsewhere, shown in ranking and rating tasks instead of sampling them here.
CSV, with a header row: a `prompt` column (required), optional `system`, `category`, `answer_1` ... `answer_9`;
  every other column becomes metadata.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from minichat.errors import MinichatError
from minichat.label.models import CATEGORIES
from minichat.tokenizer import ROLES

MAX_REPORTED = 20  # malformed lines listed in one error message


@dataclass
class PromptRow:
    messages: list[dict]
    category: str | None = None
    meta: dict = field(default_factory=dict)
    answers: list[dict] = field(default_factory=list)  # {"content", "model"}
    source: str = ""


def normalize_category(value, where: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ValueError(f"category must be a string, got {type(value).__name__}")
    c = " ".join(value.strip().lower().replace("_", " ").replace("-", " ").split())
    if c not in CATEGORIES:
        raise ValueError(f"unknown category {value!r}; use one of: {', '.join(CATEGORIES)}")
    return c


def _messages(value) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("the prompt is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError("the prompt must be a string or a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": string}}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError("a conversation must end with a user turn (the assistant's reply is what gets labeled)")
    if not out[-1]["content"].strip():
        raise ValueError("the last user turn is empty")
    return out


def _answers(value) -> list[dict]:
    if not isinstance(value, list):
        raise ValueError("'answers' must be a list of strings or {content, model} objects")
    out = []
    for i, a in enumerate(value):
        if isinstance(a, str):
            a = {"content": a}
        if not isinstance(a, dict) or not isinstance(a.get("content"), str):
            raise ValueError(f"answer {i} must be a string or an object with a string 'content'")
        out.append({"content": a["content"], "model": str(a.get("model") or "imported")})
    return out


def _row_from_obj(obj: dict, where: str) -> PromptRow:
    if "messages" in obj and "prompt" in obj:
        raise ValueError("give either 'prompt' or 'messages', not both")
    if "messages" in obj:
        msgs = _messages(obj["messages"])
    elif "prompt" in obj:
        msgs = _messages(obj["prompt"])
    else:
        raise ValueError(f"expected a 'prompt' or 'messages' field (got {', '.join(sorted(obj)) or 'none'})")
    meta = obj.get("metadata", obj.get("meta", {}))
    if not isinstance(meta, dict):
        raise ValueError("'metadata' must be an object")
    meta = dict(meta)
    for k, v in obj.items():
        if k not in ("messages", "prompt", "category", "metadata", "meta", "answers"):
            meta[k] = v
    answers = _answers(obj["answers"]) if "answers" in obj else []
    return PromptRow(msgs, normalize_category(obj.get("category"), where), meta, answers, where)


def _read_jsonl(p: Path, errors: list[str]) -> list[PromptRow]:
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                errors.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
                continue
            try:
                rows.append(_row_from_obj(obj, where))
            except ValueError as e:
                errors.append(f"{where}: {e}")
    return rows


def _read_csv(p: Path, errors: list[str]) -> list[PromptRow]:
    rows = []
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if "prompt" not in header:
            raise MinichatError(f"{p}:1: the CSV header must have a 'prompt' column (got {', '.join(header) or 'none'})")
        for rec in reader:
            where = f"{p}:{reader.line_num}"
            if None in rec:
                errors.append(f"{where}: {len(rec[None])} more fields than the header has columns")
                continue
            try:
                msgs = _messages(rec.get("prompt") or "")
                if (rec.get("system") or "").strip():
                    msgs.insert(0, {"role": "system", "content": rec["system"]})
                answers = [{"content": rec[f"answer_{i}"], "model": "imported"} for i in range(1, 10)
                           if (rec.get(f"answer_{i}") or "").strip()]
                meta = {k: v for k, v in rec.items() if k not in ("prompt", "system", "category")
                        and not (k.startswith("answer_") and k[7:].isdigit()) and v not in (None, "")}
                rows.append(PromptRow(msgs, normalize_category(rec.get("category"), where), meta, answers, where))
            except ValueError as e:
                errors.append(f"{where}: {e}")
    return rows


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Every prompt of a .jsonl or .csv file; any malformed line stops the import, listing the bad lines."""
    p = Path(path)
    if not p.is_file():
        raise MinichatError(f"prompt file {p} does not exist")
    errors: list[str] = []
    try:
        if p.suffix.lower() == ".csv":
            rows = _read_csv(p, errors)
        elif p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            rows = _read_jsonl(p, errors)
        else:
            raise MinichatError(f"{p}: expected a .jsonl or .csv file")
    except UnicodeDecodeError as e:
        raise MinichatError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED])
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise MinichatError(f"{p}: {len(errors)} malformed line(s), nothing imported:\n  {shown}{more}")
    if not rows:
        raise MinichatError(f"{p}: no prompts in the file")
    return rows
