"""The driver's side of a training run: the checks and the plan before any worker starts, the
Ray Train trainer, and what an earlier run in the same directory already did. `pipelines.train`
and the Tune trials (`tune.trial`) both launch runs through it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from vipoly.config import Config, ConfigError
from vipoly.train.config import Strategy


class StreamFactory:
    """What the driver hands to every Ray Train worker: the config and the run's `Plan` (built
    once from the footers, so every rank has the same step plan); each worker calls it with its
    rank to open its own lanes of every source (`vipoly.train.batches.TrainStream`)."""

    def __init__(self, cfg: Config, plan=None):
        from vipoly.data.stream import build_plan

        self.cfg = cfg.to_dict()
        self.plan = plan if plan is not None else build_plan(cfg)

    def __call__(self, rank: int, world: int):
        from vipoly.train.batches import TrainStream

        return TrainStream(Config.model_validate(self.cfg), self.plan, rank, world)


class Evaluator:
    """What a caller (a Tune trial) runs on the exported model as training goes, without restarting
    the workers: after every `every` steps (a checkpoint step too; None = only at the end) and at
    the last step, every rank exports `model/`, rank 0 calls the evaluator with it, and its metrics
    go to `ray.train.report` with the step and `final` (true for the last one), where a Ray Train
    callback in the controller (see `build_trainer`'s `callbacks`) passes them on. Here, not in the
    loop's module: the controller unpickles it."""

    every: int | None = None

    def __call__(self, model_dir: Path) -> dict[str, float]:
        raise NotImplementedError


def train_loop_per_worker(config: dict) -> None:
    """A Ray Train worker's entry point (`vipoly.train.loop.train_loop_per_worker`). It and
    `StreamFactory` live in this light module because Ray Train's controller unpickles them too:
    from `vipoly.train.loop` they made every run's controller import torch and transformers
    (4.95 CPU-seconds against 0.19 here; docs/benchmarks.md, "What a fresh Ray process pays")."""
    from vipoly.train.loop import train_loop_per_worker as run

    run(config)


def build_trainer(cfg: Config, run_dir: Path, plan=None, evaluate=None, callbacks=()):
    """The run's TorchTrainer. `evaluate` (an `Evaluator`) runs on the exported
    model as training goes; `callbacks` (Ray Train `UserCallback`s) see every report."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig  # ray
    from ray.train.torch import TorchConfig, TorchTrainer  # ray

    t, r, c = cfg.train, cfg.train.resources, cfg.train.checkpoint
    resources = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    strategic = sum(1 for s in c.strategic if t.max_steps < 0 or s <= t.max_steps)
    return _without_idle_helpers(TorchTrainer, state_api=_has_dashboard())(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "stream": StreamFactory(cfg, plan), "evaluate": evaluate},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources,
                                     placement_strategy=r.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            logging_config=LoggingConfig(log_level="INFO" if cfg.run.verbose else "WARNING"),
            failure_config=FailureConfig(max_failures=c.max_failures),
            # Latest is always kept; strategic checkpoints outscore periodic ones (see loop._checkpoint).
            checkpoint_config=CheckpointConfig(num_to_keep=c.keep + strategic,
                                               checkpoint_score_attribute="checkpoint_score"),
            callbacks=list(callbacks) or None,
        ),
    )


def _without_idle_helpers(trainer_cls, state_api: bool):
    """`trainer_cls` less two of Ray Train's per-run helper actors when they would have nothing to
    do; each is a process that imports Ray Train (≈ 2 CPU-seconds a run):
    - the DatasetManager: the workers read their own rows (vipoly.data.stream) and the trainer gets
      no `datasets`, so it would hand out no shard;
    - the placement-group cleaner when the cluster has no dashboard (`state_api` False, as in the
      test suite's Ray): it asks the dashboard's state API whether the controller still lives, and
      without one it only logs a warning every second and never cleans anything.
    Defined here, not at module level: the controller unpickles this module, and importing
    `ray.train.torch` there would import torch. Where Ray moves the callbacks, the default trainer
    runs as before."""
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback  # ray: internal, checked in tests
        from ray.train.v2._internal.callbacks.placement_group_callback import \
            PlacementGroupCleanerCallback  # ray: internal, checked in tests
    except ImportError:
        return trainer_cls

    class Trainer(trainer_cls):
        def _create_default_callbacks(self):
            idle = () if self.datasets else (DatasetsCallback,)
            idle += () if state_api else (PlacementGroupCleanerCallback,)
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, idle)]

    return Trainer


def _has_dashboard() -> bool:
    """Whether the Ray this driver is connected to runs a dashboard (and so the state API)."""
    from ray._private.worker import get_dashboard_url  # ray: internal (ray.init's context holds the same URL)

    return bool(get_dashboard_url())


def check_config(cfg: Config):
    """Fail before any worker starts: data present and plannable (no empty file or source, enough
    rows for the lanes, a number of workers that owns whole lanes), strategy available. Returns
    the run's `Plan` (vipoly.data.plan), built from the Parquet footers."""
    from vipoly.data.stream import build_plan

    try:
        plan = build_plan(cfg)
        plan.check_workers(cfg.train.num_workers)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"data.root / data.sources: {e}") from None
    if cfg.train.strategy != Strategy.DDP:
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"train.strategy={cfg.train.strategy.value} needs deepspeed: {e}") from None
    return plan


PLAN_FILE = "plan.json"
PLAN_KEYS = ("global_batch_size", "grad_accum", "partitions", "shuffle_buffer", "seed", "weights", "rows")


