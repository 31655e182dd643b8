"""Harness configs: an ordinary training config plus a `sweep` or `ablate` section.

A sweep (or ablation) YAML is the training Config tree (model, loss, stw, data, train, run, ...)
with a few extra top-level keys:

    base: configs/tiny-cpu.yaml      # training config the inline sections override (optional)
    train: {max_steps: 12}           # inline training overrides, as in any training YAML
    run: {dir: runs/sweep-tiny}      # the sweep's directory: trials/, search/, trials.csv, report.md
    heldout: {data: DIR}             # canonical shards never trained on: the objective's data
    synthetic: {n: 200}              # optional: generate synthetic train/held-out data if absent
    sweep: {params: {...}, ...}      # or `ablate: {factors: {...}, seeds: [...]}`

Training values resolve as defaults ← `base` file ← inline sections ← `--set` (as in
`pipelines.train`). `--set` keys under base/heldout/synthetic/sweep/ablate go to the harness.
`vipoly.config.Config` forbids unknown keys, so the harness is its own pydantic model here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from vipoly.config import Config, ConfigError, absolute_path, flatten, load_config, parse_override, read_yaml
from vipoly.section import Section

HARNESS_KEYS = ("base", "heldout", "synthetic", "sweep", "ablate")


class HeldoutConfig(Section):
    data: str | None = None
    """Canonical shards (DIR/<task>/part-*.parquet, or `canonical:DIR`) never trained on."""
    metric: str = "MRR@10"
    """Per-task retrieval metric the objective is built from: R@1, R@5, R@10, MRR@10 or nDCG@10."""
    objective: Literal["mean", "worst"] = "mean"
    """Objective = mean of `metric` over tasks, or its worst task (balance-aware)."""
    limit: int | None = Field(None, ge=1)
    """Queries per task (drawn with a fixed seed); None = all rows."""
    batch_size: int = Field(32, ge=1)
    """Rows embedded at a time by the evaluation."""
    resources: dict[str, float] | None = None
    """Run the evaluation as a Ray task with these resources (e.g. {GPU: 1} on a cluster);
    None = inside the trial's own process (CPU)."""

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        known = ("R@1", "R@5", "R@10", "MRR@10", "nDCG@10")
        if v not in known:
            raise ValueError(f"heldout.metric must be one of {', '.join(known)}, got {v!r}")
        return v

    @property
    def root(self) -> str:
        if not self.data:
            raise ConfigError("heldout.data is required: canonical shards held out from training "
                              "(an objective on the training data would reward memorisation)")
        return self.data.removeprefix("canonical:")


class SyntheticConfig(Section):
    """Generate synthetic data into `data.root` and `heldout.data` where they do not exist yet."""

    n: int = Field(200, ge=10)
    """Training rows (shared equally by the five tasks)."""
    heldout_n: int = Field(100, ge=10)
    """Held-out rows (shared equally by the five tasks)."""
    seed: int = 0
    """Training data seed; the held-out set uses seed + 1 (different sentences and scenes)."""


