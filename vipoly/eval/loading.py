"""Which config settings apply when a saved PolyEmbedder is loaded for inference.

`pipelines.evaluate` and `pipelines.embed` take `--config FILE` and `--set key=value` like every
entrypoint, so a training YAML can be passed as is. Of it, only the model settings that change how
the saved model *runs* apply: attention kernel, dtype, length and image-size limits. Anything that
would change what the model *is* (backbone, pooling, projection) is ignored: the folder decides that.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vipoly.config import Config, ModelConfig

INFERENCE_FIELDS = ("attn_implementation", "dtype", "max_length", "image_max_pixels", "image_min_pixels")
META_FILE = "vipoly.json"  # written by PolyEmbedder.save_pretrained


def inference_overrides(cfg: Config) -> dict[str, Any]:
    """The model settings set explicitly (YAML or --set) that apply at inference."""
    return {k: getattr(cfg.model, k) for k in sorted(cfg.model.model_fields_set) if k in INFERENCE_FIELDS}


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """A saved PolyEmbedder's vipoly.json; ValueError naming the folder if it is not one."""
    meta_file = Path(model_dir) / META_FILE
    if not meta_file.is_file():
        raise ValueError(f"--model {model_dir}: not a saved PolyEmbedder (no {META_FILE})")
    return json.loads(meta_file.read_text())


def effective_model_config(model_dir: str | Path, overrides: dict[str, Any]) -> ModelConfig:
    """The saved ModelConfig with the inference overrides applied (validated as a whole)."""
    saved = read_meta(model_dir)["model"]
    return ModelConfig.model_validate({**saved, **overrides})


def load_for_inference(model_dir: str | Path, overrides: dict[str, Any], device: str | None = None):
    """PolyEmbedder.from_pretrained with the overrides applied, in eval mode."""
    from vipoly.model import PolyEmbedder

    model = PolyEmbedder.from_pretrained(model_dir, ModelConfig.model_validate(overrides) if overrides else None)
    model = model.eval()
    return model.to(device) if device else model
