"""One typed config tree for the whole project.

Every number of SPEC.md is a default here and nowhere else. A config is built from the defaults,
then a YAML file, then `--set a.b=c` overrides (values parsed as YAML, so `--set stw.alpha.instr=1.2`
and `--set data.mix="{ocr: 1, instr: 2}"` both work). Unknown keys and bad values fail with a
message naming the key; nothing is silently ignored.
"""
from __future__ import annotations

import argparse
import enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vipoly.tasks import TASKS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)


def _per_task(values: dict[str, float], what: str) -> dict[str, float]:
    unknown = set(values) - set(TASKS)
    if unknown:
        raise ValueError(f"{what}: unknown task(s) {sorted(unknown)}; expected {list(TASKS)}")
    return values


# ---------------------------------------------------------------- model
class PoolingKind(str, enum.Enum):
    ATTENTION = "attention"  # SPEC §1: learnable context vector v_a
    MEAN = "mean"
    LAST = "last"
    MULTIHEAD = "multihead"


class PoolingConfig(Strict):
    kind: PoolingKind = PoolingKind.ATTENTION
    """Pooling over the last hidden states; `attention` is the method, the others are ablations."""
    init_std: float = Field(0.02, gt=0)
    """Std of the N(0, σ²) initialisation of the context vector(s) v_a."""
    num_heads: int = Field(4, ge=1)
    """Heads of `multihead` pooling (one learnable query per head, outputs concatenated)."""


class ProjectionConfig(Strict):
    out_dim: int = Field(1024, ge=1)
    """Embedding size after p = LN(W2·GELU(LN(W1 c)))."""
    hidden_dim: int | None = None
    """Width of W1's output; None = the backbone hidden size D."""
    matryoshka_dims: list[int] = [1024, 512, 256, 128]
    """Prefix sizes that stay useful after truncation (trained with the same loss when enabled)."""
    matryoshka: bool = False
    """Add the loss of each truncated prefix (Matryoshka representation learning)."""

    @model_validator(mode="after")
    def _dims_fit(self):
        bad = [d for d in self.matryoshka_dims if not 1 <= d <= self.out_dim]
        if bad:
            raise ValueError(f"model.projection.matryoshka_dims {bad} must lie in 1..out_dim={self.out_dim}")
        return self


LANGUAGE_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_LORA_TARGETS = ["qkv", "proj", "fc1", "fc2"]  # a Qwen2-VL vision block's attention and MLP


class LoraConfig(Strict):
    """Low-rank adapters (LoRA, Hu et al. 2021; through `peft`) on the backbone, whose own weights
    then stay frozen; the pooling head and the projection always train fully. Training only: the
    exported model/ has the adapters merged (an ordinary PolyEmbedder folder), model/adapter/ holds
    them alone in peft's format."""

    r: int = Field(0, ge=0)
    """Rank of each adapter; 0 = no LoRA (full fine-tuning). VLM2Vec trains Qwen2-VL-2B at r = 16."""
    alpha: float = Field(32.0, gt=0)
    """Scale: an adapter adds (alpha / r)·B·A to its layer's weight."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapters' input while training."""
    target_modules: list[str] = LANGUAGE_LORA_TARGETS
    """Names of the language model's linear layers that get adapters (default: attention and MLP)."""
    vision: bool = False
    """Also adapt the vision tower's blocks (their `qkv`, `proj`, `fc1`, `fc2`)."""


