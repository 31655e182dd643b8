"""Serve a PolyEmbedder on Ray Serve: OpenAI-compatible POST /v1/embeddings, POST /v1/search, GET /health.

    python -m pipelines.serve --model runs/demo/model [--index runs/db] [--host 127.0.0.1 --port 8000] \\
        [--replicas N | --min-replicas 1 --max-replicas N] [--gpus-per-replica G] [--max-batch-size 32]

Listens on 127.0.0.1 unless --host says otherwise. Locally it starts an embedded Ray; under
`ray job submit --working-dir . -- python -m pipelines.serve ...` (or with RAY_ADDRESS) it deploys on
that cluster. Runs until interrupted. Library code: vipoly/serve/ (app.py: the deployment).
"""
from __future__ import annotations

import argparse
import os
import sys
from vipoly.ray_init import init_ray


def build_parser() -> argparse.ArgumentParser:
    from vipoly.config import add_config_args
    from vipoly.serve.api import Limits

    d, lim = _defaults(), Limits()
    p = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="PolyEmbedder folder (save_pretrained output)")
    p.add_argument("--index", default=None, help="LanceDB database from pipelines.index (enables /v1/search)")
    p.add_argument("--host", default=d.host, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--replicas", type=int, default=d.replicas, help="fixed replica count")
    p.add_argument("--min-replicas", type=int, default=d.min_replicas)
    p.add_argument("--max-replicas", type=int, default=None, help="turn on autoscaling up to this many replicas")
    p.add_argument("--target-ongoing-requests", type=float, default=d.target_ongoing_requests)
    p.add_argument("--gpus-per-replica", type=float, default=d.gpus_per_replica)
    p.add_argument("--cpus-per-replica", type=float, default=d.cpus_per_replica)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="items per forward pass")
    p.add_argument("--batch-wait-timeout-s", type=float, default=d.batch_wait_timeout_s)
    p.add_argument("--max-items", type=int, default=lim.max_items, help="items per request")
    p.add_argument("--max-body-bytes", type=int, default=lim.max_body_bytes)
    add_config_args(p)  # model.{attn_implementation,dtype,max_length,image_*_pixels} apply, as pipelines.embed
    return p


def _defaults():
    from vipoly.serve.app import ServeConfig

    return ServeConfig(model="")


def config(args: argparse.Namespace):
    from vipoly.config import config_from_args
    from vipoly.eval.loading import effective_model_config, inference_overrides
    from vipoly.folder import read_meta
    from vipoly.serve.api import Limits
    from vipoly.serve.app import ServeConfig

    read_meta(args.model, "--model")
    overrides = inference_overrides(config_from_args(args))
    effective_model_config(args.model, overrides)  # a bad override fails here, not in a replica
    if args.index:
        from vipoly.search import open_table

        open_table(args.index)  # a missing table fails here
    return ServeConfig(model=os.path.abspath(args.model), index=args.index and _abs(args.index), host=args.host,
                       port=args.port, replicas=args.replicas, min_replicas=args.min_replicas,
                       max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
                       gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                       max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
                       overrides=overrides, limits=Limits(max_items=args.max_items, max_body_bytes=args.max_body_bytes))


def _abs(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ray import serve  # --- Ray from here on

    from vipoly.serve.app import build_app

    init_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    print(f"[serve] http://{cfg.host}:{cfg.port}/v1/embeddings  (model {cfg.model}; Ctrl-C stops)", flush=True)
    serve.run(build_app(cfg), name="vipoly", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
