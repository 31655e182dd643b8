"""Row validation: every row is either good (possibly cleaned) or rejected with a reason.

Per-row rules (`check_row`), in the order they are tried, the first failure being the reason
(every reason reads "<kind>: <detail>" or just "<kind>", so reports can count kinds):
  missing id · unknown task · unknown lang · no query (text or image) · no positive (text or image) ·
  text_pair without a score · score not finite or outside [0, 1] · an image whose bytes do not
  decode · a text longer than `max_text_chars` (truncated, or rejected when overlong="reject").
Cleaning of good rows: texts are NFC-normalised (Vietnamese sources mix composed and decomposed
diacritics; the tokenizer and the fonts expect composed), empty texts become null.

Duplicate ids need a view of the whole data set, so they are a separate step
(`duplicate_losers`): among the rows that passed every per-row rule, the first occurrence of an id
(smallest `_order`) is kept and every later one is rejected, naming where the first one came from.
"""
from __future__ import annotations

import io
import math
import unicodedata
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from vipoly.data.schema import ORDER, REASON, SOURCE, STAGING_SCHEMA, rows_to_table
from vipoly.tasks import LANGS, TASK_INDEX

TEXT_FIELDS = ("query_text", "pos_text")
IMAGE_FIELDS = ("query_images", "pos_images")


def image_error(data: Any) -> str | None:
    """None if `data` is encoded image bytes that fully decode, else what is wrong.

    `verify()` checks the container and checksums; a second open + `load()` decodes the pixels,
    which is what catches a truncated JPEG or PNG stream (verify alone lets some through).
    """
    if not isinstance(data, (bytes, bytearray)) or not data:
        return f"not image bytes ({type(data).__name__})"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "empty image"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"{type(e).__name__}: {e}"
    return None


def _clean_text(value: Any, name: str, max_chars: int, overlong: str) -> tuple[str | None, str | None]:
    """(cleaned text, reason): NFC, '' → None, and the length rule."""
    if value is None:
        return None, None
    if not isinstance(value, str):
        return None, f"not a string: {name} is {type(value).__name__}"
    text = unicodedata.normalize("NFC", value)
    if not text.strip():
        return None, None
    if len(text) > max_chars:
        if overlong == "reject":
            return None, f"overlong text: {name} has {len(text)} characters > data.max_text_chars={max_chars}"
        text = text[:max_chars]
    return text, None


def check_row(row: dict[str, Any], max_text_chars: int = 20000,
              overlong: Literal["truncate", "reject"] = "truncate") -> tuple[dict[str, Any], str | None]:
    """Validate one canonical row: (cleaned row, None) if good, (row, reason) if not."""
    row = dict(row)
    rid = row.get("id")
    if not isinstance(rid, str) or not rid.strip():
        return row, "missing id"
    task = row.get("task")
    if task not in TASK_INDEX:
        return row, f"unknown task: {task!r}"
    if row.get("lang") not in LANGS:
        return row, f"unknown lang: {row.get('lang')!r} (expected one of {', '.join(LANGS)})"

    for name in TEXT_FIELDS:
        row[name], reason = _clean_text(row.get(name), name, max_text_chars, overlong)
        if reason:
            return row, reason
    negs = []
    for i, neg in enumerate(row.get("neg_text") or []):
        text, reason = _clean_text(neg, f"neg_text[{i}]", max_text_chars, overlong)
        if reason:
            return row, reason
        if text is not None:
            negs.append(text)
    row["neg_text"] = negs
    for name in IMAGE_FIELDS:
        row[name] = list(row.get(name) or [])

    if row["query_text"] is None and not row["query_images"]:
        return row, "no query: neither text nor image"
    if row["pos_text"] is None and not row["pos_images"]:
        return row, "no positive: neither text nor image"

    score = row.get("score")
    if score is not None:
        try:
            score = float(score)
        except (TypeError, ValueError):
            return row, f"bad score: {score!r} is not a number"
        if math.isnan(score):
            score = None  # NaN is how batches spell "no score"
        elif not 0.0 <= score <= 1.0:
            return row, f"bad score: {score} outside [0, 1]"
    row["score"] = score
    if task == "text_pair" and score is None:
        return row, "text_pair without a score"

    for name in IMAGE_FIELDS:
        for i, data in enumerate(row[name]):
            err = image_error(data)
            if err:
                return row, f"image does not decode: {name}[{i}]: {err}"
    return row, None


class RowValidator:
    """Ray Data stage (`map_batches(RowValidator(...), batch_format="pyarrow")`): checks every row
    of a staging batch that has no reason yet and writes the reason (or the cleaned row) back."""

    def __init__(self, max_text_chars: int = 20000, overlong: str = "truncate"):
        self.max_text_chars = max_text_chars
        self.overlong = overlong

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            if row.get(REASON) is None:
                row, row[REASON] = check_row(row, self.max_text_chars, self.overlong)
            out.append(row)
        return rows_to_table(out, STAGING_SCHEMA)


def duplicate_losers(ids: pa.Table) -> pa.Table:
    """Rows to reject because an earlier row had the same id.

    `ids` holds the columns id, _order, _source of the rows that passed the per-row rules (any
    order). Returns the later occurrences as a table (id, _order, _source, _reason), the reason naming
    the source of the kept first occurrence. Vectorised: one sort by (id, _order), then a compare of
    each row's id with its predecessor's.
    """
    if ids.num_rows == 0:
        return pa.table({"id": pa.array([], pa.string()), ORDER: pa.array([], pa.int64()),
                         SOURCE: pa.array([], pa.string()), REASON: pa.array([], pa.string())})
    srt = ids.sort_by([("id", "ascending"), (ORDER, "ascending")])
    id_col = srt.column("id").combine_chunks()
    same_as_prev = pc.equal(id_col.slice(1), id_col.slice(0, len(id_col) - 1))
    is_later = pa.concat_arrays([pa.array([False]), same_as_prev.fill_null(False)])
    # Index of each row's group head (the first occurrence): the last index ≤ i that starts a group.
    starts = pc.invert(is_later).to_numpy(zero_copy_only=False)
    head = np.maximum.accumulate(np.where(starts, np.arange(len(starts)), 0))
    later = np.flatnonzero(~starts)
    sources = srt.column(SOURCE).to_pylist()
    id_values = id_col.to_pylist()
    reasons = [f"duplicate id: {id_values[i]!r} (first at {sources[head[i]]})" for i in later]
    return pa.table({"id": srt.column("id").take(later), ORDER: srt.column(ORDER).take(later),
                     SOURCE: srt.column(SOURCE).take(later),
                     REASON: pa.array(reasons, pa.string())})