class ModelConfig(Strict):
    backbone: str = "Qwen/Qwen2-VL-2B-Instruct"
    """Hub id or local folder of a Qwen2-VL checkpoint (or a PolyEmbedder directory)."""
    pooling: PoolingConfig = PoolingConfig()
    """How token states become one vector (SPEC §2: attention pooling)."""
    projection: ProjectionConfig = ProjectionConfig()
    """The head from the pooled state to the embedding (SPEC §2: 1024-d, Matryoshka prefixes)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "vipoly_varlen"] = "auto"
    """`auto` on a GPU: FlashAttention-2 where flash_attn is installed, else PyTorch's varlen
    FlashAttention (`vipoly_varlen`, torch ≥ 2.9); SDPA on CPU. The varlen kinds run packed batches
    without any mask (padded batches go through SDPA)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Backbone weight dtype: float32 for training under bf16 autocast, bfloat16 to serve on a GPU.
    Pooling and projection always compute in float32."""
    task_tokens: bool = True
    """Add the five task prefixes to the vocabulary as single tokens (new rows start at the mean embedding)."""
    gradient_checkpointing: bool = False
    """Recompute the backbone's activations in the backward pass (SPEC §4 uses it at scale): less
    activation memory for a second forward's compute."""
    max_length: int = Field(8192, ge=8)
    """Longest tokenised input (prefix + text + image tokens); longer ones are truncated."""
    image_max_pixels: int = Field(448 * 448, ge=28 * 28)
    """Images are resized so that h·w stays under this (Qwen2-VL dynamic resolution)."""
    image_min_pixels: int = Field(28 * 28, ge=4)
    """Images are resized so that h·w is at least this (pixels; Qwen2-VL's 28×28 patch merge)."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapters in the backbone (r = 0: full fine-tuning, SPEC's default)."""
    freeze: list[Literal["vision", "language", "embeddings"]] = []
    """Backbone parts that do not train: no gradient at all (not merely lr 0), no optimizer state,
    nothing for DDP to reduce. `language` is the language model less its input embeddings,
    `embeddings` those (the task tokens' rows too). The pooling head and the projection always
    train. A training setting: not saved with the model."""

    @model_validator(mode="after")
    def _pixels(self):
        if self.image_min_pixels > self.image_max_pixels:
            raise ValueError(f"model.image_min_pixels ({self.image_min_pixels}) exceeds "
                             f"model.image_max_pixels ({self.image_max_pixels})")
        return self


# ---------------------------------------------------------------- loss
class TripletNegatives(str, enum.Enum):
    HARDEST = "hardest"
    MEAN = "mean"


class LossKind(str, enum.Enum):
    DLE = "dle"  # per-task mixes (SPEC §2)
    INFONCE = "infonce"  # ablation: one InfoNCE for every task


class LossConfig(Strict):
    kind: LossKind = LossKind.DLE
    """dle: SPEC §3's per-task recipes; infonce: one InfoNCE for every task (the ablation)."""
    temperature: float = Field(0.07, gt=0)
    """InfoNCE temperature T (the reference run used 0.2; the sweep covers both)."""
    lambda_score: float = Field(20.0, ge=0)
    """λ_score: weight of the score MSE on text pairs (SPEC §3: 20)."""
    lambda_rank: float = Field(7.0, ge=0)
    """λ_rank: weight of the margin ranking loss on text pairs (SPEC §3: 7)."""
    rank_margin: float = Field(0.05, ge=0)
    """m_r: margin of the ranking loss, in cosine units (SPEC §3: 0.05)."""
    lambda_triplet: dict[str, float] = {"ocr": 1.0, "vqa_single": 1.0, "vqa_multi": 1.5}
    """λ_trip per triplet task."""
    triplet_margin: dict[str, float] = {"ocr": 0.2, "vqa_single": 0.2, "vqa_multi": 0.3}
    """Margin m per triplet task."""
    triplet_negatives: TripletNegatives = TripletNegatives.HARDEST
    """Which in-batch negative the triplet hinge uses: the hardest (default), or another rule."""
    gather_negatives: bool = True
    """Use the whole global batch (all workers, with gradients) as InfoNCE/triplet negatives."""
    mask_duplicates: bool = True
    """Never use a positive as a negative of a row whose own positive has the same text and image
    bytes (VQA answers "yes" twice in a batch, two questions on one paragraph): masked out of
    InfoNCE (both directions) and the triplet term. `masked_pairs` in metrics.jsonl counts them."""

    @field_validator("lambda_triplet", "triplet_margin")
    @classmethod
    def _known(cls, v: dict[str, float], info) -> dict[str, float]:
        return _per_task(v, f"loss.{info.field_name}")


# ---------------------------------------------------------------- STW
class STWMode(str, enum.Enum):
    NONE = "none"  # all λ_t = 1
    STATIC = "static"  # SPEC's per-epoch table
    DYNAMIC = "dynamic"  # λ_t = (ℓ̄/ℓ_t)·α_t·β(epoch)


