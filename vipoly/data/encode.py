"""Canonical rows → model inputs, as Arrow columns, in a Ray Data stage that needs no torch.

    ds.map_batches(encode_table, fn_kwargs={"model_dir": d}, batch_format="pyarrow")   # Ray Data stage
    rows = row_handles(encoded_block)     # consumer side: BlockRow handles (table_rows: dicts)

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

Why this shape:
- Text sides, most of the data, are tokenised in one batched call of the Rust tokenizer
  (`tokenizers`, loaded from the model's tokenizer.json): 2.5× the rate of one call per text, and
  a worker that encodes text imports neither torch nor transformers (≈ 12 s per new Ray worker
  process otherwise). Sides with images go through `InputBuilder.encode_one` (the image
  processor), loaded on the first batch that has an image.
- Arrow list columns carry ragged token ids between stages at the cost of a memcpy; on the
  consumer side a block becomes one `EncodedBlock` (its columns as numpy and lists) and one small
  `BlockRow` handle per row, which the collate reads as numpy views: no Python object per token,
  nor a dict per row. (Ray's own tensor columns and `iter_rows` built a Python object per row
  value and were 3–5× slower here; dict rows cost 7 µs a row against 1 µs for handles.)
A test checks that every row encodes exactly as `InputBuilder.encode_one` encodes it.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vipoly.tasks import TASK_INDEX, TASKS, prefix
from vipoly.folder import read_meta
from vipoly.ray_init import init_ray

SIDES = {"q": ("query_text", "query_images"), "p": ("pos_text", "pos_images")}
ENCODED_KEYS = ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw")
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|endoftext|>")


@lru_cache(maxsize=4)
def load_builder(model_dir: str):
    """One InputBuilder (tokenizer + image processor) per process and model: Ray reuses task
    workers, so it loads once per process, not once per batch. Imports torch and transformers."""
    from vipoly.model.inputs import InputBuilder

    return InputBuilder.from_pretrained(model_dir)


class TextEncoder:
    """The text half of `InputBuilder`: prefix, batched tokenisation, truncation, closing token,
    from the model folder's tokenizer.json and vipoly.json alone."""

    def __init__(self, model_dir: str | Path):
        from vipoly.config import ModelConfig

        model_dir = Path(model_dir)
        self.max_length = ModelConfig.model_validate(read_meta(model_dir)["model"]).max_length
        self.tokenizer = _rust_tokenizer(model_dir)
        ids = [self.tokenizer.token_to_id(t) for t in VISION_TOKENS]
        missing = [t for t, i in zip(VISION_TOKENS, ids) if i is None]
        if missing:
            raise ValueError(f"{model_dir}: tokenizer lacks the Qwen2-VL token(s) {missing}")
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


