"""Which config settings apply when a saved PolyEmbedder is loaded for inference.

`pipelines.evaluate` and `pipelines.embed` take `--config FILE` and `--set key=value` like every
entrypoint, so a training YAML can be passed as is. Of it, only the model settings that change how
the saved model *runs* apply: attention kernel, dtype, length and image-size limits. Anything that
would change what the model *is* (backbone, pooling, projection) is ignored: the folder decides that.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vipoly.config import Config
from vipoly.model.config import ModelConfig
from vipoly.folder import read_meta

INFERENCE_FIELDS = ("attn_implementation", "dtype", "max_length", "image_max_pixels", "image_min_pixels")


def inference_overrides(cfg: Config) -> dict[str, Any]:
    """The model settings set explicitly (YAML or --set) that apply at inference."""
    return {k: getattr(cfg.model, k) for k in sorted(cfg.model.model_fields_set) if k in INFERENCE_FIELDS}


def effective_model_config(model_dir: str | Path, overrides: dict[str, Any]) -> ModelConfig:
    """The saved ModelConfig with the inference overrides applied (validated as a whole)."""
    saved = read_meta(model_dir, "--model")["model"]
    return ModelConfig.model_validate({**saved, **overrides})


def load_for_inference(model_dir: str | Path, overrides: dict[str, Any], device: str | None = None):
    """PolyEmbedder.from_pretrained with the overrides applied, in eval mode."""
    from vipoly.model import PolyEmbedder

    model = PolyEmbedder.from_pretrained(model_dir, ModelConfig.model_validate(overrides) if overrides else None)
    model = model.eval()
    return model.to(device) if device else model
