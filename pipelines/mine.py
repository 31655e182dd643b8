"""Hard-negative mining: embed a prepared data set's queries and positives with a trained model,
search, and write copies of its shards with `neg_text` filled (for `data.negatives`).

    python -m pipelines.mine --model runs/demo/model --data data/prepared --out data/mined --negatives 4 \\
        [--tasks instr,text_pair] [--depth 30] [--margin 0.95] [--dim 256] \\
        [--num-actors 1 --num-gpus-per-actor 0 --batch-size 32]

For each task folder of --data:
  embed   a Ray Data job (an actor pool, each actor loading the model once): every row's query and
          positive, texts and images, with the task's prefix, as training embeds them;
  search  the `depth` best positives of other rows for every query (inner products of unit vectors):
          exact (a chunk of queries at a time, on the GPU when there is one) or, from --exact-max
          rows on (default 100,000: exact costs n² dot products), a FAISS HNSW index
          (`--index hnsw` forces it; its recall against exact search is printed on a sample);
  keep    positive-aware (NV-Retriever's TopK-PercPos): of the `depth` best positives of other rows,
          drop the ones scoring above `margin` × the query's score with its own positive (likely
          false negatives: another phrasing of the answer) and the ones whose text equals the row's
          own positive; the `negatives` best that are left become the row's neg_text;
  write   OUT/<task>/ copies of the shards, row for row, with neg_text replaced (the other columns
          as they were), OUT/manifest.json, and OUT/mine_report.json (per task: rows, candidates
          looked at, dropped as likely false negatives, dropped as identical, negatives written).
Resumable: a task whose copies are all written is skipped; its embeddings (OUT/_embeddings/<task>.npz,
written once the Ray job ends) are reused when only the writing was cut short. `--dim` shortens the
vectors searched (Matryoshka).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.cli import run_cli
from vipoly.ray_init import init_ray

EMBEDDINGS = "_embeddings"
REPORT = "mine_report.json"


class Embed:
    """A Ray Data actor: one PolyEmbedder, the query and positive vectors of each row."""

    def __init__(self, model_dir: str, task: str, dim: int | None, batch_size: int):
        import torch

        from vipoly.model import PolyEmbedder

        device = "cuda" if torch.cuda.is_available() else None
        self.model = PolyEmbedder.from_pretrained(model_dir, device=device).eval()
        self.task, self.dim, self.batch_size = task, dim, batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = {}
        for side, (text, image) in {"q": ("query_text", "query_images"), "p": ("pos_text", "pos_images")}.items():
            images = [list(x) if x else None for x in batch.column(image).to_pylist()]
            texts = batch.column(text).to_pylist()
            v = self.model.encode(texts, images if any(images) else None, task=self.task, dim=self.dim,
                                  batch_size=self.batch_size)
            vectors[side] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
        return pa.table({"id": batch.column("id"), **vectors})


def embed_task(files: list[str], args: argparse.Namespace, task: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(queries (n, d), positives (n, d), ids) in the files' row order."""
    import ray

    from vipoly.data.shards import read_parquet  # Ray Data's V1 reader: no FooterReader actors

    columns = ["id", "query_text", "query_images", "pos_text", "pos_images"]
    ds = read_parquet(files).select_columns(columns)  # ray
    ds = ds.map_batches(Embed, fn_constructor_kwargs={"model_dir": str(args.model), "task": task, "dim": args.dim,
                                                      "batch_size": args.batch_size},
                        batch_size=args.batch_size * 4, batch_format="pyarrow", concurrency=args.num_actors,
                        num_gpus=args.num_gpus_per_actor)
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))  # ray
    ids = [str(x) for f in files for x in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
    where = {str(x): i for i, x in enumerate(table.column("id").to_pylist())}
    order = np.array([where[i] for i in ids])
    as_np = lambda name: np.asarray(table.column(name).combine_chunks().flatten()).reshape(table.num_rows, -1)  # noqa: E731
    return as_np("q")[order], as_np("p")[order], ids


def exact_search(queries: np.ndarray, positives: np.ndarray, depth: int, rows: np.ndarray | None = None,
                 chunk: int = 1024):
    """Yields (rows, own, scores, cols) per chunk of queries: the rows' indices, their scores with
    their own positives, and their `depth` best positives of other rows (scores, indices).
    `rows`: the queries to search (default: all)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, p = (torch.from_numpy(np.asarray(x, np.float32)).to(device) for x in (queries, positives))
    rows = torch.arange(len(q), device=device) if rows is None else torch.as_tensor(rows, device=device)
    for lo in range(0, len(rows), chunk):
        idx = rows[lo:lo + chunk]
        sims = q[idx] @ p.T  # (c, n)
        at = torch.arange(len(idx), device=device)
        own = sims[at, idx].clone()
        sims[at, idx] = float("-inf")  # never the row's own positive
        scores, cols = sims.topk(depth, dim=1) if depth > 0 else (sims[:, :0], sims[:, :0].long())
        yield idx.cpu().numpy(), own.cpu().numpy(), scores.cpu().numpy(), cols.cpu().numpy()


def hnsw_search(queries: np.ndarray, positives: np.ndarray, depth: int, chunk: int = 8192, ef: int | None = None):
    """As `exact_search`, from a FAISS HNSW index over the positives (inner product): n log n
    where exact search is n². Asks for depth + 1 neighbours, as a query's own positive is often
    among them; the own score is an exact dot product."""
    try:
        import faiss
    except ImportError as e:
        raise ValueError("--index hnsw needs FAISS: pip install 'vipoly[mine]' (faiss-cpu)") from e
    index = faiss.IndexHNSWFlat(positives.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.hnsw.efSearch = ef or max(64, 2 * depth + 2)
    index.add(np.ascontiguousarray(positives, dtype=np.float32))
    for lo in range(0, len(queries), chunk):
        q = np.ascontiguousarray(queries[lo:lo + chunk], dtype=np.float32)
        idx = np.arange(lo, lo + len(q))
        scores, cols = index.search(q, depth + 1)
        not_own = (cols != idx[:, None]) & (cols >= 0)
        # the first `depth` that are not the row's own positive (a row has at most one)
        order = np.argsort(~not_own, axis=1, kind="stable")[:, :depth]
        scores, cols = np.take_along_axis(scores, order, 1), np.take_along_axis(cols, order, 1)
        own = np.einsum("ij,ij->i", q, positives[idx])
        yield idx, own, scores, cols


def recall(queries: np.ndarray, positives: np.ndarray, depth: int, found: dict[int, list[int]]) -> float:
    """recall@depth of the neighbours `found` (row → positive indices, from HNSW) against exact
    search on those rows."""
    rows = np.fromiter(found, dtype=np.int64)
    hits = [len(set(cols[k].tolist()) & set(found[int(r)]))
            for idx, _, _, cols in exact_search(queries, positives, depth, rows) for k, r in enumerate(idx)]
    return float(np.mean(hits)) / depth if hits and depth else float("nan")


def select(queries: np.ndarray, positives: np.ndarray, texts: list[str | None], n: int, depth: int,
           margin: float, index: str = "exact", recall_sample: int = 1000) -> tuple[list[list[str]], dict]:
    """TopK-PercPos: each row's `n` negatives among the `depth` best positives of other rows, less
    those above margin × its own positive's score and those with its positive's text. `texts`:
    the positives' texts, None where a positive is an image (no text negative to make of it).
    `index`: "exact" or "hnsw" (FAISS); with HNSW, counts["recall"] is its recall@depth against
    exact search on `recall_sample` rows, from the candidates this search found."""
    rows = len(texts)
    depth = min(depth, rows - 1)
    counts = {"rows": rows, "candidates": 0, "dropped_false_negative": 0, "dropped_identical": 0,
              "skipped_not_text": 0, "negatives": 0}
    out: list[list[str]] = []
    search = hnsw_search if index == "hnsw" else exact_search
    sampled = set(np.random.default_rng(0).choice(rows, min(recall_sample, rows), replace=False).tolist()) \
        if index == "hnsw" else set()
    found: dict[int, list[int]] = {}
    for idx, own, scores, cols in search(queries, positives, depth):
        for k, i in enumerate(idx.tolist()):
            if i in sampled:
                found[i] = [j for j in cols[k].tolist() if j >= 0]
            keep = []
            for score, j in zip(scores[k].tolist(), cols[k].tolist()):
                if j < 0:  # HNSW found fewer than asked
                    continue
                counts["candidates"] += 1
                if texts[j] is not None and texts[j] == texts[i]:  # two questions on one paragraph
                    counts["dropped_identical"] += 1
                elif score > margin * own[k]:
                    counts["dropped_false_negative"] += 1
                elif not texts[j]:
                    counts["skipped_not_text"] += 1
                elif len(keep) < n and texts[j] not in keep:
                    keep.append(texts[j])
            out.append(keep)
            counts["negatives"] += len(keep)
    if found:
        counts["recall"] = recall(queries, positives, depth, found)
    return out, counts


def positive_texts(files: list[str]) -> list[str | None]:
    """Each row's positive text, None where the positive has an image or no text."""
    out = []
    for f in files:
        t = pq.read_table(f, columns=["pos_text", "pos_images"])
        out += [text if text and not images else None
                for text, images in zip(t.column("pos_text").to_pylist(), t.column("pos_images").to_pylist())]
    return out


def write_task(files: list[str], out_dir: Path, negatives: list[list[str]]) -> None:
    """Copies of the task's files, row for row, with neg_text replaced; each written under a
    temporary name and renamed, so a copy is whole or absent."""
    out_dir.mkdir(parents=True, exist_ok=True)
    at = 0
    for f in files:
        table = pq.read_table(f)
        column = pa.array(negatives[at:at + table.num_rows], pa.list_(pa.string()))
        at += table.num_rows
        i = table.column_names.index("neg_text")
        table = table.set_column(i, table.schema.field(i).with_type(pa.list_(pa.string())), column)
        tmp = out_dir / f".{Path(f).name}.tmp"
        pq.write_table(table, tmp)
        tmp.replace(out_dir / Path(f).name)


def run(args: argparse.Namespace) -> dict:
    from vipoly.data.shards import MANIFEST, task_sources
    from vipoly.folder import is_polyembedder_dir

    args.model, args.data = str(Path(args.model).resolve()), str(Path(args.data).resolve())  # workers' cwd differs
    out = Path(args.out)
    if out.resolve() == Path(args.data):
        raise ValueError("--out must differ from --data: the mined copies are written beside the originals")
    if not is_polyembedder_dir(args.model):
        raise ValueError(f"--model {args.model}: not a PolyEmbedder directory (no vipoly.json)")
    sources = task_sources(args.data)
    tasks = args.tasks.split(",") if args.tasks else list(sources)
    missing = [t for t in tasks if t not in sources]
    if missing:
        raise ValueError(f"--tasks {missing}: {args.data} has no shards for them (it has {sorted(sources)})")
    report_path = out / REPORT
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    init_ray(args.ray_address)
    for task in tasks:
        files = sources[task]
        if task in report and all((out / task / Path(f).name).is_file() for f in files):
            print(f"{task}: already mined ({report[task]['negatives']} negatives), skipped", flush=True)
            continue
        cache = out / EMBEDDINGS / f"{task}.npz"
        if cache.is_file():
            saved = np.load(cache)
            queries, positives = saved["q"], saved["p"]
        else:
            print(f"{task}: embedding {sum(pq.read_metadata(f).num_rows for f in files)} queries and positives",
                  flush=True)
            queries, positives, _ = embed_task(files, args, task)
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache.with_suffix(".tmp.npz"), q=queries, p=positives)
            cache.with_suffix(".tmp.npz").replace(cache)
        texts = positive_texts(files)
        index = args.index if args.index != "auto" else ("hnsw" if len(texts) >= args.exact_max else "exact")
        negatives, counts = select(queries, positives, texts, args.negatives, args.depth, args.margin, index)
        counts["index"] = index
        if "recall" in counts:
            print(f"{task}: HNSW search over {len(texts):,} positives; recall@{min(args.depth, len(texts) - 1)} "
                  f"against exact search on a sample: {counts['recall']:.3f}", flush=True)
        write_task(files, out / task, negatives)
        report[task] = counts
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"{task}: {counts['negatives']} negatives for {counts['rows']} rows; of {counts['candidates']} "
              f"candidates, {counts['dropped_false_negative']} dropped as likely false negatives (above "
              f"{args.margin} × the positive's score) and {counts['dropped_identical']} as identical texts", flush=True)
        if counts["dropped_false_negative"] > 0.5 * counts["candidates"]:
            print(f"{task}: most candidates scored within {args.margin} × the positive's score: this model barely "
                  f"tells positives from the rest (untrained, or the demo's tiny one); mine with a trained model, "
                  f"or lower --margin", flush=True)
    if (Path(args.data) / MANIFEST).is_file():
        manifest = json.loads((Path(args.data) / MANIFEST).read_text())
        manifest["mined"] = {"model": str(args.model), "negatives": args.negatives, "margin": args.margin,
                             "depth": args.depth, "report": report}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.mine", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a PolyEmbedder folder (a run's model/)")
    p.add_argument("--data", required=True, help="a prepared folder (OUT of pipelines.prepare)")
    p.add_argument("--out", required=True, help="where the mined copies go (a new prepared folder)")
    p.add_argument("--negatives", type=int, required=True, help="negatives per row (N)")
    p.add_argument("--tasks", help="comma-separated tasks to mine (default: every task in --data)")
    p.add_argument("--depth", type=int, default=30, help="best positives of other rows looked at per query")
    p.add_argument("--margin", type=float, default=0.95,
                   help="drop candidates scoring above margin × the query's own positive score")
    p.add_argument("--dim", type=int, help="Matryoshka prefix of the vectors searched (default: full)")
    p.add_argument("--index", choices=["auto", "exact", "hnsw"], default="auto",
                   help="search: exact, a FAISS HNSW index, or auto (HNSW from --exact-max rows on)")
    p.add_argument("--exact-max", type=int, default=100_000, help="rows from which auto uses HNSW")
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--num-gpus-per-actor", type=float, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ray-address", default=None, help="a Ray cluster (default: this job's, or a local one)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
