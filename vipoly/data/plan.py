"""The global sample order of a training run: which row of which source each sample is, as a
function of (data, seed) alone, laid out so that any number of workers dividing
`data.partitions` trains on the same samples at every step while each reads only its own rows.
The model is MosaicML Streaming's "elastic determinism"; the exact-ratio mix is ours.

Terms (`Plan` computes all of them from the Parquet footers; no data is read):
- G = `train.global_batch_size`, samples per optimizer step. A step is `grad_accum` *chunks* of
  C = G / grad_accum samples; a chunk is one contrastive batch (InfoNCE's negatives come from all
  of it, gathered across workers), so it must be the same set whatever the number of workers.
  Chunk q = step·grad_accum + m; global sample n = q·C + i, i its *position* in the chunk.
- Lanes: position i belongs to lane ⌊i·L/C⌋, L = `data.partitions`. Worker r of W owns the
  positions [r·C/W, (r+1)·C/W): whole lanes when W divides both L and C (`allowed_workers`).
- Sources of a chunk: the exact-ratio scheduler (`vipoly.data.mix.RatioScheduler`) says how many
  samples each source gives (|k_s(n) − n·p_s| < 1 at every chunk boundary), and a permutation
  seeded by (seed, q) spreads them over the chunk's positions, so every lane draws each source
  at the source's share of its positions.
- Rows: a pass over a source (a *lane epoch*) lays the source's row groups out in an order seeded
  by (seed, source, epoch), and gives lane p the contiguous slice [N·P_p/C, N·P_{p+1}/C) of it,
  P_p the lane's first position: slices sized by the lane's share of positions, so the lanes of a
  source finish their passes together and the rows of a worker's lanes are one contiguous stretch.
  A lane hands its slice out in blocks of b_p = ⌈shuffle_buffer·c_p/C⌉ rows (c_p the lane's
  positions), each block in a seeded random order: all lanes of a source hold about
  `shuffle_buffer` rows at once, a worker its 1/W share, as raw rows (JPEG bytes), never patches.
- Position (`PlanState`): the next chunk, samples taken per source (the scheduler's state) and,
  per source and lane, the samples the lane has handed out (`front`) and the bad rows it has
  replaced (`back`: a row that fails to decode is replaced by a row from the end of its lane's
  slice). Nothing in it depends on the number of workers, so a run resumes on another W.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from vipoly.data.mix import RatioScheduler, integer_weights


PERIOD_LIMIT = 1 << 20  # mixes whose scheduler period is longer run the scheduler chunk by chunk


class PlanError(ValueError):
    """The data or the batch layout cannot make the global order; the message says which key."""


# ---------------------------------------------------------------- the index (footers only)
@dataclass
class SourceIndex:
    """One source's files and the rows of each of their row groups, read from the footers."""

    name: str
    files: list[str]
    groups: list[list[int]]
    """groups[f][g]: rows of row group g of file f."""

    @property
    def num_rows(self) -> int:
        return sum(sum(g) for g in self.groups)

    @classmethod
    def from_footers(cls, name: str, files: list[str]) -> "SourceIndex":
        from vipoly.data.reader import footer

        if not files:
            raise PlanError(f"source {name!r} has no Parquet files")
        groups = []
        for f in files:
            meta = footer(f)
            if meta.num_rows == 0:
                raise PlanError(f"source {name!r}: {f} has no rows (an empty Parquet file); remove it or "
                                f"re-run pipelines.prepare")
            groups.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        return cls(name, list(files), groups)

    def units(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file index, first row in the file, rows) of every row group, in file order."""
        f = np.concatenate([np.full(len(g), i) for i, g in enumerate(self.groups)])
        rows = np.concatenate([np.asarray(g, dtype=np.int64) for g in self.groups])
        starts = np.concatenate([np.cumsum([0] + g[:-1]) for g in self.groups]).astype(np.int64)
        return f, starts, rows


_M1, _M2, _MASK = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), 2**64 - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters neighbouring inputs."""
    x = np.array(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def _key(*parts: int) -> np.uint64:
    """A 64-bit key from small integers (seed, source, epoch, …): splitmix64 on Python ints (a
    numpy scalar per step costs more than the arithmetic)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        x = (h ^ part) & _MASK
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
        h = x ^ (x >> 31)
    return np.uint64(h)


def hashed_order(key: np.uint64, ids: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """A seeded random order of `ids` (within each of `groups`, groups kept in order): sorting by a
    hash of (key, id) costs one vectorised sort, where a seeded generator per block cost ~0.1 ms to
    create, and the order of an id does not depend on which other ids are sorted with it."""
    h = _mix(np.asarray(ids, dtype=np.uint64) ^ key)
    return np.argsort(h, kind="stable") if groups is None else np.lexsort((h, groups))


def _source_key(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode("utf-8"))


@dataclass
class Segment:
    """Rows [start, stop) of file `file` of a source."""

    file: int
    start: int
    stop: int


class EpochOrder:
    """The rows of one pass over a source: its row groups in a seeded order (file order when not
    shuffled), concatenated; `segments(a, b)` maps rows [a, b) of the pass to file ranges."""

    def __init__(self, index: SourceIndex, seed: int, epoch: int, shuffle: bool):
        f, starts, rows = index.units()
        units = np.arange(len(rows))
        order = hashed_order(_key(seed, _source_key(index.name), epoch, 1), units) if shuffle else units
        self.file, self.start, self.rows = f[order], starts[order], rows[order]
        self.offset = np.concatenate([[0], np.cumsum(self.rows)])

    def segments(self, a: int, b: int) -> list[Segment]:
        out = []
        u = int(np.searchsorted(self.offset, a, side="right")) - 1
        while a < b:
            lo = a - int(self.offset[u])
            take = min(b - a, int(self.rows[u]) - lo)
            first = int(self.start[u]) + lo
            prev = out[-1] if out else None
            if prev is not None and prev.file == int(self.file[u]) and prev.stop == first:
                prev.stop += take  # neighbouring row groups of one file: one read
            else:
                out.append(Segment(int(self.file[u]), first, first + take))
            a += take
            u += 1
        return out


# ---------------------------------------------------------------- the plan
@dataclass
class PlanState:
    """Where the global order stands; JSON-able, the same on every worker and for every W."""

    chunk: int = 0
    taken: dict[str, int] = field(default_factory=dict)
    front: dict[str, list[int]] = field(default_factory=dict)
    """front[source][lane]: samples the lane has handed out (over all its passes)."""
    back: dict[str, dict[str, int]] = field(default_factory=dict)
    """back[source][lane]: bad rows the lane has replaced so far (lane as a string: JSON keys)."""

    def to_dict(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "taken": dict(self.taken), "front": {k: list(v) for k, v in self.front.items()},
                "back": {k: dict(v) for k, v in self.back.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PlanState":
        return cls(int(d.get("chunk", 0)), {k: int(v) for k, v in d.get("taken", {}).items()},
                   {k: [int(x) for x in v] for k, v in d.get("front", {}).items()},
                   {k: {str(p): int(r) for p, r in v.items()} for k, v in d.get("back", {}).items()})

    @classmethod
    def merge(cls, states: list[dict[str, Any]]) -> "PlanState":
        """One state from the workers' saved ones: chunk, taken and front are the same in each;
        each worker holds the `back` counters of its own lanes."""
        if not states:
            raise PlanError("the checkpoint holds no data position (rank-<r>.json): it is incomplete, or older than "
                            "the global sample order; resume from another checkpoint or start a new run.dir")
        first = cls.from_dict(states[0])
        for other in map(cls.from_dict, states[1:]):
            if (other.chunk, other.taken, other.front) != (first.chunk, first.taken, first.front):
                raise PlanError("the workers' saved data positions disagree: the checkpoint is inconsistent")
            for s, lanes in other.back.items():
                for p, r in lanes.items():
                    mine = first.back.setdefault(s, {})
                    mine[p] = max(mine.get(p, 0), r)
        return first


@dataclass(frozen=True)
class Address:
    """One sample: source index, lane, and the lane's sample number (over all its passes)."""

    source: int
    lane: int
    j: int


class Plan:
    """The global order of a run (see the module docstring). Picklable: the driver builds it from
    the footers once and hands it to every worker."""

    def __init__(self, sources: dict[str, SourceIndex], weights: dict[str, float], *, global_batch: int,
                 grad_accum: int = 1, partitions: int = 64, shuffle_buffer: int = 0, seed: int = 0):
        if global_batch % grad_accum:
            raise PlanError(f"train.global_batch_size={global_batch} is not a multiple of train.grad_accum={grad_accum}")
        self.weights = {k: w for k, w in weights.items() if w > 0 and k in sources}
        self._integer = integer_weights(self.weights)  # fails on bad weights, by value
        self._period: np.ndarray | None = None
        self.names = list(self.weights)
        self.sources = {k: sources[k] for k in self.names}
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.chunk = global_batch // grad_accum
        self.partitions, self.shuffle_buffer, self.seed = partitions, shuffle_buffer, seed
        C, L = self.chunk, partitions
        self.lane_of = np.arange(C, dtype=np.int64) * L // C  # position → lane
        self.lanes = sorted(set(self.lane_of.tolist()))  # lanes with positions (all when L ≤ C)
        starts = [int(np.searchsorted(self.lane_of, p)) for p in self.lanes] + [C]  # each lane's first position
        self.width = {p: starts[i + 1] - starts[i] for i, p in enumerate(self.lanes)}
        self.block = {p: max(1, math.ceil(shuffle_buffer * self.width[p] / C)) for p in self.lanes}
        self.slices: dict[str, dict[int, tuple[int, int]]] = {}
        for name, index in self.sources.items():
            n = index.num_rows
            cuts = {p: (n * starts[i] // C, n * starts[i + 1] // C) for i, p in enumerate(self.lanes)}
            small = [p for p, (a, b) in cuts.items() if b <= a]
            if small:
                need = math.ceil(C / min(self.width.values()))
                raise PlanError(f"source {name!r} has {n} rows, too few to give each of the {len(self.lanes)} lanes of "
                                f"the global order a row (about {need} needed): lower data.partitions (now {L}) or "
                                f"train.global_batch_size, or add data")
            self.slices[name] = cuts

    # -- sizes
    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.sources.values())

    def steps_per_epoch(self) -> int:
        """floor(Σ rows of the mixed sources / G): one epoch is as many samples as the sources hold."""
        return max(1, self.num_rows // self.global_batch)

    def allowed_workers(self, upto: int = 1024) -> list[int]:
        """The numbers of workers that own whole lanes: divisors of both `data.partitions` and the chunk."""
        return [w for w in range(1, upto + 1) if self.partitions % w == 0 and self.chunk % w == 0]

    def check_workers(self, world: int) -> None:
        if world not in self.allowed_workers():
            raise PlanError(f"train.num_workers={world} cannot continue the global order: the workers must divide "
                            f"data.partitions={self.partitions} and the contrastive batch "
                            f"(train.global_batch_size / train.grad_accum = {self.chunk}); allowed: "
                            f"{self.allowed_workers()}")

    def positions(self, rank: int, world: int) -> range:
        per = self.chunk // world
        return range(rank * per, (rank + 1) * per)

    def lane_rows(self, name: str, lane: int) -> int:
        a, b = self.slices[name][lane]
        return b - a

    def summary(self) -> dict[str, Any]:
        """What a run's plan.json records: a resumed run must find the same."""
        return {"global_batch_size": self.global_batch, "grad_accum": self.grad_accum, "chunk": self.chunk,
                "partitions": self.partitions, "shuffle_buffer": self.shuffle_buffer, "seed": self.seed,
                "weights": self.weights, "rows": {k: s.num_rows for k, s in self.sources.items()},
                "files": {k: len(s.files) for k, s in self.sources.items()},
                "steps_per_epoch": self.steps_per_epoch(), "allowed_workers": self.allowed_workers()}

    # -- the order
    def fresh_state(self) -> PlanState:
        return PlanState(0, {k: 0 for k in self.names}, {k: [0] * self.partitions for k in self.names}, {})

    def _picks(self, step: int, taken: dict[str, int]) -> np.ndarray:
        """The scheduler's next `chunk` picks (source indices). Earliest-deadline-first is periodic:
        after D = Σ integer weights picks every count has grown by its weight and every window by D,
        so one period, computed once, serves every chunk (the state is the one after `step` picks
        from zero, which is all a run ever reaches); a mix whose D is huge runs the scheduler."""
        D = sum(self._integer.values())
        if D > PERIOD_LIMIT:
            scheduler = RatioScheduler(self.weights, dict(taken))
            where = {k: i for i, k in enumerate(self.names)}
            return np.array([where[scheduler.next()] for _ in range(self.chunk)], dtype=np.int64)
        if self._period is None:
            scheduler, where = RatioScheduler(self.weights), {k: i for i, k in enumerate(self.names)}
            self._period = np.array([where[scheduler.next()] for _ in range(D)], dtype=np.int64)
        return self._period[(step + np.arange(self.chunk)) % D]

    def advance(self, state: PlanState, positions: range | None = None) -> list[Address]:
        """Move `state` past its next chunk; return the addresses of `positions` (none when None)."""
        if positions is None:
            self.advance_arrays(state, range(0))
            return []
        source, lane, j = self.advance_arrays(state, positions)
        return [Address(*t) for t in zip(source.tolist(), lane.tolist(), j.tolist())]

    def advance_arrays(self, state: PlanState, positions: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`advance` as arrays over `positions`: (source index, lane, the lane's sample number)."""
        (source, lane, j), _ = self.advance_many(state, positions, 1)
        return source[0], lane[0], j[0]

    def advance_many(self, state: PlanState, positions: range, k: int) -> tuple[tuple[np.ndarray, ...], list[dict]]:
        """Move `state` past its next k chunks: ((source index, lane, the lane's sample number) of
        `positions` in each chunk, each (k, len(positions))), and the state after each chunk
        (`to_dict`, with no `back`). Vectorised over the chunks as well as the positions: a worker
        with 32 positions a chunk spent ~1.6 µs a sample here when chunks were drawn one by one
        (the reference run has 48 positions a chunk, the 11M-row bench thousands)."""
        if k < 1:
            raise ValueError(f"advance_many: k must be at least 1, not {k}")
        C, L, S = self.chunk, self.partitions, len(self.names)
        picks, taken = np.empty((k, C), dtype=np.int64), dict(state.taken)
        drawn = []  # the scheduler's state after each chunk
        for c in range(k):
            picks[c] = self._picks(sum(taken.values()), taken)
            for name, n in zip(self.names, np.bincount(picks[c], minlength=S).tolist()):
                taken[name] += n
            drawn.append(dict(taken))
        # Each chunk is its picks' multiset in a seeded order of its own (the same on every worker).
        keys = np.array([_key(self.seed, q, 2) for q in range(state.chunk, state.chunk + k)], dtype=np.uint64)
        perm = np.argsort(_mix(np.arange(C, dtype=np.uint64)[None, :] ^ keys[:, None]), axis=1, kind="stable")
        labels = np.take_along_axis(np.sort(picks, axis=1), perm, axis=1)  # (k, C)
        lane_keys = (labels * L + self.lane_of[None, :]).reshape(-1)  # one counter per (source, lane)
        order = np.argsort(lane_keys, kind="stable")
        ranked = np.arange(k * C) - np.searchsorted(lane_keys[order], lane_keys[order], side="left")
        before = np.empty(k * C, dtype=np.int64)
        before[order] = ranked  # earlier samples on the same (source, lane), this group's chunks in order
        fronts = np.array([state.front[n] for n in self.names], dtype=np.int64).reshape(-1)
        j = (fronts[lane_keys] + before).reshape(k, C)
        chunk_keys = np.repeat(np.arange(k), C) * (S * L) + lane_keys  # (chunk, source, lane) of each sample
        per_chunk = np.bincount(chunk_keys, minlength=k * S * L).reshape(k, S * L)
        after = (fronts[None, :] + np.cumsum(per_chunk, axis=0)).tolist()  # the fronts after each chunk
        states = [{"chunk": state.chunk + c + 1, "taken": drawn[c],
                   "front": {n: after[c][i * L:(i + 1) * L] for i, n in enumerate(self.names)}, "back": {}}
                  for c in range(k)]
        state.chunk += k
        state.taken = dict(states[-1]["taken"])
        state.front = {n: list(v) for n, v in states[-1]["front"].items()}
        mine = slice(positions.start, positions.stop)
        return (labels[:, mine], np.tile(self.lane_of[mine], (k, 1)), j[:, mine]), states

    # -- rows
    def lane_epoch(self, name: str, lane: int, j: int) -> tuple[int, int]:
        """(lane epoch, index in the lane's slice) of the lane's j-th sample."""
        n = self.lane_rows(name, lane)
        return j // n, j % n

    def block_of(self, name: str, lane: int, x: int) -> tuple[int, int, int]:
        """(block number, first slice index of the block, block rows) of slice index x."""
        b, n = self.block[lane], self.lane_rows(name, lane)
        k = x // b
        return k, k * b, min(b, n - k * b)

    def window_order(self, name: str, lane: int, epoch: int, first: int, rows: int) -> np.ndarray:
        """For the slice rows [first, first + rows) (whole blocks), the row (relative to `first`)
        handed out at each of those slice indices: each block's rows in a seeded random order
        (identity when not shuffled)."""
        x = np.arange(first, first + rows)
        if self.shuffle_buffer <= 1:
            return x - first
        return hashed_order(_key(self.seed, _source_key(name), epoch, lane, 3), x, x // self.block[lane])

    def order(self, name: str, epoch: int) -> EpochOrder:
        return _epoch_order(self, name, epoch)

    def block_segments(self, name: str, lane: int, epoch: int, first: int, rows: int) -> list[Segment]:
        """File ranges of slice rows [first, first + rows) of a lane in a pass."""
        a = self.slices[name][lane][0] + first
        return self.order(name, epoch).segments(a, a + rows)


@lru_cache(maxsize=64)
def _epoch_order(plan: Plan, name: str, epoch: int) -> EpochOrder:
    return EpochOrder(plan.sources[name], plan.seed, epoch, shuffle=plan.shuffle_buffer > 0)
