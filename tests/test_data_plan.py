"""The global sample order (vipoly.data.plan) on indices alone: lanes, passes, workers, resume."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vipoly.data.mix import integer_weights
from vipoly.data.plan import Plan, PlanError, PlanState, SourceIndex

# Row groups of unequal sizes over several files, as real shards have them.
SOURCES = {
    "a": SourceIndex("a", ["a0", "a1"], [[50, 50, 13], [64, 7]]),
    "b": SourceIndex("b", ["b0"], [[40, 40, 3]]),
    "c": SourceIndex("c", ["c0", "c1", "c2"], [[30], [31], [29, 1]]),
}
WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}


def plan(**kw) -> Plan:
    args = dict(global_batch=24, grad_accum=2, partitions=12, shuffle_buffer=20, seed=5)
    return Plan(SOURCES, WEIGHTS, **{**args, **kw})


def global_samples(p: Plan, chunks: int, world: int, state: PlanState | None = None) -> list[list[tuple]]:
    """Per chunk, the (source, lane, j) of every position, gathered over `world` workers in rank order."""
    states = [PlanState.from_dict((state or p.fresh_state()).to_dict()) for _ in range(world)]
    out = []
    for _ in range(chunks):
        chunk = []
        for r in range(world):
            chunk += [(a.source, a.lane, a.j) for a in p.advance(states[r], p.positions(r, world))]
        out.append(chunk)
    assert all(s.to_dict() == states[0].to_dict() for s in states)  # every worker holds the same position
    return out


def rows_of(p: Plan, name: str, lane: int, j: int) -> tuple[int, int]:
    """(file, row) of a lane's j-th sample, as the cursor reads it."""
    epoch, x = p.lane_epoch(name, lane, j)
    k, first, n = p.block_of(name, lane, x)
    at = first + int(p.window_order(name, lane, epoch, first, n)[x - first])
    seg = p.block_segments(name, lane, epoch, at, 1)[0]
    return seg.file, seg.start


def test_same_samples_at_every_step_for_every_allowed_world():
    p = plan()
    assert p.allowed_workers() == [1, 2, 3, 4, 6, 12]
    one = global_samples(p, 30, 1)
    for world in (2, 3, 4, 6, 12):
        assert global_samples(p, 30, world) == one, world


def test_chunks_follow_the_exact_ratio():
    p = plan()
    a = integer_weights(WEIGHTS)
    share = {s: a[s] / sum(a.values()) for s in a}
    counts = Counter()
    for q, chunk in enumerate(global_samples(p, 50, 1), 1):
        counts.update(p.names[s] for s, _, _ in chunk)
        for s in share:  # the scheduler's prefix bound at every chunk boundary
            assert abs(counts[s] - q * p.chunk * share[s]) < 1


def test_each_pass_of_the_lanes_covers_the_source_once():
    p = plan()
    for name in p.names:
        for epoch in (0, 1):
            seen = []
            for lane in p.lanes:
                n = p.lane_rows(name, lane)
                seen += [rows_of(p, name, lane, epoch * n + j) for j in range(n)]
            assert len(seen) == len(set(seen)) == SOURCES[name].num_rows, (name, epoch)


def test_passes_reshuffle_and_slices_follow_lane_widths():
    p = plan()
    lane = p.lanes[1]
    n = p.lane_rows("a", lane)
    first = [rows_of(p, "a", lane, j) for j in range(n)]
    second = [rows_of(p, "a", lane, n + j) for j in range(n)]
    assert first != second  # another row-group order and block order each pass
    widths = np.array([p.width[q] for q in p.lanes])
    sizes = np.array([p.lane_rows("a", q) for q in p.lanes])
    assert np.abs(sizes - SOURCES["a"].num_rows * widths / p.chunk).max() < 1
    unshuffled = plan(shuffle_buffer=0)
    assert [rows_of(unshuffled, "b", 0, j) for j in range(3)] == [(0, 0), (0, 1), (0, 2)]  # file order


def test_resume_from_a_saved_state_on_another_world():
    p = plan()
    straight = global_samples(p, 20, 4)
    state = p.fresh_state()
    for _ in range(7):
        p.advance(state)
    saved = PlanState.from_dict(state.to_dict())  # through JSON-able values
    assert global_samples(p, 13, 2, saved) == straight[7:]


