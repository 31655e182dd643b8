"""Train a PolyEmbedder with DLE + STW on Ray Train.

    python -m pipelines.train --config configs/tiny-cpu.yaml [--set train.max_steps=100 ...]
    ray job submit --working-dir . -- python -m pipelines.train --config configs/qwen2vl-2b.yaml

With no cluster address an embedded local Ray starts; under `ray job submit` the job's cluster is
used. Re-running the same command on the same `run.dir` resumes from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vipoly.config import ConfigError, add_config_args, config_from_args
from vipoly.folder import is_polyembedder_dir
from vipoly.ray_init import init_ray
from vipoly.train.launch import PLAN_FILE, build_trainer, describe, keep_plan, latest_step, warn_unplaceable


def main(argv: list[str] | None = None) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        run_dir = Path(cfg.run.dir).resolve()
        cfg.run.dir = str(run_dir)
        plan = keep_plan(cfg, run_dir)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / PLAN_FILE).is_file():
        (run_dir / PLAN_FILE).write_text(json.dumps(plan.summary(), indent=2) + "\n")
    if cfg.model.backbone == "tiny":
        # The demo/test model: a tiny random Qwen2-VL built locally, once per run directory.
        from vipoly.model.tiny import build_tiny

        init = run_dir / "init-model"
        if not is_polyembedder_dir(init):
            build_tiny(init, seed=cfg.train.seed, heads=cfg.model)
        cfg.model.backbone = str(init)
    from vipoly.model.inputs import effective_model_config, write_inputs

    # One resolved model config for the model and the data: the backbone folder's saved values,
    # with what this run sets on top (the workers see every field of it as set).
    cfg.model = effective_model_config(cfg.model)
    write_inputs(cfg)  # run.dir/inputs: the data workers' tokenizer, image processor and model config
    cfg.save(run_dir / "config.yaml")
    (run_dir / "STOPPED").unlink(missing_ok=True)
    shown = f"\n{(run_dir / 'config.yaml').read_text()}" if cfg.run.verbose else f" (config: {run_dir / 'config.yaml'})"
    print(f"vipoly train → {run_dir}{shown}", flush=True)
    print(describe(plan, cfg), flush=True)

    done = latest_step(run_dir)
    if done:
        print(f"resuming from step {done}, {run_dir.name}'s latest checkpoint", flush=True)  # the workers say when they have
    init_ray(cfg.run.ray_address, dashboard=True, verbose=cfg.run.verbose)
    warn_unplaceable(cfg)
    result = build_trainer(cfg, run_dir, plan).fit()  # ray
    if (run_dir / "STOPPED").exists():
        print(f"error: {(run_dir / 'STOPPED').read_text().strip()}", file=sys.stderr)
        return 1
    if result.error:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return 1
    print(f"done: model in {run_dir / 'model'}, report in {run_dir / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
