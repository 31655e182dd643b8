"""Batch embedding with Ray Data: Parquet / JSONL rows in, Parquet rows (or a Lance dataset) with embeddings out.

    python -m pipelines.embed --model runs/demo/model --input docs.parquet images.jsonl --output runs/emb \\
        [--id-col id --text-col text --image-col image --task T --dim D] \\
        [--num-actors 2 --num-gpus-per-actor 1 --batch-size 64] [--format parquet|lance]

Stages (one Ray Data pipeline, streaming):
  read Parquet / JSONL lines, with the file of each row
  → normalize (light CPU tasks): one column layout for every file; drop ids already embedded
  → prepare (CPU actors, --num-preparers): check each row, decode its image (bytes or a path), tokenize
    and cut image patches exactly as `PolyEmbedder.encode` does; bad rows go to a side file
  → embed (actor pool, --num-actors × --num-gpus-per-actor): each actor loads the PolyEmbedder once
    and runs the forward pass on padded batches
  → write Parquet: id, embedding (fixed_size_list<float32>[dim]), model, dim.
    With --format lance: a Lance dataset OUTPUT/embeddings.lance (written by Ray Data) with id,
    vector (fixed_size_list<float32>[dim]), text, image (a reference: the image's path, or
    "FILE#id=ID" for image bytes stored in an input file), model, dim — what `pipelines.index` and
    LanceDB read directly. Each run's rows are committed in one Lance transaction at its end.

Guarantees: one output row per input id. Re-running the same command skips ids already in the
output directory (resumable: a file left half-written by a killed run is set aside and its ids are
embedded again). Bad rows (missing id, empty text and no image, undecodable image, duplicate id) are
listed in OUTPUT/_errors.jsonl with their reason; every good row is still embedded. A missing input
file or column fails before any work starts, naming it. Runs locally (an embedded Ray) or on a
cluster under `ray job submit --working-dir . -- python -m pipelines.embed ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.cli import run_cli
from vipoly.ray_init import init_ray

LANCE = "embeddings.lance"  # the Lance dataset inside OUTPUT (--format lance)
ERRORS = "_errors.jsonl"  # "_" prefix: Parquet readers skip it, so OUTPUT reads as one dataset
SIDE_DIR = "_job"  # per-task side files (bad rows, counts) merged by the driver at the end
SET_ASIDE = "_incomplete"  # unreadable output files from a killed run


@dataclass
class Columns:
    id: str = "id"
    text: str | None = "text"
    image: str | None = "image"


# ------------------------------------------------------------------ checks before any work
def input_files(paths: list[str]) -> list[Path]:
    """Expand folders to their .parquet / .jsonl files; fail naming the first path that is missing."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _format(f))
            if not found:
                raise ValueError(f"--input {p}: folder holds no .parquet or .jsonl file")
            files += found
        elif p.is_file():
            if not _format(p):
                raise ValueError(f"--input {p}: unknown format (expected .parquet, .jsonl or .json lines)")
            files.append(p)
        else:
            raise ValueError(f"--input {p}: file not found")
    return files


def _format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json")):
        return "json"
    return None


def file_columns(path: Path) -> set[str]:
    """Column names of a Parquet file (its schema) or a JSONL file (keys of its first 100 rows)."""
    if _format(path) == "parquet":
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
        if _format(f) == "parquet":
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


# ------------------------------------------------------------------ resume
def output_files(out_dir: Path) -> list[Path]:
    """The Parquet parts of an output folder (names starting with "_" or "." are bookkeeping)."""
    return sorted(f for f in out_dir.glob("*.parquet") if not f.name.startswith(("_", ".")))


