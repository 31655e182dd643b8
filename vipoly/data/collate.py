"""Canonical rows → model inputs: an encoding stage for Ray Data and a collate for batches.

Image decoding and the processor run in `encode_batch`, a Ray Data `map_batches` stage, so the
training loop only pads. Each side (query, positive) of a row becomes numpy arrays from
`InputBuilder.encode_one(text, images, task)`, stored as columns `q_<key>` / `p_<key>` (ragged
arrays travel as Ray's variable-shaped tensor columns; a side without an image holds empty
(0, 0) pixel arrays so every batch has the same columns). `collate_pairs` pads both sides with
`InputBuilder.pad` and adds `task_ids` (B,) long in TASKS order, `scores` (B,) float32 with NaN
where a row has no score, and the rows' `lang` and `id`.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from vipoly.tasks import TASK_INDEX

SIDES = {"q": ("query_text", "query_images"), "p": ("pos_text", "pos_images")}
ENCODED_KEYS = ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw")
_EMPTY = {"pixel_values": np.zeros((0, 0), np.float32), "image_grid_thw": np.zeros((0, 3), np.int64)}


@lru_cache(maxsize=4)
def load_builder(model_dir: str):
    """One InputBuilder per worker process and model (Ray reuses task workers, so the processor
    is loaded once per process, not once per batch)."""
    from vipoly.model.inputs import InputBuilder

    return InputBuilder.from_pretrained(model_dir)


def _objects(values: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def encode_rows(rows: list[dict[str, Any]], builder) -> dict[str, np.ndarray]:
    """Encode both sides of canonical rows into columns (see the module docstring)."""
    cols: dict[str, list] = {k: [] for k in ("id", "task", "lang", "score")}
    enc: dict[str, list] = {f"{s}_{k}": [] for s in SIDES for k in ENCODED_KEYS}
    for r in rows:
        cols["id"].append(r["id"])
        cols["task"].append(r["task"])
        cols["lang"].append(r["lang"])
        score = r.get("score")
        cols["score"].append(np.nan if score is None else float(score))
        for side, (text_key, image_key) in SIDES.items():
            images = list(r.get(image_key) or [])
            out = builder.encode_one(r.get(text_key), images or None, r["task"])
            for k in ENCODED_KEYS:
                enc[f"{side}_{k}"].append(out.get(k, _EMPTY.get(k)))
    batch = {"id": np.asarray(cols["id"], dtype=object), "task": np.asarray(cols["task"], dtype=object),
             "lang": np.asarray(cols["lang"], dtype=object), "score": np.asarray(cols["score"], np.float32)}
    batch.update({k: _objects(v) for k, v in enc.items()})
    return batch


def encode_batch(batch: pa.Table, model_dir: str) -> dict[str, np.ndarray]:
    """Ray Data stage: `ds.map_batches(encode_batch, fn_kwargs={"model_dir": d}, batch_format="pyarrow")`."""
    return encode_rows(batch.to_pylist(), load_builder(str(model_dir)))


def _side(row: dict[str, Any], side: str) -> dict[str, Any]:
    return {k: row[f"{side}_{k}"] for k in ENCODED_KEYS if f"{side}_{k}" in row}


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


class RayPairCollateFn(NumpyBatchCollateFn):
    """The same collate for Ray's own batching of one encoded dataset:
    `ds.iter_torch_batches(batch_size=b, collate_fn=RayPairCollateFn(model_dir))`."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = str(model_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["id"])
        rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
        for r in rows:
            r["score"] = None if np.isnan(r["score"]) else float(r["score"])
        return collate_pairs(rows, load_builder(self.model_dir))
