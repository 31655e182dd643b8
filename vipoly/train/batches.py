"""The training batches of one worker: the mixed data stream (vipoly.data) → one padded forward
batch holding the queries then the positives, plus task ids and scores.

`StreamFactory` is what the driver hands to every Ray Train worker (it pickles: only the config
travels); each worker calls it with its rank to open its own shard of every source.
"""
from __future__ import annotations

from vipoly.config import Config, TrainConfig
from vipoly.data.collate import ENCODED_KEYS, collate_pairs, load_builder
from vipoly.data.stream import build_stream, resolve_sources, worker_rows

__all__ = ["StreamFactory", "TrainStream", "resolve_sources"]


class TrainStream:
    def __init__(self, cfg: Config, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        import ray.data  # ray

        ray.data.DataContext.get_current().enable_progress_bars = False  # ray: workers log the console line instead
        self.model_dir = cfg.model.backbone
        self.builder = load_builder(self.model_dir)
        self.files = resolve_sources(cfg.data)
        self.stream = build_stream(cfg.data, self.model_dir, rank=rank, world=world, seed=cfg.train.seed)

    # -- sizes
    def steps_per_epoch(self, tcfg: TrainConfig) -> int:
        """Optimizer steps for one pass over this worker's rows of every source."""
        rows = sum(worker_rows(fs, self.rank, self.world) for fs in self.files.values())
        return max(1, rows // (tcfg.batch_size * tcfg.grad_accum))

    def total_steps(self, tcfg: TrainConfig) -> int:
        if tcfg.max_steps >= 0:
            return tcfg.max_steps
        per_epoch = tcfg.steps_per_epoch or self.steps_per_epoch(tcfg)
        return per_epoch * tcfg.epochs

    # -- batches
    def next_batch(self) -> dict:
        rows = [self.stream.next() for _ in range(self.cfg.train.batch_size)]
        batch = collate_pairs(rows, self.builder)
        # Queries and positives go through the model in ONE forward pass: DDP sees one graph per
        # step, and the backbone runs one larger batch instead of two.
        both = [{k: r[f"{s}_{k}"] for k in ENCODED_KEYS if f"{s}_{k}" in r} for s in ("q", "p") for r in rows]
        batch["inputs"] = self.builder.pack(both) if self.cfg.train.packed_sequences else self.builder.pad(both)
        return batch

    # -- position
    def state_dict(self) -> dict:
        return self.stream.state()

    def load_state_dict(self, state: dict) -> None:
        self.stream.close()
        self.stream = build_stream(self.cfg.data, self.model_dir, rank=self.rank, world=self.world,
                                   seed=self.cfg.train.seed, position=state)

    def counts(self) -> dict:
        p = self.stream.position
        return {"task": dict(p.per_task), "lang": dict(p.per_lang)}


class StreamFactory:
    def __init__(self, cfg: Config):
        self.cfg = cfg.to_dict()

    def __call__(self, rank: int, world: int) -> TrainStream:
        return TrainStream(Config.model_validate(self.cfg), rank, world)
