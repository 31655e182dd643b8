"""Batch embedding with Ray Data: Parquet / JSONL rows in, Parquet rows (or a Lance dataset) with embeddings out.

    python -m pipelines.embed --model runs/demo/model --input docs.parquet images.jsonl --output runs/emb \\
        [--id-col id --text-col text --image-col image --task T --dim D] \\
        [--num-actors 2 --num-gpus-per-actor 1 --batch-size 64] [--format parquet|lance]

Stages (one Ray Data pipeline, streaming):
  read Parquet / JSONL lines, with the file of each row
  → normalize (light CPU tasks): one column layout for every file; drop ids already embedded
  → prepare (CPU actors, --num-preparers): check each row, decode its image (bytes or a path), tokenize
    and cut image patches exactly as `PolyEmbedder.encode` does; bad rows go to a side file
  → embed (actor pool, --num-actors × --num-gpus-per-actor): each actor loads the PolyEmbedder once
    and runs the forward pass on padded batches
  → write Parquet: id, embedding (fixed_size_list<float32>[dim]), model, dim.
    With --format lance: a Lance dataset OUTPUT/embeddings.lance (written by Ray Data) with id,
    vector (fixed_size_list<float32>[dim]), text, image (a reference: the image's path, or
    "FILE#id=ID" for image bytes stored in an input file), model, dim — what `pipelines.index` and
    LanceDB read directly. Each run's rows are committed in one Lance transaction at its end.

Guarantees: one output row per input id. Re-running the same command skips ids already in the
output directory (resumable: a file left half-written by a killed run is set aside and its ids are
embedded again). Bad rows (missing id, empty text and no image, undecodable image, duplicate id) are
listed in OUTPUT/_errors.jsonl with their reason; every good row is still embedded. A missing input
file or column fails before any work starts, naming it. Runs locally (an embedded Ray) or on a
cluster under `ray job submit --working-dir . -- python -m pipelines.embed ...`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.cli import run_cli
from vipoly.embed.inputs import Columns, input_files, read_inputs, resolve_columns
from vipoly.embed.output import (ERRORS, LANCE, SIDE_DIR, merge_side_files, drop_duplicates, drop_lance_duplicates,
                                 existing_ids, lance_ids, output_files, write)
from vipoly.embed.stages import Embedder, Prepare
from vipoly.ray_init import init_ray

def build_parser() -> argparse.ArgumentParser:
    from vipoly.config import add_config_args

    p = argparse.ArgumentParser(prog="python -m pipelines.embed", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="PolyEmbedder directory (save_pretrained output)")
    p.add_argument("--input", nargs="+", required=True, help="Parquet / JSONL files or folders of them")
    p.add_argument("--output", required=True, help="output folder (Parquet parts or embeddings.lance, + _errors.jsonl)")
    p.add_argument("--format", choices=("parquet", "lance"), default="parquet",
                   help="parquet (default): id, embedding, model, dim; lance: a Lance dataset OUTPUT/embeddings.lance "
                        "with id, vector, text, image (a reference), model, dim")
    p.add_argument("--id-col", default="id")
    p.add_argument("--text-col", default=None, help="text column (default: text, optional if an image column exists)")
    p.add_argument("--image-col", default=None, help="image column, bytes or a path (default: image, optional)")
    p.add_argument("--task", default=None, help="task prefix (one of vipoly.tasks.TASKS; default none)")
    p.add_argument("--dim", type=int, default=None, help="Matryoshka truncation (default: the model's size)")
    p.add_argument("--model-name", default=None, help="value of the `model` column (default: the model folder)")
    p.add_argument("--num-actors", type=int, default=1, help="embedding actors (model replicas)")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--cpus-per-actor", type=float, default=0.5,
                   help="CPUs reserved per embedding actor (torch threads = max(1, round(this))); small by default "
                        "so that on a 2-core machine readers and preparers still get scheduled beside it")
    p.add_argument("--num-preparers", type=int, default=1, help="CPU actors that decode images and tokenize")
    p.add_argument("--read-tasks", type=int, default=2,
                   help="concurrent normalize / write tasks (with fractional CPUs Ray would start a process per task)")
    p.add_argument("--prepare-cpus", type=float, default=0.25, help="CPUs reserved per read/prepare task or actor")
    p.add_argument("--batch-size", type=int, default=64, help="rows per actor call (and per encode batch)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model layer in the actors (GPU: about 1.4x the eager rate "
                        "after a minute of compiling; see docs/benchmarks.md)")
    add_config_args(p)  # model.{attn_implementation,dtype,max_length,image_*_pixels} apply; see vipoly.eval.loading
    return p


def run(args: argparse.Namespace) -> dict:
    from vipoly.config import config_from_args
    from vipoly.eval.loading import effective_model_config, inference_overrides
    from vipoly.folder import read_meta
    from vipoly.tasks import check_task

    check_task(args.task)
    model_dir = Path(args.model)
    meta = read_meta(model_dir, "--model")
    cfg = config_from_args(args)
    overrides = inference_overrides(cfg)
    effective_model_config(model_dir, overrides)  # a bad override fails here, not inside an actor
    model_name = args.model_name or meta.get("name") or model_dir.resolve().name
    if args.dim is not None and not 1 <= args.dim <= meta["embedding_dim"]:
        raise ValueError(f"--dim {args.dim}: must lie in 1..{meta['embedding_dim']} (the model's embedding size)")
    explicit = {f for f, v in (("--text-col", args.text_col), ("--image-col", args.image_col)) if v is not None}
    cols = Columns(args.id_col, args.text_col or "text", args.image_col or "image")
    files = input_files(args.input)
    per_file = resolve_columns(files, cols, explicit)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    side_dir = out_dir / SIDE_DIR
    shutil.rmtree(side_dir, ignore_errors=True)  # a killed run's side files describe work redone now
    lance_out = out_dir / LANCE if args.format == "lance" else None
    if lance_out is not None:
        done = lance_ids(lance_out)
        before_rows = len(done)
    else:
        done = existing_ids(out_dir)
        before = {f.name for f in output_files(out_dir)}

    import ray  # --- Ray from here on

    # Small inputs give an operator fewer blocks than its concurrency cap; Ray warns about each.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")

    we_start_ray = init_ray(log_to_driver=False, verbose=cfg.run.verbose)
    check_resources(args, ray.cluster_resources(), strict=we_start_ray)

    ds = read_inputs(per_file, done, str(side_dir), cpus=args.prepare_cpus, tasks=args.read_tasks)
    # Blocks of a few actor calls: a file read as one block would go through every stage whole,
    # one stage after the other; small blocks let preparing, embedding and writing overlap.
    ds = ds.repartition(target_num_rows_per_block=8 * args.batch_size)
    ds = ds.map_batches(
        Prepare, batch_format="pyarrow", batch_size=args.batch_size, num_cpus=args.prepare_cpus,
        fn_constructor_args=(str(model_dir.resolve()), overrides, args.task, str(side_dir), lance_out is not None),
        compute=ray.data.ActorPoolStrategy(size=args.num_preparers))
    threads = max(1, int(round(args.cpus_per_actor)))
    ds = ds.map_batches(
        Embedder, batch_format="pyarrow", batch_size=args.batch_size,
        fn_constructor_args=(str(model_dir.resolve()), overrides, model_name, args.dim, threads, args.compile),
        compute=ray.data.ActorPoolStrategy(size=args.num_actors),
        num_gpus=args.num_gpus_per_actor, num_cpus=args.cpus_per_actor)
    t0 = time.perf_counter()
    write(ds, out_dir, lance_out, cpus=args.prepare_cpus, tasks=args.read_tasks)
    seconds = time.perf_counter() - t0

    stats = merge_side_files(side_dir)
    if lance_out is not None:
        dups = drop_lance_duplicates(lance_out) if (lance_out / "_versions").is_dir() else []
        embedded = len(lance_ids(lance_out)) - before_rows
    else:
        new_files = [f for f in output_files(out_dir) if f.name not in before]
        dups = drop_duplicates(new_files)
        embedded = sum(pq.read_metadata(f).num_rows for f in new_files)
    errors = stats["bad"] + [{"id": i, "file": None, "reason": "duplicate id in the input (embedded once)"} for i in dups]
    with open(out_dir / ERRORS, "w", encoding="utf-8") as f:
        for e in errors:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    summary = {"rows_in": stats["rows_in"], "skipped": stats["skipped"], "embedded": embedded, "errors": len(errors),
               "seconds": seconds, "rows_per_s": embedded / seconds if seconds > 0 else 0.0, "output": str(out_dir)}
    print(f"[embed] {embedded} rows embedded in {seconds:.1f}s ({summary['rows_per_s']:.1f} rows/s); "
          f"{stats['skipped']} already done, {len(errors)} bad → {out_dir / ERRORS}")
    return summary


def check_resources(args: argparse.Namespace, cluster: dict, strict: bool) -> None:
    """Fail (or, on a cluster that may autoscale, warn) when the actors leave no room for the rest.

    Ray Data lists input files in a task that takes 1 whole CPU (not configurable in Ray 2.60); if
    the actor pools hold more than total − 1 CPUs, the listing never starts and the job hangs."""
    cpus = args.num_actors * args.cpus_per_actor + args.num_preparers * args.prepare_cpus + 1.0
    gpus = args.num_actors * args.num_gpus_per_actor
    problems = []
    if cpus > cluster.get("CPU", 0):
        problems.append(f"{args.num_actors} actor(s) × --cpus-per-actor {args.cpus_per_actor} + "
                        f"{args.num_preparers} preparer(s) × --prepare-cpus {args.prepare_cpus} + 1 CPU for Ray Data's "
                        f"file listing = {cpus:g} CPUs, the cluster has {cluster.get('CPU', 0):g}")
    if gpus > cluster.get("GPU", 0):
        problems.append(f"{args.num_actors} actor(s) × --num-gpus-per-actor {args.num_gpus_per_actor} = {gpus:g} GPUs, "
                        f"the cluster has {cluster.get('GPU', 0):g}")
    if problems:
        msg = "not enough resources: " + "; ".join(problems) + " (lower --num-actors / --cpus-per-actor)"
        if strict:
            raise ValueError(msg)
        print(f"[embed] warning: {msg}; waiting for the cluster to grow", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
