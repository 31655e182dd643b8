"""Search a LanceDB table built by pipelines.index: embed the query with the same model, print hits.

    python -m pipelines.search --index runs/db --model runs/demo/model --query "Hà Nội" \\
        [--image photo.png] [--task instr] [--k 10] [--exact]

Prints one JSON line per hit, best first: {"rank", "id", "score" (cosine), "text", "image"}. The query
is embedded at the index's dimension (Matryoshka prefix when the table was built smaller) and
searched with the settings stored in the table at build time.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipelines.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    from vipoly.config import add_config_args
    from vipoly.search.index import TABLE

    p = argparse.ArgumentParser(prog="python -m pipelines.search", description=__doc__.split("\n")[0])
    p.add_argument("--index", required=True, help="the LanceDB database (pipelines.index --out)")
    p.add_argument("--model", required=True, help="the PolyEmbedder folder that embedded the corpus")
    p.add_argument("--query", default=None, help="query text")
    p.add_argument("--image", default=None, help="query image file (with or without --query)")
    p.add_argument("--task", default=None, help="task prefix (one of vipoly.tasks.TASKS)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--table", default=TABLE)
    p.add_argument("--exact", action="store_true", help="bypass the ANN index (exact search)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    add_config_args(p)  # inference settings of the model, as pipelines.embed
    return p


def run(args: argparse.Namespace) -> list[dict]:
    from vipoly.config import config_from_args
    from vipoly.eval.loading import inference_overrides, load_for_inference
    from vipoly.folder import read_meta
    from vipoly.search import open_table, search
    from vipoly.tasks import check_task

    check_task(args.task)
    if not args.query and not args.image:
        raise ValueError("give --query, --image or both")
    if args.k < 1:
        raise ValueError(f"--k {args.k}: must be ≥ 1")
    read_meta(args.model, "--model")
    storage = dict(kv.split("=", 1) for kv in args.storage_option) or None
    table, plan = open_table(args.index, args.table, storage)
    model = load_for_inference(args.model, inference_overrides(config_from_args(args)))
    if plan.dim > model.embedding_dim:
        raise ValueError(f"--index {args.index} holds {plan.dim}-d vectors, the model makes {model.embedding_dim}-d ones")
    q = model.encode(texts=[args.query] if args.query else None, images=[args.image] if args.image else None,
                     task=args.task, dim=plan.dim)
    hits = search(table, plan, q, args.k, exact=args.exact)[0]
    for h in hits:
        print(json.dumps(h, ensure_ascii=False))
    return hits


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
