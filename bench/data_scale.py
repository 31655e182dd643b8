"""The data layer at the reference run's shape: plan, resume, bytes per worker, memory per worker.

    python bench/data_scale.py [--rows 11000000] [--skip-index] [--images 12000]

Sections (each prints its numbers and what they are measured against):
  [plan]    the global order of an 11M-row corpus (configs/qwen2vl-2b.yaml's mix, 100k-row files
            of 1024-row groups, G = 480 in 10 chunks of 48, 64 lanes) from the Parquet footers
            alone: time and memory of `build_plan`, and the pickle every worker receives;
  [resume]  time to the first batch of worker 1 of 4 opened at sample 5M (a saved position, as a
            checkpoint holds it) against one opened at sample 0, on the same files;
  [bytes]   bytes read per worker over one pass of a 960k-row source, W = 1, 2, 4, against the
            data's size (what every worker read before: all of it);
  [memory]  peak RSS of one worker (a fresh process each) streaming 448² JPEG pages for
            data.shuffle_buffer ∈ {64, 1000, 10000}.
"""
from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIX = {"text_pair": 0.50, "instr": 0.055, "ocr": 0.225, "vqa_single": 0.11, "vqa_multi": 0.11}
SHARES = {"text_pair": 5.6, "instr": 0.6, "ocr": 2.5, "vqa_single": 1.25, "vqa_multi": 1.25}  # millions (SPEC §5)


def write_text_corpus(root: Path, sizes: dict[str, int], file_rows: int = 100_000) -> int:
    """Canonical text rows (hash-like ids, short texts), `sizes[task]` rows per task."""
    from vipoly.data.schema import SCHEMA

    written = 0
    for task, n in sizes.items():
        (root / task).mkdir(parents=True, exist_ok=True)
        for f, start in enumerate(range(0, n, file_rows)):
            k = min(file_rows, n - start)
            i = np.arange(start, start + k, dtype=np.uint64)
            ids = pa.array(np.char.add(task[:2], ((i * np.uint64(2654435761)) % np.uint64(2**61)).astype(str)))
            text = pa.array(np.char.add("câu ", i.astype(str)))
            cols = {"id": ids, "task": pa.array([task] * k), "lang": pa.array(["vi"] * k), "query_text": text,
                    "pos_text": text, "score": pa.array(np.full(k, 0.5), pa.float32()) if task == "text_pair" else None}
            table = pa.table({c: cols.get(c) if cols.get(c) is not None else pa.nulls(k, SCHEMA.field(c).type)
                              for c in SCHEMA.names}, schema=SCHEMA)
            pq.write_table(table, root / task / f"part-{f:05d}.parquet", row_group_size=1024)
            written += k
    return written


def config(root: Path, workers: int, **data):
    from vipoly.config import Config

    return Config.model_validate({"data": {"root": str(root), "mix": MIX, "shuffle_buffer": 10_000, "partitions": 64,
                                           **data},
                                  "train": {"global_batch_size": 480, "grad_accum": 10, "num_workers": workers}})


def bench_plan(root: Path) -> None:
    from vipoly.data.stream import build_plan

    tracemalloc.start()
    t = time.perf_counter()
    plan = build_plan(config(root, 4))
    seconds = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    files = sum(len(s.files) for s in plan.sources.values())
    print(f"\n[plan] {plan.num_rows:,} rows in {files} files: build_plan (footers only) {seconds:.2f} s, "
          f"peak Python memory {peak / 2**20:.1f} MiB, pickle for the workers {len(pickle.dumps(plan)) / 2**20:.2f} MiB")
    print(f"  {plan.steps_per_epoch():,} steps an epoch; resumable on {plan.allowed_workers()} workers "
          f"(targets: ≤ 10 s, ≤ 1 GiB)")
    return plan


