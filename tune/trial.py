"""One trial: a training run (a Ray Train `TorchTrainer`) evaluated on held-out data as it goes.

Sweeps and ablations share this. A trial trains `eval_every` steps at a time: each chunk is one
`TorchTrainer.fit()` with `train.stop_after`, which ends with a checkpoint and the exported model;
the trial then evaluates `model/` on the held-out shards and reports the objective to Tune. ASHA
decides at those reports, so weak trials stop early on the real objective, not on training loss.
The next chunk re-runs the same `RunConfig(name, storage_path)`, which Ray Train resumes from its
latest checkpoint (exactly: the data position and RNG states are in it).

The same resume makes an interrupted sweep cheap: a restored trial has the same id, so the same run
directory, and continues from its last checkpoint instead of step 0.

Why not `ray.tune.integration.ray_train.TuneReportCallback`: it forwards the workers' own reports
(step, loss), which carry no held-out metric; Tune's strict metric check and OptunaSearch (which
reads `result[metric]` on every result) both reject results without the objective. The objective
exists only after evaluation, here, so this function reports it with `tune.report`.

Each trial directory (RUN_DIR/trials/<trial id>) is an ordinary training run directory
(config.yaml, metrics.jsonl, checkpoints, model/, report.md) plus `trial.json`:
{trial_id, experiment, params, design, status, evals: [{step, metrics...}], error}.
"""
from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tune.config import HeldoutConfig
from vipoly.config import Config


@dataclass
class Job:
    """What every trial of one experiment shares (sent to the trials with `tune.with_parameters`)."""

    cfg: dict
    """The resolved training config (Config.to_dict()), before the trial's parameters."""
    root: str
    """The sweep's or ablation's run directory."""
    experiment: str
    """search | oat | ablate: the experiment the trial belongs to (a column of the trials table)."""
    heldout: dict
    eval_every: int | None = None
    inits: dict[int, str] = field(default_factory=dict)
    """{seed: tiny model directory} when model.backbone == "tiny" (built once by the driver)."""

    @classmethod
    def of(cls, harness, cfg: Config, root: Path, experiment: str, inits: dict[int, str],
           eval_every: int | None = None) -> "Job":
        """The job of one experiment of a sweep or ablation harness (`tune.config.Harness`)."""
        return cls(cfg=cfg.to_dict(), root=str(root), experiment=experiment,
                   heldout=harness.heldout.model_dump(mode="json"), eval_every=eval_every, inits=inits)


def split_point(config: dict) -> tuple[dict[str, Any], Any]:
    """Tune's trial config → (training parameters, design tag). Fixed designs (grid, Sobol, OAT,
    ablation cells) arrive as {"point": {...}}; searched ones as the parameters themselves."""
    point = config.get("point", config)
    params = {k: v for k, v in point.items() if not k.startswith("_")}
    return params, point.get("_design")


def run_trial(config: dict, job: Job) -> None:
    """The Tune function of every trial (`ray` lines: the context and the reports)."""
    from ray import tune  # ray

    from tune.space import apply_params

    trial_id = tune.get_context().get_trial_id()  # ray
    params, design = split_point(config)
    run_dir = Path(job.root) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    record = TrialRecord(run_dir / "trial.json", trial_id, job.experiment, params, design)
    try:
        cfg = apply_params(Config.model_validate(job.cfg), params)
        for step, metrics in train_and_evaluate(cfg, run_dir, HeldoutConfig.model_validate(job.heldout),
                                                job.eval_every, job.inits):
            record.add_eval(step, metrics)
            if cfg.train.max_steps < 0 or step >= cfg.train.max_steps:
                record.finish("complete")  # before the report: ASHA ends a trial at max_t right at it
            tune.report({"step": step, **metrics})  # ray: ASHA and the searcher see the objective here
    except Exception as e:
        record.finish("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")
        raise


class TrialRecord:
    """trial.json, rewritten after every change so a killed sweep leaves a readable record."""

    def __init__(self, path: Path, trial_id: str, experiment: str, params: dict, design: Any):
        self.path = path
        old = json.loads(path.read_text()) if path.exists() else {}
        self.data = {"trial_id": trial_id, "experiment": experiment, "params": params, "design": design,
                     "status": "running", "evals": old.get("evals", []), "error": None}
        self._write()

    def add_eval(self, step: int, metrics: dict[str, float]) -> None:
        evals = [e for e in self.data["evals"] if e["step"] != step]  # a restored trial re-evaluates its last step
        self.data["evals"] = evals + [{"step": step, **metrics}]
        self._write()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data.update(status=status, error=error)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def prepare_run(cfg: Config, run_dir: Path, inits: dict[int, str]) -> Config:
    """The trial's training config: its run directory, the tiny model's initialisation for its
    seed, and the model config that the workers' model and data both follow (`write_inputs`)."""
    from vipoly.model.inputs import effective_model_config, write_inputs

    cfg = cfg.model_copy(deep=True)
    cfg.run.dir = str(run_dir)
    cfg.run.name = run_dir.name
    if cfg.model.backbone == "tiny":
        if cfg.train.seed not in inits:
            raise ValueError(f"no tiny initialisation was built for train.seed={cfg.train.seed}")
        cfg.model.backbone = inits[cfg.train.seed]
    # The workers rebuild the config from a dict, where every field counts as set: hand them the
    # effective one, so that the saved model's unset fields are not replaced by defaults there.
    cfg.model = effective_model_config(cfg.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_inputs(cfg)
    cfg.save(run_dir / "config.yaml")
    return cfg


def train_and_evaluate(cfg: Config, run_dir: Path, heldout: HeldoutConfig, eval_every: int | None,
                       inits: dict[int, str]) -> Iterator[tuple[int, dict[str, float]]]:
    """Train in chunks of `eval_every` steps (one chunk when None), yielding (step, held-out metrics)
    after each. Resumes from the run directory's latest checkpoint."""
    from vipoly.train.launch import build_trainer, latest_step

    cfg = prepare_run(cfg, run_dir, inits)
    total = cfg.train.max_steps
    evaluate = evaluator(heldout)
    done = latest_step(run_dir)
    while True:
        if done < total or total < 0 or not (run_dir / "model").exists():
            chunk = cfg.model_copy(deep=True)
            chunk.train.stop_after = eval_every if eval_every and total > 0 and done + eval_every < total else None
            (run_dir / "STOPPED").unlink(missing_ok=True)
            build_trainer(chunk, run_dir).fit()  # ray: Ray Train V2 raises if the run fails
            if (run_dir / "STOPPED").exists():
                raise RuntimeError(f"training stopped: {(run_dir / 'STOPPED').read_text().strip()}")
            new = latest_step(run_dir)
            if new <= done and total > 0:
                raise RuntimeError(f"training made no progress past step {done} in {run_dir}")
            done = new
        yield done, evaluate(run_dir / "model")
        if total < 0 or done >= total:
            return


def evaluator(heldout: HeldoutConfig) -> Callable[[Path], dict[str, float]]:
    """Evaluate in this process, or as a Ray task with `heldout.resources` (a GPU on a cluster)."""
    from tune.objective import evaluate

    heldout.root  # fail now, not after training, when heldout.data is missing
    if not heldout.resources:
        return lambda model_dir: evaluate(model_dir, heldout)
    import ray  # ray

    res = dict(heldout.resources)
    options = {"num_cpus": res.pop("CPU", 1), "num_gpus": res.pop("GPU", 0), "resources": res or None}
    remote = ray.remote(**options)(evaluate)  # ray
    return lambda model_dir: ray.get(remote.remote(str(model_dir), heldout))  # ray
