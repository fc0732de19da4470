"""The paired comparisons BENCHMARKS.md prints: pairing by example, the sign test and the interval, on
hand-worked examples."""
from __future__ import annotations

import math

import pytest

from chunkkv.eval import paired


def _entry(method, budget, score):
    return {"method": method, "budget": budget, "score": score}


def test_entries_pair_by_example_whatever_the_key_order():
    results = {
        "8|0|full|-": _entry("full", "-", 1.0), "8|1|full|-": _entry("full", "-", 0.0),
        "8|0|chunkkv|0.1": _entry("chunkkv", "0.1", 1.0), "8|1|chunkkv|0.1": _entry("chunkkv", "0.1", 1.0),
        "snapkv|0.1|8|0": _entry("snapkv", "0.1", 0.0),      # another key layout, same example "8|0"
    }
    runs = paired.runs_by_setting(results)
    assert runs[("full", "-")] == {"8|0": 1.0, "8|1": 0.0}
    assert runs[("snapkv", "0.1")] == {"8|0": 0.0}
    c = paired.compare(runs[("chunkkv", "0.1")], runs[("full", "-")])
    assert (c.pairs, c.differ, c.wins, c.losses, c.mean_diff) == (2, 1, 1, 0, 0.5)


def test_sign_test_by_hand():
    assert paired.sign_test_p(0, 0) == 1.0
    assert paired.sign_test_p(5, 0) == pytest.approx(2 / 32)        # 2 * (1/2)^5
    assert paired.sign_test_p(1, 4) == pytest.approx(2 * 6 / 32)    # 2 * (C(5,0) + C(5,1)) / 2^5
    assert paired.sign_test_p(3, 3) == 1.0


def test_interval_and_verdict():
    ahead = paired.compare({str(i): 1.0 for i in range(30)}, {str(i): 0.0 for i in range(30)})
    assert ahead.low == ahead.high == 1.0 and ahead.verdict == "ahead"
    mixed = paired.compare({str(i): float(i % 2) for i in range(40)}, {str(i): float((i + 1) % 2) for i in range(40)})
    assert mixed.low < 0 < mixed.high and mixed.verdict == "not separated"
    few = paired.compare({str(i): 1.0 if i < 5 else 0.0 for i in range(20)}, {str(i): 0.0 for i in range(20)})
    assert few.low > 0 and few.p_sign == pytest.approx(2 / 32) and few.verdict == "not separated"  # 5 wins: too few
    behind = paired.compare({str(i): 0.0 if i < 25 else 1.0 for i in range(30)}, {str(i): 1.0 for i in range(30)})
    assert behind.high < 0 and behind.verdict == "behind" and math.isclose(behind.mean_diff, -25 / 30)


def test_rows_compare_against_full_and_chunkkv_at_the_same_budget():
    results = {f"{i}|{m}|{b}": _entry(m, b, s) for i in range(4)
               for m, b, s in (("full", "-", 1.0), ("chunkkv", "64", 1.0), ("snapkv", "64", 0.0))}
    rows = paired.paired_rows(results)
    assert [r[:3] for r in rows] == [["chunkkv", "64", "full"], ["snapkv", "64", "full"], ["snapkv", "64", "chunkkv"]]
    assert rows[1][3:6] == [4, 4, "0/4"] and rows[1][6] == -100.0
    assert rows[1][-1] == "not separated"  # 4 of 4 lost, but a sign test on 4 cannot reach p < 0.05