def bench_resume(root: Path, plan, model_dir: Path, at: int = 5_000_000) -> None:
    from vipoly.data.stream import PlannedStream

    state = plan.fresh_state()
    t = time.perf_counter()
    left = -(-at // plan.chunk)  # chunks drawn before sample `at`, 1,024 at a time
    while left > 0:
        plan.advance_many(state, range(0), min(1024, left))
        left -= min(1024, left)
    replay = time.perf_counter() - t
    waits = {}
    for label, start in (("fresh (sample 0)", None), (f"resumed (sample {at:,})", state.to_dict())):
        t = time.perf_counter()
        with PlannedStream(plan, 1, 4, model_dir, state=start) as stream:
            stream.next_chunk()
        waits[label] = time.perf_counter() - t
    print("\n[resume] worker 1 of 4, seconds to its first micro-batch: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in waits.items()))
    print(f"  difference {waits[list(waits)[1]] - waits[list(waits)[0]]:+.2f} s (target ≤ 10 s); the position comes from "
          f"the checkpoint (computing it from scratch, not needed on resume: {replay:.1f} s for "
          f"{state.chunk:,} chunks)")


def bench_bytes(tmp: Path, model_dir: Path) -> None:
    from vipoly.data.stream import PlannedStream, build_plan

    root = tmp / "bytes"
    write_text_corpus(root, {"instr": 960_000})  # lanes' slices of 15,000 rows, as at scale: ≫ a row group
    cfg = config(root, 1, mix={"instr": 1}, shuffle_buffer=1000)
    cfg.train.global_batch_size, cfg.train.grad_accum = 48, 1
    plan = build_plan(cfg)
    metas = [pq.ParquetFile(f).metadata for f in plan.sources["instr"].files]
    size = sum(m.row_group(g).column(c).total_compressed_size for m in metas for g in range(m.num_row_groups)
               for c in range(m.num_columns))
    n = plan.sources["instr"].num_rows
    print(f"\n[bytes] one pass over {n:,} rows ({size / 2**20:.1f} MiB of column data), 48-sample chunks, 64 lanes")
    for world in (1, 2, 4):
        streams = [PlannedStream(plan, r, world, model_dir, read_ahead=1) for r in range(world)]
        for _ in range(n // plan.chunk - 1):  # the last chunk of the pass is selected (read) ahead
            for s in streams:
                s.next_chunk()
        read = [s.bytes_read for s in streams]
        for s in streams:
            s.close()
        print(f"  W={world}: per worker {', '.join(f'{b / 2**20:.2f}' for b in read)} MiB = "
              f"{max(read) / size:.3f} of the data (1/W = {1 / world:.3f}); before: every worker read 1.000")


MEMORY_CHILD = """
import resource, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from vipoly.config import Config
from vipoly.data.stream import PlannedStream, build_plan
cfg = Config.model_validate({{"data": {{"root": {root!r}, "mix": {{"ocr": 1}}, "shuffle_buffer": {buffer},
    "partitions": 8}}, "train": {{"global_batch_size": 8, "grad_accum": 1, "num_workers": 1}}}})
plan = build_plan(cfg)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with PlannedStream(plan, 0, 1, {model!r}, read_ahead=2) as stream:
    for _ in range({chunks}):
        rows, _ = stream.next_chunk()
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_memory(tmp: Path, model_dir: Path, n: int) -> None:
    from vipoly.data.schema import SCHEMA
    from vipoly.data.synthetic import jpeg_pages

    pages = jpeg_pages(64, grain=56)
    root = tmp / "pages"
    (root / "ocr").mkdir(parents=True)
    for f, start in enumerate(range(0, n, 4000)):
        k = min(4000, n - start)
        cols = {"id": [f"p{i:07d}" for i in range(start, start + k)], "task": ["ocr"] * k, "lang": ["vi"] * k,
                "query_images": [[pages[i % 64]] for i in range(start, start + k)],
                "pos_text": [f"trang {i}" for i in range(start, start + k)]}
        pq.write_table(pa.table({c: cols.get(c, pa.nulls(k, SCHEMA.field(c).type)) for c in SCHEMA.names}, schema=SCHEMA),
                       root / "ocr" / f"part-{f:03d}.parquet", row_group_size=1024,
                       use_dictionary=False)  # 64 distinct pages: a dictionary would store them once
    raw = sum(p.stat().st_size for p in (root / "ocr").glob("*.parquet")) / n
    print(f"\n[memory] one worker, 448² JPEG pages ({raw / 1e3:.0f} kB each; 4.8 MB of float32 patches encoded), "
          f"8-sample chunks, 40 chunks: peak RSS (ru_maxrss) of a fresh process")
    for buffer in (64, 1000, 10_000):
        code = MEMORY_CHILD.format(repo=str(REPO), root=str(root), buffer=buffer, model=str(model_dir), chunks=40)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        before, after = (int(x) / 1024 for x in out[-2:])
        print(f"  data.shuffle_buffer={buffer:>6}: peak {after:7.0f} MiB ({after - before:+6.0f} MiB while streaming; "
              f"raw bytes of the buffer {buffer * raw / 2**20:6.0f} MiB, its patches {buffer * 4.8e6 / 2**20:7.0f} MiB)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=11_000_000, help="rows of the planned corpus")
    p.add_argument("--images", type=int, default=12_000, help="448² pages for the memory section")
    p.add_argument("--skip-index", action="store_true", help="skip [plan] and [resume] (they write the corpus)")
    p.add_argument("--skip-bytes", action="store_true", help="skip [bytes] (it tokenises 960k rows per W)")
    args = p.parse_args(argv)

    from vipoly.config import Config
    from vipoly.model.inputs import write_inputs
    from vipoly.model.tiny import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="vipoly-bench-scale-"))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; data in {tmp}")
    tiny = build_tiny(tmp / "tiny", seed=0)
    model_dir = Path(write_inputs(Config.model_validate({
        "model": {"backbone": str(tiny), "max_length": 1024, "image_max_pixels": 448 * 448},
        "run": {"dir": str(tmp / "run")}})))
    if not args.skip_index:
        t = time.perf_counter()
        total = sum(SHARES.values())
        rows = write_text_corpus(tmp / "corpus", {t: int(args.rows * v / total) for t, v in SHARES.items()})
        print(f"wrote {rows:,} rows in {time.perf_counter() - t:.0f} s")
        plan = bench_plan(tmp / "corpus")
        bench_resume(tmp / "corpus", plan, model_dir)
    if not args.skip_bytes:
        bench_bytes(tmp, model_dir)
    bench_memory(tmp, model_dir, args.images)


if __name__ == "__main__":
    main()