def existing_ids(out_dir: Path) -> pa.Array:
    """Ids already embedded. An output file that does not read back whole (a killed run's last
    write) is moved to OUTPUT/_incomplete/ so its ids are embedded again."""
    ids = []
    for f in output_files(out_dir):
        try:
            ids.append(pq.read_table(f, columns=["id"]).column("id").combine_chunks())
        except Exception as e:  # truncated or foreign file
            aside = out_dir / SET_ASIDE
            aside.mkdir(exist_ok=True)
            print(f"[embed] {f.name} is unreadable ({type(e).__name__}); moved to {aside}/", file=sys.stderr)
            shutil.move(str(f), aside / f.name)
    return pa.concat_arrays(ids) if ids else pa.array([], pa.string())


def lance_ids(dataset: Path) -> pa.Array:
    """Ids already in a Lance output. A killed run never committed its fragments, so they are not
    visible here and their ids are embedded again."""
    import lance

    if not (dataset / "_versions").is_dir():
        return pa.array([], pa.string())
    return lance.dataset(str(dataset)).to_table(columns=["id"]).column("id").combine_chunks()


def drop_lance_duplicates(dataset: Path) -> list[str]:
    """As `drop_duplicates` for a Lance output: keep each id's first row (lowest row id: earlier
    runs and earlier fragments first), delete the others, return the dropped ids."""
    import lance

    ds = lance.dataset(str(dataset))
    t = ds.to_table(columns=["id"], with_row_id=True)
    ids, rowids = t.column("id").to_pylist(), t.column("_rowid").to_pylist()
    first: dict[str, int] = {}
    extra: list[tuple[int, str]] = []
    for i, r in sorted(zip(ids, rowids), key=lambda x: x[1]):
        if i in first:
            extra.append((r, i))
        else:
            first[i] = r
    if extra:
        ds.delete(f"_rowid IN ({', '.join(str(r) for r, _ in extra)})")
    return [i for _, i in extra]


# ------------------------------------------------------------------ stage 1: normalize (light CPU tasks)
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
    _side(side_dir, {"rows_in": n_in, "skipped": n_in - len(bad) - n, "bad": bad})
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


def _side(side_dir: str, record: dict) -> None:
    """Counts and bad rows of one batch, in a file of its own (tasks run anywhere, in any order)."""
    Path(side_dir).mkdir(parents=True, exist_ok=True)
    (Path(side_dir) / f"{uuid.uuid4().hex}.json").write_text(json.dumps(record, ensure_ascii=False))


# ------------------------------------------------------------------ stage 2: prepare (CPU actors)
PREPARED = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int64())),
                      ("mm_token_type_ids", pa.list_(pa.int32())), ("pixel_values", pa.list_(pa.float32())),
                      ("pixel_dim", pa.int32()), ("image_grid_thw", pa.list_(pa.int64()))])
# --format lance carries the source text and an image reference through to the output
PREPARED_SOURCE = PREPARED.append(pa.field("text", pa.string())).append(pa.field("image_ref", pa.string()))


class Prepare:
    """Check each row, decode its image and build the model input (token ids, pixel patches)
    exactly as `PolyEmbedder.encode` would; bad rows go to a side file.

    An actor rather than a task: the tokenizer and image processor load once, and torch is imported
    by a few long-lived processes instead of one per task."""

    def __init__(self, model_dir: str, overrides: dict, task: str | None, side_dir: str, keep_source: bool = False):
        from vipoly.eval.loading import effective_model_config
        from vipoly.model import InputBuilder
        from vipoly.model.backbone import load_processor

        self.builder = InputBuilder(load_processor(model_dir), effective_model_config(model_dir, overrides))
        self.task, self.side_dir = task, side_dir
        self.schema = PREPARED_SOURCE if keep_source else PREPARED

    def __call__(self, batch: pa.Table) -> pa.Table:
        good: dict[str, list] = {name: [] for name in self.schema.names}
        bad = []
        for r in batch.to_pylist():
            text = r["text"] if r["text"] and r["text"].strip() else None
            image = r["image"] or r["image_path"] or None
            try:
                if not r["id"]:
                    raise ValueError("missing id")
                if text is None and image is None:
                    raise ValueError("empty text and no image")
                row = self.builder.encode_one(text, None if image is None else _decode(image), self.task)
            except ValueError as e:
                bad.append({"id": r["id"] or None, "file": r["file"], "reason": str(e)})
                continue
            pixels = row.get("pixel_values")
            good["id"].append(r["id"])
            good["input_ids"].append(row["input_ids"])
            good["mm_token_type_ids"].append(row["mm_token_type_ids"])
            good["pixel_values"].append(None if pixels is None else pixels.reshape(-1))
            good["pixel_dim"].append(None if pixels is None else pixels.shape[-1])
            good["image_grid_thw"].append(None if pixels is None else row["image_grid_thw"].reshape(-1))
            if self.schema is PREPARED_SOURCE:
                good["text"].append(text)
                good["image_ref"].append(r["image_path"] or (f"{r['file']}#id={r['id']}" if r["image"] else None))
        if bad:
            _side(self.side_dir, {"rows_in": 0, "skipped": 0, "bad": bad})
        return pa.table(good, schema=self.schema)


