"""Tokenised rows on the consumer side: a block of `tokenize_table`'s output becomes one
`EncodedBlock` (its columns as numpy arrays and lists) and one small `BlockRow` handle per row,
which the collate reads as numpy views: no Python object per token, nor a dict per row."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vipoly.data.tokenize import SIDES
from vipoly.tasks import TASK_INDEX


class ListColumn:
    """An Arrow list column as numpy `values` and `offsets` (n+1 ints) into them, with `valid` (n
    bools; None = no nulls). Offsets index the unsliced child array, so a sliced column works as it
    is; nothing is copied."""

    __slots__ = ("offsets", "values", "valid")

    def __init__(self, column: pa.ChunkedArray | pa.Array):
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        self.offsets = arr.offsets.to_pylist()  # Python ints: slicing numpy with them is ~2× faster
        self.values = arr.values.to_numpy(zero_copy_only=False)
        self.valid = arr.is_valid().to_pylist() if arr.null_count else None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def view(self, i: int) -> np.ndarray | None:
        if self.valid is not None and not self.valid[i]:
            return None
        return self.values[self.offsets[i]:self.offsets[i + 1]]


def list_views(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """A list column → one numpy view per row (None where the row is null), without copying: no
    Python object per value, unlike `to_pylist`."""
    col = ListColumn(column)
    return [col.view(i) for i in range(len(col))]


class _ListColumns(dict):
    """A table's list columns as `ListColumn`s, each made when first read: text rows never read
    their image columns, and converting a column's offsets costs about as much as the rows' reads."""

    def __init__(self, table: pa.Table):
        super().__init__()
        self.table = table

    def __missing__(self, name: str) -> ListColumn:
        col = self[name] = ListColumn(self.table.column(name))
        return col


def _any_values(table: pa.Table, name: str) -> bool:
    """Whether list column `name` holds a value in any row (False where the table lacks it: a
    pre-encoded copy's rows are read without their always-empty image columns)."""
    if name not in table.column_names:
        return False
    return (pc.sum(pc.list_value_length(table.column(name))).as_py() or 0) > 0


def _few_values(column: pa.ChunkedArray) -> np.ndarray | list:
    """A column of a few distinct strings (task, lang), one per row, read through its distinct
    values: a numpy object array of the same str objects, without converting every row's string."""
    if column.null_count:
        return column.to_pylist()
    encoded = pc.dictionary_encode(column).combine_chunks()
    values = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
    return values[encoded.indices.to_numpy(zero_copy_only=False)]


class EncodedBlock:
    """An encoded block (from `tokenize_table`), column by column: the scalar columns as Python lists
    and numpy, the list columns as `ListColumn`s (made when first read). Its rows are `BlockRow`
    handles, so splitting a block into rows costs one small object per row; the collate then takes
    each row's sides as numpy views (`side`) and its labels from these columns
    (`vipoly.data.collate`)."""

    def __init__(self, table: pa.Table):
        self.num_rows = table.num_rows
        self.id = table.column("id").to_pylist()
        self.task, self.lang = (_few_values(table.column(k)) for k in ("task", "lang"))
        self.score = table.column("score").to_numpy()
        self.p_key = table.column("p_key").to_numpy()
        self._neg_column = table.column("neg_text")
        self._neg: list[list[str]] | None = None  # made on the first `negatives` call
        self.lists = _ListColumns(table)
        self.has_images = {side: _any_values(table, f"{side}_image_grid_thw") for side in SIDES}
        self.views: dict[str, list[np.ndarray]] = {}  # side → its input_ids view per row (`token_views`)
        self._labels: list[tuple] | None = None

    @property
    def labels(self) -> list[tuple[int, float, int, str, str]]:
        """Each row's (task index in TASKS, score, p_key, lang, id), made once per block: a batch's
        labels are then one tuple per row (`vipoly.data.collate.pair_labels`), not five reads."""
        if self._labels is None:
            tasks = [TASK_INDEX[str(t)] for t in self.task]
            self._labels = list(zip(tasks, self.score.tolist(), self.p_key.tolist(), self.lang, self.id))
        return self._labels

    def token_views(self, side: str) -> list[np.ndarray] | None:
        """Every row's input_ids of one side as numpy views, made once per block and kept in
        `views` (the rows of a window are all used, sooner or later): a view per row in one loop
        costs a fraction of slicing row by row in the collate. None where the side has images (its
        rows need their pixels too), so `views` holds text-only sides alone."""
        if self.has_images[side]:
            return None
        views = self.views.get(side)
        if views is None:
            col = self.lists[f"{side}_input_ids"]
            values, offsets = col.values, col.offsets
            views = self.views[side] = [values[a:b] for a, b in zip(offsets, offsets[1:])]
        return views

    def negatives(self, i: int) -> list[str]:
        """Row i's hard negatives (neg_text), all of them."""
        if self._neg is None:
            self._neg = self._neg_column.to_pylist()
        return self._neg[i] or []

    def rows(self) -> list["BlockRow"]:
        return [BlockRow(self, i) for i in range(self.num_rows)]

    def side(self, i: int, side: str) -> dict[str, np.ndarray]:
        """One side of row i in the `InputBuilder.encode_one` layout (numpy views)."""
        lists = self.lists
        out = {"input_ids": lists[f"{side}_input_ids"].view(i),
               "mm_token_type_ids": lists[f"{side}_mm_token_type_ids"].view(i)}
        if self.has_images[side]:
            grid = lists[f"{side}_image_grid_thw"].view(i)
            if len(grid):
                grid = grid.reshape(-1, 3)
                pixels = lists[f"{side}_pixel_values"].view(i)
                out["pixel_values"] = pixels.reshape(int(np.prod(grid, axis=1).sum()), -1)
                out["image_grid_thw"] = grid
        return out

    def row(self, i: int) -> dict[str, Any]:
        """Row i as a dict (the `table_rows` layout)."""
        score = self.score[i]
        row = {"id": self.id[i], "task": self.task[i], "lang": self.lang[i],
               "score": None if np.isnan(score) else float(score), "p_key": int(self.p_key[i]),
               "neg_text": self.negatives(i)}
        for side in SIDES:
            row.update((f"{side}_{k}", v) for k, v in self.side(i, side).items())
        return row


class BlockRow(Mapping):
    """Row `i` of an `EncodedBlock`: a read-only mapping with the `table_rows` keys. id, task, lang
    and score are read straight from the block (the mixer counts them per row); the arrays are
    made on demand."""

    __slots__ = ("block", "i")
    _SCALARS = frozenset(("id", "task", "lang"))

    def __init__(self, block: EncodedBlock, i: int):
        self.block, self.i = block, i

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._SCALARS:
            return getattr(self.block, key)[self.i]
        return self.block.row(self.i).get(key, default)

    def __getitem__(self, key: str) -> Any:
        if key in self._SCALARS:
            return getattr(self.block, key)[self.i]
        return self.block.row(self.i)[key]

    def side(self, side: str) -> dict[str, np.ndarray]:
        return self.block.side(self.i, side)

    def __iter__(self):
        return iter(self.block.row(self.i))

    def __len__(self) -> int:
        return len(self.block.row(self.i))

    def __repr__(self) -> str:
        return f"BlockRow({self.block.id[self.i]!r})"


def row_handles(table: pa.Table) -> list[BlockRow]:
    """Encoded rows (from `tokenize_table`) → `BlockRow` handles, what the training stream yields."""
    return EncodedBlock(table).rows()


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Encoded rows (from `tokenize_table`) → one dict per row: id, task, lang, score (None = no
    score) and q_/p_ input_ids, mm_token_type_ids, pixel_values (P, dim), image_grid_thw (k, 3) as
    numpy views into the table (pixel keys only on sides with images)."""
    block = EncodedBlock(table)
    return [block.row(i) for i in range(block.num_rows)]
