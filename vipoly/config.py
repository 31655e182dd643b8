"""One typed config tree for the whole project, assembled from the sections its components own.

    model.*  vipoly/model/config.py    loss.*   vipoly/losses/config.py   stw.*  vipoly/stw/config.py
    data.*   vipoly/data/config.py     train.*, run.*, debug.*  vipoly/train/config.py

Every number of SPEC.md is a default in one section and nowhere else. A config is built from the defaults,
then a YAML file, then `--set a.b=c` overrides (values parsed as YAML, so `--set stw.alpha.instr=1.2`
and `--set data.mix="{ocr: 1, instr: 2}"` both work). Unknown keys and bad values fail with a
message naming the key; nothing is silently ignored.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from vipoly.data.config import DataConfig
from vipoly.losses.config import LossConfig
from vipoly.model.config import ModelConfig
from vipoly.section import Section
from vipoly.stw.config import STWConfig
from vipoly.train.config import DebugConfig, RunConfig, TrainConfig


class Config(Section):
    model: ModelConfig = ModelConfig()
    """The embedding model (SPEC §1)."""
    loss: LossConfig = LossConfig()
    """Dynamic Loss Equilibrium's per-task recipes (SPEC §2)."""
    stw: STWConfig = STWConfig()
    """Strategic Task Weighting (SPEC §3)."""
    data: DataConfig = DataConfig()
    """Sources, the task mix and the global sample order (SPEC §5)."""
    train: TrainConfig = TrainConfig()
    """Steps, batches, optimizer, checkpoints, workers (SPEC §4)."""
    run: RunConfig = RunConfig()
    """Where the run is recorded, and how loudly."""
    debug: DebugConfig = DebugConfig()
    """Fault injection for tests and fire drills."""

    @model_validator(mode="after")
    def _batch_from_global(self):
        t = self.train
        if t.global_batch_size is not None:
            per = t.num_workers * t.grad_accum
            if t.global_batch_size % per:
                raise ValueError(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                                 f"train.num_workers × train.grad_accum = {per}")
            if t.batch_size != t.global_batch_size // per:
                t.batch_size = t.global_batch_size // per
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


# ---------------------------------------------------------------- loading
class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


# Keys that moved into a section of their own, so an older config fails saying where the key is now.
MOVED = {f"train.{old}": f"train.{new}" for old, new in {
    "lr": "optimizer.lr", "vision_lr": "optimizer.vision_lr", "head_lr": "optimizer.head_lr",
    "weight_decay": "optimizer.weight_decay", "warmup_steps": "optimizer.warmup_steps",
    "schedule": "optimizer.schedule", "clip_grad_norm": "optimizer.clip_grad_norm",
    "checkpoint_every": "checkpoint.every", "keep_checkpoints": "checkpoint.keep",
    "strategic_checkpoints": "checkpoint.strategic", "max_failures": "checkpoint.max_failures",
    "use_gpu": "resources.use_gpu", "cpus_per_worker": "resources.cpus_per_worker",
    "gpus_per_worker": "resources.gpus_per_worker", "placement_strategy": "resources.placement_strategy",
}.items()}


def _set_path(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    schema: Any = Config
    for i, part in enumerate(parts):
        # Walk the pydantic schema beside the dict so an unknown key fails here, by name.
        if schema is not None and isinstance(schema, type) and issubclass(schema, BaseModel):
            if part not in schema.model_fields:
                here = ".".join(parts[: i + 1])
                if here in MOVED:
                    raise ConfigError(f"config key {here!r} is now {MOVED[here]!r}")
                raise ConfigError(f"unknown config key {here!r} (known here: {', '.join(schema.model_fields)})")
            ann = schema.model_fields[part].annotation
            schema = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is not a section")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping; a ConfigError naming the file if it is missing or not one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Defaults ← `base` dict ← YAML file ← `key=value` overrides, validated as one tree, with local
    paths made absolute against the working directory (`resolve_paths`)."""
    tree: dict[str, Any] = {}
    if base:
        for k, v in flatten(base):
            _set_path(tree, k, v)
    if path is not None:
        for k, v in flatten(read_yaml(path)):
            _set_path(tree, k, v)
    for item in overrides or []:
        _set_path(tree, *parse_override(item))
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']} (got {err.get('input')!r})" for err in e.errors()]
        raise ConfigError("invalid config" + (f" {path}" if path else "") + ":\n" + "\n".join(lines)) from None
    return resolve_paths(cfg)


def absolute_path(path: str, base: Path) -> str:
    """`path` made absolute against `base` (`~` expanded); a URI with a scheme (s3://, file://) as is."""
    if "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def resolve_paths(cfg: Config, base: Path | None = None) -> Config:
    """A copy of `cfg` whose local paths are absolute, against `base` (default: the working
    directory). Ray workers run in another directory, so a relative `data.root` typed on the
    command line would mean something else there. `model.backbone` changes only when it names an
    existing local folder: `tiny` and hub ids (`Qwen/Qwen2-VL-2B-Instruct`) stay as they are."""
    base = Path(base).absolute() if base is not None else Path.cwd()
    out = cfg.model_copy(deep=True)

    def assign(section: BaseModel, name: str, value: Any) -> None:
        # Only changed values: an assignment marks the field as set explicitly (PolyEmbedder.build reads that).
        if value != getattr(section, name):
            setattr(section, name, value)

    data = out.data
    if data.root is not None:
        assign(data, "root", absolute_path(data.root, base))
    assign(data, "sources", {name: absolute_path(p, base) for name, p in data.sources.items()})
    if data.encoded_dir:
        assign(data, "encoded_dir", absolute_path(data.encoded_dir, base))
    assign(out.run, "dir", absolute_path(out.run.dir, base))
    backbone = absolute_path(out.model.backbone, base)
    if out.model.backbone != "tiny" and Path(backbone).is_dir():  # `tiny`: built by pipelines.train
        assign(out.model, "backbone", backbone)
    return out


def flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaf (dotted key, value) pairs; dict-valued fields of the schema (mix, alpha) stay whole."""
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and _is_section(key):
            out += flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _is_section(dotted: str) -> bool:
    schema: Any = Config
    for part in dotted.split("."):
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)) or part not in schema.model_fields:
            return False
        schema = schema.model_fields[part].annotation
    return isinstance(schema, type) and issubclass(schema, BaseModel)


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="YAML config file (defaults + this + --set overrides)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.max_steps=100 (repeatable)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
