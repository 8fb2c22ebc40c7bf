"""`minichat label report`: people's judgements of the models, as InstructGPT reported them.

    minichat label report --project helpful --baseline sft      # Markdown on stdout; --json, --out FILE

From the labelers' submitted work on the store (the rows `minichat label export` writes):
  * Likert 1-7 per model: mean with a 95% bootstrap interval over prompts, the histogram, the mean per category;
  * win rates between models, from rankings (two answers of different models in one ranking: the better
    placed wins, a tie is half a win) and from ratings (two answers rated in one task: the higher Likert wins),
    with bootstrap intervals over prompts; with --baseline, every model against that one (InstructGPT's Figure 1);
  * the share of rated answers with each metadata flag (hallucination, fails to follow the instruction, ...);
each for all labelers, the labelers whose work trains models, and the held-out labelers (who only evaluate:
InstructGPT's test of generalisation to people whose preferences were never trained on).
"""
from __future__ import annotations

import json
from collections import defaultdict
from itertools import combinations

from minichat.errors import MinichatError
from minichat.eval import metrics as M
from minichat.label.models import FLAGS

GROUPS = {"all labelers": None, "training labelers": False, "held-out labelers": True}


def _pairs_from_rankings(rows: list[dict]):
    """(prompt_id, model_a, model_b, outcome for a) for every two answers of different models in one ranking."""
    for r in rows:
        models, ranks = r["meta"].get("models") or [], r["ranks"]
        for i, j in combinations(range(len(models)), 2):
            if models[i] != models[j]:
                yield r["meta"]["prompt_id"], models[i], models[j], 1.0 if ranks[i] < ranks[j] else 0.5 if ranks[i] == ranks[j] else 0.0


def _pairs_from_ratings(rows: list[dict]):
    """The same from ratings: answers rated in one assignment (one labeler, one task) compared by Likert."""
    by_assignment: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_assignment[r["meta"]["assignment_id"]].append(r)
    for group in by_assignment.values():
        for x, y in combinations(group, 2):
            if x["model"] != y["model"]:
                a, b = x["likert"], y["likert"]
                yield x["meta"]["prompt_id"], x["model"], y["model"], 1.0 if a > b else 0.5 if a == b else 0.0


def _win_matrix(pairs, models: list[str], baseline: str | None, n_boot: int, seed: int) -> dict:
    """{a: {b: win_rate dict of a against b}}: outcomes grouped by prompt for the interval."""
    acc: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for pid, a, b, out in pairs:
        acc[(a, b)][pid].append(out)
        acc[(b, a)][pid].append(1.0 - out)
    table: dict[str, dict[str, dict]] = {}
    for a in models:
        for b in models:
            if a == b or (a, b) not in acc or (baseline is not None and b != baseline):
                continue
            table.setdefault(a, {})[b] = M.win_rate(list(acc[(a, b)].values()), n_boot, seed)
    return table


def _likert(rows: list[dict], n_boot: int, seed: int) -> dict:
    by_prompt: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        by_prompt[r["meta"]["prompt_id"]].append(r["likert"])
    h = M.likert_histogram(r["likert"] for r in rows)
    lo, hi = M.bootstrap_ci(list(by_prompt.values()), n_boot, seed=seed)
    return {**h, "ci_low": lo, "ci_high": hi, "prompts": len(by_prompt),
            "by_category": M.by_category((r["meta"].get("category") or "none", r["likert"]) for r in rows)}


