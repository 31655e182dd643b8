"""A LanceDB table from the embedding job's output (Parquet or Lance), with an ANN index where it pays.

    python -m pipelines.index --embeddings runs/emb --out runs/db [--table embeddings] \\
        [--kind auto|exact|ivf_pq|ivf_hnsw_sq] [--exact-below 50000] [--recall-queries 200]

--out is a folder (an embedded LanceDB: no server) or an object-store URI such as s3://bucket/db
where credentials exist (--storage-option key=value, repeatable). Prints one JSON report: rows,
dim, the index plan (chosen from the row count), build seconds, and for an ANN index its recall@10
against exact search and the query latency; a local database also keeps it as TABLE.index.json.
Library code: vipoly/search/index.py.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipelines.cli import run_cli
from vipoly.search import IndexConfig, build_index
from vipoly.search.index import TABLE, report_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.index", description=__doc__.split("\n")[0])
    p.add_argument("--embeddings", required=True, help="output folder of pipelines.embed (either format)")
    p.add_argument("--out", required=True, help="LanceDB database: a folder, or s3://... / gs://... / az://...")
    p.add_argument("--table", default=TABLE)
    d = IndexConfig()
    p.add_argument("--kind", default=d.kind, choices=("auto", "exact", "ivf_pq", "ivf_hnsw_sq"))
    p.add_argument("--exact-below", type=int, default=d.exact_below, help="auto: rows under which search stays exact")
    p.add_argument("--recall-queries", type=int, default=d.recall_queries)
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="object-store option passed to LanceDB (e.g. region=eu-west-1)")
    return p


def run(args: argparse.Namespace) -> dict:
    storage = dict(kv.split("=", 1) for kv in args.storage_option) or None
    cfg = IndexConfig(kind=args.kind, exact_below=args.exact_below, recall_queries=args.recall_queries)
    report = build_index(args.embeddings, args.out, cfg, table=args.table, storage_options=storage)
    where = report_path(args.out, args.table)
    if where is not None:
        where.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
