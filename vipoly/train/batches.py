"""The training batches of one worker: its share of the global sample order (vipoly.data.plan,
vipoly.data.stream) → one padded (or packed) forward batch holding the queries then the positives,
plus task ids and scores.

Each worker opens its `TrainStream` through the `StreamFactory` the driver hands it
(vipoly.train.launch).
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np

from vipoly.config import Config
from vipoly.train.config import TrainConfig
from vipoly.data.collate import hard_negatives, load_builder, pad_sides, pair_labels, sides
from vipoly.data.pretokenized import default_cache, encoded_files
from vipoly.data.shards import QUARANTINE
from vipoly.data.stream import PlannedStream
from vipoly.model.inputs import inputs_dir

__all__ = ["Prefetcher", "TrainStream"]


class Prefetcher:
    """Makes items with `make()` in a background thread, `depth` ahead of the consumer, so that
    reading, mixing and collating the next batches overlap the model's step (torch releases the
    GIL while it computes). Errors in the thread reach the consumer at the item that failed."""

    def __init__(self, make, depth: int):
        self._make, self._queue = make, queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vipoly-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = (self._make(), None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                item = (None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return

    def get(self):
        item, error = self._queue.get()
        if error is not None:
            raise error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def decode_in_tasks(cfg: Config) -> bool:
    """`data.decode_in_tasks`, where unset: in Ray tasks when the workers have GPUs to overlap."""
    return cfg.data.decode_in_tasks if cfg.data.decode_in_tasks is not None else cfg.train.resources.use_gpu


class TrainStream:
    """One worker's batches: `next_batch()`, with the data position of the last batch handed out
    (`state_dict`, for checkpoints; the same for every number of workers) and the step plan
    (`total_steps`, `steps_per_epoch`), which comes from the driver's `Plan` and so is the same
    on every rank.

    With `data.prefetch_batches` > 0 the batches are made in a background thread; each carries the
    position after it, so a checkpoint records what the model has seen, not what was prefetched."""

    def __init__(self, cfg: Config, plan, rank: int, world: int):
        self.cfg, self.plan, self.rank, self.world = cfg, plan, rank, world
        self.inputs_dir = inputs_dir(cfg)
        self.builder = load_builder(self.inputs_dir)
        cache = default_cache(cfg.data)
        self.encoded = {name: encoded_files(index.files, cache, self.inputs_dir) if cache else None
                        for name, index in plan.sources.items()}
        self._open(None)

    def _open(self, position: dict | None) -> None:
        self.stream = PlannedStream(self.plan, self.rank, self.world, self.inputs_dir, state=position,
                                    encoded=self.encoded, read_ahead=self.cfg.data.read_ahead,
                                    quarantine=Path(self.cfg.run.dir) / QUARANTINE,
                                    decode_in_tasks=decode_in_tasks(self.cfg),
                                    decode_task_cpus=self.cfg.data.decode_task_cpus)
        self._state = self.stream.state()
        depth = self.cfg.data.prefetch_batches
        self._prefetch = Prefetcher(self._make_batch, depth) if depth else None

    # -- sizes: from the plan, identical on every rank
    def steps_per_epoch(self, tcfg: TrainConfig) -> int:
        """Optimizer steps in one epoch: floor(Σ rows of the mixed sources / G), unless set."""
        return tcfg.steps_per_epoch or self.plan.steps_per_epoch()

    def total_steps(self, tcfg: TrainConfig) -> int:
        if tcfg.max_steps >= 0:
            return tcfg.max_steps
        return self.steps_per_epoch(tcfg) * tcfg.epochs

    # -- batches
    def _make_batch(self) -> tuple[dict, dict]:
        rows, position = self.stream.next_chunk()
        batch = pair_labels(rows)
        negs, owners = [], []
        if self.cfg.data.negatives:
            found = hard_negatives(rows, self.cfg.data.negatives, self.inputs_dir)
            negs, owners = found.pop("input_ids"), found["neg_owner"].tolist()
            batch.update(found)
        size = self.cfg.train.gradcache_chunk
        if size:  # GradCache: (inputs, rows, negatives) of each chunk of `size` rows, in order
            batch["chunks"] = []
            for lo in range(0, len(rows), size):
                part = rows[lo:lo + size]
                mine = [x for x, o in zip(negs, owners) if lo <= o < lo + size]  # owners ascend
                batch["chunks"].append((self._inputs(part, mine), len(part), len(mine)))
        else:
            batch["inputs"] = self._inputs(rows, negs)
        batch["bad_rows"] = self.stream.bad_rows
        batch["bytes_read"] = self.stream.bytes_read
        return batch, position

    def _inputs(self, rows: list, negs: list) -> dict:
        """Queries, positives, then hard negatives in ONE forward batch (padded or packed): DDP
        sees one graph per step, and the backbone runs one larger batch instead of two."""
        if self.cfg.train.packed_sequences:
            return self.builder.pack(sides(rows) + [{"input_ids": x, "mm_token_type_ids": np.zeros(len(x), np.int8)}
                                                    for x in negs])
        return pad_sides(rows, self.builder, extra=negs)

    def next_batch(self) -> dict:
        batch, self._state = self._prefetch.get() if self._prefetch else self._make_batch()
        return batch

    # -- position
    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self._open(state)

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()  # first: the thread is the only user of the stream
        self.stream.close()
