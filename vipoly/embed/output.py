"""The embedding job's output folder: what is already embedded (a resumed run skips it), the side
files merged at the end, and the duplicates a killed run can leave. `Output` is the driver's view
of one run of the job on the folder."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

LANCE = "embeddings.lance"  # the Lance dataset inside OUTPUT (--format lance)
ERRORS = "_errors.jsonl"  # "_" prefix: Parquet readers skip it, so OUTPUT reads as one dataset
SIDE_DIR = "_job"  # per-task side files (bad rows, counts) merged by the driver at the end
SET_ASIDE = "_incomplete"  # unreadable output files from a killed run


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


def merge_side_files(side_dir: Path) -> dict:
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


def write(ds, out_dir: Path, lance_out: Path | None, cpus: float, tasks: int) -> None:
    """Run the pipeline into OUTPUT: Parquet files, or rows appended to the Lance dataset."""
    remote_args = {"num_cpus": cpus}
    if lance_out is None:
        ds.write_parquet(str(out_dir), concurrency=tasks, ray_remote_args=remote_args)
        return
    from ray.data import SaveMode  # ray

    from vipoly.search.lance_sink import LanceSink, ray_write_lance_works

    append = (lance_out / "_versions").is_dir()
    if ray_write_lance_works():
        ds.write_lance(str(lance_out), mode=SaveMode.APPEND if append else SaveMode.CREATE, concurrency=tasks,
                       ray_remote_args=remote_args)
    else:  # Ray 2.60's Lance sink and released pylance disagree: see vipoly/search/lance_sink.py
        ds.write_datasink(LanceSink(str(lance_out), append), concurrency=tasks, ray_remote_args=remote_args)


class Output:
    """One run of the job on OUTPUT (Parquet parts, or the Lance dataset with `lance`): opened before
    the pipeline (`done`: the ids a resumed run skips), closed after it (`close`: duplicates dropped,
    the side files merged into OUTPUT/_errors.jsonl)."""

    def __init__(self, out_dir: str | Path, lance: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.side_dir = self.dir / SIDE_DIR
        shutil.rmtree(self.side_dir, ignore_errors=True)  # a killed run's side files describe work redone now
        self.lance = self.dir / LANCE if lance else None
        if self.lance is not None:
            self.done = lance_ids(self.lance)
            self._before_rows = len(self.done)
        else:
            self.done = existing_ids(self.dir)
            self._before = {f.name for f in output_files(self.dir)}

    def write(self, ds, cpus: float, tasks: int) -> None:
        write(ds, self.dir, self.lance, cpus=cpus, tasks=tasks)

    def close(self) -> tuple[int, dict, list[dict]]:
        """(rows embedded by this run, the side files' counts, the errors written to ERRORS)."""
        stats = merge_side_files(self.side_dir)
        if self.lance is not None:
            dups = drop_lance_duplicates(self.lance) if (self.lance / "_versions").is_dir() else []
            embedded = len(lance_ids(self.lance)) - self._before_rows
        else:
            new_files = [f for f in output_files(self.dir) if f.name not in self._before]
            dups = drop_duplicates(new_files)
            embedded = sum(pq.read_metadata(f).num_rows for f in new_files)
        errors = stats["bad"] + [{"id": i, "file": None, "reason": "duplicate id in the input (embedded once)"}
                                 for i in dups]
        with open(self.dir / ERRORS, "w", encoding="utf-8") as f:
            for e in errors:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
        return embedded, stats, errors
