"""Embedding-job throughput: `pipelines.embed` (Ray Data) against a plain loop over `PolyEmbedder.encode`.

    python bench/embed_job.py [--model DIR] [--rows 2000] [--image-every 4] [--num-actors 1] [--batch-size 32]

Same model and the same rows for both: real NTREX sentences (Vietnamese, English, Chinese), every
k-th row with a small generated PNG beside its text. Without --model the tiny random model is built.
Baseline: one process reads the Parquet file and calls `encode` batch by batch (decode, tokenize and
forward all on one thread of control). Ours: the Ray Data job, reported two ways: rows/s over the
pipeline's execution (what the job prints, actor start-up included) and over the whole command
(Ray start-up included). Prints both and the ratio ours / baseline.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EVAL = Path(os.environ.get("VIPOLY_EVAL_DATA", REPO.parent / "shared" / "data" / "eval"))


def make_rows(n: int, image_every: int) -> list[dict]:
    from PIL import Image

    files = ["newstest2019-ref.vie.txt", "newstest2019-src.eng.txt", "newstest2019-ref.zho-CN.txt"]
    lines = [line.strip() for f in files for line in (EVAL / "ntrex128" / f).read_text(encoding="utf-8").split("\n")]
    lines = [line for line in lines if line]
    rows = []
    for i in range(n):
        image = None
        if image_every and i % image_every == 0:
            buf = io.BytesIO()
            Image.new("RGB", (48 + i % 17, 40), ((7 * i) % 256, 120, (3 * i) % 256)).save(buf, "PNG")
            image = buf.getvalue()
        rows.append({"id": f"r{i}", "text": lines[i % len(lines)], "image": image})
    return rows


def baseline(model_dir: Path, data: Path, batch_size: int) -> float:
    """rows/s of a single-process loop: read, encode, collect (model load not timed)."""
    import numpy as np
    import pyarrow.parquet as pq

    from vipoly.model import PolyEmbedder

    model = PolyEmbedder.from_pretrained(model_dir).eval()
    t0 = time.perf_counter()
    table = pq.read_table(data)
    out = []
    for batch in table.to_batches(max_chunksize=batch_size):
        texts, images = batch.column("text").to_pylist(), batch.column("image").to_pylist()
        # encode takes pairs or one modality per call: group rows like the job does
        with_image = [i for i, im in enumerate(images) if im is not None]
        text_only = [i for i, im in enumerate(images) if im is None]
        if with_image:
            out.append(model.encode(texts=[texts[i] for i in with_image], images=[images[i] for i in with_image],
                                    batch_size=batch_size))
        if text_only:
            out.append(model.encode(texts=[texts[i] for i in text_only], batch_size=batch_size))
    n = sum(len(x) for x in out)
    assert n == table.num_rows and np.isfinite(np.concatenate(out)).all()
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--image-every", type=int, default=4)
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="vipoly-bench-embed-"))
    model_dir = Path(args.model) if args.model else tmp / "tiny"
    if not args.model:
        from vipoly.model.tiny import build_tiny

        build_tiny(model_dir, seed=0)
    data = tmp / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(make_rows(args.rows, args.image_every)), data, row_group_size=256)

    load_before = os.getloadavg()[0]
    base_before = baseline(model_dir, data, args.batch_size)

    from pipelines.embed import build_parser, run

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, _temp_dir=str(Path("/tmp") / f"vipoly-bench-{os.getpid()}"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    summary = run(build_parser().parse_args([
        "--model", str(model_dir), "--input", str(data), "--output", str(tmp / "out"),
        "--batch-size", str(args.batch_size), "--num-actors", str(args.num_actors),
        "--cpus-per-actor", str(args.cpus_per_actor), "--num-gpus-per-actor", str(args.num_gpus_per_actor)]))
    total = time.perf_counter() - t0
    ray.shutdown()
    assert summary["embedded"] == args.rows, summary
    # The baseline runs before and after the job: on a shared machine the spread shows the noise.
    base_after = baseline(model_dir, data, args.batch_size)
    base = (base_before + base_after) / 2

    ours, ours_total = summary["rows_per_s"], args.rows / total
    print(f"\nrows={args.rows} (1 in {args.image_every} with an image), batch={args.batch_size}, "
          f"actors={args.num_actors}, cpus/actor={args.cpus_per_actor}, cores={os.cpu_count()}, model={model_dir.name}, "
          f"load average {load_before:.1f} → {os.getloadavg()[0]:.1f}")
    print(f"baseline  plain encode loop, one process : {base:8.1f} rows/s   (before {base_before:.1f}, after {base_after:.1f})")
    print(f"ours      Ray Data job (execution)       : {ours:8.1f} rows/s   ratio {ours / base:.2f}")
    print(f"ours      Ray Data job (incl. ray.init)  : {ours_total:8.1f} rows/s   ratio {ours_total / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
