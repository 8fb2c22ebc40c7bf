"""Helpers shared by the RLHF tests (a plain module: conftest files of several folders share one name)."""
import json

COLORS = ["red", "blue", "green", "black", "white", "yellow"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