def evaluation(rows: dict[str, list[dict]], baseline: str | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """The report as a dict, from export rows that include the held-out labelers (held_out="include")."""
    models = sorted({r["model"] for r in rows["ratings"]} |
                    {m for r in rows["rankings"] for m in (r["meta"].get("models") or [])})
    if baseline is not None and baseline not in models:
        raise MinichatError(f"--baseline {baseline!r} answered none of the rated or ranked tasks; models: "
                            f"{', '.join(models) or 'none'}")
    out: dict = {"models": models, "baseline": baseline, "groups": {}}
    for name, held in GROUPS.items():
        pick = (lambda r: True) if held is None else (lambda r, h=held: bool(r["meta"]["held_out"]) is h)
        ratings = [r for r in rows["ratings"] if pick(r)]
        rankings = [r for r in rows["rankings"] if pick(r)]
        g = {"labelers": sorted({r["meta"]["labeler"] for r in ratings + rankings}),
             "ratings": len(ratings), "rankings": len(rankings), "likert": {}, "flags": {},
             "win_rankings": _win_matrix(_pairs_from_rankings(rankings), models, baseline, n_boot, seed),
             "win_ratings": _win_matrix(_pairs_from_ratings(ratings), models, baseline, n_boot, seed)}
        for m in models:
            mine = [r for r in ratings if r["model"] == m]
            if mine:
                g["likert"][m] = _likert(mine, n_boot, seed)
                g["flags"][m] = {f: M.mean(1.0 if r["flags"].get(f) else 0.0 for r in mine) for f in FLAGS}
        out["groups"][name] = g
    return out


# ------------------------------------------------------------------------------------------------ Markdown

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _win_table(table: dict, models: list[str], baseline: str | None) -> list[str]:
    cols = [baseline] if baseline else [m for m in models if any(m in row for row in table.values())]
    lines = ["| model | " + " | ".join(f"vs {c}" for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for a in models:
        if a not in table:
            continue
        cells = []
        for b in cols:
            w = table[a].get(b)
            cells.append("" if w is None else f"{_pct(w['win_rate'])} [{_pct(w['ci_low'])}, {_pct(w['ci_high'])}] "
                                              f"({w['judgements']} on {w['prompts']} prompts)")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def to_markdown(rep: dict, title: str = "Human evaluation") -> str:
    models, base = rep["models"], rep["baseline"]
    lines = [f"# {title}", ""]
    if not models:
        return "\n".join(lines + ["No rated or ranked answers yet.", ""])
    for name, g in rep["groups"].items():
        lines += [f"## {name.capitalize()}: {len(g['labelers'])} ({', '.join(g['labelers']) or 'none'}); "
                  f"{g['ratings']} ratings, {g['rankings']} rankings", ""]
        if not g["labelers"]:
            lines += ["Nothing submitted by this group.", ""]
            continue
        if g["likert"]:
            lines += ["Likert 1-7 (95% bootstrap interval over prompts):", "",
                      "| model | ratings | mean [95% CI] | " + " | ".join(str(k) for k in range(1, 8)) + " |",
                      "|---|---|---|" + "---|" * 7]
            for m, h in g["likert"].items():
                lines.append(f"| {m} | {h['n']} | {h['mean']:.2f} [{h['ci_low']:.2f}, {h['ci_high']:.2f}] | "
                             + " | ".join(str(h["counts"][k]) for k in range(1, 8)) + " |")
            cats = sorted({c for h in g["likert"].values() for c in h["by_category"]})
            if len(cats) > 1:
                lines += ["", "Likert mean per category:", "", "| model | " + " | ".join(cats) + " |",
                          "|---|" + "---|" * len(cats)]
                for m, h in g["likert"].items():
                    lines.append(f"| {m} | " + " | ".join(f"{h['by_category'][c]:.2f}" if c in h["by_category"]
                                                          else "" for c in cats) + " |")
            shown = [f for f in FLAGS if any(fl[f] > 0 for fl in g["flags"].values())]
            if shown:
                lines += ["", "Share of rated answers flagged:", "", "| model | " + " | ".join(shown) + " |",
                          "|---|" + "---|" * len(shown)]
                for m, fl in g["flags"].items():
                    lines.append(f"| {m} | " + " | ".join(_pct(fl[f]) for f in shown) + " |")
            lines.append("")
        for key, what in (("win_rankings", "rankings"), ("win_ratings", "ratings")):
            if g[key]:
                lines += [f"Win rate of the row's model {'against ' + base if base else 'against the column'}"
                          f", from {what} (ties count half; 95% bootstrap interval over prompts):", ""]
                lines += _win_table(g[key], models, base) + [""]
        if not g["win_rankings"] and not g["win_ratings"]:
            lines += ["No win rates: no ranking or rating task showed answers of two different models.", ""]
    return "\n".join(lines)


def to_json(rep: dict) -> str:
    return json.dumps(rep, indent=2, sort_keys=False, default=str)
