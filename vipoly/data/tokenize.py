"""Canonical rows → model inputs, as Arrow columns, in a Ray Data stage that needs no torch.

    ds.map_batches(tokenize_table, fn_kwargs={"inputs_dir": d}, batch_format="pyarrow")   # Ray Data stage
    rows = row_handles(block)             # consumer side (vipoly.data.blocks): BlockRow handles

Both sides of a row (query, positive) become the `InputBuilder.encode_one` layout:

    q_input_ids, p_input_ids                    list<int32>    [task prefix] [image tokens…] text <|endoftext|>
    q_mm_token_type_ids, p_mm_token_type_ids    list<int8>     1 on <|image_pad|> tokens
    q_pixel_values, p_pixel_values              large_list<float32>, the (P, C·T·p·p) patches flattened
    q_image_grid_thw, p_image_grid_thw          list<int64>, the (k, 3) grids flattened
    id, task, lang (as read), score float32 (NaN = none)
    p_key                                       int64, a hash of the positive's text and image bytes:
                                                equal positives, equal keys (`positive_keys`)
    neg_text                                    list<string>, as read: the hard negatives, tokenised
                                                by the collate when `data.negatives` asks for them

Why this shape (the measurements behind it: docs/benchmarks.md, "Design measurements"):
- Text sides, most of the data, are tokenised in one batched call of the Rust tokenizer
  (`tokenizers`, loaded from the model's tokenizer.json), faster than a call per text, and a
  worker that tokenises text imports neither torch nor transformers. Sides with images go through
  `InputBuilder.encode_one` (the image processor), loaded on the first batch that has an image.
- Arrow list columns carry ragged token ids between stages at the cost of a memcpy; on the
  consumer side (`vipoly.data.blocks`) a block becomes one `EncodedBlock` and one small `BlockRow`
  handle per row, which the collate reads as numpy views: no Python object per token, nor a dict
  per row (Ray's own tensor columns and `iter_rows` build both).
A test checks that every row is tokenised exactly as `InputBuilder.encode_one` does it.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vipoly.folder import read_meta
from vipoly.tasks import TASKS, prefix

SIDES = {"q": ("query_text", "query_images"), "p": ("pos_text", "pos_images")}
ENCODED_KEYS = ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw")
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|endoftext|>")


@lru_cache(maxsize=4)
def load_builder(inputs_dir: str):
    """One InputBuilder (tokenizer + image processor) per process and model: Ray reuses task
    workers, so it loads once per process, not once per batch. Imports torch and transformers."""
    from vipoly.model.inputs import InputBuilder

    return InputBuilder.from_pretrained(inputs_dir)


class TextEncoder:
    """The text half of `InputBuilder`: prefix, batched tokenisation, truncation, closing token,
    from the model folder's tokenizer.json and vipoly.json alone."""

    def __init__(self, inputs_dir: str | Path):
        from vipoly.model.config import ModelConfig

        inputs_dir = Path(inputs_dir)
        self.max_length = ModelConfig.model_validate(read_meta(inputs_dir)["model"]).max_length
        self.tokenizer = _rust_tokenizer(inputs_dir)
        ids = [self.tokenizer.token_to_id(t) for t in VISION_TOKENS]
        missing = [t for t, i in zip(VISION_TOKENS, ids) if i is None]
        if missing:
            raise ValueError(f"{inputs_dir}: tokenizer lacks the Qwen2-VL token(s) {missing}")
        self.image_pad_id, self.eos_id = ids[1], ids[3]
        self.prefix_ids = {t: self.tokenizer.encode(prefix(t).strip(), add_special_tokens=False).ids for t in TASKS}

    def encode(self, texts: list[str | None], tasks: list[str]) -> list[list[int]]:
        """input_ids of text-only inputs (None = no text), in the encode_one layout."""
        given = [i for i, t in enumerate(texts) if t]
        tokens = self.tokenizer.encode_batch_fast([texts[i] for i in given], add_special_tokens=False) \
            if hasattr(self.tokenizer, "encode_batch_fast") else \
            self.tokenizer.encode_batch([texts[i] for i in given], add_special_tokens=False)
        body: list[list[int]] = [[] for _ in texts]
        for i, enc in zip(given, tokens):
            body[i] = enc.ids
        out = []
        for task, text_ids in zip(tasks, body):
            head = self.prefix_ids[task]
            room = self.max_length - len(head) - 1
            if room < 0:
                raise ValueError(f"the task prefix ({len(head)} tokens) exceeds model.max_length={self.max_length}")
            out.append(head + text_ids[:room] + [self.eos_id])
        return out


def _rust_tokenizer(inputs_dir: Path):
    from tokenizers import Tokenizer

    if (inputs_dir / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(inputs_dir / "tokenizer.json"))
    from transformers import AutoTokenizer  # a folder with only the slow files: convert once

    return AutoTokenizer.from_pretrained(str(inputs_dir)).backend_tokenizer


@lru_cache(maxsize=4)
def text_encoder(inputs_dir: str) -> TextEncoder:
    return TextEncoder(inputs_dir)


