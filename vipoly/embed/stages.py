"""The embedding job's model stages (Ray Data actors): `Prepare` checks each row, decodes its image
and builds the model's inputs exactly as `PolyEmbedder.encode` does; `Embedder` loads the model once
per actor and runs the forward pass on padded batches."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from vipoly.embed.inputs import write_side

PREPARED = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int64())),
                      ("mm_token_type_ids", pa.list_(pa.int32())), ("pixel_values", pa.list_(pa.float32())),
                      ("pixel_dim", pa.int32()), ("image_grid_thw", pa.list_(pa.int64()))])
# --format lance carries the source text and an image reference through to the output
PREPARED_SOURCE = PREPARED.append(pa.field("text", pa.string())).append(pa.field("image_ref", pa.string()))


class Prepare:
    """Check each row, decode its image and build the model input (token ids, pixel patches)
    exactly as `PolyEmbedder.encode` would; bad rows go to a side file.

    An actor rather than a task: the tokenizer and image processor load once, and torch is imported
    by a few long-lived processes instead of one per task."""

    def __init__(self, model_dir: str, overrides: dict, task: str | None, side_dir: str, keep_source: bool = False):
        from vipoly.eval.loading import effective_model_config
        from vipoly.model import InputBuilder
        from vipoly.model.processor import load_processor

        self.builder = InputBuilder(load_processor(model_dir), effective_model_config(model_dir, overrides))
        self.task, self.side_dir = task, side_dir
        self.schema = PREPARED_SOURCE if keep_source else PREPARED

    def __call__(self, batch: pa.Table) -> pa.Table:
        good: dict[str, list] = {name: [] for name in self.schema.names}
        bad = []
        for r in batch.to_pylist():
            text = r["text"] if r["text"] and r["text"].strip() else None
            image = r["image"] or r["image_path"] or None
            try:
                if not r["id"]:
                    raise ValueError("missing id")
                if text is None and image is None:
                    raise ValueError("empty text and no image")
                row = self.builder.encode_one(text, None if image is None else _decode(image), self.task)
            except ValueError as e:
                bad.append({"id": r["id"] or None, "file": r["file"], "reason": str(e)})
                continue
            pixels = row.get("pixel_values")
            good["id"].append(r["id"])
            good["input_ids"].append(row["input_ids"])
            good["mm_token_type_ids"].append(row["mm_token_type_ids"])
            good["pixel_values"].append(None if pixels is None else pixels.reshape(-1))
            good["pixel_dim"].append(None if pixels is None else pixels.shape[-1])
            good["image_grid_thw"].append(None if pixels is None else row["image_grid_thw"].reshape(-1))
            if self.schema is PREPARED_SOURCE:
                good["text"].append(text)
                good["image_ref"].append(r["image_path"] or (f"{r['file']}#id={r['id']}" if r["image"] else None))
        if bad:
            write_side(self.side_dir, {"rows_in": 0, "skipped": 0, "bad": bad})
        return pa.table(good, schema=self.schema)


def _decode(image):
    """An RGB image, or a ValueError whose message names the file or the byte count."""
    from vipoly.model import decode_image

    try:
        return decode_image(image)
    except ValueError:
        if isinstance(image, str):
            what = "image file not found" if not os.path.exists(image) else "undecodable image file"
            raise ValueError(f"{what}: {image}") from None
        raise ValueError(f"undecodable image ({len(image)} bytes)") from None


class Embedder:
    """One PolyEmbedder per actor, loaded once; pads prepared rows and runs the forward pass."""

    def __init__(self, model_dir: str, overrides: dict, model_name: str, dim: int | None, threads: int,
                 compile_layers: bool = False):
        import torch

        from vipoly.eval.loading import load_for_inference

        torch.set_num_threads(threads)  # fractional-CPU actors must not each spawn a thread per core
        self.model = load_for_inference(model_dir, overrides, "cuda" if torch.cuda.is_available() else "cpu")
        if compile_layers:
            self.model.compile_layers()
        self.name, self.dim = model_name, dim or self.model.embedding_dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        import contextlib

        import torch

        from vipoly.data.blocks import list_views
        from vipoly.model import matryoshka

        # Columns → numpy views; `to_pylist` would make a Python float of every pixel value.
        ids, mm, pixels, grids = (list_views(batch.column(c)) for c in
                                  ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw"))
        dims = batch.column("pixel_dim").to_pylist()
        rows = []
        for i in range(batch.num_rows):
            row = {"input_ids": ids[i], "mm_token_type_ids": mm[i]}
            if pixels[i] is not None:
                row["pixel_values"] = pixels[i].reshape(-1, dims[i])
                row["image_grid_thw"] = grids[i].reshape(-1, 3)
            rows.append(row)
        emb = np.empty((len(rows), self.dim), dtype=np.float32)
        if rows:
            model = self.model
            # packed (no padding) where the attention is a varlen kind, as `encode` does
            inputs = {k: v.to(model.device) for k, v in model.collate(rows).items()}
            # the same autocast as `encode` (bf16 on a GPU), so the vectors match it
            autocast = getattr(model, "_inference_autocast", contextlib.nullcontext)
            with torch.no_grad(), autocast():
                emb[:] = matryoshka(model(**inputs).embedding, self.dim).float().cpu().numpy()
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), self.dim)
        meta = {"model": pa.array([self.name] * len(rows), pa.string()),
                "dim": pa.array([self.dim] * len(rows), pa.int32())}
        if "text" in batch.column_names:  # --format lance: LanceDB's column names, with the source
            return pa.table({"id": batch.column("id"), "vector": vectors, "text": batch.column("text"),
                             "image": batch.column("image_ref"), **meta})
        return pa.table({"id": batch.column("id"), "embedding": vectors, **meta})


def embed_stages(ds, model_dir: str, overrides: dict, *, task: str | None, side_dir: str, keep_source: bool,
                 model_name: str, dim: int | None, batch_size: int, preparers: int, prepare_cpus: float,
                 actors: int, cpus_per_actor: float, gpus_per_actor: float, compile: bool = False):
    """The job's model stages after the input's normalize stage: `Prepare` then `Embedder`, each an
    actor pool, over blocks of a few actor calls (a file read as one block would go through every
    stage whole, one stage after the other; small blocks let preparing, embedding and writing overlap)."""
    import ray  # ray

    ds = ds.repartition(target_num_rows_per_block=8 * batch_size)
    ds = ds.map_batches(
        Prepare, batch_format="pyarrow", batch_size=batch_size, num_cpus=prepare_cpus,
        fn_constructor_args=(model_dir, overrides, task, side_dir, keep_source),
        compute=ray.data.ActorPoolStrategy(size=preparers))
    threads = max(1, int(round(cpus_per_actor)))
    return ds.map_batches(
        Embedder, batch_format="pyarrow", batch_size=batch_size,
        fn_constructor_args=(model_dir, overrides, model_name, dim, threads, compile),
        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor, num_cpus=cpus_per_actor)
