"""Ray Data sources for the mixed stream: one lazily read dataset per source, sharded per worker,
encoded in Ray Data stages.

    sources = resolve_sources(cfg.data)                      # {name: parquet files}
    stream = build_stream(cfg.data, model_dir, rank=r, world=W, seed=cfg.train.seed)
    for batch in stream.iter_batches(cfg.train.batch_size, PairCollate(model_dir)): ...

Per source and pass ("epoch") the pipeline is

    read_parquet(files, in an order shuffled per epoch) → keep this worker's rows → encode_table

(or, for a source pre-encoded by `python -m vipoly.data.encode`, read its copies → keep this
worker's rows), whose blocks come back as Arrow tables (`iter_batches`, not `iter_rows`: no Python
object per value) and are split into `BlockRow` handles (`row_handles`: no dict per row; the
collate reads each row's token ids as numpy views of its block). The rows feed `MixedStream`, which
shuffles each source through a seeded buffer and picks the source of every sample by the
exact-ratio scheduler.

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
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from vipoly.config import DataConfig
from vipoly.data.encode import default_cache, encode_table, encoded_files, row_handles
from vipoly.data.mix import MixedStream, MixPosition, close_rows
from vipoly.data.shards import keep_selected, keep_worker_rows, read_parquet, shard_files, task_sources


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


class RaySource:
    """A source for MixedStream: `source(epoch) -> rows` via a fresh Ray Data pipeline per epoch,
    and `source.select(epoch, head, start)` for a resumed pass (`MixedStream._resume`).

    With `model_dir`, rows are encoded (`vipoly.data.encode.encode_table`) in a Ray Data stage;
    without, they are canonical rows. When encoding, blocks hold about `block_rows` rows, by default
    `TEXT_BLOCK_ROWS` for a source without images and `IMAGE_BLOCK_ROWS` for one with them (a whole
    file as one block would make the first encoded row wait for the whole file's encoding; plain
    reads keep Ray's larger blocks, which are cheaper per row). `encoded`: pre-encoded copies of
    `files` (`vipoly.data.encode.encoded_files`), same rows in the same order, read instead of
    encoding, in blocks of about `ENCODED_BLOCK_ROWS` rows. One encoding task per CPU: more made
    Ray start more worker processes, each paying its imports, and ran slower on 2 cores.
    """

    def __init__(self, files: list[str], *, rank: int = 0, world: int = 1, seed: int = 0,
                 model_dir: str | Path | None = None, encoded: list[str] | None = None,
                 block_rows: int | None = None, encode_num_cpus: float = 1.0):
        if not files:
            raise ValueError("RaySource: no files")
        if not 0 <= rank < world:
            raise ValueError(f"worker rank {rank} outside [0, {world})")
        if encoded is not None and len(encoded) != len(files):
            raise ValueError(f"RaySource: {len(encoded)} encoded copies for {len(files)} files")
        self.files, self.encoded, self.rank, self.world, self.seed = files, encoded, rank, world, seed
        self.model_dir, self.encode_num_cpus = model_dir, encode_num_cpus
        self.block_rows = None
        if model_dir is not None and encoded is None:
            self.block_rows = block_rows or (IMAGE_BLOCK_ROWS if has_images(files) else TEXT_BLOCK_ROWS)
        self._counts: dict[int, int] = {}  # this worker's rows per file

    def __call__(self, epoch: int) -> Iterable[dict[str, Any]]:
        return self._pipeline(self._order(epoch))

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.files)))
        random.Random(f"{self.seed}/files/{epoch}").shuffle(order)  # the same order for a source and its copy
        return order

    def _pipeline(self, order: list[int], keep: dict[int, list[str] | None] | None = None) -> Iterator[dict[str, Any]]:
        """Rows of the files `order` (indices into `files`), this worker's share, encoded; with
        `keep`, only the rows of each file whose ids it lists (None: every row)."""
        paths = [(self.encoded or self.files)[i] for i in order]
        if self.encoded is not None:
            num_blocks = -(-count_rows(paths) // ENCODED_BLOCK_ROWS)
        elif self.block_rows is not None:
            num_blocks = max(len(paths), -(-count_rows(paths) // self.block_rows))
        else:
            num_blocks = None
        if keep is not None:
            paths = [str(Path(f).resolve()) for f in paths]  # what Ray's `path` column reports
        ds = read_parquet(paths, override_num_blocks=num_blocks, include_paths=keep is not None)  # ray
        if self.world > 1:
            ds = ds.map_batches(keep_worker_rows, fn_kwargs={"rank": self.rank, "world": self.world},
                                batch_format="pyarrow")
        if keep is not None:
            ds = ds.map_batches(keep_selected, fn_kwargs={"keep": {p: keep[i] for p, i in zip(paths, order)}},
                                batch_format="pyarrow")
        if self.block_rows is not None:
            ds = ds.map_batches(encode_table, fn_kwargs={"model_dir": str(self.model_dir)}, batch_format="pyarrow",
                                batch_size=self.block_rows, num_cpus=self.encode_num_cpus)  # ray: decode + processor
        ds.context.execution_options.preserve_order = True  # ray: the same order on every replay
        return _rows(ds, row_handles if self.model_dir is not None else pa.Table.to_pylist)

    # -- a resumed pass
    def _ids(self, i: int) -> list[str]:
        """This worker's ids of file i, in file order (reads the id column only)."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.files[i], columns=["id"])
        return keep_worker_rows(table, self.rank, self.world).column("id").to_pylist()

    def _count(self, i: int) -> int:
        if i not in self._counts:
            self._counts[i] = count_rows([self.files[i]]) if self.world == 1 else len(self._ids(i))
        return self._counts[i]

    @property
    def num_rows(self) -> int:
        """This worker's rows in one pass."""
        return sum(self._count(i) for i in range(len(self.files)))

    def select(self, epoch: int, head: list[int], start: int) -> Iterator[dict[str, Any]]:
        """The rows at the pass indices `head` (ascending, below `start`), then every row from
        `start` on. Files wholly before `start` with no `head` row are not read at all; in the
        others, a Ray Data stage before the encoding keeps the wanted rows by id."""
        order, keep, base = [], {}, 0
        head = list(head)
        for i in self._order(epoch):
            end = base + self._count(i)
            if base >= start:
                keep[i] = None
            else:
                picks = [k - base for k in head if base <= k < end] + list(range(max(start - base, 0), end - base))
                if picks:
                    ids = self._ids(i)
                    keep[i] = [ids[k] for k in picks]
            if i in keep:
                order.append(i)
            base = end
        return self._pipeline(order, keep) if order else iter(())


def _rows(ds, split: Callable[[pa.Table], list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The rows of a Ray Dataset, block by block (closing this generator stops the pipeline)."""
    blocks = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4))  # ray: whole blocks
    try:
        for table in blocks:
            yield from split(table)
    finally:
        close_rows(blocks)  # a generator: closing it shuts the executor down


TEXT_BLOCK_ROWS = 1024
"""Rows per encoded block of a text source. Each Ray Data task costs tens of ms on top of its work;
a text row encodes in ≈ 0.15 ms, so small blocks were mostly overhead (one source on 2 cores:
256-row blocks 3,300–4,000 rows/s, 1,024-row blocks 7,400)."""
ENCODED_BLOCK_ROWS = 16384
"""Rows per block read from pre-encoded copies. Ray's default split a 16k-row file into six blocks,
and each block costs the consumer's process (Ray's executor and iterator threads share its GIL)
about as much as a few thousand rows: warm streams of 96,000 samples through the mix and collate
ran at 29,700–31,800 samples/s with one 16k-row block per file, 22,600–24,800 with six (2 cores;
a scratch loop over bench/data_pipeline.py's shards, see docs/benchmarks.md)."""
IMAGE_BLOCK_ROWS = 32
"""Rows per encoded block of an image source: a 448² image is ≈ 4.8 MB of float32 patches once
encoded, so 32 rows make blocks of ≈ 150 MB; decoding, at ≈ 20 ms an image, dwarfs the task cost."""


def has_images(files: list[str]) -> bool:
    """Whether any row of `files` has an image, from the Parquet footers (no data read): the
    image columns hold more than a few bytes per row."""
    import pyarrow.parquet as pq

    for f in files:
        meta = pq.ParquetFile(f).metadata
        names = [meta.schema.column(i).path for i in range(meta.num_columns)]
        image_cols = [i for i, n in enumerate(names) if n.split(".")[0] in ("query_images", "pos_images")]
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            if sum(group.column(i).total_uncompressed_size for i in image_cols) > 64 * max(group.num_rows, 1):
                return True
    return False


def build_stream(data: DataConfig, model_dir: str | Path | None = None, *, rank: int = 0, world: int = 1,
                 seed: int = 0, position: MixPosition | dict | None = None, **source_kwargs) -> MixedStream:
    """The mixed stream of `data.mix` over `resolve_sources(data)`, for worker `rank` of `world`."""
    files = resolve_sources(data)
    cache = default_cache(data) if model_dir is not None else None
    sources = {name: RaySource(fs, rank=rank, world=world, seed=seed, model_dir=model_dir,
                               encoded=encoded_files(fs, cache, model_dir) if cache else None, **source_kwargs)
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
