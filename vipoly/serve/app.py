"""The Ray Serve application: an OpenAI-compatible embedding service (and search, given an index).

    POST /v1/embeddings   OpenAI's embeddings API (+ images as data URLs, + task); see api.py
    POST /v1/search       {"query": text | {text, image, task}, "k": 10} → hits (with --index)
    GET  /health          {"status": "ok", model, dim, index}
    GET  /v1/stats        this replica's recent batch sizes (what dynamic batching achieved)

Design choices:
- Dynamic batching is per item, not per request: every item of every request is one call of the
  `@serve.batch` method, so a batch mixes items of concurrent requests (and a 100-item request is
  cut into batches of `max_batch_size`). The forward pass runs in one dedicated thread: torch
  releases the GIL, the replica's event loop keeps accepting requests, and the next batch fills
  meanwhile.
- The same input path as `pipelines.embed` (vipoly.serve.engine: encode_one → collate, packed on
  GPUs → forward under `encode`'s autocast), so a served vector equals `PolyEmbedder.encode`'s.
- `dimensions` is applied after batching (Matryoshka prefix, renormalised), so requests of different
  sizes share batches.
- Replicas, GPUs per replica and autoscaling come from `ServeConfig` (the CLI's flags); Serve's
  `max_ongoing_requests` is raised so a replica sees enough concurrent requests to batch.
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve  # --- Ray Serve

from vipoly.serve.api import (Item, Limits, RequestError, embeddings_response, parse_body, parse_embeddings,
                              parse_search, truncate)


@dataclass
class ServeConfig:
    """One embedding service: the model, where it listens, how it scales and batches."""

    model: str
    """A saved PolyEmbedder folder (on every node: a shared path, or the working dir of a Ray job)."""
    index: str | None = None
    """A LanceDB database built by `pipelines.index` (enables POST /v1/search)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds: loopback unless told otherwise."""
    port: int = 8000
    replicas: int = 1
    """Fixed number of replicas (ignored when max_replicas is set)."""
    min_replicas: int = 1
    """Autoscaling floor (with max_replicas)."""
    max_replicas: int | None = None
    """Autoscaling ceiling; set it to turn autoscaling on."""
    target_ongoing_requests: float = 16.0
    """Autoscaling target: requests in flight per replica."""
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    """CPUs reserved per replica; torch threads = max(1, round(this))."""
    max_batch_size: int = 32
    """Items per forward pass (dynamic batching)."""
    batch_wait_timeout_s: float = 0.005
    """How long a batch waits to fill once its first item is queued."""
    max_ongoing_requests: int = 256
    """Requests one replica accepts at once (Serve's default of 5 would cap every batch at 5 requests)."""
    access_log: bool = True
    """Serve's per-request access log lines (off saves a little CPU per request)."""
    overrides: dict = field(default_factory=dict)
    """Inference settings applied to the saved model config (attention kernel, dtype, max_length...)."""
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        if isinstance(self.limits, dict):
            self.limits = Limits(**self.limits)


api = FastAPI(title="vipoly embeddings", docs_url=None, redoc_url=None)


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=400)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError("body", f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError("body", f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment
@serve.ingress(api)
class EmbeddingService:
    def __init__(self, cfg: dict):
        import torch

        from vipoly.eval.loading import load_for_inference
        from vipoly.folder import read_meta

        self.cfg = ServeConfig(**cfg)
        torch.set_num_threads(max(1, round(self.cfg.cpus_per_replica)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_for_inference(self.cfg.model, self.cfg.overrides, device)
        self.name = read_meta(self.cfg.model, "--model").get("name") or self.model.name
        self.limits = self.cfg.limits
        self.embed_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        # One thread for every forward pass: torch's OpenMP pool belongs to the calling thread, and
        # asyncio.to_thread's rotating threads would each start (and spin) a pool of their own.
        self.forward_thread = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.table = self.plan = None
        if self.cfg.index:
            from vipoly.search import open_table

            self.table, self.plan = open_table(self.cfg.index)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed_batch(self, items: list[Item]) -> list[tuple[np.ndarray, int]]:
        from vipoly.serve.engine import embed_items

        self.batch_sizes.append(len(items))
        vectors, tokens = await asyncio.get_running_loop().run_in_executor(
            self.forward_thread, embed_items, self.model, items, self.cfg.max_batch_size)
        return list(zip(vectors, tokens))

    async def _embed(self, items: list[Item]) -> tuple[np.ndarray, int]:
        results = await asyncio.gather(*(self.embed_batch(it) for it in items))
        return np.stack([v for v, _ in results]), sum(t for _, t in results)

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        try:
            body = parse_body(await _read_body(request, self.limits.max_body_bytes), self.limits)
            req = parse_embeddings(body, self.limits, self.model.embedding_dim)
        except RequestError as e:
            return _error(e)
        vectors, tokens = await self._embed(req.items)
        return JSONResponse(embeddings_response(truncate(vectors, req.dimensions), tokens, self.name,
                                                req.encoding_format))

    @api.post("/v1/search")
    async def search(self, request: Request):
        from vipoly.search import search

        if self.table is None:
            return JSONResponse({"error": {"message": "no index: start the service with --index DB",
                                           "type": "invalid_request_error", "param": None, "code": None}},
                                status_code=404)
        try:
            body = parse_body(await _read_body(request, self.limits.max_body_bytes), self.limits)
            req = parse_search(body, self.limits)
        except RequestError as e:
            return _error(e)
        t0 = time.perf_counter()
        vectors, tokens = await self._embed([req.item])
        hits = await asyncio.to_thread(search, self.table, self.plan, truncate(vectors, self.plan.dim), req.k)
        return JSONResponse({"object": "list", "data": hits[0], "model": self.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                             "took_ms": round(1e3 * (time.perf_counter() - t0), 3)})

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.name, "dim": self.model.embedding_dim,
                "index": None if self.plan is None else {"rows": self.plan.rows, "kind": self.plan.kind}}

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "max_batch_size": self.cfg.max_batch_size}


def build_app(cfg: ServeConfig):
    """The bound Serve application for `serve.run` (replicas, resources, autoscaling from `cfg`)."""
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
                            "max_ongoing_requests": cfg.max_ongoing_requests,
                            "logging_config": {"enable_access_log": cfg.access_log}}
    if cfg.max_replicas:
        opts["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                      "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        opts["num_replicas"] = cfg.replicas
    return EmbeddingService.options(**opts).bind(json.loads(json.dumps(asdict(cfg))))


def app_builder(args: dict):
    """For `serve run vipoly.serve.app:app_builder model=DIR ...` and `serve deploy` config files
    (`import_path: vipoly.serve.app:app_builder`, `args: {model: ..., index: ..., max_batch_size: ...}`)."""
    return build_app(ServeConfig(**args))