def _decode(image):
    """An RGB image, or a ValueError whose message names the file or the byte count."""
    from vipoly.model import decode_image

    try:
        return decode_image(image)
    except ValueError:
        if isinstance(image, str):
            what = "image file not found" if not os.path.exists(image) else "undecodable image file"
            raise ValueError(f"{what}: {image}") from None
        raise ValueError(f"undecodable image ({len(image)} bytes)") from None


# ------------------------------------------------------------------ stage 3: embed (actor pool, GPUs)
class Embedder:
    """One PolyEmbedder per actor, loaded once; pads prepared rows and runs the forward pass."""

    def __init__(self, model_dir: str, overrides: dict, model_name: str, dim: int | None, threads: int,
                 compile_layers: bool = False):
        import torch

        from vipoly.eval.loading import load_for_inference

        torch.set_num_threads(threads)  # fractional-CPU actors must not each spawn a thread per core
        self.model = load_for_inference(model_dir, overrides, "cuda" if torch.cuda.is_available() else "cpu")
        if compile_layers:
            self.model.compile_layers()
        self.name, self.dim = model_name, dim or self.model.embedding_dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        import contextlib

        import torch

        from vipoly.data.encode import list_views
        from vipoly.model import matryoshka

        # Columns → numpy views; `to_pylist` would make a Python float of every pixel value.
        ids, mm, pixels, grids = (list_views(batch.column(c)) for c in
                                  ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw"))
        dims = batch.column("pixel_dim").to_pylist()
        rows = []
        for i in range(batch.num_rows):
            row = {"input_ids": ids[i], "mm_token_type_ids": mm[i]}
            if pixels[i] is not None:
                row["pixel_values"] = pixels[i].reshape(-1, dims[i])
                row["image_grid_thw"] = grids[i].reshape(-1, 3)
            rows.append(row)
        emb = np.empty((len(rows), self.dim), dtype=np.float32)
        if rows:
            model = self.model
            # packed (no padding) where the attention is a varlen kind, as `encode` does
            inputs = {k: v.to(model.device) for k, v in model.collate(rows).items()}
            # the same autocast as `encode` (bf16 on a GPU), so the vectors match it
            autocast = getattr(model, "_inference_autocast", contextlib.nullcontext)
            with torch.no_grad(), autocast():
                emb[:] = matryoshka(model(**inputs).embedding, self.dim).float().cpu().numpy()
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), self.dim)
        meta = {"model": pa.array([self.name] * len(rows), pa.string()),
                "dim": pa.array([self.dim] * len(rows), pa.int32())}
        if "text" in batch.column_names:  # --format lance: LanceDB's column names, with the source
            return pa.table({"id": batch.column("id"), "vector": vectors, "text": batch.column("text"),
                             "image": batch.column("image_ref"), **meta})
        return pa.table({"id": batch.column("id"), "embedding": vectors, **meta})


