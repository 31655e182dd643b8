"""The on-disk layout of a prepared data set, shared by `pipelines.prepare` and the synthetic generator.

    OUT/<task>/part-*.parquet   canonical rows (vipoly.data.schema.SCHEMA), one folder per task
    OUT/quarantine.jsonl        {"id", "source", "reason"} for every rejected row
    OUT/manifest.json           rows per task and per (task, lang), bytes per task, files

`ShardWriter` streams rows into per-task files, rolling to a new file every `rows_per_file` rows;
`TaskShardSink` wraps it as a Ray Data Datasink so that each write task writes its own files
(named by the task index, so parallel writers never collide) and reports what it wrote.
"""
from __future__ import annotations

import glob
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink

from vipoly.data.schema import SCHEMA, conform
from vipoly.tasks import TASKS

QUARANTINE = "quarantine.jsonl"
ENCODED_DIR = "_encoded"  # OUT/_encoded/<tokenizer fingerprint>/…: pipelines.pretokenize's cache (vipoly.data.pretokenized)
MANIFEST = "manifest.json"


class ShardWriter:
    """Per-task rolling Parquet writers under `out`; files are `part-<prefix>-<k>.parquet`."""

    def __init__(self, out: str | Path, prefix: str = "00000", rows_per_file: int = 100_000,
                 row_group_rows: int = 1024):
        self.out = Path(out)
        self.prefix = prefix
        self.rows_per_file = rows_per_file
        self.row_group_rows = row_group_rows
        self._open: dict[str, tuple[pq.ParquetWriter, Path, int]] = {}
        self._file_no: Counter = Counter()
        self.files: list[dict[str, Any]] = []
        self.rows: Counter = Counter()  # (task, lang) → rows

    def write(self, table: pa.Table) -> None:
        table = conform(table)
        for task in pc.unique(table.column("task")).to_pylist():
            part = table.filter(pc.equal(table.column("task"), task))
            for lang, n in zip(*_value_counts(part.column("lang"))):
                self.rows[(task, lang)] += n
            while part.num_rows:
                writer, path, n = self._writer(task)
                take = min(part.num_rows, self.rows_per_file - n)
                writer.write_table(part.slice(0, take), row_group_size=self.row_group_rows)
                self._open[task] = (writer, path, n + take)
                part = part.slice(take)
                if n + take >= self.rows_per_file:
                    self._close(task)

    def _writer(self, task: str) -> tuple[pq.ParquetWriter, Path, int]:
        if task not in self._open:
            path = self.out / task / f"part-{self.prefix}-{self._file_no[task]:03d}.parquet"
            self._file_no[task] += 1
            path.parent.mkdir(parents=True, exist_ok=True)
            self._open[task] = (pq.ParquetWriter(path, SCHEMA), path, 0)
        return self._open[task]

    def _close(self, task: str) -> None:
        writer, path, n = self._open.pop(task)
        writer.close()
        self.files.append({"task": task, "path": str(path), "rows": n, "bytes": path.stat().st_size})

    def close(self) -> dict[str, Any]:
        for task in list(self._open):
            self._close(task)
        return {"files": self.files, "rows": [[t, l, n] for (t, l), n in self.rows.items()]}


def _value_counts(col: pa.ChunkedArray) -> tuple[list, list]:
    vc = pc.value_counts(col)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


class TaskShardSink(Datasink):
    """Ray Data sink: `ds.write_datasink(TaskShardSink(out))` writes `out/<task>/part-*.parquet`.

    After the write, `.result` holds the merged `ShardWriter.close()` reports of all write tasks.
    """

    def __init__(self, out: str | Path, rows_per_file: int = 100_000):
        self.out = str(out)
        self.rows_per_file = rows_per_file
        self.result: dict[str, Any] = {"files": [], "rows": []}

    def write(self, blocks: Iterable, ctx) -> dict[str, Any]:
        writer = ShardWriter(self.out, prefix=f"{ctx.task_idx:05d}", rows_per_file=self.rows_per_file)
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
            if table.num_rows:
                writer.write(table)
        return writer.close()

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.result["files"] += r["files"]
            self.result["rows"] += r["rows"]


