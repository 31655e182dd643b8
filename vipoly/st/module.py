"""`PolyModule`: a whole PolyEmbedder as one sentence-transformers input module.

sentence-transformers (≥ 6) runs `encode` as: sort the inputs by length, cut batches, and for each
call `preprocess(batch, prompt=…, **kwargs)` then `forward(features)` and read
`features["sentence_embedding"]`. Here `preprocess` is `InputBuilder.encode_one` + `collate` (the
path `PolyEmbedder.encode` takes) and `forward` is `PolyEmbedder.forward`, so a vector is the one
`PolyEmbedder.encode` gives for the same input and task (each vector does not depend on its batch).

Inputs, as sentence-transformers passes them:
- a string: text; a string that is a path to an image file: that image (ST's own rule);
- a PIL image, a uint8 HxWxC array or tensor (CxHxW too), PNG/JPEG bytes, a `data:image/…` URI;
- `{"text": str, "image": image}`: a text+image pair; `{"image": [a, b]}`: several images, one input;
- a batch may mix all of these (ST calls that the `message` modality).
Not taken, with an error naming the input: chat-style messages (role/content dicts), text pairs
(tuples: this is a bi-encoder), image URLs (never fetched), audio and video.
"""
from __future__ import annotations

import base64
import inspect
from typing import Any, Sequence

import numpy as np
import torch
from sentence_transformers.base.modality import is_image_url_or_path
from sentence_transformers.base.modules import InputModule

from vipoly.model.config import ModelConfig
from vipoly.model import PolyEmbedder
from vipoly.model.inputs import decode_image
from vipoly.tasks import TASKS, prefix

TASK_OF_PROMPT = {prefix(t): t for t in TASKS}
ST_ROUTES = ("query", "document")  # the `task` values sentence-transformers' encode_query / encode_document set
MODEL_INPUTS = frozenset(inspect.signature(PolyEmbedder.forward).parameters) - {"self"}
# model_kwargs that change how the saved model runs (as vipoly.eval.loading's inference fields)
MODEL_KWARGS = {"attn_implementation", "dtype", "torch_dtype", "max_length", "image_max_pixels", "image_min_pixels"}


class PolyModule(InputModule):
    """One PolyEmbedder behind sentence-transformers' module interface (see the module docstring)."""

    save_in_root = True
    forward_kwargs: set[str] = set()

    def __init__(self, model: PolyEmbedder, packed: bool | None = None):
        super().__init__()
        self.model = model
        self.packed = packed
        """Feed packed batches (None: where the attention is a varlen kind, as `PolyEmbedder.encode`)."""

    # ------------------------------------------------------------ what ST asks of a module
    @property
    def modalities(self) -> list:
        return ["text", "image", ("image", "text"), "message"]

    @property
    def tokenizer(self):
        return self.model.processor.tokenizer

    @property
    def processor(self):
        return self.model.processor

    @property
    def max_seq_length(self) -> int:
        return self.model.cfg.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.model.cfg.max_length = value  # validated on assignment (≥ 8); InputBuilder shares this config

    def get_embedding_dimension(self) -> int:
        return self.model.embedding_dim

    # ------------------------------------------------------------ inputs
    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, task: str | None = None,
                   processing_kwargs: dict | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """A batch of ST inputs → the padded (or packed) batch `PolyEmbedder.forward` takes.

        prompt: a task prefix (`prompts[<task>]`) selects that task; any other string is put before
        the text, as sentence-transformers does for its own models. task: `encode(..., task=…)`
        passes it through; a vipoly task name selects that task as its prompt does, while ST's own
        routing names (`query` / `document`, which `encode_query` / `encode_document` set) mean
        nothing to a model with one route and are ignored.
        """
        if processing_kwargs:
            raise ValueError(f"processing_kwargs are not used by {type(self).__name__}: set model.max_length / "
                             f"model.image_max_pixels in the model folder's vipoly.json instead")
        if task in ST_ROUTES:
            task = None
        elif task is not None and task not in TASKS:
            raise ValueError(f"task={task!r}: expected a vipoly task ({', '.join(TASKS)}) or one of ST's routes "
                             f"{ST_ROUTES}")
        text_prefix = ""
        if prompt:
            if prompt in TASK_OF_PROMPT:
                chosen = TASK_OF_PROMPT[prompt]
                if task is not None and task != chosen:
                    raise ValueError(f"prompt {prompt!r} selects task {chosen!r} but task={task!r} was also given")
                task = chosen
            else:
                text_prefix = prompt
        rows = []
        for i, x in enumerate(inputs):
            text, image = split_input(x, i)
            if text_prefix:
                text = text_prefix + (text or "")
            try:
                image = ([decode_image(_image(y, i)) for y in image] if isinstance(image, list)
                         else None if image is None else decode_image(_image(image, i)))
                rows.append(self.model.inputs.encode_one(text, image, task))
            except ValueError as e:
                raise ValueError(f"inputs[{i}]: {e}") from None
        return self.model.collate(rows, self.packed)

    # ------------------------------------------------------------ forward
    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        batch = {k: v for k, v in features.items() if k in MODEL_INPUTS}
        with self.model._inference_autocast():
            out = self.model(**batch)
        features["sentence_embedding"] = out.embedding
        return features

    # ------------------------------------------------------------ save / load
    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        if not safe_serialization:
            raise ValueError("vipoly saves safetensors only (no pickles)")
        self.model.save_pretrained(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             model_kwargs: dict[str, Any] | None = None, processor_kwargs: dict[str, Any] | None = None,
             config_kwargs: dict[str, Any] | None = None, backend: str = "torch", **kwargs: Any) -> "PolyModule":
        """A saved folder (local, or a hub repo fetched whole) → PolyModule. `model_kwargs` may set
        how the model runs: attn_implementation, dtype (or torch_dtype), max_length, image_*_pixels."""
        if backend != "torch":
            raise ValueError(f"backend={backend!r}: a vipoly model runs on the torch backend only")
        for name, given in (("processor_kwargs", processor_kwargs), ("config_kwargs", config_kwargs)):
            if given:
                raise ValueError(f"{name} {sorted(given)} are not used by a vipoly model; model_kwargs takes "
                                 f"{sorted(MODEL_KWARGS)}")
        model_dir = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                      revision=revision, local_files_only=local_files_only)
        overrides = _overrides(model_kwargs or {})
        model = PolyEmbedder.from_pretrained(model_dir, ModelConfig.model_validate(overrides) if overrides else None)
        return cls(model.eval())


