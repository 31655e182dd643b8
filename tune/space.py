"""The search space: which training-config values a sweep may vary, over which ranges.

A parameter is named by its dotted path in the training `Config` (`stw.alpha.instr`,
`loss.lambda_triplet.vqa_multi`, `loss.temperature`, ...). `DEFAULT_SPACE` holds SPEC's ranges
(§3 for α_t and β; §2 gives only reference values for λ, margins and T, so those ranges bracket the
reference value by about ×½–×2, and T spans the 0.07 default and the reference run's 0.2).
A sweep picks any subset, optionally with its own bounds; shell-style patterns (`stw.alpha.*`)
select several at once.

A point {name: value} becomes a training config with `apply_params`, which sets the values inside
the resolved config and re-validates the whole tree, so a bad name or value fails with its name.
Designs that fix their points in advance (grid, Sobol/Saltelli) are built here too.
"""
from __future__ import annotations

import fnmatch
import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from vipoly.config import Config, ConfigError
from vipoly.tasks import TASKS


@dataclass(frozen=True)
class Range:
    """A continuous parameter: uniform on [low, high], or on log scale when `log`."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"range needs finite low < high, got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got {self.low}")

    def from_unit(self, u: np.ndarray | float) -> np.ndarray | float:
        """Map u ∈ [0, 1] onto the range (geometrically when `log`)."""
        u = np.asarray(u, dtype=np.float64)
        if self.log:
            v = np.exp(np.log(self.low) + u * (np.log(self.high) - np.log(self.low)))
        else:
            v = self.low + u * (self.high - self.low)
        return float(v) if v.ndim == 0 else v

    def grid(self, n: int) -> list[float]:
        """n evenly spaced values including both ends (geometric spacing when `log`)."""
        if n < 1:
            raise ValueError(f"grid needs ≥ 1 point, got {n}")
        if n == 1:
            return [float(self.from_unit(0.5))]
        return [float(self.from_unit(u)) for u in np.linspace(0.0, 1.0, n)]


def _default_space() -> dict[str, Range]:
    space = {
        # SPEC §3: α_t ranges (reference 0.27 / 1.25 / 1.0) and β per epoch.
        "stw.alpha.text_pair": Range(0.25, 0.35),
        "stw.alpha.instr": Range(1.1, 1.3),
        "stw.alpha.ocr": Range(0.9, 1.2),
        "stw.alpha.vqa_single": Range(0.9, 1.2),
        "stw.alpha.vqa_multi": Range(0.9, 1.2),
        "stw.beta_foundation": Range(1.0, 1.2),
        "stw.beta_balance": Range(0.8, 1.0),
        # SPEC §2 reference values; the ranges bracket them (log scale: they are ratios).
        "loss.temperature": Range(0.05, 0.25, log=True),
        "loss.lambda_score": Range(5.0, 40.0, log=True),
        "loss.lambda_rank": Range(2.0, 15.0, log=True),
        "loss.rank_margin": Range(0.02, 0.1),
        "loss.lambda_triplet.ocr": Range(0.5, 2.0, log=True),
        "loss.lambda_triplet.vqa_single": Range(0.5, 2.0, log=True),
        "loss.lambda_triplet.vqa_multi": Range(0.75, 3.0, log=True),
        "loss.triplet_margin.ocr": Range(0.1, 0.4),
        "loss.triplet_margin.vqa_single": Range(0.1, 0.4),
        "loss.triplet_margin.vqa_multi": Range(0.15, 0.5),
    }
    assert all(n.split(".")[-1] in TASKS for n in space if ".alpha." in n)
    return space


DEFAULT_SPACE: dict[str, Range] = _default_space()


def resolve_space(params: Mapping[str, Any] | None) -> dict[str, Range]:
    """{name or pattern: None | [low, high] | {low, high, log}} → {name: Range}.

    None (or an empty mapping) keeps SPEC's range; [low, high] keeps the default scale (log or
    not) of a known parameter; any training-config path with a numeric value may be named with an
    explicit range. An empty or missing `params` means the whole default space."""
    if not params:
        return dict(DEFAULT_SPACE)
    out: dict[str, Range] = {}
    for key, spec in params.items():
        names = sorted(n for n in DEFAULT_SPACE if fnmatch.fnmatchcase(n, key)) if any(c in key for c in "*?[") else [key]
        if not names:
            raise ValueError(f"sweep.params: pattern {key!r} matches no known parameter ({', '.join(DEFAULT_SPACE)})")
        for name in names:
            out[name] = _range_of(name, spec)
    check_names(out)
    return out


def _range_of(name: str, spec: Any) -> Range:
    default = DEFAULT_SPACE.get(name)
    try:
        if spec is None:
            if default is None:
                raise ValueError("has no default range: give [low, high]")
            return default
        if isinstance(spec, (list, tuple)):
            if len(spec) != 2:
                raise ValueError(f"expected [low, high], got {list(spec)}")
            return Range(float(spec[0]), float(spec[1]), default.log if default else False)
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"low", "high", "log"}
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)}; expected low, high, log")
            return Range(float(spec["low"]), float(spec["high"]), bool(spec.get("log", default.log if default else False)))
        raise ValueError(f"expected null, [low, high] or {{low, high, log}}, got {spec!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"sweep.params.{name}: {e}") from None


def check_names(names) -> None:
    """Every name must be a numeric value in the training config (fails naming the first that is not)."""
    tree = Config().to_dict()
    for name in names:
        node: Any = tree
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"sweep parameter {name!r} is not a training config value")
            node = node[part]
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            raise ValueError(f"sweep parameter {name!r} is not numeric (it is {node!r})")


def apply_params(cfg: Config, params: Mapping[str, Any]) -> Config:
    """A copy of `cfg` with each dotted `name` set to its value, the whole tree re-validated.

    Works inside per-task dicts (`stw.alpha.instr`) that `--set` would replace whole, and for any
    value type (`stw.mode: none`, `model.pooling.kind: mean`, `train.seed: 2`)."""
    tree = cfg.to_dict()
    for name, value in params.items():
        node: Any = tree
        parts = name.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key {name!r}")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"unknown config key {name!r}")
        node[parts[-1]] = value
    try:
        return Config.model_validate(tree)
    except Exception as e:  # pydantic's message names the field
        raise ConfigError(f"invalid value in {dict(params)}: {e}") from None


# ---------------------------------------------------------------- fixed designs
def grid_points(space: Mapping[str, Range], points: int) -> list[dict[str, float]]:
    """The full factorial grid with `points` values per parameter (points^d trials)."""
    names = list(space)
    axes = [space[n].grid(points) for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*axes)]


def sobol_design(space: Mapping[str, Range], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Saltelli's design for Sobol indices: n(d + 2) points.

    Two independent scrambled-Sobol matrices A and B (n × d, u ∈ [0,1)) and, for each parameter i,
    AB_i = A with column i taken from B. Each point carries `_design` = [matrix, i, row] with matrix
    "A", "B" or "AB" (i = -1 for A and B), which `importance.sobol_indices` uses to put the
    evaluations back in place. n must be a power of 2 (the Sobol sequence's balance property)."""
    from scipy.stats import qmc

    if n < 2 or n & (n - 1):
        raise ValueError(f"sweep.sobol_n must be a power of 2 ≥ 2, got {n}")
    names = list(space)
    d = len(names)
    base = qmc.Sobol(2 * d, scramble=True, seed=seed).random(n)
    a, b = base[:, :d], base[:, d:]

    def point(u: np.ndarray, tag: list) -> dict[str, Any]:
        p: dict[str, Any] = {name: float(space[name].from_unit(float(u[k]))) for k, name in enumerate(names)}
        p["_design"] = tag
        return p

    out = [point(a[j], ["A", -1, j]) for j in range(n)] + [point(b[j], ["B", -1, j]) for j in range(n)]
    for i in range(d):
        ab = a.copy()
        ab[:, i] = b[:, i]
        out += [point(ab[j], ["AB", i, j]) for j in range(n)]
    return out


def oat_points(space: Mapping[str, Range], center: Mapping[str, float], n: int,
               center_id: str | None = None) -> list[dict[str, Any]]:
    """One-at-a-time curves: for each parameter, n values across its range with the others at
    `center`; each point is tagged `_design` = ["OAT", i, name, center_id]."""
    out = []
    for i, name in enumerate(space):
        for v in space[name].grid(n):
            p = {k: float(center[k]) for k in space}
            p[name] = v
            p["_design"] = ["OAT", i, name, center_id]
            out.append(p)
    return out
