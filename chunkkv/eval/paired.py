"""Paired comparisons of methods on the same examples, so that a report claims an ordering only where the
data supports one.

Every results entry carries its ``method``, ``budget`` and ``score``; its key is the example's own id with the
method and budget labels among its ``|``-separated parts. Two runs are paired when their keys are equal once
those two labels are removed. For a method at a budget against a reference run (the full cache, or chunkkv at
the same budget) :func:`compare` gives the number of pairs, how many differ, wins and losses, the mean score
difference with a seeded paired bootstrap 95% interval, and the exact two-sided sign-test p-value; the
verdict says ``ahead`` or ``behind`` only when the interval excludes 0.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

FULL = ("full", "-")


def example_id(key: str, entry: dict) -> str:
    """The key without the entry's method and budget labels (the first part equal to each)."""
    parts = key.split("|")
    for label in (str(entry.get("method")), str(entry.get("budget"))):
        if label in parts:
            parts.remove(label)
    return "|".join(parts)


def runs_by_setting(results: dict) -> dict[tuple[str, str], dict[str, float]]:
    """(method, budget) -> {example id: score} for every entry with a numeric score."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for key, entry in results.items():
        score = entry.get("score") if isinstance(entry, dict) else None
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            continue
        out.setdefault((str(entry["method"]), str(entry["budget"])), {})[example_id(key, entry)] = float(score)
    return out


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided binomial p-value of wins vs losses at 1/2 (ties dropped); 1.0 with none."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def bootstrap_interval(diffs: list[float], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A paired percentile bootstrap 95% interval of the mean difference (seeded, so reports are stable)."""
    if not diffs:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


@dataclass
class Comparison:
    """A method's paired scores against a reference run on the same examples."""

    pairs: int
    differ: int
    wins: int
    losses: int
    mean_diff: float
    low: float
    high: float
    p_sign: float

    @property
    def verdict(self) -> str:
        if self.pairs == 0:
            return "no pairs"
        if self.low > 0 and self.p_sign < 0.05:
            return "ahead"
        if self.high < 0 and self.p_sign < 0.05:
            return "behind"
        return "not separated"


def compare(method: dict[str, float], reference: dict[str, float], *, seed: int = 0) -> Comparison:
    """Paired comparison of two runs' scores ({example id: score}) on the examples both have."""
    common = sorted(set(method) & set(reference))
    diffs = [method[i] - reference[i] for i in common]
    low, high = bootstrap_interval(diffs, seed=seed)
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    mean = sum(diffs) / len(diffs) if diffs else 0.0
    return Comparison(len(common), wins + losses, wins, losses, mean, low, high, sign_test_p(wins, losses))


def paired_rows(results: dict, *, scale: float = 100.0,
                baseline_method: str = "chunkkv") -> list[list]:
    """Table rows: every compressed (method, budget) against the full cache and against chunkkv at the same
    budget: reference, pairs, differing, wins/losses, mean difference and its 95% interval (x scale), sign-test p,
    verdict."""
    runs = runs_by_setting(results)
    rows = []
    for (method, budget) in sorted(runs):
        if (method, budget) == FULL:
            continue
        refs: list[tuple[str, Optional[dict]]] = [("full", runs.get(FULL))]
        if method != baseline_method:
            refs.append((baseline_method, runs.get((baseline_method, budget))))
        for name, ref in refs:
            if not ref:
                continue
            c = compare(runs[(method, budget)], ref)
            rows.append([method, budget, name, c.pairs, c.differ, f"{c.wins}/{c.losses}", c.mean_diff * scale,
                         f"[{c.low * scale:.1f}, {c.high * scale:.1f}]", f"{c.p_sign:.3g}", c.verdict])
    return rows


HEADERS = ["method", "budget", "vs", "pairs", "differ", "wins/losses", "mean diff", "95% CI", "sign p", "verdict"]