class STWConfig(Strict):
    mode: STWMode = STWMode.DYNAMIC
    """none | static | dynamic (SPEC §3; dynamic is the method, none the equal-weights baseline)."""
    alpha: dict[str, float] = {"text_pair": 0.27, "instr": 1.25, "ocr": 1.0, "vqa_single": 1.0, "vqa_multi": 1.0}
    """α_t, reference values (ranges: text_pair 0.25–0.35, instr 1.1–1.3, others 0.9–1.2)."""
    beta_foundation: float = Field(1.05, gt=0)
    """β for epoch 0 (range 1.0–1.2)."""
    beta_balance: float = Field(0.95, gt=0)
    """β for epochs ≥ 1 (range 0.8–1.0)."""
    static_epoch0: dict[str, float] = {"text_pair": 0.25, "instr": 1.2, "ocr": 1.0, "vqa_single": 1.0, "vqa_multi": 0.8}
    """λ_t in epoch 0 for static mode, and the fallback before any dynamic update (SPEC §3)."""
    static_later: dict[str, float] = {"text_pair": 0.22, "instr": 1.3, "ocr": 1.2, "vqa_single": 1.0, "vqa_multi": 0.8}
    """λ_t from epoch 1 on for static mode (SPEC §3)."""
    update_every: int = Field(10, ge=1)
    """K: optimizer steps between dynamic updates (the reference tested down to K = 5)."""
    min_tasks: int = Field(2, ge=1, le=len(TASKS))
    """Fewer tasks seen in a window than this → keep the current weights (static before any update)."""
    clamp: tuple[float, float] | None = None
    """Optional (low, high) bound on each dynamic λ_t; off by default as in the SPEC."""

    @field_validator("alpha", "static_epoch0", "static_later")
    @classmethod
    def _complete(cls, v: dict[str, float], info) -> dict[str, float]:
        _per_task(v, f"stw.{info.field_name}")
        missing = set(TASKS) - set(v)
        if missing:
            raise ValueError(f"stw.{info.field_name}: missing task(s) {sorted(missing)}")
        return v


# ---------------------------------------------------------------- data
class DataConfig(Strict):
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


# ---------------------------------------------------------------- train
class Strategy(str, enum.Enum):
    DDP = "ddp"
    ZERO2 = "deepspeed_zero2"
    ZERO3 = "deepspeed_zero3"


