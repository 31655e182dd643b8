"""The canonical sample: one Arrow schema for every task (DESIGN.md, "Canonical sample").

A row is a pair (query, positive) of a task, each side text and/or images, with an optional gold
score (required for text_pair) and optional text negatives. Images travel as encoded bytes
(PNG/JPEG), never as decoded pixels or pickled PIL objects, so shards stay small and any worker can
decode them.

Columns, in this order:

    id            string, unique across a prepared data set
    task          one of vipoly.tasks.TASKS
    lang          vi | en | zh | other (a cross-lingual pair carries its query's language)
    query_text    string or null (multi-turn VQA: the earlier turns, then the last question)
    query_images  list<binary>, encoded image bytes ([] when none)
    pos_text      string or null
    pos_images    list<binary>
    score         float32 in [0, 1] or null
    neg_text      list<string> ([] when none)
"""
from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("query_text", pa.string()),
        pa.field("query_images", pa.list_(pa.binary())),
        pa.field("pos_text", pa.string()),
        pa.field("pos_images", pa.list_(pa.binary())),
        pa.field("score", pa.float32()),
        pa.field("neg_text", pa.list_(pa.string())),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
LIST_COLUMNS = ("query_images", "pos_images", "neg_text")

# Bookkeeping columns that travel with a row between converter and shard, never into a shard:
# where the row came from (for the quarantine report), its global input order (to decide which of
# two rows with the same id is the first), and why it was rejected (null when it is good).
SOURCE, ORDER, REASON = "_source", "_order", "_reason"
# Every staging column is nullable: a rejected row may lack even its id.
STAGING_SCHEMA = pa.schema([f.with_nullable(True) for f in SCHEMA] + [
    pa.field(SOURCE, pa.string()), pa.field(ORDER, pa.int64()), pa.field(REASON, pa.string())])

ORDER_STRIDE = 1 << 40
"""`_order = input_index · ORDER_STRIDE + row`: inputs keep their command-line order, rows their
order within the input (2^40 rows per input is far above any real file)."""


def make_row(**fields: Any) -> dict[str, Any]:
    """A canonical row dict with every column present: lists default to [], the rest to None."""
    unknown = set(fields) - set(COLUMNS) - {SOURCE, ORDER, REASON}
    if unknown:
        raise ValueError(f"unknown canonical field(s) {sorted(unknown)}; expected {list(COLUMNS)}")
    row: dict[str, Any] = {c: ([] if c in LIST_COLUMNS else None) for c in COLUMNS}
    row.update(fields)
    for c in LIST_COLUMNS:
        if row[c] is None:
            row[c] = []
    return row


def rows_to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema = SCHEMA) -> pa.Table:
    """Rows (dicts) → an Arrow table of exactly `schema` (missing keys become null / [])."""
    rows = list(rows)
    columns = {}
    for field in schema:
        default = [] if field.name in LIST_COLUMNS else None
        columns[field.name] = [r.get(field.name, default) for r in rows]
    return pa.table(columns, schema=schema)


def table_to_rows(table: pa.Table) -> list[dict[str, Any]]:
    return table.to_pylist()


def conform(table: pa.Table, schema: pa.Schema = SCHEMA) -> pa.Table:
    """Select and cast `table`'s columns to `schema`; absent list columns become [], other
    absent nullable ones null.

    Raises a ValueError naming the column when a required column is absent or will not cast.
    """
    arrays = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            try:
                arrays.append(col.cast(field.type) if col.type != field.type else col)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValueError(f"column {field.name!r}: cannot cast {col.type} to {field.type}: {e}") from None
        elif field.name in LIST_COLUMNS:
            arrays.append(pa.array([[]] * table.num_rows, field.type))
        elif field.nullable:
            arrays.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"required column {field.name!r} is missing (have {table.column_names})")
    return pa.Table.from_arrays(arrays, schema=schema)
