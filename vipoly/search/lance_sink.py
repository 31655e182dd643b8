"""Write a Ray Dataset as a Lance dataset: each write task writes Lance fragments, the driver commits
them all in one transaction (a killed job leaves no visible rows, so a re-run redoes them).

Why not `Dataset.write_lance`: Ray 2.60's Lance sink passes `storage_options_provider` to
`lance.fragment.write_fragments` and `lance.LanceDataset`, which no released pylance (≤ 14.0.2)
accepts, so every write fails with a TypeError. `write_lance` is used where the installed pylance
takes that argument; this sink — the same design: distributed fragment writes, one commit — elsewhere.
"""
from __future__ import annotations

import inspect
import pickle
from typing import Iterable

import pyarrow as pa
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink


def ray_write_lance_works() -> bool:
    """Whether the installed pylance takes the argument Ray's own Lance sink passes."""
    from lance.fragment import write_fragments

    return "storage_options_provider" in inspect.signature(write_fragments).parameters


class LanceSink(Datasink):
    """Append to (or create) the Lance dataset at `uri`; `storage_options` for object stores."""

    def __init__(self, uri: str, append: bool, storage_options: dict | None = None,
                 max_rows_per_file: int = 1024 * 1024):
        self.uri, self.append, self.storage_options = uri, append, storage_options
        self.max_rows_per_file = max_rows_per_file
        self.read_version: int | None = None

    @property
    def supports_distributed_writes(self) -> bool:
        return True

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        import lance

        if self.append:
            self.read_version = lance.dataset(self.uri, storage_options=self.storage_options).version

    def write(self, blocks: Iterable[Block], ctx) -> list[bytes]:
        from lance.fragment import write_fragments

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        fragments = write_fragments(table, self.uri, schema=table.schema, max_rows_per_file=self.max_rows_per_file,
                                    storage_options=self.storage_options)
        return [pickle.dumps((f, table.schema)) for f in fragments]

    def on_write_complete(self, write_result) -> None:
        import lance

        parts = [pickle.loads(x) for ret in write_result.write_returns for x in (ret or [])]
        if not parts:
            return
        fragments = [f for f, _ in parts]
        if self.append:
            op = lance.LanceOperation.Append(fragments)
        else:
            op = lance.LanceOperation.Overwrite(parts[0][1], fragments)
        lance.LanceDataset.commit(self.uri, op, read_version=self.read_version, storage_options=self.storage_options)
