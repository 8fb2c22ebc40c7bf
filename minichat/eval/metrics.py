"""The arithmetic of evaluation: win rates with ties, confidence intervals, Likert histograms, rates.

Pure functions on plain lists, checked by hand in tests/pipeline/test_metrics.py.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Iterable, Sequence


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (successes may be fractional, e.g. ties counted as half)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ci(groups: Sequence[Sequence[float]], n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean, resampling whole groups (a prompt's judgements move together)."""
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        sample = [groups[rng.randrange(len(groups))] for _ in groups]
        stats.append(mean(x for g in sample for x in g))
    stats.sort()
    lo = stats[int(math.floor(alpha / 2 * (n_boot - 1)))]
    hi = stats[int(math.ceil((1 - alpha / 2) * (n_boot - 1)))]
    return (lo, hi)


def win_rate(outcomes: Sequence[Sequence[float]], n_boot: int = 1000, seed: int = 0) -> dict:
    """outcomes[i] = judgements of prompt i (1 win, 0.5 tie, 0 loss). Win rate counts a tie as half a win."""
    flat = [x for g in outcomes for x in g]
    wins = sum(1 for x in flat if x == 1.0)
    ties = sum(1 for x in flat if x == 0.5)
    lo, hi = bootstrap_ci(outcomes, n_boot, seed=seed)
    return {"win_rate": mean(flat), "ci_low": lo, "ci_high": hi, "wins": wins, "ties": ties,
            "losses": len(flat) - wins - ties, "judgements": len(flat), "prompts": len(outcomes)}


def likert_histogram(scores: Iterable[int]) -> dict:
    """Counts of 1..7 and the mean."""
    scores = list(scores)
    counts = {k: 0 for k in range(1, 8)}
    for s in scores:
        if not 1 <= s <= 7:
            raise ValueError(f"Likert score {s} is outside 1..7")
        counts[s] += 1
    return {"counts": counts, "mean": mean(scores), "n": len(scores)}


def rate(flags: Iterable[bool]) -> dict:
    """A proportion with its Wilson interval."""
    flags = [bool(f) for f in flags]
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "ci_low": lo, "ci_high": hi}


def by_category(items: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Mean value per category, from (category, value) pairs."""
    acc: dict[str, list[float]] = defaultdict(list)
    for cat, v in items:
        acc[cat].append(v)
    return {c: mean(v) for c, v in sorted(acc.items())}


def perplexity(total_nll: float, n_tokens: int) -> float:
    return math.exp(total_nll / n_tokens) if n_tokens else float("nan")


def best_of_n_kl_bound(n: int) -> float:
    """KL(best-of-n ‖ base) ≤ log n − (n − 1)/n (Stiennon et al. 2020; exact for a continuous reward)."""
    return math.log(n) - (n - 1) / n
