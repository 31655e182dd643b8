"""The exact-ratio scheduler (no Ray needed); vipoly.data.plan builds the global order on it."""
from __future__ import annotations

from fractions import Fraction

import pytest

from vipoly.data.mix import RatioScheduler, integer_weights, measure_ratio

WEIGHT_SETS = [
    {"text_pair": 0.45, "instr": 0.05, "ocr": 0.2, "vqa_single": 0.15, "vqa_multi": 0.15},  # the default mix
    {"a": 1, "b": 1},
    {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3},
    {"a": 0.7, "b": 0.2, "c": 0.0999, "d": 0.0001},  # one tiny source
    {"a": 3, "b": 7, "c": 11, "d": 13, "e": 17, "f": 19, "g": 23},  # primes
    {"big": 1000, **{f"s{i}": 1 for i in range(9)}},
]


def picks_of(weights, n):
    sched = RatioScheduler(weights)
    return [sched.next() for _ in range(n)]


@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_ratio_bound_on_every_prefix_and_window(weights):
    picks = picks_of(weights, 6000)
    a = integer_weights(weights)
    total = sum(a.values())
    # exact check of the prefix bound |k_s(n) - n p_s| < 1, in integers: |k·D - n·a| < D
    counts = dict.fromkeys(a, 0)
    for n, s in enumerate(picks, 1):
        counts[s] += 1
        for t in a:
            assert abs(counts[t] * total - n * a[t]) < total, (t, n)
    for window in (7, 64, 500):
        m = measure_ratio(picks, weights, window)
        assert m["max_window_dev"]["max"] < 2
        assert m["max_prefix_dev"]["max"] < 1
    m = measure_ratio(picks, weights, 64)
    for s, share in m["shares"].items():
        assert share == pytest.approx(m["target"][s], abs=1 / 6000 + 1e-12)


def test_zero_weight_never_drawn_and_weights_checked():
    assert set(picks_of({"a": 1, "b": 0, "c": 2}, 300)) == {"a", "c"}
    with pytest.raises(ValueError, match="not all 0"):
        RatioScheduler({"a": 0})
    with pytest.raises(ValueError):
        RatioScheduler({"a": -1, "b": 1})
    assert integer_weights({"a": 0.45, "b": 0.05}) == {"a": 9, "b": 1}
    assert Fraction(integer_weights({"a": 1 / 3, "b": 2 / 3})["b"], integer_weights({"a": 1 / 3, "b": 2 / 3})["a"]) \
        == pytest.approx(2)


def test_block_mix_would_fail_the_same_measure():
    """The measure is not vacuous: a mix that takes whole blocks of 32 from each source misses it."""
    picks = (["a"] * 32 + ["b"] * 32) * 20
    assert measure_ratio(picks, {"a": 1, "b": 1}, 64)["max_window_dev"]["max"] == pytest.approx(0)
    assert measure_ratio(picks, {"a": 1, "b": 1}, 16)["max_window_dev"]["max"] == pytest.approx(8)
