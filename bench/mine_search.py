"""pipelines.mine's search: FAISS HNSW against exact search on the same vectors, in one run.

    .venv/bin/python bench/mine_search.py [--rows 50000] [--dim 256] [--depth 30]

The vectors are synthetic: unit queries around topic centres (50 rows a topic) and positives
near their queries, the shape of a task's embeddings; the time covers the whole `select` (search and
the positive-aware filter, and for HNSW its recall@depth against exact search on 1,000 rows).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=30)
    args = p.parse_args()

    import faiss
    import torch

    from pipelines import mine

    rng = np.random.default_rng(0)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def noise(scale: float) -> np.ndarray:
        return rng.standard_normal((args.rows, args.dim)).astype(np.float32) * np.float32(scale / np.sqrt(args.dim))

    # Topics, as real embeddings have them (uniform random vectors have no near neighbours to find):
    # queries near one of rows/50 topic centres, each positive near its query.
    topics = unit(rng.standard_normal((max(1, args.rows // 50), args.dim)))
    q = unit(topics[rng.integers(0, len(topics), args.rows)] + noise(0.8))
    pos = unit(q + noise(0.6))
    texts = [f"row {i}" for i in range(args.rows)]
    results = {}
    for index in ("exact", "hnsw"):
        t0 = time.perf_counter()
        negatives, counts = mine.select(q, pos, texts, 4, args.depth, 0.95, index=index)
        results[index] = (time.perf_counter() - t0, negatives, counts.get("recall"))
    same = np.mean([a == b for a, b in zip(results["exact"][1], results["hnsw"][1])])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, faiss {faiss.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; {args.rows:,} rows of {args.dim} dims, depth {args.depth}; "
          f"path: pipelines.mine.select")
    print(f"{'search':<8} {'select (s)':>11}")
    for name, (seconds, _, _) in results.items():
        print(f"{name:<8} {seconds:>11.1f}")
    print(f"HNSW / exact: time {results['hnsw'][0] / results['exact'][0]:.2f}x; recall@{args.depth} "
          f"{results['hnsw'][2]:.3f}; rows with the same negatives {same:.3f}")


if __name__ == "__main__":
    main()