class SweepSection(Section):
    params: dict[str, Any] = {}
    """{name or pattern: null | [low, high] | {low, high, log}}; names are training-config paths
    (`stw.alpha.instr`, `loss.lambda_triplet.vqa_multi`); null = SPEC's range; empty = all of
    `tune.space.DEFAULT_SPACE`."""
    searcher: Literal["optuna_tpe", "random", "grid", "sobol"] = "optuna_tpe"
    """How points are chosen: Optuna's TPE, uniform random, a grid, or a Saltelli (Sobol) design."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """ASHA stops weak trials at held-out evaluations; grid and Sobol designs need every point at
    full budget and default to fifo."""
    num_samples: int = Field(20, ge=1)
    """Trials for optuna_tpe and random (grid and Sobol sizes follow from their designs)."""
    grid_points: int = Field(3, ge=1)
    """Values per parameter of the grid (grid_points^d trials)."""
    sobol_n: int = Field(8, ge=2)
    """Base sample size n of the Saltelli design (n·(d+2) trials; a power of 2)."""
    seed: int = 0
    """Seed of the searcher and of the designs (training seeds stay in train.seed)."""
    eval_every: int | None = Field(None, ge=1)
    """Training steps between held-out evaluations (ASHA decides at each); None = max_steps/4 with
    ASHA, only at the end with fifo."""
    grace_period: int | None = Field(None, ge=1)
    """ASHA: steps before a trial can be stopped; None = eval_every."""
    reduction_factor: float = Field(2.0, gt=1)
    """ASHA: 1 / the fraction of trials kept at each rung."""
    max_concurrent: int = Field(2, ge=1)
    """Trials training at once."""
    trial_resources: dict[str, float] = {"CPU": 0.01}
    """Resources of each trial's driver function (the Train workers reserve their own)."""
    sensitivity: bool = True
    """Write the sensitivity report at the end of the sweep."""
    oat: int = Field(0, ge=0)
    """After the sweep, train one-at-a-time curves around the best trial with this many values per
    parameter (0 = off; the report then uses partial dependence from the trials)."""

    @model_validator(mode="before")
    @classmethod
    def _fixed_designs_run_fifo(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("searcher") in ("grid", "sobol") and "scheduler" not in data:
            data = {**data, "scheduler": "fifo"}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.searcher in ("grid", "sobol") and self.scheduler == "asha":
            raise ValueError(f"sweep.scheduler=asha with sweep.searcher={self.searcher}: a fixed design needs every "
                             "point at full budget; use scheduler: fifo")
        if self.searcher == "sobol" and self.sobol_n & (self.sobol_n - 1):
            raise ValueError(f"sweep.sobol_n must be a power of 2, got {self.sobol_n}")
        return self


FACTOR_ALIASES = {"stw": "stw.mode", "loss": "loss.kind", "dle": "loss.kind", "pooling": "model.pooling.kind"}


class AblateSection(Section):
    factors: dict[str, list[Any]] = {"stw": ["none", "static", "dynamic"], "loss": ["infonce", "dle"],
                                      "pooling": ["mean", "last", "attention"]}
    """{factor: levels}; factors are `stw` (stw.mode), `loss` (loss.kind: dle = full DLE, infonce =
    one InfoNCE for all tasks), `pooling` (model.pooling.kind), or any training-config path. The
    first level is the baseline each other level is compared with."""
    seeds: list[int] = [0, 1, 2]
    """Each cell is trained once per seed (train.seed, and the tiny model's initialisation)."""
    max_concurrent: int = Field(2, ge=1)
    """Cells training at once."""
    trial_resources: dict[str, float] = {"CPU": 0.01}
    """Resources of each cell's driver function (the Train workers reserve their own)."""

    @field_validator("factors")
    @classmethod
    def _levels(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not v:
            raise ValueError("ablate.factors is empty")
        for name, levels in v.items():
            if not levels or len(set(map(str, levels))) != len(levels):
                raise ValueError(f"ablate.factors.{name}: needs distinct levels, got {levels}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"ablate.seeds: needs distinct seeds, got {v}")
        return v

    def paths(self) -> dict[str, str]:
        """{factor name: training-config path}."""
        return {f: FACTOR_ALIASES.get(f, f) for f in self.factors}


class Harness(Section):
    base: str | None = None
    """The training config the trials start from (relative to the working directory)."""
    heldout: HeldoutConfig = HeldoutConfig()
    """The held-out data and metric that score a trial."""
    synthetic: SyntheticConfig | None = None
    """Make synthetic training and held-out data where they do not exist; None = use what is there."""
    sweep: SweepSection | None = None
    """The search (`python -m tune.sweep`)."""
    ablate: AblateSection | None = None
    """The factorial ablation (`python -m tune.ablate`)."""


def load_harness(path: str | Path | None, overrides: list[str] | None = None,
                 section: Literal["sweep", "ablate"] = "sweep") -> tuple[Harness, Config]:
    """(harness, training config) from a harness YAML and `--set key=value` overrides."""
    tree: dict[str, Any] = read_yaml(path) if path is not None else {}
    harness_tree = {k: tree.pop(k) for k in HARNESS_KEYS if k in tree}
    other = "ablate" if section == "sweep" else "sweep"
    if other in harness_tree:
        raise ConfigError(f"{path}: has an `{other}` section; use `python -m tune.{other}` for it")
    harness_tree.setdefault(section, {})
    train_sets = [f"{k}={json.dumps(v)}" for k, v in flatten(tree)]  # JSON is YAML: --set parses it
    for item in overrides or []:
        key, value = parse_override(item)
        head = key.split(".")[0]
        if head in HARNESS_KEYS:
            node = harness_tree
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"config key {key!r}: {part!r} is not a section")
            node[parts[-1]] = value
        else:
            train_sets.append(item)
    try:
        harness = Harness.model_validate(harness_tree)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']} (got {err.get('input')!r})" for err in e.errors()]
        raise ConfigError("invalid harness config" + (f" {path}" if path else "") + ":\n" + "\n".join(lines)) from None
    if harness.base is not None and not Path(harness.base).is_file():
        raise ConfigError(f"base: training config not found: {harness.base} (paths are relative to the working "
                          "directory, normally the repo root)")
    if harness.heldout.data:  # absolute, as load_config makes the training paths: trials run elsewhere
        harness.heldout.data = absolute_path(harness.heldout.root, Path.cwd())
    cfg = load_config(harness.base, train_sets)
    return harness, cfg


def save_harness(harness: Harness, cfg: Config, path: Path) -> None:
    """The resolved harness + training config as one YAML (what `load_harness` reads back)."""
    tree = {k: v for k, v in harness.model_dump(mode="json").items() if v is not None and k != "base"}
    tree.update(cfg.to_dict())
    path.write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
