"""Would producer processes lift the pre-encoded text stream to issue 14's ≥ 85% of the Arrow-block read?

    python bench/stream_producers.py [--n 128000] [--batch 32] [--producers 2] [--repeat 3]

A question, not a feature: the training stream runs in the Train worker's process, and
bench/data_pipeline.py measures it at 60–75% of a plain Ray Data read of the same shards, which
decodes in read tasks on every core. This splits one worker's stream the way `data.partitions`
already splits lanes between workers: K producer processes, producer k being rank k of K of the
same global order (so each reads and selects only its lanes), each collating its share of every
micro-batch and sending it through a pipe as numpy arrays; the consumer pads the K shares to one
length and concatenates them (the same samples as one process gives, in another row order).

Alternating, run after run, on the same synthetic text shards and pre-encoded copies as
bench/data_pipeline.py's "pre-encoded" path:
  Arrow-block read   Ray Data read_parquet → Arrow blocks (the issue's baseline)
  1 process          PlannedStream + collate in this process (what a Train worker runs)
  K producers        the split above, K processes plus this one
Each path's samples/s is printed over the whole run and steady (after its first batch or block; the
producers' whole run counts their start-up, seconds of imports, which a long run pays once), with
the ratios to the Arrow-block read of the same run, then their medians.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data_pipeline as dp  # noqa: E402  (the same shards, baseline and stream as that bench)


def _arrays(batch: dict) -> dict:
    """A collated batch with numpy arrays in place of tensors: a pipe carries them ~15× faster
    (pickling a batch's tensors cost ~0.4 ms, its arrays ~26 µs, measured here)."""
    import torch

    def conv(v):
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v.numpy() if isinstance(v, torch.Tensor) else v

    return conv(batch)


def produce(k: int, producers: int, data: dict, model_dir: str, n: int, batch: int, conn) -> None:
    """Producer k: rank k of `producers` of the global order (global batch `batch`), its collated
    share of each micro-batch into `conn`, then None."""
    import torch

    from vipoly.config import Config
    from vipoly.data.collate import PairCollate
    from vipoly.data.pretokenized import default_cache, encoded_files
    from vipoly.data.stream import PlannedStream, build_plan

    torch.set_num_threads(1)
    cfg = Config.model_validate({"data": data, "train": {"global_batch_size": batch, "grad_accum": 1,
                                                         "num_workers": producers}})
    plan = build_plan(cfg)
    copies = {s: encoded_files(src.files, default_cache(cfg.data), model_dir) for s, src in plan.sources.items()}
    collate = PairCollate(model_dir)
    with PlannedStream(plan, k, producers, model_dir, encoded=copies) as stream:
        for _ in range(n // batch + 1):  # the first batch (start-up), then n samples' worth
            conn.send_bytes(pickle.dumps(_arrays(collate(stream.next_chunk()[0])), protocol=5))
    conn.send_bytes(pickle.dumps(None))


def merge(parts: list[dict], pad_id: int) -> dict:
    """The producers' shares of one micro-batch as one batch: sides padded to one length (right
    padding, as InputBuilder.pad_ids), then concatenated."""
    import numpy as np
    import torch

    out = {}
    for side in ("query", "pos"):
        width = max(p[side]["input_ids"].shape[1] for p in parts)
        rows = sum(p[side]["input_ids"].shape[0] for p in parts)
        out[side] = {}
        for key in parts[0][side]:
            merged = np.full((rows, width), pad_id if key == "input_ids" else 0, dtype=parts[0][side][key].dtype)
            at = 0
            for p in parts:  # (np.pad costs ~0.15 ms a call: 12 of them were most of a batch's merge)
                x = p[side][key]
                merged[at:at + x.shape[0], :x.shape[1]] = x
                at += x.shape[0]
            out[side][key] = torch.from_numpy(merged)
    for key in ("task_ids", "scores", "pos_key"):
        out[key] = torch.from_numpy(np.concatenate([p[key] for p in parts]))
    out["lang"] = [x for p in parts for x in p["lang"]]
    out["id"] = [x for p in parts for x in p["id"]]
    return out


def producers_rate(data, model_dir, n: int, batch: int, producers: int, pad_id: int) -> tuple[int, float, float]:
    """(samples, seconds after the first batch, seconds to it) of `producers` processes feeding this one."""
    ctx = mp.get_context("spawn")  # not fork: this process holds Ray's threads
    pipes = [ctx.Pipe(duplex=False) for _ in range(producers)]
    procs = [ctx.Process(target=produce, args=(k, producers, data.model_dump(), str(model_dir), n, batch, w))
             for k, (_, w) in enumerate(pipes)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    merge([pickle.loads(r.recv_bytes()) for r, _ in pipes], pad_id)
    first = time.perf_counter() - t0
    t = time.perf_counter()
    done = 0
    while True:
        parts = [pickle.loads(r.recv_bytes()) for r, _ in pipes]
        if parts[0] is None:
            break
        done += len(merge(parts, pad_id)["id"])
    seconds = time.perf_counter() - t
    for p in procs:
        p.join()
    return done, seconds, first


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=128000, help="samples drawn from the text mix per run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--producers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="alternating runs of the three paths")
    args = p.parse_args(argv)

    import ray

    from vipoly.data.collate import PairCollate, load_builder
    from vipoly.data.config import DataConfig
    from vipoly.data.shards import task_sources
    from vipoly.model.tiny import build_tiny
    from vipoly.ray_init import quiet_ray_data

    tmp = Path(tempfile.mkdtemp(prefix="vipoly-bench-producers-"))
    os.environ.setdefault("RAY_worker_niceness", "0")  # as bench/data_pipeline.py: a fair share for Ray's workers
    cpus = len(os.sched_getaffinity(0))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=str(tmp / "ray"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_ray_data()
    print(f"machine: {cpus} of {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"ray {ray.__version__}; {args.producers} producers")
    mix = {"text_pair": 0.9, "instr": 0.1}  # bench/data_pipeline.py's text mix and shards
    root = tmp / "text"
    dp.write_mix(root, mix, args.n, 16384)
    model_dir = build_tiny(tmp / "tiny", seed=0)
    files = task_sources(root)
    dp.pre_encode(files, model_dir, root / "_encoded")
    data = DataConfig(root=str(root), mix=mix, shuffle_buffer=256)
    collate, pad_id = PairCollate(model_dir), load_builder(str(model_dir)).pad_id
    dp.raw_read(files, blocks=True)  # warm Ray Data's workers

    # Both ratios: on the whole run (each path's first batch included; for the producers, after
    # their start-up) and steady (after each path's first batch or block), the rate a long run keeps.
    paths = ("1 process", f"{args.producers} producers")
    ratios: dict[tuple[str, str], list[float]] = {(p, k): [] for p in paths for k in ("whole", "steady")}
    for i in range(args.repeat):
        n_b, s_b, f_b = dp.raw_read(files, blocks=True)
        n_1, s_1, f_1 = dp.stream_rate(data, model_dir, args.n, args.batch, collate, encoded=True)
        n_k, s_k, f_k = producers_rate(data, model_dir, args.n, args.batch, args.producers, pad_id)
        base, base_steady = dp.rate(n_b, s_b), dp.rate(n_b, s_b - f_b)  # (the first block's rows: ~1%)
        rates = {paths[0]: (dp.rate(n_1, s_1), dp.rate(n_1 - args.batch, s_1 - f_1)),
                 paths[1]: (dp.rate(n_k, s_k + f_k), dp.rate(n_k, s_k))}  # producers: first = start-up + batch
        cells = []
        for path, (whole, steady) in rates.items():
            ratios[path, "whole"].append(whole / base)
            ratios[path, "steady"].append(steady / base_steady)
            cells.append(f"{path} {whole:7.0f} / {steady:7.0f} samples/s ({whole / base:.1%} / {steady / base_steady:.1%})")
        print(f"run {i + 1}: Arrow-block read {base:7.0f} / {base_steady:7.0f} rows/s | " + " | ".join(cells), flush=True)
    print("(whole run / steady, and their ratios to the Arrow-block read's)")
    for (path, kind), rs in ratios.items():
        print(f"median, {path}, {kind}: {statistics.median(rs):.1%} of the Arrow-block read")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