def keep_plan(cfg: Config, run_dir: Path):
    """The run's plan, the same as when `run_dir` first trained: a re-run keeps the saved global
    batch G (so a resume on another number of workers continues the same order with a new
    per-worker batch) and is refused, before any worker starts, when the data, the mix or the
    order's keys changed, or when its number of workers cannot own whole lanes."""
    path = run_dir / PLAN_FILE
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is not None:
        G, t = saved["global_batch_size"], cfg.train
        if t.global_batch_size not in (None, G) or t.grad_accum != saved["grad_accum"]:
            raise ConfigError(f"{run_dir} trains with train.global_batch_size={G} and train.grad_accum="
                              f"{saved['grad_accum']}; changing them changes the sample order: use a new run.dir")
        allowed = [w for w in range(1, 1025) if saved["partitions"] % w == 0 and saved["chunk"] % w == 0]
        if t.num_workers not in allowed:
            raise ConfigError(f"train.num_workers={t.num_workers} cannot continue {run_dir}: its global order has "
                              f"{saved['partitions']} lanes (data.partitions) and contrastive batches of "
                              f"{saved['chunk']}; allowed: {allowed}")
        ckpt = latest_checkpoint(run_dir)
        zero = zero_world(ckpt) if ckpt is not None else 0
        if t.strategy == Strategy.ZERO3 and zero and t.num_workers != zero:
            # DeepSpeed's universal checkpoint carries ZeRO-2 partitions to another world size
            # exactly (vipoly.train.engine.reshard). For ZeRO-3 it restored the weights, but
            # DeepSpeed 0.19's stage-3 load gives every parameter group the first group's lr and
            # weight decay, and with that put right the steps still drifted (1e-4 in the loss a step
            # after the resume, 0.02 two steps after) from the run that stayed on its workers.
            raise ConfigError(f"train.num_workers={t.num_workers} cannot continue {run_dir}: its ZeRO-3 "
                              f"checkpoint {ckpt.name} holds the partitions of {zero} workers, and a ZeRO-3 run "
                              f"resumes only on as many (ZeRO-2 and DDP runs resume on any of {allowed})")
        t.batch_size = G // (t.num_workers * t.grad_accum)
        t.global_batch_size = G
    plan = check_config(cfg)
    if saved is not None:
        now = plan.summary()
        changed = [k for k in PLAN_KEYS if json.loads(json.dumps(now[k])) != saved[k]]
        if changed:
            raise ConfigError(f"{run_dir} was planned with other {', '.join(changed)} ({path}); the data or the "
                              f"order's keys changed since: use a new run.dir, or restore them")
    return plan


def describe(plan, cfg: Config) -> str:
    t = cfg.train
    steps = t.max_steps if t.max_steps >= 0 else (t.steps_per_epoch or plan.steps_per_epoch()) * t.epochs
    return (f"plan: {plan.num_rows:,} rows in {len(plan.sources)} source(s); {plan.global_batch} samples a step "
            f"({t.num_workers} worker(s) × {t.grad_accum} × {t.batch_size}); "
            f"{t.steps_per_epoch or plan.steps_per_epoch():,} steps an epoch, {steps:,} in all; "
            f"resumable on {resumable_on(plan, cfg)} workers")


def resumable_on(plan, cfg: Config) -> list[int]:
    """The numbers of workers a checkpoint of this run resumes on: those that own whole lanes, and
    for ZeRO-3 only the run's own (its partitions do not carry to another; see `keep_plan`)."""
    return [cfg.train.num_workers] if cfg.train.strategy == Strategy.ZERO3 else plan.allowed_workers()


def warn_unplaceable(cfg: Config) -> None:
    """Say so when the cluster as it is now cannot place the workers: Ray Train then waits (for an
    autoscaler to add nodes) without a word, which on a fixed cluster looks like a hang."""
    import ray

    t, r = cfg.train, cfg.train.resources
    need = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    fits = lambda res: all(res.get(k, 0) >= v for k, v in need.items())  # noqa: E731
    if r.placement_strategy.startswith("STRICT_SPREAD"):
        ok = sum(fits(r) for r in nodes) >= t.num_workers
        what = f"{t.num_workers} nodes that each have {need}"
    elif r.placement_strategy == "STRICT_PACK":
        ok = any(all(r.get(k, 0) >= v * t.num_workers for k, v in need.items()) for r in nodes)
        what = f"one node with {t.num_workers} × {need}"
    else:
        ok = all(sum(r.get(k, 0) for r in nodes) >= v * t.num_workers for k, v in need.items())
        what = f"{t.num_workers} × {need} in all"
    if not ok:
        print(f"warning: train.resources.placement_strategy={r.placement_strategy} needs {what}; the cluster has "
              f"{len(nodes)} node(s) with {[{k: r.get(k, 0) for k in need} for r in nodes]}. The run waits "
              f"until nodes are added (autoscaler) — on a fixed cluster, lower train.num_workers or change "
              f"the strategy.", file=sys.stderr, flush=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """An earlier run's newest complete checkpoint in `run_dir` (None: none). Ray Train restores
    that same checkpoint: it is the latest one reported."""
    found = [p.parent for p in run_dir.glob("checkpoint-*/state.pt")]
    return max(found, key=lambda d: int(d.name.split("-")[1]), default=None)


def latest_step(run_dir: Path) -> int:
    """Steps already done by an earlier run in `run_dir`, 0 if none."""
    ckpt = latest_checkpoint(run_dir)
    return int(ckpt.name.split("-")[1]) if ckpt is not None else 0


def zero_world(ckpt_dir: Path) -> int:
    """How many workers saved a ZeRO checkpoint (one optimizer partition each; 0: not one)."""
    return len(list((ckpt_dir / "deepspeed" / "state").glob("*zero_pp_rank_*_optim_states.pt")))
