"""Streaming mix of several sources by exact ratio, with a position that survives a restart.

Why not Ray's `Dataset.mix`: it interleaves whole blocks, so the ratio only holds on average over
many blocks (with large blocks a 1:1 mix returned one source). Here every source is its own stream
and a scheduler picks the source of *each* sample.

Scheduler (`RatioScheduler`): the weights are normalised to exact integer ratios a_s / D (decimal
weights as written, via `Fraction(repr(w))`). Sample j (1-based) of source s has the window
[⌊(j−1)·D/a_s⌋, ⌈j·D/a_s⌉) of global steps (a "Pfair" window); at each step the scheduler takes,
among the sources whose next window has opened, the one whose window closes first (earliest
deadline first; ties → the source listed first). Since Σ a_s / D = 1, EDF meets every window, which
gives, for every source s and every n:

    |k_s(n) − n·p_s| < 1          (k_s(n): samples of s among the first n, p_s = a_s / D)

and therefore, for every window of N consecutive samples anywhere in the stream,

    |count_s − N·p_s| < 2.

(A bound ≤ 1 for every window is impossible in general for three or more sources.) The state is
just k_s, so a restored position continues the identical sequence.

The global sample order (`vipoly.data.plan`) runs this scheduler over all workers' samples, one
contrastive batch ("chunk") at a time, and permutes each chunk's positions: the prefix bound holds
at every chunk boundary and the window bound for every run of whole chunks, whatever the number
of workers.
"""
from __future__ import annotations

from collections import Counter
from fractions import Fraction
from math import gcd, lcm
from typing import Any, Iterable


def integer_weights(weights: dict[str, float]) -> dict[str, int]:
    """{source: w} → the smallest integers with exactly the same ratios (zero weights dropped)."""
    bad = {k: w for k, w in weights.items() if not (isinstance(w, (int, float)) and w >= 0)}
    if bad or not any(w > 0 for w in weights.values()):
        raise ValueError(f"mix weights must be ≥ 0 and not all 0, got {weights}")
    fracs = {k: Fraction(repr(float(w))) for k, w in weights.items() if w > 0}
    den = lcm(*(f.denominator for f in fracs.values()))
    ints = {k: int(f * den) for k, f in fracs.items()}
    g = 0
    for v in ints.values():
        g = gcd(g, v)
    return {k: v // g for k, v in ints.items()}


class RatioScheduler:
    """Picks the source of each next sample (earliest deadline first over Pfair windows)."""

    def __init__(self, weights: dict[str, float], taken: dict[str, int] | None = None):
        self.a = integer_weights(weights)
        self.names = list(self.a)
        self.total = sum(self.a.values())
        self.taken = {s: 0 for s in self.names}
        if taken:
            unknown = set(taken) - set(self.names)
            if unknown:
                raise ValueError(f"position names source(s) {sorted(unknown)} that the mix does not have")
            self.taken.update(taken)
        self.step = sum(self.taken.values())

    @property
    def shares(self) -> dict[str, float]:
        return {s: a / self.total for s, a in self.a.items()}

    def next(self) -> str:
        best, best_deadline = None, None
        for s in self.names:
            k, a = self.taken[s], self.a[s]
            if (k * self.total) // a > self.step:  # release ⌊k·D/a⌋: the window has not opened yet
                continue
            deadline = -((-(k + 1) * self.total) // a)  # ⌈(k+1)·D/a⌉
            if best is None or deadline < best_deadline:
                best, best_deadline = s, deadline
        assert best is not None  # Σ p = 1 guarantees an open window at every step
        self.taken[best] += 1
        self.step += 1
        return best


def measure_ratio(picks: Iterable[str], weights: dict[str, float], window: int) -> dict[str, Any]:
    """How well a sequence of source names honours `weights`.

    Returns shares (achieved over the whole sequence), max_prefix_dev (max over n, s of
    |k_s(n) − n·p_s|) and max_window_dev (max over every window of `window` consecutive samples of
    |count_s − window·p_s|), each per source and overall ("max").
    """
    a = integer_weights(weights)
    total = sum(a.values())
    p = {s: a.get(s, 0) / total for s in weights}
    picks = list(picks)
    unknown = set(picks) - set(p)
    if unknown:
        raise ValueError(f"picks name source(s) {sorted(unknown)} not in the weights")
    counts: Counter = Counter()
    win: Counter = Counter()
    prefix_dev = {s: 0.0 for s in p}
    window_dev = {s: 0.0 for s in p}
    for n, s in enumerate(picks, 1):
        counts[s] += 1
        win[s] += 1
        if n > window:
            win[picks[n - 1 - window]] -= 1
        for t in p:
            prefix_dev[t] = max(prefix_dev[t], abs(counts[t] - n * p[t]))
            if n >= window:
                window_dev[t] = max(window_dev[t], abs(win[t] - window * p[t]))
    n = max(len(picks), 1)
    return {"n": len(picks), "window": window, "target": p, "shares": {s: counts[s] / n for s in p},
            "max_prefix_dev": {**prefix_dev, "max": max(prefix_dev.values())},
            "max_window_dev": {**window_dev, "max": max(window_dev.values())}}