# ------------------------------------------------------------------ driver
def build_parser() -> argparse.ArgumentParser:
    from vipoly.config import add_config_args

    p = argparse.ArgumentParser(prog="python -m pipelines.embed", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="PolyEmbedder directory (save_pretrained output)")
    p.add_argument("--input", nargs="+", required=True, help="Parquet / JSONL files or folders of them")
    p.add_argument("--output", required=True, help="output folder (Parquet parts or embeddings.lance, + _errors.jsonl)")
    p.add_argument("--format", choices=("parquet", "lance"), default="parquet",
                   help="parquet (default): id, embedding, model, dim; lance: a Lance dataset OUTPUT/embeddings.lance "
                        "with id, vector, text, image (a reference), model, dim")
    p.add_argument("--id-col", default="id")
    p.add_argument("--text-col", default=None, help="text column (default: text, optional if an image column exists)")
    p.add_argument("--image-col", default=None, help="image column, bytes or a path (default: image, optional)")
    p.add_argument("--task", default=None, help="task prefix (one of vipoly.tasks.TASKS; default none)")
    p.add_argument("--dim", type=int, default=None, help="Matryoshka truncation (default: the model's size)")
    p.add_argument("--model-name", default=None, help="value of the `model` column (default: the model folder)")
    p.add_argument("--num-actors", type=int, default=1, help="embedding actors (model replicas)")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--cpus-per-actor", type=float, default=0.5,
                   help="CPUs reserved per embedding actor (torch threads = max(1, round(this))); small by default "
                        "so that on a 2-core machine readers and preparers still get scheduled beside it")
    p.add_argument("--num-preparers", type=int, default=1, help="CPU actors that decode images and tokenize")
    p.add_argument("--read-tasks", type=int, default=2,
                   help="concurrent normalize / write tasks (with fractional CPUs Ray would start a process per task)")
    p.add_argument("--prepare-cpus", type=float, default=0.25, help="CPUs reserved per read/prepare task or actor")
    p.add_argument("--batch-size", type=int, default=64, help="rows per actor call (and per encode batch)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model layer in the actors (GPU: about 1.4x the eager rate "
                        "after a minute of compiling; see docs/benchmarks.md)")
    add_config_args(p)  # model.{attn_implementation,dtype,max_length,image_*_pixels} apply; see vipoly.eval.loading
    return p


