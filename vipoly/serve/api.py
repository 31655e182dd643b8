"""The HTTP contract of the embedding service, without Ray or a model: request checks and responses.

`POST /v1/embeddings` follows OpenAI's embeddings API: `input` (a string or a list of them), `model`,
`dimensions` (here: the Matryoshka prefix, renormalised), `encoding_format` ("float" or "base64":
little-endian float32 bytes, as OpenAI sends them). Our extension: an item of `input` may be an
object `{"text": ..., "image": "data:image/png;base64,...", "task": ...}`, and `task` may also be given
for the whole request. `POST /v1/search` takes `query` (a string or such an object), `k` and `task`.

Every bad request becomes a `RequestError` naming the field (`input[3].image`, `dimensions`, ...),
answered with HTTP 400 and OpenAI's error body. Images arrive only as base64 data URLs: a string that
is not one is refused, so a request can never make the server open a path or fetch a URL.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from vipoly.tasks import TASKS


@dataclass
class Limits:
    """What one request may ask for."""

    max_items: int = 256
    """Items in one `input` list."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Request body size (images travel inside it)."""
    max_text_chars: int = 100_000
    """Characters in one text (the model truncates to its max_length tokens anyway)."""
    max_image_pixels: int = 40_000_000
    """Decoded image size (width × height); a guard against decompression bombs."""
    max_k: int = 1000
    """Hits one search may ask for."""


