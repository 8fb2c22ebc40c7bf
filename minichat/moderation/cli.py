"""`minichat moderate`: moderate text, evaluate the moderator, or retrain its learned scorer.

    minichat moderate "How do I bully John Doe?"      # JSON result (OpenAI shape + rule hits)
    minichat moderate - < texts.txt                   # one text per line in, one JSON line out
    minichat moderate --eval eval.jsonl               # precision/recall/F1/AUPRC per category and overall
    minichat moderate --train [--data-dir DIR]        # retrain the learned scorer (python -m minichat.moderation.train)
"""
from __future__ import annotations

import argparse
import json
import sys

from minichat.errors import MinichatError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="minichat moderate", description="Moderate text with rules + a learned scorer.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("text", nargs="?", help="text to moderate, or - to read one text per line from stdin")
    ap.add_argument("--eval", metavar="FILE.jsonl", help="evaluate on OpenAI moderation-eval format labels")
    ap.add_argument("--train", action="store_true", help="retrain the packaged learned scorer")
    ap.add_argument("--data-dir", help="with --train: folder of the shared moderation data")
    ap.add_argument("--config", help="your rules/config file (YAML or JSON), merged over the packaged rules")
    ap.add_argument("--no-learned", action="store_true", help="rules only")
    ap.add_argument("--openai", action="store_true", help="print the full /v1/moderations response body")
    ap.add_argument("--audit", metavar="FILE.jsonl", help="append one audit line per decision to this file")
    ap.add_argument("--refusal", action="store_true", help="also print the refusal a flagged text would get")
    return ap


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    if a.train:
        from minichat.moderation.train import main as train_main

        return train_main(["--data-dir", a.data_dir] if a.data_dir else [])
    if a.text is None and not a.eval:
        raise MinichatError("give a TEXT to moderate, - to read stdin, --eval FILE or --train (see --help)")
    from minichat.moderation.engine import Moderator, moderation_response

    mod = Moderator.load(a.config, learned=False if a.no_learned else None, audit_path=a.audit)
    if a.eval:
        from minichat.moderation.evaluate import evaluate_rows, format_report, read_eval_file

        report = evaluate_rows(mod, read_eval_file(a.eval))
        print(format_report(report))
        return 0

    def emit(text: str) -> None:
        r = mod.check(text)
        out = moderation_response([r]) if a.openai else r.to_dict()
        if a.refusal and r.flagged:
            out["refusal"] = mod.refusal_for(r)
        print(json.dumps(out, ensure_ascii=False, indent=None if a.text == "-" else 2))

    if a.text == "-":
        data = sys.stdin.buffer.read()
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise MinichatError(f"stdin is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        for line in lines:
            try:
                emit(line)
            except MinichatError as e:  # one bad line must not stop the rest of the stream
                print(json.dumps({"error": str(e)}))
        return 0
    emit(a.text)
    return 0
