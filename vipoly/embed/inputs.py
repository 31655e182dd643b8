"""The embedding job's input side: the files and columns checked before any work, and the
normalize stage (light CPU tasks) that gives every file one column layout and drops the ids
already embedded."""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

@dataclass
class Columns:
    id: str = "id"
    text: str | None = "text"
    image: str | None = "image"


def input_files(paths: list[str]) -> list[Path]:
    """Expand folders to their .parquet / .jsonl files; fail naming the first path that is missing."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and file_format(f))
            if not found:
                raise ValueError(f"--input {p}: folder holds no .parquet or .jsonl file")
            files += found
        elif p.is_file():
            if not file_format(p):
                raise ValueError(f"--input {p}: unknown format (expected .parquet, .jsonl or .json lines)")
            files.append(p)
        else:
            raise ValueError(f"--input {p}: file not found")
    return files


def file_format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json")):
        return "json"
    return None


def file_columns(path: Path) -> set[str]:
    """Column names of a Parquet file (its schema) or a JSONL file (keys of its first 100 rows)."""
    if file_format(path) == "parquet":
        try:
            return set(pq.read_schema(path).names)
        except pa.ArrowInvalid as e:
            raise ValueError(f"--input {path}: not a readable Parquet file ({e})") from None
    keys: set[str] = set()
    parsed = 0
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 100:
                break
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                continue  # a malformed line is a bad row for the job to report, not a reason to stop
            if isinstance(row, dict):
                keys |= set(row)
                parsed += 1
    if not parsed:
        raise ValueError(f"--input {path}: no JSON object in its first 100 lines (expected JSON Lines)")
    return keys


def resolve_columns(files: list[Path], cols: Columns, explicit: set[str]) -> dict[Path, Columns]:
    """Per file, the columns it has. The id column is required everywhere; of text and image at
    least one must exist; a column named explicitly by a flag must exist in every file."""
    out = {}
    for f in files:
        have = file_columns(f)
        if cols.id not in have:
            raise ValueError(f"--input {f}: id column {cols.id!r} not found (columns: {sorted(have)}); see --id-col")
        for flag, name in (("--text-col", cols.text), ("--image-col", cols.image)):
            if flag in explicit and name not in have:
                raise ValueError(f"--input {f}: column {name!r} ({flag}) not found (columns: {sorted(have)})")
        text = cols.text if cols.text in have else None
        image = cols.image if cols.image in have else None
        if file_format(f) == "parquet":
            _check_types(f, text, image)
        if text is None and image is None:
            raise ValueError(f"--input {f}: neither text column {cols.text!r} nor image column {cols.image!r} "
                             f"found (columns: {sorted(have)}); see --text-col / --image-col")
        out[f] = Columns(cols.id, text, image)
    return out


def _check_types(path: Path, text: str | None, image: str | None) -> None:
    """Parquet columns of a type the job cannot use fail now, not halfway through the job."""
    schema = pq.read_schema(path)
    is_str = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
    is_bin = lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)  # noqa: E731
    if text and not (is_str(schema.field(text).type) or pa.types.is_null(schema.field(text).type)):
        raise ValueError(f"--input {path}: text column {text!r} has type {schema.field(text).type}, expected string")
    if image and not any(f(schema.field(image).type) for f in (is_str, is_bin, pa.types.is_null)):
        raise ValueError(f"--input {path}: image column {image!r} has type {schema.field(image).type}, "
                         "expected binary (encoded image bytes) or string (a path)")
RAW = pa.schema([("id", pa.string()), ("text", pa.string()), ("image", pa.binary()), ("image_path", pa.string()),
                 ("file", pa.string())])


def normalize(batch: pa.Table, cols: Columns, done: pa.Array, side_dir: str, json_lines: bool = False) -> pa.Table:
    """Rename the user's columns to one schema (so every input file can be unioned) and drop ids
    already embedded. Pure Arrow and json: these tasks never import torch."""
    bad = []
    if json_lines:
        batch, bad = _parse_lines(batch, cols)
    n_in = batch.num_rows + len(bad)
    ids = batch.column(cols.id).cast(pa.string())
    if len(done):
        keep = pc.invert(pc.fill_null(pc.is_in(ids, value_set=done), False))
        batch, ids = batch.filter(keep), ids.filter(keep)
    n = batch.num_rows
    null_str, null_bin = pa.nulls(n, pa.string()), pa.nulls(n, pa.binary())
    text = batch.column(cols.text).cast(pa.string()) if cols.text else null_str
    image, image_path = null_bin, null_str
    if cols.image:
        col = batch.column(cols.image)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            image = col.cast(pa.binary())
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            image_path = _beside(col.cast(pa.string()), batch.column("path"))
        elif not pa.types.is_null(col.type):
            raise ValueError(f"column {cols.image!r}: expected image bytes or a path, got Arrow type {col.type}")
    write_side(side_dir, {"rows_in": n_in, "skipped": n_in - len(bad) - n, "bad": bad})
    return pa.table([ids, text, image, image_path, batch.column("path").cast(pa.string())], schema=RAW)


def _parse_lines(batch: pa.Table, cols: Columns) -> tuple[pa.Table, list[dict]]:
    """JSONL lines (from read_text) → a table of the wanted columns, values kept as written.

    Parsed here with `json` rather than by Ray's read_json, which goes through pandas and turns an
    id like "007" into the number 7: ids must come out exactly as they went in."""
    wanted = [c for c in (cols.id, cols.text, cols.image) if c]
    out: dict[str, list] = {c: [] for c in wanted + ["path"]}
    bad = []
    for line, path in zip(batch.column("text").to_pylist(), batch.column("path").to_pylist()):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError
        except ValueError:
            bad.append({"id": None, "file": path, "reason": f"not a JSON object: {line[:80]!r}"})
            continue
        for c in wanted:
            out[c].append(None if row.get(c) is None else str(row[c]))
        out["path"].append(path)
    return pa.table({c: pa.array(v, pa.string()) for c, v in out.items()}), bad


def _beside(paths: pa.ChunkedArray, files: pa.ChunkedArray) -> pa.Array:
    """A relative image path is looked up beside its input file first, then as given (cwd)."""
    out = []
    for value, source in zip(paths.to_pylist(), files.to_pylist()):
        if value and not os.path.isabs(value) and source:
            beside = Path(source).parent / value
            value = str(beside) if beside.exists() else value
        out.append(value)
    return pa.array(out, pa.string())


def write_side(side_dir: str, record: dict) -> None:
    """Counts and bad rows of one batch, in a file of its own (tasks run anywhere, in any order)."""
    Path(side_dir).mkdir(parents=True, exist_ok=True)
    (Path(side_dir) / f"{uuid.uuid4().hex}.json").write_text(json.dumps(record, ensure_ascii=False))


def read_inputs(per_file: dict[Path, Columns], done: pa.Array, side_dir: str, cpus: float, tasks: int):
    """One Ray Data dataset of every input row in the normalized layout, the ids in `done` dropped.
    Files with the same format and columns are read together (one read, many blocks)."""
    import ray  # ray

    from vipoly.data.shards import read_parquet  # Ray Data's V1 reader: no FooterReader actors

    groups: dict[tuple, list[str]] = {}
    for f, c in per_file.items():
        groups.setdefault((file_format(f), c.id, c.text, c.image), []).append(str(f))
    parts = []
    for (fmt, id_col, text_col, image_col), paths in groups.items():
        cols = Columns(id_col, text_col, image_col)
        if fmt == "parquet":
            wanted = [x for x in (id_col, text_col, image_col) if x]
            ds = read_parquet(paths, include_paths=True, num_cpus=cpus).select_columns(wanted + ["path"])
        else:
            ds = ray.data.read_text(paths, include_paths=True, num_cpus=cpus)
        parts.append(ds.map_batches(normalize, batch_format="pyarrow", num_cpus=cpus,
                                    compute=ray.data.TaskPoolStrategy(size=tasks),
                                    fn_kwargs={"cols": cols, "done": done, "side_dir": side_dir,
                                               "json_lines": fmt == "json"}))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
