"""Serving and search: the Ray Serve embedding service against a plain in-process `encode` loop, and
a LanceDB ANN index against exact search.

    python bench/serve.py [--model DIR] [--requests 96,192,288] [--concurrency 1,8,32] \\
        [--index-rows 100000 --dim 1024] [--skip-serve | --skip-index]

Serving: the same NTREX sentences (Vietnamese, English, Chinese), one text per request. Baseline: one
process calling `model.encode([text])` text after text (what a service without batching does per
request). Ours: `POST /v1/embeddings` on 127.0.0.1 through httpx at concurrency 1, 8 and 32 (one
replica, dynamic batching, Serve's access log off), reported as texts/s and p50/p99 latency, and the
ratio served/in-process. Both sides use the same torch thread count (--threads, 1 by default). Without --model the tiny random model is built.

Index: `--index-rows` unit vectors of size `--dim` drawn around 1000 random centres (real embeddings
cluster; vectors uniform on the sphere have no near neighbours for any index to find), written in the
embedding job's Parquet layout and indexed by `vipoly.search.build_index` (what `pipelines.index`
runs): build time, query latency, recall@10 of the ANN search against exact search on 200 queries.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EVAL = Path(os.environ.get("VIPOLY_EVAL_DATA", REPO.parent / "shared" / "data" / "eval"))


def sentences(n: int) -> list[str]:
    files = ["newstest2019-ref.vie.txt", "newstest2019-src.eng.txt", "newstest2019-ref.zho-CN.txt"]
    lines = [x.strip() for f in files for x in (EVAL / "ntrex128" / f).read_text(encoding="utf-8").split("\n")]
    lines = [x for x in lines if x]
    return [lines[(i * 7) % len(lines)] for i in range(n)]  # a spread over the three languages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def bench_inprocess(model_dir: str, texts: list[str], threads: int) -> dict:
    import torch

    from vipoly.model import PolyEmbedder

    torch.set_num_threads(threads)
    model = PolyEmbedder.from_pretrained(model_dir).eval()
    model.encode(texts[:8])  # warm-up
    lat = []
    t0 = time.perf_counter()
    for t in texts:
        s = time.perf_counter()
        model.encode([t])
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    model.encode(texts, batch_size=32)
    batched = time.perf_counter() - t1
    return {"texts_per_s": len(texts) / wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "batched_texts_per_s": len(texts) / batched}


def bench_served(url: str, texts: list[str], concurrency: int) -> dict:
    """`concurrency` clients on one asyncio loop (the load generator shares the 2 cores with the
    service: threads would cost it more CPU), each posting one text at a time."""
    import asyncio

    import httpx

    lat: list[float] = []

    async def main() -> float:
        it = iter(texts)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            async def worker():
                for t in it:  # one shared iterator: each text is sent once
                    s = time.perf_counter()
                    r = await c.post(f"{url}/v1/embeddings",
                                     json={"input": t, "model": "vipoly", "encoding_format": "base64"})
                    r.raise_for_status()
                    lat.append(time.perf_counter() - s)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - t0

    wall = asyncio.run(main())
    return {"texts_per_s": len(texts) / wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}


def run_serve(args, model_dir: str) -> None:
    import httpx
    import ray
    from ray import serve

    from vipoly.serve.app import ServeConfig, build_app

    levels = [int(x) for x in args.concurrency.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    texts = sentences(max(counts))
    base = bench_inprocess(model_dir, texts[:counts[0]], args.threads)
    print(f"in-process encode loop (1 text per call, {args.threads} torch threads): {base['texts_per_s']:.1f} texts/s, "
          f"p50 {base['p50_ms']:.1f} ms, p99 {base['p99_ms']:.1f} ms; "
          f"(one encode call over all texts, batch 32: {base['batched_texts_per_s']:.1f} texts/s)", flush=True)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(model=model_dir, port=port, cpus_per_replica=args.threads, max_batch_size=32,
                      batch_wait_timeout_s=args.batch_wait, access_log=False)
    serve.run(build_app(cfg), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{url}/health").status_code != 200:
        time.sleep(0.2)
    bench_served(url, texts[:16], 4)  # warm-up
    rows = []
    for c, n in zip(levels, counts):
        before = len(httpx.get(f"{url}/v1/stats").json()["batch_sizes"])
        r = bench_served(url, texts[:n], c)
        sizes = httpx.get(f"{url}/v1/stats").json()["batch_sizes"][before:]
        r.update(concurrency=c, requests=n, mean_batch=float(np.mean(sizes)), ratio=r["texts_per_s"] / base["texts_per_s"])
        rows.append(r)
        print(f"served, concurrency {c:>2} ({n} requests): {r['texts_per_s']:.1f} texts/s, p50 {r['p50_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms, mean batch {r['mean_batch']:.1f}, ratio served/in-process "
              f"{r['ratio']:.2f}", flush=True)
    serve.shutdown()
    ray.shutdown()
    print("serve json:", json.dumps({"inprocess": base, "served": rows}))


def run_index(args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vipoly.search import IndexConfig, build_index

    rng = np.random.default_rng(0)
    n, d = args.index_rows, args.dim
    centres = rng.standard_normal((1000, d)).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + 0.7 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "emb").mkdir()
        pq.write_table(pa.table({"id": [f"v{i}" for i in range(n)],
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)}),
                       Path(tmp) / "emb" / "part-0.parquet")
        del x
        t0 = time.perf_counter()
        report = build_index(Path(tmp) / "emb", str(Path(tmp) / "db"), IndexConfig(recall_queries=200))
        total = time.perf_counter() - t0
    p = report["plan"]
    print(f"index: {n} x {d} vectors, {p['kind']} (partitions {p['num_partitions']}, sub-vectors "
          f"{p['num_sub_vectors']}, nprobes {p['nprobes']}, refine {p['refine_factor']}); table write "
          f"{report['write_s']:.1f} s, index build {report['index_s']:.1f} s (total {total:.1f} s incl. recall); "
          f"query {report.get('query_ms', 0):.1f} ms (exact {report.get('exact_query_ms', 0):.1f} ms); "
          f"recall@10 vs exact {report.get('recall@10', 1.0):.3f} on {report.get('recall_queries', 0)} queries",
          flush=True)
    print("index json:", json.dumps(report))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="PolyEmbedder folder (default: build the tiny random model)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", default="96,192,288", help="requests per concurrency level")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, in-process and per replica (on 2 cores a 2-thread replica's OpenMP "
                        "threads spin against the HTTP proxy and the clients)")
    p.add_argument("--batch-wait", type=float, default=0.005)
    p.add_argument("--index-rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--skip-index", action="store_true")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs", flush=True)
    if not args.skip_serve:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = args.model
            if model_dir is None:
                from vipoly.model.tiny import build_tiny

                model_dir = str(Path(tmp) / "tiny")
                build_tiny(model_dir, seed=0)
            run_serve(args, model_dir)
    if not args.skip_index:
        run_index(args)


if __name__ == "__main__":
    main()
