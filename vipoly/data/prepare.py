"""Raw sources → canonical Parquet shards per task, a quarantine report and a manifest (the
library side of `python -m pipelines.prepare`).

Three Ray Data passes, so that it scales from a laptop to a cluster:
  1. convert → validate (per row, in parallel) → a staging Parquet set (OUT/_staging) that keeps
     every row with its source, input order and rejection reason;
  2. duplicate ids: a driver-side pass over the staging set's small columns only (id, order,
     source, reason). A duplicate cannot be seen inside one block, so this is the one global
     step; it keeps the first occurrence of each id among the good rows;
  3. staging → keep good, non-duplicate rows → OUT/<task>/part-*.parquet (TaskShardSink).
Every row ends in exactly one place: a shard or the quarantine (the summary checks the sum).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vipoly.data.config import DataConfig
from vipoly.data.converters import ConvertOptions, convert_unit, plan_units
from vipoly.data.schema import COLUMNS, ORDER, REASON, SOURCE, STAGING_SCHEMA, rows_to_table
from vipoly.data.shards import (MANIFEST, QUARANTINE, TaskShardSink, read_parquet, write_manifest,
                                 write_quarantine)
from vipoly.data.validate import RowValidator, duplicate_losers
from vipoly.tasks import TASKS
from vipoly.ray_init import init_ray

STAGING = "_staging"
BATCH_ROWS = 1024


def convert_stage(batch: dict[str, np.ndarray], opts: dict[str, Any]):
    """Ray Data stage: a batch of JSON-encoded units → Arrow tables of staging rows."""
    options = ConvertOptions(**opts)
    for unit in batch["unit"]:
        rows = []
        for row in convert_unit(json.loads(unit), options):
            rows.append(row)
            if len(rows) == BATCH_ROWS:
                yield rows_to_table(rows, STAGING_SCHEMA)
                rows = []
        if rows:
            yield rows_to_table(rows, STAGING_SCHEMA)


def keep_good(batch: pa.Table, losers: np.ndarray) -> pa.Table:
    """Ray Data stage: drop rejected rows and the later duplicates (`losers`: their _order values)."""
    keep = pc.is_null(batch.column(REASON))
    if len(losers):
        keep = pc.and_(keep, pc.invert(pc.is_in(batch.column(ORDER), pa.array(losers))))
    return batch.filter(keep).select(list(COLUMNS))


def prepare(fmt: str, inputs: list[str], out: str | Path, opts: ConvertOptions | None = None,
            data: DataConfig | None = None, overwrite: bool = False, rows_per_file: int = 100_000,
            ray_address: str | None = None) -> dict[str, Any]:
    """Run the three passes; returns the manifest (counts, bytes, quarantine summary).

    Inputs are checked before Ray starts or anything in `out` is touched.
    """
    import ray  # ray

    opts = opts or ConvertOptions()
    data = data or DataConfig()
    out = Path(out)
    units = plan_units(fmt, inputs, opts)
    _clear_or_refuse(out, overwrite)
    init_ray(ray_address)
    staging = out / STAGING
    ctx = ray.data.DataContext.get_current()
    preserve, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True  # deterministic shards
    try:
        # ---- pass 1: convert → validate → staging (ray)
        (ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=max(len(units), 1))
         .map_batches(convert_stage, fn_kwargs={"opts": opts.to_dict()}, batch_size=1)
         .map_batches(RowValidator(data.max_text_chars, data.overlong), batch_format="pyarrow")
         .write_parquet(str(staging)))
        # ---- pass 2: the global view, on the small columns only
        small_cols = ["id", ORDER, SOURCE, REASON]
        meta = STAGING_SCHEMA.empty_table().select(small_cols)
        if any(staging.glob("*.parquet")):  # an input without a single row writes no file
            small = read_parquet(str(staging), columns=small_cols)
            meta = pa.concat_tables([meta, *small.iter_batches(batch_format="pyarrow", batch_size=65536)])
        bad = meta.filter(pc.is_valid(meta.column(REASON)))
        good = meta.filter(pc.is_null(meta.column(REASON)))
        dups = duplicate_losers(good.select(["id", ORDER, SOURCE]))
        losers = np.sort(dups.column(ORDER).to_numpy())
        # ---- pass 3: staging → per-task shards (ray)
        sink = TaskShardSink(out, rows_per_file=rows_per_file)
        if good.num_rows:
            (read_parquet(str(staging))
             .map_batches(keep_good, fn_kwargs={"losers": losers}, batch_format="pyarrow")
             .write_datasink(sink))
    finally:
        ctx.execution_options.preserve_order = preserve
    shutil.rmtree(staging, ignore_errors=True)

    quarantined = _quarantine_records(bad, dups)
    n_bad = write_quarantine(out, quarantined)
    reasons: dict[str, int] = {}
    for r in quarantined:
        key = r["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    summary = {"format": fmt, "inputs": [str(p) for p in inputs], "options": opts.to_dict(),
               "max_text_chars": data.max_text_chars, "overlong": data.overlong,
               "good": int(good.num_rows - dups.num_rows), "quarantined": n_bad, "reasons": reasons}
    manifest = write_manifest(out, sink.result, **summary)
    if manifest["total_rows"] != summary["good"] or summary["good"] + n_bad != meta.num_rows:
        raise RuntimeError(f"row accounting failed: {meta.num_rows} read, {manifest['total_rows']} written, "
                           f"{n_bad} quarantined")
    return manifest


def _quarantine_records(bad: pa.Table, dups: pa.Table) -> list[dict[str, Any]]:
    """Rejected rows in input order: per-row reasons and later duplicates together."""
    cols = ["id", ORDER, SOURCE, REASON]
    rows = bad.select(cols).to_pylist() + dups.select(cols).to_pylist()
    rows.sort(key=lambda r: r[ORDER])
    return [{"id": r["id"], "source": r[SOURCE], "reason": r[REASON]} for r in rows]


def _clear_or_refuse(out: Path, overwrite: bool) -> None:
    existing = [out / t for t in TASKS if (out / t).exists()]
    existing += [p for p in (out / MANIFEST, out / QUARANTINE, out / STAGING) if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{out} already holds prepared data ({existing[0].name}, ...); pass --overwrite to replace it")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
