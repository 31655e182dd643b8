"""One worker's share of the global sample order, as encoded rows, chunk after chunk.

    plan = build_plan(cfg)                                   # the driver: footers only
    stream = PlannedStream(plan, rank, world, inputs_dir)     # each worker
    rows, position = stream.next_chunk()                     # its C/W rows of the next chunk

Per chunk (`vipoly.data.plan` defines chunks, lanes and the order):
    select    the plan says which lane sample sits at each of this worker's positions; each lane's
              cursor finds the rows in the window it holds, reading only its own slice of the
              source (`vipoly.data.reader`); chunks are selected GROUP_SAMPLES samples at a time;
    encode    rows with images are decoded and run through the image processor after the
              selection, in Ray tasks (`tokenize_rows`, `data.read_ahead` chunks in flight, so
              decoding overlaps the step), or in this process (`decode_in_tasks=False`, what a CPU
              run does: see `data.decode_in_tasks`); text rows are tokenised when their lane reads its
              window, in one batched call (≈ 0.15 ms a row in this process: a Ray task per chunk
              would cost more than the work); sources with pre-encoded copies
              (`python -m pipelines.pretokenize`) are read from the copies and not encoded at all;
    repair    a row that fails to decode is skipped, counted (`bad_rows`), written with its id and
              reason to the quarantine file, and its slot filled by the next replacement row of the
              same lane and source (from the end of the lane's slice), so the ratio holds;
    order     the rows go back into position order (`BlockRow` handles over the windows' blocks).

Why not a Ray Data pipeline per source, as before: Ray Data has no resumable state and hands
blocks to whichever reader asks, so every worker read every file and kept its rows by a hash of
the id, shuffled encoded patches (≈ 4.8 MB a 448² image) in its buffer, and counted its own steps.
Here the selection happens on indices first and only the chosen raw rows are read and decoded.
"""
from __future__ import annotations

import itertools
import json
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vipoly.config import Config
from vipoly.data.config import DataConfig
from vipoly.data.tokenize import tokenize_rows, has_images
from vipoly.data.blocks import BlockRow, EncodedBlock
from vipoly.data.plan import Plan, PlanState, SourceIndex
from vipoly.data.reader import LaneCursor
from vipoly.data.shards import shard_files, task_sources


def resolve_sources(data: DataConfig) -> dict[str, list[str]]:
    """{source name: Parquet files} for every name in `data.mix`: a named source from
    `data.sources`, else a task folder of `data.root`. Raises naming what is missing."""
    found: dict[str, list[str]] = {}
    prepared = task_sources(data.root) if data.root else {}
    for name in data.mix:
        if name in data.sources:
            found[name] = shard_files(data.sources[name])
        elif name in prepared:
            found[name] = prepared[name]
        elif data.mix[name] > 0:
            where = f"data.root={data.root!r} has tasks {sorted(prepared)}" if data.root else "data.root is not set"
            raise ValueError(f"data.mix names {name!r}, which is neither in data.sources nor a task folder ({where})")
    return found


def global_batch(cfg: Config) -> int:
    """G: `train.global_batch_size`, or batch_size × grad_accum × num_workers when unset."""
    t = cfg.train
    return t.global_batch_size or t.batch_size * t.grad_accum * t.num_workers


def build_plan(cfg: Config) -> Plan:
    """The run's global order from the sources' footers (what the driver hands to the workers)."""
    files = resolve_sources(cfg.data)
    used = {name: fs for name, fs in files.items() if cfg.data.mix.get(name, 0) > 0}
    sources = {name: SourceIndex.from_footers(name, fs) for name, fs in used.items()}
    return Plan(sources, cfg.data.mix, global_batch=global_batch(cfg), grad_accum=cfg.train.grad_accum,
                partitions=cfg.data.partitions, shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed)


GROUP_SAMPLES = 512
"""Samples a worker selects at once: the plan draws several chunks in one call
(`Plan.advance_many`) and a lane finds its rows of them in one call, so the work per sample is one
handle; selecting chunk by chunk (a call per lane per chunk, an object per
address) cost more per sample than reading the rows. Rows with images are still submitted to
their Ray tasks chunk by chunk."""


class _Chunk:
    """A selected chunk on its way, and the plan state after it:
    - `ready`: the encoded rows at each of the worker's positions (None where still to come);
    - `bad`: rows to replace (source, lane, j, position, id, reason);
    - `raw`: rows with images (source, raw table, rows, positions, [(lane, j)]) until submitted,
      then `pending` (source, ObjectRef or raw table, positions, [(lane, j)])."""

    def __init__(self, state: dict[str, Any]):
        self.state = state
        self.ready: list[BlockRow | None] = []  # its slice of the group's rows, set by `_select_group`
        self.bad: list[tuple[int, int, int, int, str, str]] = []
        self.raw: list[tuple[int, pa.Table, np.ndarray, np.ndarray, list]] = []
        self.pending: list[tuple[int, Any, list[int], list]] = []