def tokenize_table(table: pa.Table, inputs_dir: str) -> pa.Table:
    """Ray Data stage: canonical rows → the encoded columns of the module docstring."""
    n = table.num_rows
    tasks = table.column("task").to_pylist()
    columns: dict[str, pa.Array] = {"id": table.column("id"), "task": table.column("task"),
                                    "lang": table.column("lang")}
    score = table.column("score") if "score" in table.column_names else pa.nulls(n, pa.float32())
    columns["score"] = pc.fill_null(pc.cast(score, pa.float32()), float("nan"))
    columns["neg_text"] = table.column("neg_text") if "neg_text" in table.column_names else \
        pa.array([[]] * n, pa.list_(pa.string()))
    for side, (text_key, image_key) in SIDES.items():
        texts = table.column(text_key).to_pylist() if text_key in table.column_names else [None] * n
        images = table.column(image_key).to_pylist() if image_key in table.column_names else [None] * n
        empty = [i for i in range(n) if texts[i] is None and not images[i]]
        if empty:  # prepare rejects such rows; a source that skipped prepare gets told which one
            raise ValueError(f"row {table.column('id')[empty[0]].as_py()!r}: {text_key} and {image_key} "
                             f"are both empty ({len(empty)} such rows in this block)")
        columns.update(_tokenize_side(side, texts, images, tasks, str(inputs_dir)))
        if side == "p":
            columns["p_key"] = pa.array(positive_keys(texts, images), pa.int64())
    return pa.table(columns)


def positive_keys(texts: list[str | None], images: list[list[bytes] | None]) -> np.ndarray:
    """One int64 per row, equal for rows whose positives have the same text and the same image
    bytes: the loss does not use such a positive as a negative of the other row (`loss.mask_duplicates`)."""
    import hashlib

    keys = np.empty(len(texts), dtype=np.int64)
    for i, (text, imgs) in enumerate(zip(texts, images)):
        h = hashlib.blake2b(digest_size=8)
        h.update((text or "").encode())
        for img in imgs or ():
            h.update(len(img).to_bytes(8, "little"))  # lengths too: ("ab", "c") is not ("a", "bc")
            h.update(img)
        keys[i] = int.from_bytes(h.digest(), "little", signed=True)
    return keys


def has_images(table: pa.Table) -> bool:
    """Whether any row of a canonical table has an image (the image columns' list lengths)."""
    return any(c in table.column_names and (pc.sum(pc.list_value_length(table.column(c))).as_py() or 0) > 0
               for c in ("query_images", "pos_images"))


def tokenize_rows(table: pa.Table, inputs_dir: str) -> tuple[pa.Table | None, list[tuple[int, str, str]]]:
    """`tokenize_table`, but a row that fails (an image that does not decode, a row with nothing in
    it) does not fail the others: (the encoded good rows in order, [(row index, id, reason)] of the
    bad ones). What the training stream runs, in a Ray task when the rows have images."""
    try:
        return tokenize_table(table, inputs_dir), []
    except Exception:  # noqa: BLE001 - find which rows; each one's own error is its reason
        good, bad = [], []
        for i in range(table.num_rows):
            try:
                good.append(tokenize_table(table.slice(i, 1), inputs_dir))
            except Exception as e:  # noqa: BLE001
                bad.append((i, str(table.column("id")[i].as_py()), f"{type(e).__name__}: {e}"))
        return (pa.concat_tables(good) if good else None), bad


def _tokenize_side(side: str, texts: list, images: list, tasks: list[str], inputs_dir: str) -> dict[str, pa.Array]:
    rows: list[dict[str, np.ndarray] | None] = [None] * len(texts)
    with_images = [i for i, im in enumerate(images) if im]
    text_only = [i for i, im in enumerate(images) if not im]
    if with_images:
        builder = load_builder(inputs_dir)
        for i in with_images:
            rows[i] = builder.encode_one(texts[i], list(images[i]), tasks[i])
    if text_only:
        for i, input_ids in zip(text_only, text_encoder(inputs_dir).encode([texts[i] for i in text_only],
                                                                          [tasks[i] for i in text_only])):
            rows[i] = {"input_ids": input_ids}
    ids = [np.asarray(r["input_ids"], dtype=np.int32) for r in rows]
    kinds = [np.asarray(r["mm_token_type_ids"], dtype=np.int8) if "pixel_values" in r else np.zeros(len(x), np.int8)
             for r, x in zip(rows, ids)]
    pixels = [np.asarray(r["pixel_values"], dtype=np.float32).reshape(-1) if "pixel_values" in r
              else np.zeros(0, np.float32) for r in rows]
    grids = [np.asarray(r["image_grid_thw"], dtype=np.int64).reshape(-1) if "pixel_values" in r
             else np.zeros(0, np.int64) for r in rows]
    return {f"{side}_input_ids": _lists(ids, np.int32), f"{side}_mm_token_type_ids": _lists(kinds, np.int8),
            f"{side}_pixel_values": _lists(pixels, np.float32, large=True),
            f"{side}_image_grid_thw": _lists(grids, np.int64)}


def _lists(parts: list[np.ndarray], dtype, large: bool = False) -> pa.Array:
    """Ragged numpy arrays → one Arrow list array (one concatenation, no per-value objects)."""
    offsets = np.zeros(len(parts) + 1, dtype=np.int64 if large else np.int32)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    values = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return (pa.LargeListArray if large else pa.ListArray).from_arrays(pa.array(offsets), pa.array(values))