class RequestError(ValueError):
    """A bad request: `param` names the field, the message says what is wrong."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param, self.message = param, message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": None}}


@dataclass
class Item:
    """One thing to embed: text and/or a decoded image, and the task prefix."""

    text: str | None = None
    image: Any = None  # a PIL image, decoded from the request's data URL
    task: str | None = None


@dataclass
class EmbeddingsRequest:
    items: list[Item]
    dimensions: int | None = None
    encoding_format: str = "float"
    model: str | None = None


@dataclass
class SearchRequest:
    item: Item
    k: int = 10


def parse_body(raw: bytes, limits: Limits) -> dict:
    if len(raw) > limits.max_body_bytes:
        raise RequestError("body", f"request body of {len(raw)} bytes is over the limit of {limits.max_body_bytes}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError("body", f"request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError("body", f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _task(value: Any, param: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in TASKS:
        raise RequestError(param, f"{param} must be one of {list(TASKS)} or null, got {value!r}")
    return value


def decode_data_url(value: Any, param: str, limits: Limits):
    """A base64 `data:image/...` URL → an RGB PIL image; anything else is a RequestError."""
    from PIL import Image

    from vipoly.model import decode_image

    if not isinstance(value, str) or not value.startswith("data:"):
        raise RequestError(param, f"{param} must be a base64 data URL (data:image/png;base64,...); "
                                  "the server opens no paths or URLs")
    head, sep, payload = value.partition(",")
    if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
        raise RequestError(param, f"{param} must be a base64 data URL of an image (data:image/...;base64,...)")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(param, f"{param}: the data URL's payload is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as probe:  # size from the header, before decoding pixels
            w, h = probe.size
    except Exception:
        raise RequestError(param, f"{param}: the image does not decode ({len(raw)} bytes)") from None
    if w * h > limits.max_image_pixels:
        raise RequestError(param, f"{param}: image of {w}x{h} pixels is over the limit of {limits.max_image_pixels}")
    try:
        return decode_image(raw)
    except ValueError:
        raise RequestError(param, f"{param}: the image does not decode ({len(raw)} bytes)") from None


def parse_item(value: Any, param: str, task: str | None, limits: Limits) -> Item:
    """A string, or {"text", "image", "task"} with at least one of text and image."""
    if isinstance(value, str):
        value = {"text": value}
    elif not isinstance(value, dict):
        kind = "token ids (not supported: send text)" if isinstance(value, (int, list)) else type(value).__name__
        raise RequestError(param, f"{param} must be a string or an object with text/image, got {kind}")
    unknown = set(value) - {"text", "image", "task"}
    if unknown:
        raise RequestError(param, f"{param}: unknown field(s) {sorted(unknown)} (expected text, image, task)")
    text, image = value.get("text"), value.get("image")
    if text is not None and not isinstance(text, str):
        raise RequestError(f"{param}.text", f"{param}.text must be a string, got {type(text).__name__}")
    if text is not None and len(text) > limits.max_text_chars:
        raise RequestError(f"{param}.text", f"{param}.text has {len(text)} characters, over the limit of "
                                            f"{limits.max_text_chars}")
    if text is not None and not text.strip():
        text = None
    if image is not None:
        image = decode_data_url(image, f"{param}.image", limits)
    if text is None and image is None:
        raise RequestError(param, f"{param} is empty: give a non-empty text or an image")
    own_task = _task(value.get("task"), f"{param}.task") if "task" in value else task
    return Item(text, image, own_task)


def parse_embeddings(body: dict, limits: Limits, max_dim: int) -> EmbeddingsRequest:
    known = {"input", "model", "dimensions", "encoding_format", "user", "task"}
    unknown = set(body) - known
    if unknown:
        raise RequestError(sorted(unknown)[0], f"unknown field(s) {sorted(unknown)} (expected {sorted(known)})")
    if "input" not in body:
        raise RequestError("input", "input is required")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model", f"model must be a string, got {type(model).__name__}")
    task = _task(body.get("task"), "task")
    raw = body["input"]
    if isinstance(raw, (str, dict)):
        raw = [raw]
    if not isinstance(raw, list):
        raise RequestError("input", f"input must be a string or a list, got {type(raw).__name__}")
    if not raw:
        raise RequestError("input", "input is empty")
    if len(raw) > limits.max_items:
        raise RequestError("input", f"input has {len(raw)} items, over the limit of {limits.max_items}")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        raise RequestError("input", "input as token ids is not supported: send text")
    items = [parse_item(x, f"input[{i}]", task, limits) for i, x in enumerate(raw)]
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= max_dim):
        raise RequestError("dimensions", f"dimensions must be an integer in 1..{max_dim}, got {dims!r}")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise RequestError("encoding_format", f"encoding_format must be 'float' or 'base64', got {fmt!r}")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError("user", f"user must be a string, got {type(user).__name__}")
    return EmbeddingsRequest(items, dims, fmt, model)


def parse_search(body: dict, limits: Limits) -> SearchRequest:
    known = {"query", "k", "task", "model"}
    unknown = set(body) - known
    if unknown:
        raise RequestError(sorted(unknown)[0], f"unknown field(s) {sorted(unknown)} (expected {sorted(known)})")
    if "query" not in body:
        raise RequestError("query", "query is required")
    task = _task(body.get("task"), "task")
    item = parse_item(body["query"], "query", task, limits)
    k = body.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limits.max_k:
        raise RequestError("k", f"k must be an integer in 1..{limits.max_k}, got {k!r}")
    return SearchRequest(item, k)


def truncate(vectors: np.ndarray, dim: int | None) -> np.ndarray:
    """The Matryoshka prefix e[:dim] / ‖e[:dim]‖, as `vipoly.model.matryoshka` (None: unchanged)."""
    if dim is None or dim == vectors.shape[-1]:
        return vectors
    head = vectors[..., :dim]
    return (head / np.linalg.norm(head, axis=-1, keepdims=True)).astype(np.float32)


def embeddings_response(vectors: np.ndarray, tokens: int, model: str, encoding_format: str) -> dict:
    """OpenAI's response shape; base64 = the little-endian float32 bytes of each vector."""
    data = []
    for i, v in enumerate(np.asarray(vectors, dtype="<f4")):
        emb = base64.b64encode(v.tobytes()).decode("ascii") if encoding_format == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": int(tokens), "total_tokens": int(tokens)}}
