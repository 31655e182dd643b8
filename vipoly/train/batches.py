"""The training batches of one worker: the mixed data stream (vipoly.data) → one padded forward
batch holding the queries then the positives, plus task ids and scores.

`StreamFactory` is what the driver hands to every Ray Train worker (it pickles: only the config
travels); each worker calls it with its rank to open its own shard of every source.
"""
from __future__ import annotations

import queue
import threading

from vipoly.config import Config, TrainConfig
from vipoly.data.collate import load_builder, pair_labels, sides
from vipoly.data.stream import build_stream, resolve_sources, worker_rows

__all__ = ["StreamFactory", "TrainStream", "inputs_dir", "resolve_sources"]


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


class TrainStream:
    """One worker's batches: `next_batch()`, with the stream position of the last batch handed out
    (`state_dict`, for checkpoints) and the samples counted per task and language (`counts`).

    With `data.prefetch_batches` > 0 the batches are made in a background thread; each carries the
    position after it, so a checkpoint records what the model has seen, not what was prefetched."""

    def __init__(self, cfg: Config, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        import ray.data  # ray

        ray.data.DataContext.get_current().enable_progress_bars = False  # ray: workers log the console line instead
        self.model_dir = inputs_dir(cfg)
        self.builder = load_builder(self.model_dir)
        self.files = resolve_sources(cfg.data)
        self._open(None)

    def _open(self, position: dict | None) -> None:
        self.stream = build_stream(self.cfg.data, self.model_dir, rank=self.rank, world=self.world,
                                   seed=self.cfg.train.seed, position=position)
        self._state = self.stream.state()
        depth = self.cfg.data.prefetch_batches
        self._prefetch = Prefetcher(self._make_batch, depth) if depth else None

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
    def _make_batch(self) -> tuple[dict, dict]:
        rows = [self.stream.next() for _ in range(self.cfg.train.batch_size)]
        batch = pair_labels(rows)
        # Queries and positives go through the model in ONE forward pass: DDP sees one graph per
        # step, and the backbone runs one larger batch instead of two.
        both = sides(rows)
        batch["inputs"] = self.builder.pack(both) if self.cfg.train.packed_sequences else self.builder.pad(both)
        return batch, self.stream.state()

    def next_batch(self) -> dict:
        batch, self._state = self._prefetch.get() if self._prefetch else self._make_batch()
        return batch

    # -- position
    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self._open(state)

    def counts(self) -> dict:
        return {"task": dict(self._state["per_task"]), "lang": dict(self._state["per_lang"])}

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()  # first: the thread is the only user of the stream
        self.stream.close()


def inputs_dir(cfg: Config) -> str:
    """Where the data workers find the model's tokenizer and image processor: the backbone itself
    when it is a PolyEmbedder folder, else `<run.dir>/inputs` (`pipelines.train` writes it with
    `vipoly.model.inputs.save_inputs` before training starts)."""
    from pathlib import Path

    return str(Path(cfg.model.backbone) if _is_polyembedder(cfg) else Path(cfg.run.dir) / "inputs")


def _is_polyembedder(cfg: Config) -> bool:
    """Whether the backbone is a PolyEmbedder folder (vipoly.json), not a plain Qwen2-VL checkpoint."""
    from pathlib import Path

    from vipoly.data.encode import META_FILE

    return (Path(cfg.model.backbone) / META_FILE).is_file()


def write_inputs(cfg: Config) -> str:
    """`inputs_dir(cfg)`, first written there (`save_inputs`: tokenizer with the task tokens, image
    processor, no weights) when the backbone is a plain Qwen2-VL checkpoint. What `pipelines.train`
    and `python -m vipoly.data.encode` both call, so the pre-encoded copies match the training
    run's tokenizer. A PolyEmbedder backbone folder is never written to."""
    out = inputs_dir(cfg)
    if not _is_polyembedder(cfg):
        from vipoly.model.inputs import save_inputs

        save_inputs(cfg.model, out)
    return out


class StreamFactory:
    def __init__(self, cfg: Config):
        self.cfg = cfg.to_dict()

    def __call__(self, rank: int, world: int) -> TrainStream:
        return TrainStream(Config.model_validate(self.cfg), rank, world)
