"""`minichat feedback export`: users' feedback from the serving store as comparison data for the reward model.

Each line is one comparison in the format the reward-model trainer reads (minichat/data/chat.py):
    {"prompt": [messages up to the user's turn, with the system prompt],
     "chosen": [{"role": "assistant", "content": ...}], "rejected": [{"role": "assistant", "content": ...}],
     "meta": {"source": "comparison" | "thumbs", "conversation_id", "chosen_id", "rejected_id", ...}}
Pairs come from (a) a user saying which of two regenerated answers was better, and (b) two answers to the same
message of which one got thumbs up and the other thumbs down. Answers that moderation replaced are left out
(they are refusals written by the server, not the model's answers).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import uuid
from pathlib import Path

from minichat.errors import MinichatError


def _store_for_export(url: str | None):
    from minichat.serve.store import Store, default_url

    url = url or default_url()
    if url.startswith("sqlite:///") and ":memory:" not in url:
        path = Path(url[len("sqlite:///"):]).expanduser()
        if not path.is_file():
            raise MinichatError(f"there is no store at {path} yet (nothing to export); serve and collect feedback "
                                "first, or pass --store URL")
    return Store(url)


def export(store, out: str | Path, *, include_thumbs: bool = True, include_moderated: bool = False,
           since: dt.datetime | None = None, meta: bool = True) -> dict:
    """Write the comparisons to `out` (atomically); returns counts by source."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    counts = {"comparison": 0, "thumbs": 0}
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in store.preference_pairs(include_thumbs=include_thumbs, since=since,
                                              include_moderated=include_moderated):
                counts[rec["meta"]["source"]] += 1
                if not meta:
                    rec = {k: v for k, v in rec.items() if k != "meta"}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return counts


def _date(s: str) -> dt.datetime:
    try:
        d = dt.datetime.fromisoformat(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {s!r} (e.g. 2025-01-31)") from None
    if d.tzinfo is not None:
        d = d.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return d


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="minichat feedback", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write comparisons as JSONL for `minichat reward`")
    ex.add_argument("--out", "-o", required=True, help="output JSONL file")
    ex.add_argument("--store", help="SQLAlchemy URL of the store (default: the SQLite file minichat serve uses)")
    ex.add_argument("--no-thumbs", action="store_true", help="only explicit 'which was better' choices")
    ex.add_argument("--include-moderated", action="store_true", help="keep pairs where moderation replaced an answer")
    ex.add_argument("--since", type=_date, help="only feedback given at or after this UTC date/time")
    ex.add_argument("--no-meta", action="store_true", help="leave out the 'meta' key of each line")
    st = sub.add_parser("stats", help="count conversations, messages and feedback in the store")
    st.add_argument("--store", help="SQLAlchemy URL of the store")
    a = ap.parse_args(argv)
    store = _store_for_export(a.store)
    try:
        if a.cmd == "export":
            counts = export(store, a.out, include_thumbs=not a.no_thumbs, include_moderated=a.include_moderated,
                            since=a.since, meta=not a.no_meta)
            total = sum(counts.values())
            print(f"wrote {total} comparisons to {a.out} ({counts['comparison']} from 'which was better', "
                  f"{counts['thumbs']} from thumbs up/down)", file=sys.stderr)
        else:
            print(json.dumps(store.counts(), indent=2))
    finally:
        store.close()
    return 0