def write_manifest(out: str | Path, report: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Write OUT/manifest.json from a writer report (+ `extra` keys) and return it.

    rows: {task: n}, rows_by_lang: {task: {lang: n}}, bytes: {task: on-disk bytes}, files: [...].
    """
    by_lang: dict[str, Counter] = {}
    for task, lang, n in report["rows"]:
        by_lang.setdefault(task, Counter())[lang] += n
    files = sorted(report["files"], key=lambda f: f["path"])
    size: Counter = Counter()
    for f in files:
        size[f["task"]] += f["bytes"]
    order = [t for t in TASKS if t in by_lang]
    manifest = {
        "rows": {t: sum(by_lang[t].values()) for t in order},
        "rows_by_lang": {t: dict(sorted(by_lang[t].items())) for t in order},
        "bytes": {t: size[t] for t in order},
        "total_rows": sum(sum(c.values()) for c in by_lang.values()),
        "files": [{**f, "path": str(Path(f["path"]).resolve().relative_to(Path(out).resolve()))} for f in files],
        **extra,
    }
    Path(out, MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def write_quarantine(out: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write OUT/quarantine.jsonl ({"id", "source", "reason"} per line); returns the count."""
    n = 0
    with open(Path(out, QUARANTINE), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"id": r.get("id"), "source": r.get("source"), "reason": r.get("reason")},
                               ensure_ascii=False) + "\n")
            n += 1
    return n


def shard_files(path: str | Path) -> list[str]:
    """Parquet files of a source: a file, a folder (searched recursively) or a glob, sorted; or a
    file or folder URI on any pyarrow/fsspec filesystem (`s3://…`, `gs://…`, `file://…`)."""
    if "://" in str(path):
        from vipoly.data.reader import list_parquet

        files = [f for f in list_parquet(str(path)) if ENCODED_DIR not in f.split("/")]
    else:
        p = Path(path)
        if p.is_file():
            return [str(p)]
        if p.is_dir():  # (a pre-encoded copy inside the folder is not a source)
            files = sorted(str(f) for f in p.rglob("*.parquet") if ENCODED_DIR not in f.relative_to(p).parts)
        else:
            files = sorted(glob.glob(str(path), recursive=True))
    if not files:
        raise ValueError(f"no Parquet files at {path}")
    return files


def read_parquet(paths: str | list[str], **kwargs):
    """`ray.data.read_parquet` through Ray Data's V1 datasource.

    Ray 2.60's default (V2) Parquet reader starts FooterReader actors for every read, paid again at
    every epoch of every mixed source; the V1 reader reads footers inside its read tasks, two orders
    of magnitude faster here (docs/benchmarks.md, "Design measurements").
    """
    import ray  # ray

    ctx = ray.data.DataContext.get_current()
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, **kwargs)  # ray
    finally:
        ctx.use_datasource_v2 = previous


def task_sources(root: str | Path) -> dict[str, list[str]]:
    """{task: its shard files} of a prepared folder (a path or a URI), for the tasks that have any."""
    out = {}
    for task in TASKS:
        if "://" in str(root):
            from vipoly.data.reader import list_parquet

            folder = f"{str(root).rstrip('/')}/{task}"
            files = [f for f in list_parquet(folder) if f.rsplit("/", 1)[0] == folder]
        else:
            d = Path(root, task)
            files = sorted(str(f) for f in d.glob("*.parquet")) if d.is_dir() else []
        if files:
            out[task] = files
    if not out:
        raise ValueError(f"{root} holds no prepared shards (expected {root}/<task>/part-*.parquet)")
    return out


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root, MANIFEST)
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} in {root}")
    return json.loads(path.read_text())
