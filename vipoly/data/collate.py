"""Encoded rows → model batches: the collate of the training stream and of Ray's own batching.

Rows come from `vipoly.data.encode` (`encode_table` in a Ray Data stage, `table_rows` on the
consumer side): each side (query, positive) holds `q_<key>` / `p_<key>` numpy arrays in the
`InputBuilder.encode_one` layout. `collate_pairs` pads both sides with `InputBuilder.pad` and adds
`task_ids` (B,) long in TASKS order, `scores` (B,) float32 with NaN where a row has no score, and
the rows' `lang` and `id`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from vipoly.data.encode import ENCODED_KEYS, SIDES, load_builder, table_rows
from vipoly.tasks import TASK_INDEX

__all__ = ["PairCollate", "RayPairCollateFn", "collate_pairs", "load_builder", "pair_labels", "sides"]


_SIDE_KEYS = {side: [(k, f"{side}_{k}") for k in ENCODED_KEYS] for side in SIDES}


def _side(row: dict[str, Any], side: str) -> dict[str, Any]:
    return {k: row[name] for k, name in _SIDE_KEYS[side] if name in row}


def pair_labels(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a batch carries besides the inputs: task_ids (B,) long in TASKS order, scores (B,)
    float32 with NaN = no score, lang and id lists."""
    if not rows:
        raise ValueError("collate_pairs: no rows")
    scores = [r.get("score") for r in rows]
    return {
        "task_ids": torch.tensor([TASK_INDEX[str(r["task"])] for r in rows], dtype=torch.long),
        "scores": torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float32),
        "lang": [str(r["lang"]) for r in rows],
        "id": [str(r["id"]) for r in rows],
    }


def sides(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The queries of `rows`, then their positives, as `InputBuilder.pad`/`pack` rows."""
    return [_side(r, s) for s in SIDES for r in rows]


def collate_pairs(rows: list[dict[str, Any]], builder) -> dict[str, Any]:
    """Encoded rows → {query, pos: padded tensors} and `pair_labels`."""
    labels = pair_labels(rows)
    return {"query": builder.pad([_side(r, "q") for r in rows]), "pos": builder.pad([_side(r, "p") for r in rows]),
            **labels}


class PairCollate:
    """`collate_pairs` bound to a model's InputBuilder: `MixedStream.iter_batches(b, PairCollate(dir))`."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = str(model_dir)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_pairs(rows, load_builder(self.model_dir))


class RayPairCollateFn(ArrowBatchCollateFn):
    """The same collate for Ray's own batching of one encoded dataset:
    `ds.iter_torch_batches(batch_size=b, collate_fn=RayPairCollateFn(model_dir))`."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = str(model_dir)

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        return collate_pairs(table_rows(batch), load_builder(self.model_dir))
