"""The data's config section (`data.*`): sources, mix, shuffle, partitions, read-ahead."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from vipoly.section import Section


class DataConfig(Section):
    root: str | None = None
    """Prepared data directory (`OUT/<task>/part-*.parquet` from `pipelines.prepare`)."""
    sources: dict[str, str] = {}
    """Extra named sources: {name: path to canonical Parquet (file, folder or glob)}."""
    mix: dict[str, float] = {"text_pair": 0.45, "instr": 0.05, "ocr": 0.2, "vqa_single": 0.15, "vqa_multi": 0.15}
    """{source or task: weight}; weights are normalised. Default ≈ the reference corpus' shares."""
    mix_window: int = Field(64, ge=1)
    """Window over which the achieved ratio is reported. The scheduler (vipoly.data.mix) keeps each
    source within 1 sample of n·p_s on every prefix and within 2 of N·p_s on every window of N."""
    shuffle_buffer: int = Field(256, ge=0)
    """Rows over which each source is shuffled (held as raw rows, spread over the workers: each
    holds about shuffle_buffer / num_workers of every source); 0 = file order, no shuffle at all.
    Each pass also lays a source's row groups out in a new seeded order (vipoly.data.plan)."""
    partitions: int = Field(64, ge=1)
    """Lanes of the global sample order (MosaicML's canonical nodes): a run gives the same samples
    at every step, and resumes, on any number of workers that divides both this and the
    contrastive batch (train.global_batch_size / train.grad_accum)."""
    negatives: int = Field(0, ge=0)
    """Hard negatives: up to N of each row's `neg_text` become extra candidates of every query of the
    global batch (InfoNCE's denominator, the triplet's hardest negative), embedded in the same
    forward pass and gathered across workers like positives; 0 = off."""
    read_ahead: int = Field(2, ge=1)
    """Micro-batches selected and decoding (images in Ray tasks) ahead of the one training: what
    overlaps image decoding with the step, and bounds the encoded patches held."""
    decode_in_tasks: bool | None = None
    """Decode images and run the image processor in Ray tasks (overlapping the step), or in the
    training worker itself; None = in tasks where the workers have GPUs (`train.resources.use_gpu`).
    On CPU the step already keeps the cores busy, and each new task process first imports
    transformers' image code (≈ 9 CPU-seconds): a cold 6-step fit on 2 cores took 35 s against 16 s
    in the worker, a warm one 15 s either way (docs/benchmarks.md)."""
    decode_task_cpus: float = Field(1.0, gt=0)
    """CPUs each decoding task reserves (Ray's `num_cpus`; a task decodes one micro-batch's image rows
    of one source): what bounds how many decode at once on a node, and so how many task processes
    start, each paying the image code's import once."""
    prefetch_batches: int = Field(0, ge=0)
    """Training batches made ahead in a background thread, to overlap a GPU step; 0 = none. On a
    2-core CPU it cost 10% (docs/benchmarks.md): there the thread competes with the step."""
    encoded_dir: str | None = None
    """Pre-encoded text shards (`python -m pipelines.pretokenize`): a source whose every file has an
    up-to-date copy there for the model's tokenizer is read from it, skipping tokenisation. None =
    `<root>/_encoded` when `root` is set; "" = never."""
    max_text_chars: int = Field(20000, ge=1)
    """Texts longer than this are truncated or rejected by `prepare` (see `overlong`)."""
    overlong: Literal["truncate", "reject"] = "truncate"
    """What `prepare` does with a text over max_text_chars: cut it, or quarantine the row."""

    @field_validator("mix")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("data.mix is empty")
        bad = {k: w for k, w in v.items() if not w >= 0}
        if bad or sum(v.values()) <= 0:
            raise ValueError(f"data.mix weights must be ≥ 0 and not all 0, got {v}")
        return v