class TrainConfig(Strict):
    seed: int = 0
    """Seeds the model's fresh heads, the sample order, dropout and every shuffle."""
    max_steps: int = Field(-1, ge=-1)
    """Optimizer steps to run; -1 = `epochs` over the data."""
    epochs: int = Field(3, ge=1)
    """Passes over the data when max_steps = -1 (SPEC §4: 3)."""
    steps_per_epoch: int | None = Field(None, ge=1)
    """Optimizer steps that make an epoch (β and static weights change per epoch); None = from data size."""
    batch_size: int = Field(12, ge=1)
    """Per-device micro-batch (pairs); derived from global_batch_size when that is set."""
    global_batch_size: int | None = Field(None, ge=1)
    """G: samples (pairs) per optimizer step over all workers; batch_size = G / (num_workers ×
    grad_accum). None = batch_size × grad_accum × num_workers. The global sample order is cut in
    batches of G, so a run keeps its G when it resumes on another number of workers."""
    grad_accum: int = Field(10, ge=1)
    """Micro-batches per optimizer step (SPEC §4: 10)."""
    lr: float = Field(2e-5, gt=0)
    """AdamW learning rate of the language model (and heads unless head_lr) (SPEC §4: 2e-5)."""
    vision_lr: float = Field(2e-6, ge=0)
    """AdamW learning rate of the vision tower (SPEC §4: 2e-6)."""
    head_lr: float | None = None
    """LR of pooling + projection; None = `lr`."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW decoupled weight decay (not on biases and norms)."""
    warmup_steps: int = Field(100, ge=0)
    """Optimizer steps of linear LR warm-up before the schedule."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """LR decay after the warm-up, to 0 at the last step."""
    clip_grad_norm: float = Field(1.0, gt=0)
    """Global gradient L2-norm clip (SPEC §4: 1.0)."""
    bf16: bool = True
    """bf16 autocast where a GPU is used (ignored on CPU)."""
    packed_sequences: bool = False
    """Concatenate a micro-batch's documents into one row with no padding (per-document positions
    and attention); pays off with FlashAttention varlen on GPU, equal results on CPU."""
    gradcache_chunk: int = Field(0, ge=0)
    """GradCache (Gao et al. 2021): embed each micro-batch C rows at a time without a graph, take the
    loss (negatives gathered from every worker) on the cached embeddings, then embed each chunk
    again with a graph and send its gradient back: the gradients of the whole batch, in the memory
    of one chunk's graph, for a second forward. 0 = off."""
    compile: bool = False
    """torch.compile each decoder layer and vision block (fuses their elementwise work): about
    1.5× the eager step on an H100 (docs/benchmarks.md); costs a minute of compiling at the start."""
    strategy: Strategy = Strategy.DDP
    """ddp | deepspeed_zero2 | deepspeed_zero3: how the workers share the model and the optimizer."""
    num_workers: int = Field(1, ge=1)
    """Ray Train workers, one per GPU on a GPU cluster (SPEC §4 reference: 4)."""
    use_gpu: bool = False
    """Give each worker GPUs (gpus_per_worker) and use NCCL."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Logical CPUs Ray reserves per worker (fractions work on small machines)."""
    gpus_per_worker: float = Field(1.0, ge=0)
    """GPUs per worker when use_gpu."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement of the workers: STRICT_PACK keeps a run of up to 8 GPUs on one NVLink node."""
    phases: tuple[int, int] = (2000, 10000)
    """Step boundaries exploration → stabilization → optimization."""
    dynamic_from_phase: Literal["exploration", "stabilization", "optimization"] = "exploration"
    """First phase in which dynamic STW updates apply (static weights before)."""
    strategic_checkpoints: list[int] = [1000, 2000, 5000, 10000]
    """Steps whose checkpoints are always kept (SPEC §4: 1000, 2000, 5000, 10000)."""
    checkpoint_every: int = Field(1000, ge=1)
    """Optimizer steps between periodic checkpoints."""
    keep_checkpoints: int = Field(3, ge=1)
    """Periodic checkpoints kept (strategic ones are always kept)."""
    log_every: int = Field(10, ge=1)
    """Optimizer steps between metrics.jsonl rows (and console lines)."""
    max_bad_steps: int = Field(10, ge=1)
    """Consecutive NaN/inf losses that stop the run."""
    max_failures: int = Field(3, ge=0)
    """Worker failures Ray Train recovers from (restart from the last checkpoint)."""
    stop_after: int | None = Field(None, ge=1)
    """Stop (with a checkpoint) after this many steps in this invocation; re-run to continue.
    For time-boxed allocations."""

    @model_validator(mode="after")
    def _phases(self):
        if not 0 <= self.phases[0] <= self.phases[1]:
            raise ValueError(f"train.phases must be increasing, got {self.phases}")
        return self


class RunConfig(Strict):
    dir: str = "runs/default"
    """Where a run writes config.yaml, metrics.jsonl, checkpoints, model/ and report.md."""
    name: str | None = None
    """Run name (Ray Train / wandb); None = the directory's name."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb on rank 0; online needs WANDB_API_KEY (offline without one)."""
    ray_address: str | None = None
    """None = the cluster from RAY_ADDRESS or `ray job submit`, else an embedded local Ray."""
    verbose: bool = False
    """Show Ray Train's and Ray Data's own INFO lines (worker group start, each checkpoint report,
    each dataset's execution plan) and the full config at launch; off: one line per logged step,
    Ray's warnings and errors."""


class DebugConfig(Strict):
    """Fault injection for tests and fire drills; all off by default."""

    fail_at_step: int | None = None
    """Kill a worker process (os._exit) once, right after this step; a marker file in run.dir makes it once."""
    fail_rank: int = 0
    """The worker rank that debug.fail_at_step kills."""
    nan_at_steps: list[int] = []
    """Make the loss NaN at these (1-based) steps."""


class Config(Strict):
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    stw: STWConfig = STWConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    run: RunConfig = RunConfig()
    debug: DebugConfig = DebugConfig()

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


def _set_path(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    schema: Any = Config
    for i, part in enumerate(parts):
        # Walk the pydantic schema beside the dict so an unknown key fails here, by name.
        if schema is not None and isinstance(schema, type) and issubclass(schema, BaseModel):
            if part not in schema.model_fields:
                known = ", ".join(schema.model_fields)
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} (known here: {known})")
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
