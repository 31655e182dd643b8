"""The config tree: sections beside their components, documented leaves, light to import, and
old keys that say where they moved."""
from __future__ import annotations

import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from vipoly.config import MOVED, Config, ConfigError, load_config
from tune.config import Harness

REPO = Path(__file__).resolve().parents[1]


def _sections(annotation) -> list[type[BaseModel]]:
    """The section classes in a field's annotation (`X`, `X | None`)."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield prefix + name, field
        for section in _sections(field.annotation):
            yield from _fields(section, f"{prefix}{name}.")


@pytest.mark.parametrize("tree", [Config, Harness], ids=["training config", "tune harness"])
def test_every_field_has_a_docstring(tree):
    undocumented = [key for key, field in _fields(tree) if not (field.description or "").strip()]
    assert undocumented == []


def test_sections_sit_beside_their_components():
    owners = {name: field.annotation.__module__ for name, field in Config.model_fields.items()}
    assert owners == {"model": "vipoly.model.config", "loss": "vipoly.losses.config", "stw": "vipoly.stw.config",
                      "data": "vipoly.data.config", "train": "vipoly.train.config", "run": "vipoly.train.config",
                      "debug": "vipoly.train.config"}


def test_loading_a_config_imports_no_torch_ray_or_transformers():
    code = (f"import sys; from vipoly.config import load_config; load_config({str(REPO / 'configs/qwen2vl-2b.yaml')!r}); "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'numpy', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_key_names_its_new_place(old):
    with pytest.raises(ConfigError, match=f"config key '{old}' is now '{MOVED[old]}'"):
        load_config(None, [f"{old}=1"])


def test_sections_load_from_yaml_and_set():
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", ["train.optimizer.lr=0.5", "train.checkpoint.every=7"])
    assert (cfg.train.optimizer.lr, cfg.train.optimizer.vision_lr, cfg.train.optimizer.warmup_steps) == (0.5, 1e-4, 5)
    assert (cfg.train.checkpoint.every, cfg.train.checkpoint.strategic) == (7, [30])
    assert cfg.train.resources.cpus_per_worker == 0.5
