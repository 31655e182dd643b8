"""Encoded rows → model batches: the collate of the training stream and of Ray's own batching.

Rows come from `vipoly.data.tokenize` (`tokenize_table` in a Ray Data stage; `row_handles` or
`table_rows` dicts on the consumer side): each side (query, positive) holds `q_<key>` / `p_<key>`
numpy arrays in the `InputBuilder.encode_one` layout. `collate_pairs` pads both sides as
`InputBuilder.pad` does and adds `task_ids` (B,) long in TASKS order, `scores` (B,) float32 with
NaN where a row has no score, `pos_key` (B,) long (equal positives, equal keys: the loss masks
them as negatives of each other), and the rows' `lang` and `id`.

Rows that are `BlockRow` handles (what the training stream yields) give their sides and labels
straight from their blocks' columns, with no dict per row and key.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from vipoly.data.tokenize import ENCODED_KEYS, SIDES, load_builder
from vipoly.data.blocks import BlockRow, row_handles
from vipoly.tasks import TASK_INDEX

__all__ = ["PairCollate", "RayPairCollateFn", "collate_pairs", "hard_negatives", "load_builder", "pad_sides",
           "pair_labels", "sides"]


_SIDE_KEYS = {side: [(k, f"{side}_{k}") for k in ENCODED_KEYS] for side in SIDES}


def _side(row: Mapping[str, Any], side: str) -> dict[str, Any]:
    if type(row) is BlockRow:
        return row.side(side)
    return {k: row[name] for k, name in _SIDE_KEYS[side] if name in row}


def pair_labels(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """What a batch carries besides the inputs: task_ids (B,) long in TASKS order, scores (B,)
    float32 with NaN = no score, pos_key (B,) long, lang and id lists."""
    if not rows:
        raise ValueError("collate_pairs: no rows")
    if all(type(r) is BlockRow for r in rows):  # straight from the blocks: a tuple per row
        tasks, scores, keys, lang, ids = zip(*[r.block.labels[r.i] for r in rows])
        return {
            "task_ids": torch.tensor(tasks, dtype=torch.int64),
            "scores": torch.from_numpy(np.array(scores, dtype=np.float32)),
            "pos_key": torch.from_numpy(np.array(keys, dtype=np.int64)),
            "lang": list(lang),
            "id": list(ids),
        }
    tasks, lang, ids = [r["task"] for r in rows], [r["lang"] for r in rows], [r["id"] for r in rows]
    scores = [math.nan if r.get("score") is None else r["score"] for r in rows]
    return {
        "task_ids": torch.from_numpy(np.fromiter((TASK_INDEX[str(t)] for t in tasks), np.int64, len(rows))),
        "scores": torch.from_numpy(np.asarray(scores, dtype=np.float32)),
        "pos_key": torch.from_numpy(np.asarray([r["p_key"] for r in rows], dtype=np.int64)),
        "lang": [str(x) for x in lang],
        "id": [str(x) for x in ids],
    }


def sides(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The queries of `rows`, then their positives, as `InputBuilder.pad`/`pack` rows."""
    return [_side(r, s) for s in SIDES for r in rows]


def _text_ids(rows: list[Mapping[str, Any]], names: tuple[str, ...]) -> list[np.ndarray] | None:
    """input_ids of sides `names` of every row, in that order, straight from the blocks' offsets,
    when every row is a `BlockRow` and none of these sides has an image (all `pad` needs then;
    the views cost a third of whole side dicts); else None."""
    try:  # every block's views already made (all but a block's first batch): no call per block
        return [r.block.views[name][r.i] for name in names for r in rows]
    except (AttributeError, KeyError):  # a dict row, a side with images, or a block seen first
        pass
    blocks = {}
    for r in rows:
        if type(r) is not BlockRow:
            return None
        blocks[id(r.block)] = r.block
    if any(b.token_views(name) is None for b in blocks.values() for name in names):
        return None
    return [r.block.views[name][r.i] for name in names for r in rows]


def pad_sides(rows: list[Mapping[str, Any]], builder, names: tuple[str, ...] = tuple(SIDES),
              extra: list[np.ndarray] | tuple = ()) -> dict[str, Any]:
    """`builder.pad` of sides `names` of the rows (queries, then positives), then of the text-only
    inputs `extra` (their input_ids: the hard negatives)."""
    ids = _text_ids(rows, names)
    if ids is not None:
        return builder.pad_ids(ids + list(extra))
    return builder.pad([_side(r, s) for s in names for r in rows] + [{"input_ids": x} for x in extra])


def hard_negatives(rows: list[Mapping[str, Any]], n: int, inputs_dir: str) -> dict[str, Any]:
    """Up to `n` of each row's neg_text (`data.negatives`), tokenised as positives are (the row's
    task prefix, one batched call): {"input_ids": [int32 arrays], "neg_owner": (M,) long, the row
    of each, "neg_key": (M,) long, `positive_keys` of their texts}. A row with fewer negatives
    gives fewer: no candidate is padding."""
    from vipoly.data.tokenize import positive_keys, text_encoder

    texts, tasks, owners = [], [], []
    for i, r in enumerate(rows):
        negs = r.block.negatives(r.i) if type(r) is BlockRow else (r.get("neg_text") or [])
        for text in negs[:n]:
            texts.append(text)
            tasks.append(str(r["task"]))
            owners.append(i)
    ids = [np.asarray(x, dtype=np.int32) for x in text_encoder(inputs_dir).encode(texts, tasks)] if texts else []
    return {"input_ids": ids, "neg_owner": torch.tensor(owners, dtype=torch.int64),
            "neg_key": torch.from_numpy(positive_keys(texts, [None] * len(texts)))}


def collate_pairs(rows: list[Mapping[str, Any]], builder) -> dict[str, Any]:
    """Encoded rows → {query, pos: padded tensors} and `pair_labels`."""
    labels = pair_labels(rows)
    query, pos = (pad_sides(rows, builder, (side,)) for side in SIDES)
    return {"query": query, "pos": pos, **labels}


class PairCollate:
    """`collate_pairs` bound to a model's InputBuilder: `MixedStream.iter_batches(b, PairCollate(dir))`."""

    def __init__(self, inputs_dir: str | Path):
        self.inputs_dir = str(inputs_dir)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_pairs(rows, load_builder(self.inputs_dir))


class RayPairCollateFn(ArrowBatchCollateFn):
    """The same collate for Ray's own batching of one encoded dataset:
    `ds.iter_torch_batches(batch_size=b, collate_fn=RayPairCollateFn(inputs_dir))`."""

    def __init__(self, inputs_dir: str | Path):
        self.inputs_dir = str(inputs_dir)

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        return collate_pairs(row_handles(batch), load_builder(self.inputs_dir))
