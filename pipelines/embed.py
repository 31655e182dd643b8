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
import sys
import time
import warnings
from pathlib import Path

from pipelines.cli import run_cli
from vipoly.embed.inputs import Columns, input_files, read_inputs, resolve_columns
from vipoly.embed.output import ERRORS, Output
from vipoly.embed.stages import embed_stages
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
    meta = read_meta(args.model, "--model")
    model_dir = Path(args.model).resolve()  # the actors' working directory is not this one
    cfg = config_from_args(args)
    overrides = inference_overrides(cfg)
    effective_model_config(model_dir, overrides)  # a bad override fails here, not inside an actor
    if args.dim is not None and not 1 <= args.dim <= meta["embedding_dim"]:
        raise ValueError(f"--dim {args.dim}: must lie in 1..{meta['embedding_dim']} (the model's embedding size)")
    explicit = {f for f, v in (("--text-col", args.text_col), ("--image-col", args.image_col)) if v is not None}
    per_file = resolve_columns(input_files(args.input), Columns(args.id_col, args.text_col or "text",
                                                                args.image_col or "image"), explicit)
    out = Output(args.output, lance=args.format == "lance")

    import ray  # --- Ray from here on

    # Small inputs give an operator fewer blocks than its concurrency cap; Ray warns about each.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")
    we_start_ray = init_ray(log_to_driver=False, verbose=cfg.run.verbose)
    check_resources(args, ray.cluster_resources(), strict=we_start_ray)

    ds = read_inputs(per_file, out.done, str(out.side_dir), cpus=args.prepare_cpus, tasks=args.read_tasks)
    ds = embed_stages(ds, str(model_dir), overrides, task=args.task, side_dir=str(out.side_dir),
                      keep_source=out.lance is not None,
                      model_name=args.model_name or meta.get("name") or model_dir.name, dim=args.dim,
                      batch_size=args.batch_size, preparers=args.num_preparers, prepare_cpus=args.prepare_cpus,
                      actors=args.num_actors, cpus_per_actor=args.cpus_per_actor,
                      gpus_per_actor=args.num_gpus_per_actor, compile=args.compile)
    t0 = time.perf_counter()
    out.write(ds, cpus=args.prepare_cpus, tasks=args.read_tasks)
    seconds = time.perf_counter() - t0
    embedded, stats, errors = out.close()
    summary = {"rows_in": stats["rows_in"], "skipped": stats["skipped"], "embedded": embedded, "errors": len(errors),
               "seconds": seconds, "rows_per_s": embedded / seconds if seconds > 0 else 0.0, "output": str(out.dir)}
    print(f"[embed] {embedded} rows embedded in {seconds:.1f}s ({summary['rows_per_s']:.1f} rows/s); "
          f"{stats['skipped']} already done, {len(errors)} bad → {out.dir / ERRORS}")
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
