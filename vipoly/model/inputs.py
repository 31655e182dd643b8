"""(text, image, task) → model inputs: the one place that does it, for `encode` and for the data pipeline.

Layout of one input (M = number of merged image patches):

    [task prefix] [<|vision_start|> <|image_pad|>×M <|vision_end|>]… [text tokens] <|endoftext|>

- The prefix comes first so that every later token, image tokens included, is conditioned on the task.
- The closing <|endoftext|> gives every input the same last token: last-token pooling then reads a
  position that has attended to everything, as in the decoder-based embedders.
- Truncation to `model.max_length` only ever cuts text: the number of <|image_pad|> tokens must
  equal the vision tower's output, so image tokens are never cut.

`encode_one` returns numpy arrays only (cheap to pickle between Ray Data stages; images travel as
bytes and are decoded here); `pad` turns a list of them into one right-padded batch of tensors.
Right padding keeps every real token at the position it has alone, so a vector does not depend on
its batch. `pack` concatenates them instead, with no padding at all (see packing.py); the model
takes either kind of batch.

A training run's data workers build their `InputBuilder` from `<run.dir>/inputs` (`write_inputs`):
the backbone's processor and the model config the model itself is built with, whatever the
backbone is, so that a `--set model.max_length=…` reaches tokenisation as it reaches the model.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from vipoly.folder import META_FILE, is_polyembedder_dir, read_meta
from vipoly.model.config import ModelConfig
from vipoly.model.packing import pack_rows
from vipoly.tasks import TASKS, check_task, prefix

if TYPE_CHECKING:  # the whole tree assembles this package's section: a type only, no import
    from vipoly.config import Config


def decode_image(x: Any) -> Image.Image:
    """An RGB PIL image from PIL, PNG/JPEG bytes, a file path, an HxW(x3|4) uint8 array or an
    HF-datasets `{"bytes", "path"}` dict; anything else raises a ValueError that says what it got."""
    if isinstance(x, dict):  # the form `datasets.Image` stores
        x = x.get("bytes") or x.get("path")
    try:
        if isinstance(x, Image.Image):
            img = x
        elif isinstance(x, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(x)))
        elif isinstance(x, (str, os.PathLike)):
            if not Path(x).is_file():
                raise ValueError(f"not an image: no such file {str(x)!r}")
            img = Image.open(x)
        elif isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim in (2, 3):
            img = Image.fromarray(x)
        else:
            raise ValueError(f"not an image: got {type(x).__name__}")
        img.load()  # decode now, so a truncated file fails here and not deep inside the model
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"not an image: {e}") from None
    return img if img.mode == "RGB" else img.convert("RGB")


def apply_explicit(saved: ModelConfig, given: ModelConfig) -> ModelConfig:
    """`saved` with the fields set explicitly in `given` (pydantic's `model_fields_set`: YAML or
    `--set`) applied, nested sections field by field. The backbone stays the saved provenance."""
    update = _explicit(given)
    update.pop("backbone", None)
    return ModelConfig.model_validate(_merge(saved.model_dump(), update))


def _explicit(cfg: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in cfg.model_fields_set:
        value = getattr(cfg, name)
        out[name] = _explicit(value) if isinstance(value, BaseModel) else value
    return out


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for k, v in update.items():
        merged[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return merged


def effective_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """The ModelConfig `PolyEmbedder.build(model_cfg)` runs with, its backbone still `model_cfg`'s:
    for a PolyEmbedder folder the saved config with `model_cfg`'s explicit fields applied, else
    `model_cfg` itself. Handed on as a whole, it builds the same model again (every field explicit)."""
    if not is_polyembedder_dir(model_cfg.backbone):
        return model_cfg
    saved = ModelConfig.model_validate(read_meta(model_cfg.backbone)["model"])
    return apply_explicit(saved, model_cfg).model_copy(update={"backbone": model_cfg.backbone})


def save_inputs(model_cfg: ModelConfig, out_dir: str | Path) -> Path:
    """The input side of `PolyEmbedder.build(model_cfg)` without its weights: the processor and, in
    vipoly.json, the effective model config (`effective_model_config`). A plain Qwen2-VL
    checkpoint's processor gets the task tokens `build` adds (same tokens, same order, so the same
    ids); a PolyEmbedder folder's already has them. The data workers (`InputBuilder.from_pretrained`,
    vipoly.data.tokenize) read this, so they tokenise and resize images as the model is configured.
    It holds no weights: `PolyEmbedder.from_pretrained` refuses it."""
    from vipoly.model.processor import load_processor, save_processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = load_processor(model_cfg.backbone)
    if model_cfg.task_tokens and not is_polyembedder_dir(model_cfg.backbone):
        processor.tokenizer.add_tokens([prefix(t).strip() for t in TASKS], special_tokens=True)
    save_processor(processor, out)
    meta = {"format": "inputs-only", "model": effective_model_config(model_cfg).model_dump(mode="json")}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return out


def inputs_dir(cfg: Config) -> str:
    """Where the data workers find the run's tokenizer, image processor and model config:
    `<run.dir>/inputs`, written by `write_inputs` before training starts."""
    return str(Path(cfg.run.dir) / "inputs")


def write_inputs(cfg: Config) -> str:
    """`inputs_dir(cfg)`, written (`save_inputs`) for whatever the backbone is, so that the model and
    the data workers follow one ModelConfig: a `--set model.max_length=…` on a PolyEmbedder
    backbone reaches the tokenisation too. What `pipelines.train` and `python -m pipelines.pretokenize`
    both call, so the pre-encoded copies match the training run's inputs. The backbone folder is
    only read."""
    return str(save_inputs(cfg.model, inputs_dir(cfg)))


class InputBuilder:
    """Tokenises text, runs the image processor, lays out one input, and pads batches.

    Holds only the processor (tokenizer + image processor) and the ModelConfig, so it pickles to
    Ray Data workers without the model weights; `InputBuilder.from_pretrained(dir)` loads just that.
    """

    def __init__(self, processor, model_cfg: ModelConfig):
        self.processor = processor
        self.cfg = model_cfg
        tok = processor.tokenizer
        names = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|endoftext|>"]
        ids = tok.convert_tokens_to_ids(names)
        missing = [n for n, i in zip(names, ids) if i is None or i == tok.unk_token_id and n != tok.unk_token]
        if missing:
            raise ValueError(f"tokenizer lacks the Qwen2-VL token(s) {missing}")
        self.vision_start_id, self.image_pad_id, self.vision_end_id, self.eos_id = ids
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.merge = processor.image_processor.merge_size
        # Prefixes are tokenised once; with `model.task_tokens` each is a single token.
        self.prefix_ids = {t: self._tokenize(prefix(t).strip()) for t in TASKS}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "InputBuilder":
        """The builder of a saved PolyEmbedder, without loading its weights."""
        from vipoly.model.processor import load_processor

        return cls(load_processor(model_dir), ModelConfig.model_validate(read_meta(model_dir)["model"]))

    def _tokenize(self, text: str) -> list[int]:
        # verbose=False: the tokenizer warns of "indexing errors" for a text longer than its
        # model_max_length, but `encode_one` cuts the ids to max_length right after.
        return self.processor.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode_one(self, text: str | None = None, image: Any = None, task: str | None = None) -> dict[str, np.ndarray]:
        """One input as numpy: `input_ids` (N,) int64, `mm_token_type_ids` (N,) int32 (1 on image
        tokens), and with images `pixel_values` (P, C·T·p·p) float32 and `image_grid_thw` (k, 3) int64.
        `image` may be one image or a list of them (multi-image samples)."""
        if text is not None and not isinstance(text, str):
            raise ValueError(f"text must be a string or None, got {type(text).__name__}")
        check_task(task)
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        if text is None and not images:
            raise ValueError("nothing to encode: the input has neither text nor image")
        head = list(self.prefix_ids[task]) if task else []
        pixels, grids = [], []
        for img in images:
            out = self.processor.image_processor(
                images=[decode_image(img)], return_tensors="np",
                size={"shortest_edge": self.cfg.image_min_pixels, "longest_edge": self.cfg.image_max_pixels})
            grid = np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(1, 3)
            n_tokens = int(grid.prod()) // self.merge**2
            head += [self.vision_start_id] + [self.image_pad_id] * n_tokens + [self.vision_end_id]
            pixels.append(np.asarray(out["pixel_values"], dtype=np.float32))
            grids.append(grid)
        room = self.cfg.max_length - len(head) - 1
        if room < 0:
            raise ValueError(f"prefix and image tokens ({len(head)}) exceed model.max_length={self.cfg.max_length}; "
                             f"lower model.image_max_pixels or raise model.max_length")
        ids = np.asarray(head + (self._tokenize(text)[:room] if text else []) + [self.eos_id], dtype=np.int64)
        row = {"input_ids": ids, "mm_token_type_ids": (ids == self.image_pad_id).astype(np.int32)}
        if images:
            row["pixel_values"] = np.concatenate(pixels)
            row["image_grid_thw"] = np.concatenate(grids)
        return row

    def pad(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad rows from `encode_one` into one batch: input_ids, attention_mask and
        mm_token_type_ids (B, N; 1 on <|image_pad|> tokens, as encode_one marks them); pixel_values
        and image_grid_thw concatenated in row order (the order in which the model matches image
        features to <|image_pad|> runs). Rows without an image may lack the pixel keys or hold
        None / empty arrays there."""
        if not rows:
            raise ValueError("pad: no rows")
        batch = self.pad_ids([r["input_ids"] for r in rows])
        pixels, grids = [], []
        for r in rows:
            pv = r.get("pixel_values")
            if pv is not None and np.size(pv):
                pixels.append(np.asarray(pv, dtype=np.float32).reshape(-1, np.shape(pv)[-1]))
                grids.append(np.asarray(r["image_grid_thw"], dtype=np.int64).reshape(-1, 3))
        if pixels:
            batch["pixel_values"] = torch.from_numpy(np.concatenate(pixels))
            batch["image_grid_thw"] = torch.from_numpy(np.concatenate(grids))
        return batch

    def pad_ids(self, ids: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """The token half of `pad`, from the rows' input_ids alone (text-only rows need nothing else)."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        real = np.arange(lengths.max()) < lengths[:, None]  # (B, N), row-major: fills row after row
        flat = np.concatenate(ids).astype(np.int64, copy=False)
        input_ids = np.full(real.shape, self.pad_id, dtype=np.int64)
        input_ids[real] = flat
        mm = np.zeros(real.shape, dtype=np.int32)
        mm[real] = flat == self.image_pad_id  # what encode_one's mm_token_type_ids is, row by row
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(real.astype(np.int64)),
                "mm_token_type_ids": torch.from_numpy(mm)}

    def pack(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Concatenate rows from `encode_one` into one packed batch with no padding: input_ids,
        mm_token_type_ids and seq_ids (1, T), position_ids (4, 1, T) restarting at 0 in each row,
        cu_seqlens (B+1,) int32, and the pixel keys as in `pad`. `PolyEmbedder` gives each row the
        vector it gets from a padded batch (see packing.py)."""
        return pack_rows(rows, self.merge)
