"""Ray Data sources for the mixed stream: one lazily read dataset per source, sharded per worker,
encoded in Ray Data stages.

    sources = resolve_sources(cfg.data)                      # {name: parquet files}
    stream = build_stream(cfg.data, model_dir, rank=r, world=W, seed=cfg.train.seed)
    for batch in stream.iter_batches(cfg.train.batch_size, PairCollate(model_dir)): ...

Per source and pass ("epoch") the pipeline is

    read_parquet(files, in an order shuffled per epoch) → keep this worker's rows → encode_batch

and its rows feed `MixedStream`, which shuffles each source through a seeded buffer and picks the
source of every sample by the exact-ratio scheduler.

Per-worker sharding: worker r of W keeps the rows with crc32(id) mod W = r. Every row belongs to
exactly one worker whatever the file or block layout, and the choice depends on the data alone, so
a restarted worker sees the same rows in the same order (Ray's `streaming_split` hands blocks to
whichever worker asks first, which a data position cannot replay). The price: each worker reads
every file of a source (but decodes and encodes only its own 1/W of the rows).

Determinism: the datasets run with `preserve_order=True`, so a source's row order is a function
of its files, the epoch and the seed.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Iterable

from vipoly.config import DataConfig
from vipoly.data.mix import MixedStream, MixPosition
from vipoly.data.shards import keep_worker_rows, read_parquet, shard_files, task_sources


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


def ray_source(files: list[str], *, rank: int = 0, world: int = 1, seed: int = 0,
               model_dir: str | Path | None = None, block_rows: int = 256, encode_batch_size: int = 64,
               encode_num_cpus: float = 0.5) -> Callable[[int], Iterable[dict[str, Any]]]:
    """A source for MixedStream: `epoch -> rows` via a fresh Ray Data pipeline per epoch.

    With `model_dir`, rows are encoded (query and positive through the model's InputBuilder) in a
    Ray Data stage; without, they are canonical rows. When encoding, blocks hold about
    `block_rows` rows: a whole file as one block would make the first encoded row wait for the
    whole file's encoding (plain reads keep Ray's larger blocks, which are cheaper per row).
    """
    if not files:
        raise ValueError("ray_source: no files")
    if not 0 <= rank < world:
        raise ValueError(f"worker rank {rank} outside [0, {world})")
    num_blocks = max(len(files), -(-count_rows(files) // block_rows)) if model_dir is not None else None

    def open_epoch(epoch: int) -> Iterable[dict[str, Any]]:
        order = list(files)
        random.Random(f"{seed}/files/{epoch}").shuffle(order)
        ds = read_parquet(order, override_num_blocks=num_blocks)  # ray
        if world > 1:
            ds = ds.map_batches(keep_worker_rows, fn_kwargs={"rank": rank, "world": world}, batch_format="pyarrow")
        if model_dir is not None:
            from vipoly.data.collate import encode_batch  # torch: only where rows are encoded

            ds = ds.map_batches(encode_batch, fn_kwargs={"model_dir": str(model_dir)}, batch_format="pyarrow",
                                batch_size=encode_batch_size, num_cpus=encode_num_cpus)  # ray: decode + processor
        ds.context.execution_options.preserve_order = True  # ray: the same order on every replay
        return ds.iter_rows()

    return open_epoch


def build_stream(data: DataConfig, model_dir: str | Path | None = None, *, rank: int = 0, world: int = 1,
                 seed: int = 0, position: MixPosition | dict | None = None, **source_kwargs) -> MixedStream:
    """The mixed stream of `data.mix` over `resolve_sources(data)`, for worker `rank` of `world`."""
    files = resolve_sources(data)
    sources = {name: ray_source(fs, rank=rank, world=world, seed=seed, model_dir=model_dir, **source_kwargs)
               for name, fs in files.items()}
    weights = {name: w for name, w in data.mix.items() if name in sources}
    return MixedStream(sources, weights, seed=seed, shuffle_buffer=data.shuffle_buffer, position=position)


def count_rows(files: list[str]) -> int:
    """Rows in Parquet files, from their footers (no data read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def worker_rows(files: list[str], rank: int, world: int) -> int:
    """Rows of `files` that worker `rank` of `world` gets (reads the id column only)."""
    import pyarrow.parquet as pq

    return sum(keep_worker_rows(pq.read_table(f, columns=["id"]), rank, world).num_rows for f in files)
