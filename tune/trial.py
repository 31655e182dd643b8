"""One trial: a training run (a Ray Train `TorchTrainer`) evaluated on held-out data as it goes.

Sweeps and ablations share this. A trial is one `TorchTrainer.fit()`: every `eval_every` steps
(and at the last) the workers checkpoint, export `model/`, and rank 0 evaluates it on the held-out
shards (`HeldoutEval`, in the worker, which has the model code loaded already). The metrics reach
Tune through `HeldoutReport`, a Ray Train callback in the controller that records them in
trial.json and hands them to Tune's `TuneReportCallback`; ASHA decides at those reports, so weak
trials stop early on the real objective, not on training loss. The workers are not restarted
between evaluations (before, each chunk of `eval_every` steps was a fit of its own: a worker group,
a model load and a data stream opened per evaluation).

`HeldoutReport` passes on only the reports that carry the objective: the workers' checkpoint
reports (step, score) have none, and Tune's strict metric check and OptunaSearch (which reads
`result[metric]` on every result) both reject results without it.

An interrupted sweep is cheap to resume: a restored trial has the same id, so the same run
directory, and Ray Train continues it from its last checkpoint (an evaluation step at the latest),
not from step 0.

Each trial directory (RUN_DIR/trials/<trial id>) is an ordinary training run directory
(config.yaml, metrics.jsonl, checkpoints, model/, report.md) plus `trial.json`:
{trial_id, experiment, params, design, status, evals: [{step, metrics...}], error}.
"""
from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune.config import HeldoutConfig
from vipoly.config import Config
from vipoly.train.launch import Evaluator


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
    """The Tune function of every trial (`ray` lines: the context and the training run)."""
    from ray import tune  # ray

    from tune.space import apply_params

    from ray.train._internal.session import get_session  # ray: the session TuneReportCallback uses

    trial_id = tune.get_context().get_trial_id()  # ray
    session = get_session()  # held: Tune clears the global one while tearing a stopped trial down
    params, design = split_point(config)
    run_dir = Path(job.root) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    record = TrialRecord.start(run_dir / "trial.json", trial_id, job.experiment, params, design)
    try:
        cfg = apply_params(Config.model_validate(job.cfg), params)
        train_and_evaluate(cfg, run_dir, HeldoutConfig.model_validate(job.heldout), job.eval_every, job.inits,
                           record.path)
        done = TrialRecord.load(record.path).data
        if done["status"] == "complete":  # the final evaluation, once the run has ended (see HeldoutReport)
            tune.report(dict(done["evals"][-1]))  # ray
    except Exception as e:
        if session is not None and session.stop_event.is_set():
            # Tune stopped the trial at a report (ASHA's decision, or max_t at the last step) while
            # fit() still ran; the run's controller was torn down under it: no failure, and
            # trial.json keeps what was reported.
            return
        TrialRecord.load(record.path).finish("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")
        raise


class TrialRecord:
    """trial.json, rewritten after every change so a killed sweep leaves a readable record. The
    trial's function starts it; the Train controller (`HeldoutReport`) adds the evaluations."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def start(cls, path: Path, trial_id: str, experiment: str, params: dict, design: Any) -> "TrialRecord":
        old = json.loads(path.read_text()) if path.exists() else {}
        record = cls(path, {"trial_id": trial_id, "experiment": experiment, "params": params, "design": design,
                            "status": "running", "evals": old.get("evals", []), "error": None})
        record._write()
        return record

    @classmethod
    def load(cls, path: Path) -> "TrialRecord":
        return cls(path, json.loads(path.read_text()))

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
                       inits: dict[int, str], record: Path) -> None:
    """One fit that evaluates `model/` every `eval_every` steps (None: at the end only) and at the
    end, reporting each evaluation to Tune; resumes from the run directory's latest checkpoint."""
    from vipoly.train.launch import build_trainer

    heldout.root  # fail now, not after training, when heldout.data is missing
    cfg = prepare_run(cfg, run_dir, inits)
    (run_dir / "STOPPED").unlink(missing_ok=True)
    build_trainer(cfg, run_dir, evaluate=HeldoutEval(heldout, eval_every),
                  callbacks=[HeldoutReport(record)]).fit()  # ray: raises if the run fails
    if (run_dir / "STOPPED").exists():
        raise RuntimeError(f"training stopped: {(run_dir / 'STOPPED').read_text().strip()}")


class HeldoutEval(Evaluator):
    """The held-out objective of `model/` (`tune.objective.evaluate`), on the Train worker of rank
    0, or as a Ray task with `heldout.resources` (a GPU on a cluster)."""

    def __init__(self, heldout: HeldoutConfig, every: int | None):
        self.heldout, self.every = heldout.model_dump(mode="json"), every

    def __call__(self, model_dir: Path) -> dict[str, float]:
        from tune.objective import evaluate

        heldout = HeldoutConfig.model_validate(self.heldout)
        if not heldout.resources:
            return evaluate(model_dir, heldout)
        import ray  # ray

        res = dict(heldout.resources)
        options = {"num_cpus": res.pop("CPU", 1), "num_gpus": res.pop("GPU", 0), "resources": res or None,
                   "scheduling_strategy": "DEFAULT"}  # outside the Train worker's placement group
        return ray.get(ray.remote(**options)(evaluate).remote(str(model_dir), heldout))  # ray


def _user_callback():
    from ray.train import UserCallback  # ray

    return UserCallback


class HeldoutReport(_user_callback()):
    """A Ray Train callback (it runs in the Train controller): each report that carries the
    held-out objective goes into trial.json, and the intermediate ones on to Tune
    (`TuneReportCallback`, built here in the trial's Tune session), where ASHA may stop the trial;
    the workers' checkpoint reports carry none and stay in Ray Train. The final evaluation is
    reported by the trial's function after `fit()` returns: at max_t Tune stops a trial at its
    report, which would tear the run down before it has finished."""

    def __init__(self, record: Path):
        from ray.tune.integration.ray_train import TuneReportCallback  # ray

        self.record = Path(record)
        self.tune = TuneReportCallback()

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        first = metrics[0]
        if "objective" not in first:
            return
        record = TrialRecord.load(self.record)
        step = int(first["step"])
        record.add_eval(step, {k: v for k, v in first.items() if k not in ("step", "final")})
        if first.get("final"):
            record.finish("complete")
            return
        self.tune.after_report(run_context, [{k: v for k, v in first.items() if k != "final"}], None)  # ray