def run(args: argparse.Namespace) -> dict:
    from vipoly.config import config_from_args
    from vipoly.eval.loading import effective_model_config, inference_overrides, read_meta
    from vipoly.tasks import check_task

    check_task(args.task)
    model_dir = Path(args.model)
    meta = read_meta(model_dir)
    overrides = inference_overrides(config_from_args(args))
    effective_model_config(model_dir, overrides)  # a bad override fails here, not inside an actor
    model_name = args.model_name or meta.get("name") or model_dir.resolve().name
    if args.dim is not None and not 1 <= args.dim <= meta["embedding_dim"]:
        raise ValueError(f"--dim {args.dim}: must lie in 1..{meta['embedding_dim']} (the model's embedding size)")
    explicit = {f for f, v in (("--text-col", args.text_col), ("--image-col", args.image_col)) if v is not None}
    cols = Columns(args.id_col, args.text_col or "text", args.image_col or "image")
    files = input_files(args.input)
    per_file = resolve_columns(files, cols, explicit)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    side_dir = out_dir / SIDE_DIR
    shutil.rmtree(side_dir, ignore_errors=True)  # a killed run's side files describe work redone now
    lance_out = out_dir / LANCE if args.format == "lance" else None
    if lance_out is not None:
        done = lance_ids(lance_out)
        before_rows = len(done)
    else:
        done = existing_ids(out_dir)
        before = {f.name for f in output_files(out_dir)}

    import ray  # --- Ray from here on

    # Small inputs give an operator fewer blocks than its concurrency cap; Ray warns about each.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")

    we_start_ray = init_ray(log_to_driver=False)
    check_resources(args, ray.cluster_resources(), strict=we_start_ray)

    # Files with the same format and columns are read together (one read, many blocks).
    groups: dict[tuple, list[str]] = {}
    for f, c in per_file.items():
        groups.setdefault((_format(f), c.id, c.text, c.image), []).append(str(f))
    parts = []
    for (fmt, id_col, text_col, image_col), paths in groups.items():
        c = Columns(id_col, text_col, image_col)
        if fmt == "parquet":
            wanted = [x for x in (id_col, text_col, image_col) if x]
            ds = ray.data.read_parquet(paths, include_paths=True, num_cpus=args.prepare_cpus).select_columns(
                wanted + ["path"])
        else:
            ds = ray.data.read_text(paths, include_paths=True, num_cpus=args.prepare_cpus)
        parts.append(ds.map_batches(normalize, batch_format="pyarrow", num_cpus=args.prepare_cpus,
                                    compute=ray.data.TaskPoolStrategy(size=args.read_tasks),
                                    fn_kwargs={"cols": c, "done": done, "side_dir": str(side_dir),
                                               "json_lines": fmt == "json"}))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # Blocks of a few actor calls: a file read as one block would go through every stage whole,
    # one stage after the other; small blocks let preparing, embedding and writing overlap.
    ds = ds.repartition(target_num_rows_per_block=8 * args.batch_size)
    ds = ds.map_batches(
        Prepare, batch_format="pyarrow", batch_size=args.batch_size, num_cpus=args.prepare_cpus,
        fn_constructor_args=(str(model_dir.resolve()), overrides, args.task, str(side_dir), lance_out is not None),
        compute=ray.data.ActorPoolStrategy(size=args.num_preparers))
    threads = max(1, int(round(args.cpus_per_actor)))
    ds = ds.map_batches(
        Embedder, batch_format="pyarrow", batch_size=args.batch_size,
        fn_constructor_args=(str(model_dir.resolve()), overrides, model_name, args.dim, threads, args.compile),
        compute=ray.data.ActorPoolStrategy(size=args.num_actors),
        num_gpus=args.num_gpus_per_actor, num_cpus=args.cpus_per_actor)
    t0 = time.perf_counter()
    if lance_out is not None:
        from ray.data import SaveMode

        from vipoly.search.lance_sink import LanceSink, ray_write_lance_works

        append = (lance_out / "_versions").is_dir()
        if ray_write_lance_works():
            ds.write_lance(str(lance_out), mode=SaveMode.APPEND if append else SaveMode.CREATE,
                           concurrency=args.read_tasks, ray_remote_args={"num_cpus": args.prepare_cpus})
        else:  # Ray 2.60's Lance sink and released pylance disagree: see vipoly/search/lance_sink.py
            ds.write_datasink(LanceSink(str(lance_out), append), concurrency=args.read_tasks,
                              ray_remote_args={"num_cpus": args.prepare_cpus})
    else:
        ds.write_parquet(str(out_dir), concurrency=args.read_tasks, ray_remote_args={"num_cpus": args.prepare_cpus})
    seconds = time.perf_counter() - t0

    stats = _merge_side_files(side_dir)
    if lance_out is not None:
        dups = drop_lance_duplicates(lance_out) if (lance_out / "_versions").is_dir() else []
        embedded = len(lance_ids(lance_out)) - before_rows
    else:
        new_files = [f for f in output_files(out_dir) if f.name not in before]
        dups = drop_duplicates(new_files)
        embedded = sum(pq.read_metadata(f).num_rows for f in new_files)
    errors = stats["bad"] + [{"id": i, "file": None, "reason": "duplicate id in the input (embedded once)"} for i in dups]
    with open(out_dir / ERRORS, "w", encoding="utf-8") as f:
        for e in errors:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    summary = {"rows_in": stats["rows_in"], "skipped": stats["skipped"], "embedded": embedded, "errors": len(errors),
               "seconds": seconds, "rows_per_s": embedded / seconds if seconds > 0 else 0.0, "output": str(out_dir)}
    print(f"[embed] {embedded} rows embedded in {seconds:.1f}s ({summary['rows_per_s']:.1f} rows/s); "
          f"{stats['skipped']} already done, {len(errors)} bad → {out_dir / ERRORS}")
    return summary