def _rust_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    if (model_dir / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    from transformers import AutoTokenizer  # a folder with only the slow files: convert once

    return AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer


@lru_cache(maxsize=4)
def text_encoder(model_dir: str) -> TextEncoder:
    return TextEncoder(model_dir)


# ---------------------------------------------------------------- the stage
def encode_table(table: pa.Table, model_dir: str) -> pa.Table:
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
        columns.update(_encode_side(side, texts, images, tasks, str(model_dir)))
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


def encode_rows(table: pa.Table, model_dir: str) -> tuple[pa.Table | None, list[tuple[int, str, str]]]:
    """`encode_table`, but a row that fails (an image that does not decode, a row with nothing in
    it) does not fail the others: (the encoded good rows in order, [(row index, id, reason)] of the
    bad ones). What the training stream runs, in a Ray task when the rows have images."""
    try:
        return encode_table(table, model_dir), []
    except Exception:  # noqa: BLE001 - find which rows; each one's own error is its reason
        good, bad = [], []
        for i in range(table.num_rows):
            try:
                good.append(encode_table(table.slice(i, 1), model_dir))
            except Exception as e:  # noqa: BLE001
                bad.append((i, str(table.column("id")[i].as_py()), f"{type(e).__name__}: {e}"))
        return (pa.concat_tables(good) if good else None), bad


def _encode_side(side: str, texts: list, images: list, tasks: list[str], model_dir: str) -> dict[str, pa.Array]:
    rows: list[dict[str, np.ndarray] | None] = [None] * len(texts)
    with_images = [i for i, im in enumerate(images) if im]
    text_only = [i for i, im in enumerate(images) if not im]
    if with_images:
        builder = load_builder(model_dir)
        for i in with_images:
            rows[i] = builder.encode_one(texts[i], list(images[i]), tasks[i])
    if text_only:
        for i, input_ids in zip(text_only, text_encoder(model_dir).encode([texts[i] for i in text_only],
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


# ---------------------------------------------------------------- the consumer
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


class EncodedBlock:
    """An encoded block (from `encode_table`), column by column: the scalar columns as Python lists
    and numpy, the list columns as `ListColumn`s. Its rows are `BlockRow` handles, so splitting a
    block into rows costs one small object per row; the collate then takes each row's sides as
    numpy views (`side`) and its labels from these columns (`vipoly.data.collate`)."""

    def __init__(self, table: pa.Table):
        self.num_rows = table.num_rows
        self.id, self.task, self.lang = (table.column(k).to_pylist() for k in ("id", "task", "lang"))
        self.score = table.column("score").to_numpy()
        self.p_key = table.column("p_key").to_numpy()
        self._neg_column = table.column("neg_text")
        self._neg: list[list[str]] | None = None  # made on the first `negatives` call
        self.lists = {f"{side}_{k}": ListColumn(table.column(f"{side}_{k}")) for side in SIDES for k in ENCODED_KEYS}
        self.has_images = {side: len(self.lists[f"{side}_image_grid_thw"].values) > 0 for side in SIDES}
        self.views: dict[str, list[np.ndarray]] = {}  # side → its input_ids view per row (`token_views`)
        self._task_index: list[int] | None = None

    @property
    def task_index(self) -> list[int]:
        """Each row's task as its index in TASKS (what a batch's task_ids hold)."""
        if self._task_index is None:
            self._task_index = [TASK_INDEX[str(t)] for t in self.task]
        return self._task_index

    def token_views(self, side: str) -> list[np.ndarray]:
        """Every row's input_ids of one side as numpy views, made once per block (the rows of a
        window are all used, sooner or later): a view per row in one loop costs a fraction of
        slicing row by row in the collate."""
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
    """Encoded rows (from `encode_table`) → `BlockRow` handles, what the training stream yields."""
    return EncodedBlock(table).rows()


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Encoded rows (from `encode_table`) → one dict per row: id, task, lang, score (None = no
    score) and q_/p_ input_ids, mm_token_type_ids, pixel_values (P, dim), image_grid_thw (k, 3) as
    numpy views into the table (pixel keys only on sides with images)."""
    block = EncodedBlock(table)
    return [block.row(i) for i in range(block.num_rows)]


# ---------------------------------------------------------------- pre-encoded text
ENCODING_VERSION = 3  # bump when the encoded layout changes: old copies then stop matching
# 2: one row group per row group of the source file (the global order reads row groups by their
#    place in the source, vipoly.data.plan), where 1 wrote 4,096-row groups.
# 3: the p_key column (false-negative masking).


def fingerprint(model_dir: str | Path) -> str:
    """What a text row's encoding depends on: the tokenizer file, max_length and this layout."""
    return _fingerprint(str(model_dir))


@lru_cache(maxsize=4)
def _fingerprint(model_dir: str) -> str:  # hashing a 150k-token vocabulary once per process, not per file
    import hashlib

    enc = text_encoder(model_dir)
    digest = hashlib.sha256(enc.tokenizer.to_str().encode())
    digest.update(f"{enc.max_length}/{ENCODING_VERSION}".encode())
    return digest.hexdigest()[:16]


def encoded_copy(source: str | Path, cache: str | Path, model_dir: str | Path) -> Path:
    """Where the pre-encoded copy of one canonical file lives: cache/<fingerprint>/<path hash>-<name>."""
    import hashlib

    source = Path(source).resolve()
    return Path(cache) / fingerprint(model_dir) / f"{hashlib.sha1(str(source).encode()).hexdigest()[:12]}-{source.name}"


def _stamp(source: Path) -> dict[bytes, bytes]:
    st = source.stat()
    return {b"vipoly.source": str(source).encode(), b"vipoly.source_bytes": str(st.st_size).encode(),
            b"vipoly.source_mtime_ns": str(st.st_mtime_ns).encode()}


def encoded_files(files: list[str], cache: str | Path | None, model_dir: str | Path) -> list[str] | None:
    """The pre-encoded copies of `files`, in order, when every one exists and was made from the
    file as it is now (size and mtime); else None (the source is then encoded as it streams)."""
    import pyarrow.parquet as pq

    if not cache or not Path(cache).is_dir():
        return None
    out = []
    for f in files:
        copy = encoded_copy(f, cache, model_dir)
        if not copy.is_file():
            return None
        stamp = _stamp(Path(f).resolve())
        meta = pq.read_schema(copy).metadata or {}
        if any(meta.get(k) != v for k, v in stamp.items()):
            return None
        out.append(str(copy))
    return out


def encode_file(source: str, cache: str, model_dir: str, chunk_rows: int = 4096) -> dict[str, Any]:
    """Write the pre-encoded copy of one canonical file (text-only files; a file with images is
    left to the streaming encoder, since its patches would be ~100× its JPEG bytes): the same rows
    in the same order and the same row groups, so a range of the source's rows is a range of whole
    row groups of the copy too. Written to a temporary name and renamed, so a copy is whole or
    absent."""
    import os

    import pyarrow.parquet as pq

    src = Path(source).resolve()
    out = encoded_copy(src, cache, model_dir)
    reader = pq.ParquetFile(src)
    image_columns = [c for c in ("query_images", "pos_images") if c in reader.schema_arrow.names]
    if image_columns:
        for batch in reader.iter_batches(batch_size=chunk_rows, columns=image_columns):
            if any(pc.sum(pc.list_value_length(batch.column(c))).as_py() for c in image_columns):
                return {"source": str(src), "rows": 0, "skipped": "has images"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer, rows = None, 0
    try:
        for g in range(reader.num_row_groups):
            parts = [encode_table(pa.Table.from_batches([batch]), str(model_dir))
                     for batch in reader.iter_batches(batch_size=chunk_rows, row_groups=[g])]
            if not parts:
                continue
            table = pa.concat_tables(parts)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema.with_metadata(_stamp(src)))
            writer.write_table(table, row_group_size=max(1, table.num_rows))  # one group, as in the source
            rows += table.num_rows
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)  # no half-written copy left behind
        raise
    if writer is None:
        return {"source": str(src), "rows": 0, "skipped": "empty"}
    writer.close()
    os.replace(tmp, out)
    return {"source": str(src), "rows": rows, "path": str(out)}


def default_cache(data) -> str | None:
    """`data.encoded_dir`, or `<data.root>/_encoded` when that is unset ("" turns it off)."""
    from vipoly.data.shards import ENCODED_DIR

    if data.encoded_dir is not None:
        return data.encoded_dir or None
    return str(Path(data.root) / ENCODED_DIR) if data.root else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m vipoly.data.encode --config CFG [--set ...]`: pre-encode the text sources of
    `data.mix` for `model.backbone` into `data.encoded_dir`, one Ray task per file. Training then
    reads them instead of tokenising on the fly. `<run.dir>/inputs` is written first, as
    `pipelines.train` writes it, so that both see the same tokenizer and `model.max_length`."""
    import argparse
    import sys

    import ray
    from tqdm import tqdm

    from vipoly.config import add_config_args, config_from_args
    from vipoly.data.stream import resolve_sources
    from vipoly.model.inputs import write_inputs

    parser = argparse.ArgumentParser(prog="python -m vipoly.data.encode", description=main.__doc__.split("\n")[0])
    cfg = config_from_args(add_config_args(parser).parse_args(argv))
    cache = default_cache(cfg.data)
    if not cache:
        parser.error("no cache folder: set data.encoded_dir or data.root")
    model_dir = write_inputs(cfg)
    text_encoder(model_dir)  # a wrong model folder fails here, before any task starts
    files = sorted({f for fs in resolve_sources(cfg.data).values() for f in fs})
    init_ray(cfg.run.ray_address)
    task = ray.remote(num_cpus=1)(encode_file)  # ray: one file per task
    pending = [task.remote(f, cache, model_dir) for f in files]
    done = []
    with tqdm(total=len(pending), desc="encoding files", unit="file", disable=not sys.stderr.isatty()) as bar:
        while pending:
            ready, pending = ray.wait(pending)  # ray
            done += ray.get(ready)  # ray
            bar.update(len(ready))
    written = [d for d in done if d["rows"]]
    summary = {"cache": f"{cache}/{fingerprint(model_dir)}", "files": len(written), "rows": sum(d["rows"] for d in written),
               "skipped": {d["source"]: d["skipped"] for d in done if not d["rows"]}}
    print(f"pre-encoded {summary['rows']} rows of {len(written)} files into {summary['cache']}; "
          f"{len(summary['skipped'])} files left to the streaming encoder (images or empty)")
    return summary


if __name__ == "__main__":
    main()
