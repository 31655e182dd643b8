"""The exact-ratio scheduler, the mixed stream and its resumable position (no Ray needed)."""
from __future__ import annotations

import json
import random
from fractions import Fraction

import pytest

from vipoly.data.mix import (ListSource, MixedStream, MixPosition, RatioScheduler, ShuffleBuffer, integer_weights,
                             measure_ratio)

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


def rows(name, n, task="ocr", lang="vi"):
    return [{"id": f"{name}{i}", "task": task, "lang": lang} for i in range(n)]


SOURCES = {"a": rows("a", 7, "ocr", "vi"), "b": rows("b", 13, "instr", "en"), "c": rows("c", 3, "text_pair", "zh")}
WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}


def test_stream_follows_the_schedule_and_counts():
    stream = MixedStream(SOURCES, WEIGHTS, seed=3, shuffle_buffer=4)
    got = [stream.next() for _ in range(200)]
    assert [r["id"][0] for r in got] == picks_of(WEIGHTS, 200)
    pos = stream.position
    assert pos.taken == {"a": 100, "b": 60, "c": 40}
    assert pos.per_task == {"ocr": 100, "instr": 60, "text_pair": 40}
    assert pos.per_lang == {"vi": 100, "en": 60, "zh": 40}
    assert pos.epoch == {"a": 100 // 7, "b": 60 // 13, "c": 40 // 3}
    # each pass over a source is a permutation of it, and passes differ in order
    a_rows = [r["id"] for r in got if r["id"][0] == "a"]
    passes = [a_rows[i:i + 7] for i in range(0, 98, 7)]
    assert all(sorted(p) == sorted(r["id"] for r in SOURCES["a"]) for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_stream_is_deterministic_for_a_seed():
    def ids(seed):
        s = MixedStream(SOURCES, WEIGHTS, seed=seed, shuffle_buffer=5)
        return [s.next()["id"] for _ in range(120)]

    assert ids(1) == ids(1)
    assert ids(1) != ids(2)


@pytest.mark.parametrize("stop", [1, 17, 20, 61, 99])
def test_resumed_stream_neither_repeats_nor_skips(stop):
    full = MixedStream(SOURCES, WEIGHTS, seed=7, shuffle_buffer=4)
    expected = [full.next()["id"] for _ in range(150)]
    first = MixedStream(SOURCES, WEIGHTS, seed=7, shuffle_buffer=4)
    head = [first.next()["id"] for _ in range(stop)]
    saved = json.loads(json.dumps(first.state()))  # as a checkpoint stores it
    resumed = MixedStream(SOURCES, WEIGHTS, seed=7, shuffle_buffer=4, position=saved)
    tail = [resumed.next()["id"] for _ in range(150 - stop)]
    assert head + tail == expected
    assert resumed.position.taken == full.position.taken
    assert resumed.position.per_task == full.position.per_task


def test_resume_through_batches():
    stream = MixedStream(SOURCES, WEIGHTS, seed=0, shuffle_buffer=3)
    it = stream.iter_batches(8, collate=lambda rs: [r["id"] for r in rs])
    batches = [next(it) for _ in range(3)]
    pos = MixPosition.from_dict(stream.state())
    more = next(it)
    again = MixedStream(SOURCES, WEIGHTS, seed=0, shuffle_buffer=3, position=pos)
    assert next(again.iter_batches(8, collate=lambda rs: [r["id"] for r in rs])) == more
    assert sum(len(b) for b in batches) == pos.step == 24


def test_stream_accepts_callables_and_ray_like_sources():
    seen_epochs = []

    def by_epoch(epoch):
        seen_epochs.append(epoch)
        return rows("e", 2)

    class Dataset:  # anything with iter_rows(), as a Ray Dataset or DataIterator
        def iter_rows(self):
            return iter(rows("d", 3))

    s = MixedStream({"e": by_epoch, "d": Dataset()}, {"e": 1, "d": 1})
    ids = [s.next()["id"] for _ in range(10)]
    assert sorted(set(ids)) == ["d0", "d1", "d2", "e0", "e1"]
    assert seen_epochs == [0, 1, 2]


def test_stream_errors_name_the_problem():
    with pytest.raises(ValueError, match="sources without a weight"):
        MixedStream(SOURCES, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="weights without a source"):
        MixedStream(SOURCES, {**WEIGHTS, "zz": 1})
    with pytest.raises(ValueError, match="yields no rows"):
        MixedStream({"a": [], "b": rows("b", 2)}, {"a": 1, "b": 1}).next()
    with pytest.raises(ValueError, match="re-iterable"):
        MixedStream({"a": iter(rows("a", 2))}, {"a": 1})
    shrunk = MixedStream({"a": rows("a", 2)}, {"a": 1}, position={"taken": {"a": 5}, "epoch": {"a": 0},
                                                                 "offset": {"a": 5}})
    with pytest.raises(ValueError, match="did the data change"):
        shrunk.next()


class CountingSource(ListSource):
    """A list source that records what a resume asks of it."""

    def __init__(self, rows):
        super().__init__(rows)
        self.selects = []

    def select(self, epoch, head, start):
        self.selects.append((len(head), start))
        return super().select(epoch, head, start)


@pytest.mark.parametrize("size", [0, 1, 8, 50])
@pytest.mark.parametrize("stop", [1, 7, 20, 35, 39, 40, 41, 73, 118])
def test_resume_reads_only_the_rows_still_to_come(size, stop):
    """A source that selects rows by index is read, on resume, only for the rows the shuffle buffer
    held and those it had not reached: the shuffle is replayed on indices. The stream is the same
    as without the stop, in the fill, steady and drain phases and across epochs (40 rows a pass)."""
    full = MixedStream({"a": rows("a", 40)}, {"a": 1}, seed=3, shuffle_buffer=size)
    expected = [full.next()["id"] for _ in range(160)]
    first = MixedStream({"a": rows("a", 40)}, {"a": 1}, seed=3, shuffle_buffer=size)
    head = [first.next()["id"] for _ in range(stop)]
    source = CountingSource(rows("a", 40))
    resumed = MixedStream({"a": source}, {"a": 1}, seed=3, shuffle_buffer=size, position=first.state())
    tail = [resumed.next()["id"] for _ in range(160 - stop)]
    assert head + tail == expected
    offset = first.state()["offset"]["a"]
    if offset:  # a pass resumed after `offset` rows: only the rows still to come were handed out
        held, start = source.selects[0]
        assert held + (40 - start) == 40 - offset and held <= size
    else:  # at the start of a pass there is nothing to skip
        assert source.selects == []


def test_shuffle_buffer_is_a_permutation():
    out = list(ShuffleBuffer(10, random.Random(0)).shuffle(range(100)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert list(ShuffleBuffer(0, random.Random(0)).shuffle(range(5))) == list(range(5))


def test_sources_start_together_and_close():
    """The first sample opens every source at once (their start-up waits overlap), and closing the
    stream closes every source's rows."""
    started, closed = [], []

    def source(name):
        def open_epoch(epoch):
            def gen():
                started.append(name)
                try:
                    yield from rows(name, 4)
                finally:
                    closed.append(name)
            return gen()
        return open_epoch

    s = MixedStream({"a": source("a"), "b": source("b"), "c": source("c")}, {"a": 1, "b": 1, "c": 1})
    first = s.next()
    assert sorted(started) == ["a", "b", "c"] and first["id"] == "a0"
    assert [s.next()["id"] for _ in range(5)] == ["b0", "c0", "a1", "b1", "c1"]
    s.close()
    assert sorted(closed) == ["a", "b", "c"]