# ---------------------------------------------------------------- helpers
def split_input(x: Any, i: int) -> tuple[str | None, Any]:
    """One ST input → (text, image or list of images); ValueError naming inputs[i] otherwise."""
    if isinstance(x, str):
        return (None, x) if is_image_url_or_path(x) else (x, None)  # ST's rule: an image file's path is an image
    if isinstance(x, dict):
        if "role" in x and "content" in x:
            raise ValueError(f"inputs[{i}]: chat-style messages are not supported; pass text, an image, "
                             f"or {{'text': ..., 'image': ...}}")
        unknown = set(x) - {"text", "image"}
        if unknown or not x:
            raise ValueError(f"inputs[{i}]: a dict input takes the keys 'text' and/or 'image', got {sorted(x)}")
        text, image = x.get("text"), x.get("image")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"inputs[{i}]['text']: one string per input, got {type(text).__name__}")
        if isinstance(image, tuple):
            image = list(image)
        return text, image
    if isinstance(x, (tuple, list)):
        if x and all(isinstance(y, dict) and "role" in y for y in x):
            raise ValueError(f"inputs[{i}]: chat-style messages are not supported; pass text, an image, "
                             f"or {{'text': ..., 'image': ...}}")
        raise ValueError(f"inputs[{i}]: pairs are not taken (this is a bi-encoder): encode each side, or pass "
                         f"{{'text': ..., 'image': ...}} for a text+image input")
    return None, x


def _image(x: Any, i: int) -> Any:
    """ST's image forms that `decode_image` does not take itself: tensors and data URIs; URLs are refused."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray) and x.ndim == 3 and x.shape[0] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        x = np.ascontiguousarray(x.transpose(1, 2, 0))  # C×H×W → H×W×C
    if isinstance(x, np.ndarray) and x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if isinstance(x, np.ndarray) and x.dtype != np.uint8:
        raise ValueError(f"inputs[{i}]: an image array must be uint8 (0–255), got {x.dtype}")
    if isinstance(x, str) and x.startswith("data:image/"):
        head, _, data = x.partition(",")
        if not head.endswith(";base64"):
            raise ValueError(f"inputs[{i}]: only base64 data:image URIs are taken")
        return base64.b64decode(data)
    if isinstance(x, str) and x.startswith(("http://", "https://")):
        raise ValueError(f"inputs[{i}]: image URLs are not fetched ({x[:80]}); download the image and pass "
                         f"a path, bytes or a PIL image")
    return x


def _overrides(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(model_kwargs) - MODEL_KWARGS)
    if unknown:
        raise ValueError(f"model_kwargs {unknown} are not used by a vipoly model; it takes {sorted(MODEL_KWARGS)}")
    out = dict(model_kwargs)
    if "torch_dtype" in out:
        out["dtype"] = out.pop("torch_dtype")
    if isinstance(out.get("dtype"), torch.dtype):
        out["dtype"] = str(out["dtype"]).removeprefix("torch.")
    return out
