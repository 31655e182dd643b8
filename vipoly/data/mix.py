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

Stream (`MixedStream`): each source is re-opened once per pass over it (its "epoch") and shuffled
through a seeded buffer (seed, source, epoch), so the order is a pure function of the seed and the
source's own row order. `position` records, per source, samples taken, epoch and offset within the
epoch; restoring it re-opens each source at its epoch after `offset` rows, so a resumed stream
neither repeats nor skips a sample. A source that can select rows by index (a Ray source, a list)
is then read only for the rows still to come: the shuffle is replayed on indices, not on data. It
also counts samples per source, task and language.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from math import gcd, lcm
from typing import Any, Callable, Iterable, Iterator


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


# ---------------------------------------------------------------- position
@dataclass
class MixPosition:
    """Where a mixed stream stands; JSON-able (`to_dict`/`from_dict`) for checkpoints."""

    taken: dict[str, int] = field(default_factory=dict)
    """Samples taken per source since the start (the scheduler's whole state)."""
    epoch: dict[str, int] = field(default_factory=dict)
    """Completed passes over each source."""
    offset: dict[str, int] = field(default_factory=dict)
    """Samples taken from each source's current pass."""
    per_task: dict[str, int] = field(default_factory=dict)
    per_lang: dict[str, int] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return sum(self.taken.values())

    def to_dict(self) -> dict[str, Any]:
        return {"taken": dict(self.taken), "epoch": dict(self.epoch), "offset": dict(self.offset),
                "per_task": dict(self.per_task), "per_lang": dict(self.per_lang)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MixPosition":
        return cls(**{k: dict(d.get(k, {})) for k in ("taken", "epoch", "offset", "per_task", "per_lang")})


# ---------------------------------------------------------------- sources
SourceLike = Any
"""A callable `epoch -> iterable of rows`, an object with `iter_rows()` (a Ray Dataset or
DataIterator: each call is a new pass), or a re-iterable (a list). A source that can also say how
many rows a pass has (`num_rows`) and hand out chosen rows (`select(epoch, head, start)`: the rows
at the ascending indices `head`, all below `start`, then every row from index `start` on) resumes
by reading only those (`vipoly.data.stream.RaySource`, lists); any other source resumes by
replaying its pass up to the position."""


class ListSource:
    """A list as a mix source: the same rows in the same order every pass, selectable by index."""

    def __init__(self, rows: list[Any]):
        self.rows = rows

    def __call__(self, epoch: int) -> list[Any]:
        return self.rows

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def select(self, epoch: int, head: list[int], start: int) -> Iterator[Any]:
        return iter([self.rows[i] for i in head] + self.rows[start:])


def _opener(source: SourceLike) -> Callable[[int], Iterable[dict[str, Any]]]:
    if hasattr(source, "iter_rows"):
        return lambda epoch: source.iter_rows()
    if callable(source):
        return source
    if isinstance(source, Iterator):
        raise ValueError("a mix source must be re-iterable (a one-shot iterator cannot start a second epoch); "
                         "pass a list, a Ray Dataset/DataIterator, or a callable epoch -> rows")
    return ListSource(list(source))


def close_rows(rows: Any) -> None:
    """Close an iterator of rows where it can be closed (a generator, Ray's block iterator), so that
    the pipeline behind it stops now rather than at garbage collection."""
    close = getattr(rows, "close", None)
    if close:
        close()


class ShuffleBuffer:
    """Streaming shuffle through `size` slots: each arriving row takes the slot of a random held
    row, which is emitted; when the rows end, the held ones are shuffled and emitted in turn.

    The state is explicit (`slots`, `emitted`, `draining`, `rng`), so the state after any number
    of emitted rows can be computed on row *indices* alone, which is how a stream resumes without
    reading the rows it already used (`MixedStream._resume`)."""

    def __init__(self, size: int, rng: random.Random, slots: list[Any] | None = None):
        self.size, self.rng = size, rng
        self.slots = slots if slots is not None else []
        self.emitted = 0
        self.draining, self._drain_start = False, 0

    @property
    def pulled(self) -> int:
        """Rows taken from the source so far, before the drain."""
        return self.emitted + len(self.slots)

    def held(self) -> list[Any]:
        """What is still to come from the slots: in slot order, or in emission order while draining."""
        return self.slots[self.emitted - self._drain_start:] if self.draining else list(self.slots)

    def shuffle(self, rows: Iterable[Any]) -> Iterator[Any]:
        it = iter(rows)
        try:
            if self.size <= 1:
                for row in it:
                    self.emitted += 1
                    yield row
                return
            slots, size, rng = self.slots, self.size, self.rng
            for row in it:
                if len(slots) < size:
                    slots.append(row)
                    continue
                i = rng.randrange(size)
                out, slots[i] = slots[i], row  # the state is whole at every yield (see _resume)
                self.emitted += 1
                yield out
            rng.shuffle(slots)
            self.draining, self._drain_start = True, self.emitted
            for row in slots:
                self.emitted += 1
                yield row
        finally:  # closing the shuffle closes the source's pipeline too
            close_rows(it)


def _primed(rows: Iterator[Any]) -> Iterator[Any]:
    """`rows` with its first item already pulled (so its source is running), closable as `rows` is."""
    first = next(rows, _END)

    def replay() -> Iterator[Any]:
        try:
            if first is not _END:
                yield first
                yield from rows
        finally:
            close_rows(rows)

    return replay()


_END = object()


class MixedStream:
    """An endless stream of rows from several sources, mixed by `weights` (see the module docstring).

    sources: {name: SourceLike}; weights: {name: weight} over the same names (weight 0 = unused).
    Rows are dicts; `task` and `lang` keys, when present, are counted. Iterate it for rows, or use
    `iter_batches(batch_size, collate)`. `position` (a MixPosition) is the state after the last row
    handed out; pass it back as `position=` to continue from there.
    """

    def __init__(self, sources: dict[str, SourceLike], weights: dict[str, float], seed: int = 0,
                 shuffle_buffer: int = 0, position: MixPosition | dict | None = None):
        missing = set(weights) - set(sources)
        extra = set(sources) - set(weights)
        if missing or extra:
            raise ValueError(f"data.mix and the sources differ: weights without a source {sorted(missing)}, "
                             f"sources without a weight {sorted(extra)}")
        if isinstance(position, MixPosition):
            position = position.to_dict()
        self.position = MixPosition.from_dict(position or {})  # a copy: the caller's object stays as saved
        self.scheduler = RatioScheduler(weights, self.position.taken)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self._open = {name: _opener(src) for name, src in sources.items() if name in self.scheduler.a}
        self._iters: dict[str, Iterator[dict[str, Any]]] = {}
        for name in self._open:
            self.position.taken.setdefault(name, 0)
            self.position.epoch.setdefault(name, 0)
            self.position.offset.setdefault(name, 0)

    def _start(self, name: str) -> Iterator[dict[str, Any]]:
        """Open `name` at its recorded epoch, after the rows already taken from that epoch."""
        epoch, offset = self.position.epoch[name], self.position.offset[name]
        rng = random.Random(f"{self.seed}/{name}/{epoch}")
        source = self._open[name]
        if offset and hasattr(source, "select"):
            return self._resume(name, source, epoch, offset, rng)
        it = ShuffleBuffer(self.shuffle_buffer, rng).shuffle(source(epoch))
        for skipped in range(offset):  # a source that cannot select rows: replay up to the position
            if next(it, None) is None:
                raise ValueError(f"source {name!r} has {skipped} rows in epoch {epoch}, fewer than the "
                                 f"position's offset {offset}: did the data change?")
        return it

    def _resume(self, name: str, source, epoch: int, offset: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Continue the shuffle of a pass after `offset` emitted rows, reading only the rows still
        to come: the shuffle is first run on row indices (no data) up to the position; the source
        then hands out the rows its slots held there and every row it had not reached yet.
        (Replaying the pass instead would read, decode and encode every row used before.)"""
        n = source.num_rows
        if offset > n:
            raise ValueError(f"source {name!r} has {n} rows in epoch {epoch}, fewer than the position's "
                             f"offset {offset}: did the data change?")
        replay = ShuffleBuffer(self.shuffle_buffer, rng)
        steps = replay.shuffle(range(n))
        for _ in range(offset):
            next(steps)
        held = replay.held()
        start = n if replay.draining else replay.pulled
        wanted = sorted(held)  # the order the source hands them out
        rows = iter(source.select(epoch, wanted, start))
        found = dict(zip(wanted, rows))
        if len(found) < len(held):
            raise ValueError(f"source {name!r} returned {len(found)} of the {len(held)} rows held at the "
                             f"position (epoch {epoch}, offset {offset}): did the data change?")
        if replay.draining:  # the rest of the pass is the held rows, in the drain's order
            close_rows(rows)
            return iter([found[i] for i in held])
        resumed = ShuffleBuffer(self.shuffle_buffer, replay.rng, slots=[found[i] for i in held])
        resumed.emitted = offset
        return resumed.shuffle(rows)

    def _start_all(self) -> None:
        """Open every source not yet open, at once: a Ray Data pipeline waits seconds for its first
        block, and sources opened one after another (as the scheduler first picks each) would add
        those waits up. Each source's rows are the same whichever thread pulled its first one."""
        from concurrent.futures import ThreadPoolExecutor

        names = [n for n in self._open if n not in self._iters]
        if len(names) < 2:
            return
        with ThreadPoolExecutor(len(names), thread_name_prefix="vipoly-open") as pool:
            for name, it in zip(names, pool.map(lambda n: _primed(self._start(n)), names)):
                self._iters[name] = it

    def _next_row(self, name: str) -> dict[str, Any]:
        if name not in self._iters:
            self._start_all()
            if name not in self._iters:  # the only source: nothing to overlap
                self._iters[name] = self._start(name)
        row = next(self._iters[name], None)
        if row is None:  # end of a pass: start the next epoch of this source
            if self.position.offset[name] == 0:
                raise ValueError(f"source {name!r} yields no rows")
            self.position.epoch[name] += 1
            self.position.offset[name] = 0
            self._iters[name] = self._start(name)
            row = next(self._iters[name], None)
            if row is None:
                raise ValueError(f"source {name!r} yields no rows in epoch {self.position.epoch[name]}")
        return row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.next()

    def next(self) -> dict[str, Any]:
        name = self.scheduler.next()
        row = self._next_row(name)
        pos = self.position
        pos.taken[name] += 1
        pos.offset[name] += 1
        task, lang = row.get("task"), row.get("lang")
        if task is not None:
            pos.per_task[task] = pos.per_task.get(task, 0) + 1
        if lang is not None:
            pos.per_lang[lang] = pos.per_lang.get(lang, 0) + 1
        return row

    def iter_batches(self, batch_size: int, collate: Callable[[list[dict[str, Any]]], Any] | None = None):
        """Endless batches of `batch_size` consecutive rows (through `collate` when given)."""
        while True:
            rows = [self.next() for _ in range(batch_size)]
            yield collate(rows) if collate else rows

    def state(self) -> dict[str, Any]:
        """The position as a JSON-able dict, for a checkpoint."""
        return self.position.to_dict()

    def close(self) -> None:
        """Stop the sources' pipelines now rather than at garbage collection."""
        for it in self._iters.values():
            close_rows(it)
        self._iters.clear()

    def __enter__(self) -> "MixedStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