class PlannedStream:
    """Worker `rank` of `world`'s rows of the global order; see the module docstring.

    `state`: a `PlanState` dict to continue from (from any number of workers). `encoded`: {source:
    its pre-encoded copies, same rows in the same order} for the sources that have them.
    `quarantine`: the JSON-lines file bad rows are written to. `group_samples`: see GROUP_SAMPLES."""

    def __init__(self, plan: Plan, rank: int, world: int, inputs_dir: str | Path, *, state: dict | None = None,
                 encoded: dict[str, list[str] | None] | None = None, read_ahead: int = 2,
                 quarantine: str | Path | None = None, decode_task_cpus: float = 1.0,
                 group_samples: int = GROUP_SAMPLES, decode_in_tasks: bool = True):
        plan.check_workers(world)
        self.plan, self.rank, self.world, self.inputs_dir = plan, rank, world, str(inputs_dir)
        self.positions = plan.positions(rank, world)
        self.selection = PlanState.from_dict(state) if state else plan.fresh_state()
        for name in plan.names:
            if name not in self.selection.front:
                raise ValueError(f"the saved data position has no source {name!r}: data.mix changed since it was saved")
        self.back = {name: dict(self.selection.back.get(name, {})) for name in plan.names}
        self.files = {name: (encoded or {}).get(name) or plan.sources[name].files for name in plan.names}
        self.is_encoded = {name: bool((encoded or {}).get(name)) for name in plan.names}
        self.read_ahead = max(1, read_ahead)
        self.quarantine = Path(quarantine) if quarantine else None
        self.counter = [0]
        mine = {str(p) for p in plan.lane_of[self.positions.start:self.positions.stop].tolist()}
        # bad rows so far = replacements made by this worker's lanes (saved with the position, so
        # the count survives a resume, on any number of workers)
        self.bad_rows = sum(r for lanes in self.back.values() for p, r in lanes.items() if p in mine)
        self._cursors: dict[tuple[int, int], LaneCursor] = {}
        self._inflight: deque[_Chunk] = deque()
        self._position = self.selection.to_dict()
        self._remote = None
        self._decode_task_cpus = decode_task_cpus
        self._decode_in_tasks = decode_in_tasks
        self._group = max(1, group_samples // len(self.positions))  # chunks selected at once

    @property
    def bytes_read(self) -> int:
        """Bytes this worker has read from Parquet files (footers excepted)."""
        return self.counter[0]

    def state(self) -> dict[str, Any]:
        """The position after the last chunk handed out (JSON-able, the same for every W)."""
        return self._position

    # -- select
    def _cursor(self, s: int, lane: int) -> LaneCursor:
        key = (s, lane)
        if key not in self._cursors:
            name = self.plan.names[s]
            self._cursors[key] = LaneCursor(self.plan, name, lane, self.files[name], self.counter,
                                            encoded=self.is_encoded[name], inputs_dir=self.inputs_dir)
        return self._cursors[key]

    def _select_group(self) -> list[_Chunk]:
        """The next GROUP_SAMPLES samples' worth of chunks, selected at once (see GROUP_SAMPLES)."""
        per, base = len(self.positions), self.positions.start
        picks, states = self.plan.advance_many(self.selection, self.positions, self._group)
        chunks = [_Chunk(state) for state in states]
        ready: list[BlockRow | None] = [None] * (len(chunks) * per)  # by slot, cut into the chunks at the end
        source, lane, js = (x.reshape(-1) for x in picks)  # slot = chunk · per + position − base
        key = source * self.plan.partitions + lane
        order = np.argsort(key, kind="stable")  # by (source, lane); within one, slots and js ascend
        for slots in np.split(order, np.flatnonzero(np.diff(key[order])) + 1):
            s, p = int(source[slots[0]]), int(lane[slots[0]])
            parts, bad = self._cursor(s, p).take(js[slots])
            for which, rows, at, raw in parts:
                if not raw:
                    for slot, i in zip(slots[which].tolist(), at.tolist()):
                        ready[slot] = BlockRow(rows, i)
                    continue
                chunk_of = slots[which] // per
                for c in np.unique(chunk_of):  # rows with images: kept raw, per chunk
                    mask = chunk_of == c
                    mine = slots[which[mask]]
                    chunks[c].raw.append((s, rows, at[mask], mine % per + base, [(p, int(j)) for j in js[mine]]))
            for k, row in bad:
                slot = int(slots[k])
                chunks[slot // per].bad.append((s, p, int(js[slot]), base + slot % per, row.id, row.reason))
        for c, chunk in enumerate(chunks):
            chunk.ready = ready[c * per:(c + 1) * per]
        return chunks

    def _submit_raw(self, chunk: _Chunk) -> None:
        """Start encoding a chunk's rows with images: one job per source."""
        by_source: dict[int, list] = {}
        for s, table, rows, positions, addresses in chunk.raw:
            by_source.setdefault(s, []).append((table.take(rows), positions, addresses))
        for s, parts in by_source.items():
            table = pa.concat_tables([t for t, _, _ in parts], promote_options="permissive") \
                if len(parts) > 1 else parts[0][0]
            chunk.pending.append((s, self._submit(table), [int(x) for _, pos, _ in parts for x in pos],
                                  [a for _, _, addrs in parts for a in addrs]))
        chunk.raw = []

    def _submit(self, table: pa.Table):
        """A Ray task for rows with images (decoding overlaps the step); text stays here."""
        import ray  # ray

        if not (self._decode_in_tasks and has_images(table) and ray.is_initialized()):
            return table  # decoded in this process when the chunk is finished
        if self._remote is None:
            # ray: "DEFAULT" schedules outside the Train/Tune worker's placement group, whose bundle
            # holds the worker's own CPUs; decoding uses the node's others (as Ray Data's tasks did).
            self._remote = ray.remote(num_cpus=self._decode_task_cpus, scheduling_strategy="DEFAULT")(tokenize_rows)
        return self._remote.remote(table, self.inputs_dir)  # ray

    # -- encode, repair, order
    def _finish(self, chunk: _Chunk) -> list:
        """The chunk's rows in position order, once its encodings are done and bad rows replaced."""
        if not chunk.bad and not chunk.pending:
            return chunk.ready
        base = self.positions.start
        rows = [(base + k, row) for k, row in enumerate(chunk.ready) if row is not None]
        for s, lane, j, pos, row_id, reason in chunk.bad:  # text rows that failed when their window was read
            rows.append((pos, EncodedBlock(self._repair(s, lane, j, row_id, reason)).rows()[0]))
        for s, job, pos, addrs in chunk.pending:
            if isinstance(job, pa.Table):
                encoded, bad = tokenize_rows(job, self.inputs_dir)
            else:
                import ray  # ray

                encoded, bad = ray.get(job)  # ray
            bad_at = {i for i, _, _ in bad}
            if encoded is not None and encoded.num_rows:
                rows += zip((p for i, p in enumerate(pos) if i not in bad_at), EncodedBlock(encoded).rows())
            for i, row_id, reason in bad:
                lane, j = addrs[i]
                rows.append((pos[i], EncodedBlock(self._repair(s, lane, j, row_id, reason)).rows()[0]))
        rows.sort(key=lambda item: item[0])
        return [row for _, row in rows]

    def _repair(self, s: int, lane: int, j: int, row_id: str, reason: str) -> pa.Table:
        """Quarantine the bad row and return the encoded replacement of its slot."""
        name = self.plan.names[s]
        while True:
            self.bad_rows += 1
            self._quarantine({"id": row_id, "source": name, "lane": lane, "reason": reason})
            r = self.back[name].get(str(lane), 0)
            self.back[name][str(lane)] = r + 1
            raw = self._cursor(s, lane).replacement(j, r)
            encoded, bad = tokenize_rows(raw, self.inputs_dir)
            if not bad:
                return encoded
            _, row_id, reason = bad[0]

    def _quarantine(self, record: dict[str, Any]) -> None:
        if self.quarantine is None:
            return
        self.quarantine.parent.mkdir(parents=True, exist_ok=True)
        with open(self.quarantine, "a", encoding="utf-8") as f:  # one short append per line: workers share it
            f.write(json.dumps({**record, "rank": self.rank}, ensure_ascii=False) + "\n")

    # -- the stream
    def next_chunk(self) -> tuple[list, dict[str, Any]]:
        """This worker's rows of the next chunk (BlockRow handles, in position order) and the
        position after them."""
        while len(self._inflight) <= self.read_ahead:
            self._inflight.extend(self._select_group())
        for chunk in itertools.islice(self._inflight, self.read_ahead + 1):
            if chunk.raw:  # this chunk and the next `read_ahead` decode while this one trains
                self._submit_raw(chunk)
        chunk = self._inflight.popleft()
        rows = self._finish(chunk)
        back = {name: dict(lanes) for name, lanes in self.back.items() if lanes}
        self._position = {**chunk.state, "back": back}
        return rows, self._position

    def close(self) -> None:
        self._inflight.clear()
        for cursor in self._cursors.values():
            cursor.close()
        self._cursors.clear()

    def __enter__(self) -> "PlannedStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