def check_resources(args: argparse.Namespace, cluster: dict, strict: bool) -> None:
    """Fail (or, on a cluster that may autoscale, warn) when the actors leave no room for the rest.

    Ray Data lists input files in a task that takes 1 whole CPU (not configurable in Ray 2.60); if
    the actor pools hold more than total − 1 CPUs, the listing never starts and the job hangs."""
    cpus = args.num_actors * args.cpus_per_actor + args.num_preparers * args.prepare_cpus + 1.0
    gpus = args.num_actors * args.num_gpus_per_actor
    problems = []
    if cpus > cluster.get("CPU", 0):
        problems.append(f"{args.num_actors} actor(s) × --cpus-per-actor {args.cpus_per_actor} + "
                        f"{args.num_preparers} preparer(s) × --prepare-cpus {args.prepare_cpus} + 1 CPU for Ray Data's "
                        f"file listing = {cpus:g} CPUs, the cluster has {cluster.get('CPU', 0):g}")
    if gpus > cluster.get("GPU", 0):
        problems.append(f"{args.num_actors} actor(s) × --num-gpus-per-actor {args.num_gpus_per_actor} = {gpus:g} GPUs, "
                        f"the cluster has {cluster.get('GPU', 0):g}")
    if problems:
        msg = "not enough resources: " + "; ".join(problems) + " (lower --num-actors / --cpus-per-actor)"
        if strict:
            raise ValueError(msg)
        print(f"[embed] warning: {msg}; waiting for the cluster to grow", file=sys.stderr)


def _merge_side_files(side_dir: Path) -> dict:
    stats = {"rows_in": 0, "skipped": 0, "bad": []}
    seen = set()
    for f in sorted(side_dir.glob("*.json")) if side_dir.exists() else []:
        rec = json.loads(f.read_text())
        stats["rows_in"] += rec["rows_in"]
        stats["skipped"] += rec["skipped"]
        for b in rec["bad"]:
            key = (b["id"], b["file"], b["reason"]) if b["id"] else None  # a retried task reports twice
            if key is None or key not in seen:
                seen.add(key)
                stats["bad"].append(b)
    shutil.rmtree(side_dir, ignore_errors=True)
    return stats


def drop_duplicates(files: list[Path]) -> list[str]:
    """An id that occurs twice in the input is embedded twice by independent tasks; keep the first
    copy (file order), rewrite the files holding the others, and return the dropped ids."""
    if not files:
        return []
    ids = [pq.read_table(f, columns=["id"]).column("id").to_pylist() for f in files]
    counts: dict[str, int] = {}
    for chunk in ids:
        for i in chunk:
            counts[i] = counts.get(i, 0) + 1
    dup = {i for i, c in counts.items() if c > 1}
    if not dup:
        return []
    dropped, kept = [], set()
    for f, chunk in zip(files, ids):
        mask = []
        for i in chunk:
            first = i not in dup or i not in kept
            kept.add(i) if i in dup and first else None
            mask.append(first)
            if not first:
                dropped.append(i)
        if not all(mask):
            table = pq.read_table(f).filter(pa.array(mask))
            tmp = f.with_name("_" + f.name)  # "_": never read as part of the dataset
            pq.write_table(table, tmp)
            os.replace(tmp, f)  # atomic: a crash leaves the old file, never half of it
    return dropped


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