def test_refusals_name_the_fix():
    p = plan()
    with pytest.raises(PlanError, match=r"train.num_workers=5 .*allowed: \[1, 2, 3, 4, 6, 12\]"):
        p.check_workers(5)
    with pytest.raises(PlanError, match="'b' has 83 rows, too few .*150 lanes"):
        Plan(SOURCES, WEIGHTS, global_batch=150, partitions=150)
    with pytest.raises(PlanError, match="not a multiple of train.grad_accum"):
        Plan(SOURCES, WEIGHTS, global_batch=25, grad_accum=2)


def test_merge_takes_each_workers_lanes():
    a = {"chunk": 3, "taken": {"x": 3}, "front": {"x": [1, 2]}, "back": {"x": {"0": 1}}}
    b = {**a, "back": {"x": {"1": 2}}}
    assert PlanState.merge([a, b]).back == {"x": {"0": 1, "1": 2}}
    with pytest.raises(PlanError, match="disagree"):
        PlanState.merge([a, {**a, "chunk": 4}])


def test_an_11m_row_index_plans_in_memory():
    """The reference corpus' shape: 11M rows in 100k-row files of 1024-row groups, 64 lanes."""
    sizes = {"text_pair": 5_600_000, "instr": 600_000, "ocr": 2_500_000, "vqa_single": 1_250_000,
             "vqa_multi": 1_250_000}
    index = {k: SourceIndex(k, [f"{k}{i}" for i in range(-(-n // 100_000))],
                            [[1024] * 97 + [672]] * (n // 100_000) + ([[n % 100_000]] if n % 100_000 else []))
             for k, n in sizes.items()}
    p = Plan(index, {"text_pair": 0.5, "instr": 0.055, "ocr": 0.225, "vqa_single": 0.11, "vqa_multi": 0.11},
             global_batch=480, grad_accum=10, partitions=64, shuffle_buffer=10_000)
    assert p.num_rows == 11_200_000 and p.steps_per_epoch() == 23_333
    assert p.allowed_workers() == [1, 2, 4, 8, 16]
    state = p.fresh_state()
    for _ in range(10):
        p.advance(state, p.positions(1, 4))
    assert sum(state.taken.values()) == 480
    assert rows_of(p, "ocr", p.lanes[7], 123_456)[0] < len(index["ocr"].files)


def test_the_cached_scheduler_period_equals_running_the_scheduler(monkeypatch):
    import vipoly.data.plan as plan_module

    fast = global_samples(plan(), 40, 2)
    monkeypatch.setattr(plan_module, "PERIOD_LIMIT", 1)  # every chunk runs the scheduler itself
    assert global_samples(plan(), 40, 2) == fast


@pytest.mark.parametrize("period_limit", [None, 1])  # the cached period, then the scheduler itself
def test_advancing_many_chunks_at_once_equals_one_at_a_time(monkeypatch, period_limit):
    """`advance_many` (what a worker's stream calls) gives each chunk's samples and the state after
    it exactly as `advance_arrays` chunk by chunk, for every worker of every allowed world."""
    import vipoly.data.plan as plan_module

    if period_limit is not None:
        monkeypatch.setattr(plan_module, "PERIOD_LIMIT", period_limit)
    p = plan()
    for world in (1, 3, 12):
        for rank in range(world):
            positions = p.positions(rank, world)
            one, many = p.fresh_state(), p.fresh_state()
            for k in (1, 7, 16, 3):  # groups of several sizes, one after another (crossing passes)
                picked, states = [], []
                for _ in range(k):
                    picked.append(p.advance_arrays(one, positions))
                    states.append({**one.to_dict(), "back": {}})
                arrays, got_states = p.advance_many(many, positions, k)
                for got, want in zip(arrays, zip(*picked)):
                    assert got.shape == (k, len(positions))
                    np.testing.assert_array_equal(got, np.stack(want))
                assert got_states == states
                assert many.to_dict() == one.to_dict()
    with pytest.raises(ValueError, match="k must be at least 1"):
        p.advance_many(p.fresh_state(), p.positions(0, 1), 0)


def test_the_global_order_is_the_one_saved_checkpoints_expect():
    """A checkpoint holds a position in the global order, not the order itself: a run resumed under
    a newer vipoly continues correctly only if the order (data, seed) → samples never changes. The
    digest is of the order as vipoly computed it at db0098a, chunk by chunk."""
    import hashlib

    digest = hashlib.sha256()
    for chunk in global_samples(plan(), 40, 1):
        digest.update("".join(f"{s},{lane},{j};" for s, lane, j in chunk).encode())
    assert digest.hexdigest()[:16] == "345c4cab962fe967"
