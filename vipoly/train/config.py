"""Training's config sections: `train.*` (steps, batches, strategy, and the optimizer, checkpoint and
resources sections), `run.*` (where and how a run is recorded) and `debug.*` (fault injection)."""
from __future__ import annotations

import enum
from typing import Literal

from pydantic import Field, model_validator

from vipoly.section import Section


class Strategy(str, enum.Enum):
    DDP = "ddp"
    ZERO2 = "deepspeed_zero2"
    ZERO3 = "deepspeed_zero3"


class OptimizerConfig(Section):
    """AdamW with per-component learning rates, warm-up, then a decay to 0 at the last step (SPEC §4)."""

    lr: float = Field(2e-5, gt=0)
    """Learning rate of the language model (and of the heads unless head_lr) (SPEC §4: 2e-5)."""
    vision_lr: float = Field(2e-6, ge=0)
    """Learning rate of the vision tower (SPEC §4: 2e-6)."""
    head_lr: float | None = None
    """Learning rate of pooling + projection; None = `lr`."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW's decoupled weight decay (× lr per step), not on biases and norms; SPEC names none."""
    warmup_steps: int = Field(100, ge=0)
    """Optimizer steps of linear LR warm-up from 0; SPEC names none."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """LR decay after the warm-up, to 0 at the last step; SPEC names none."""
    clip_grad_norm: float = Field(1.0, gt=0)
    """Clip of the global gradient's L2 norm (SPEC §4: 1.0)."""


class CheckpointConfig(Section):
    """When checkpoints are written and kept, and how many worker failures a run survives."""

    every: int = Field(1000, ge=1)
    """Optimizer steps between periodic checkpoints."""
    keep: int = Field(3, ge=1)
    """Periodic checkpoints kept, newest first (strategic ones are always kept)."""
    strategic: list[int] = [1000, 2000, 5000, 10000]
    """Optimizer steps whose checkpoints are always kept (SPEC §4: 1000, 2000, 5000, 10000)."""
    max_failures: int = Field(3, ge=0)
    """Worker failures Ray Train recovers from, each by restarting from the last checkpoint."""


class ResourcesConfig(Section):
    """What Ray reserves for each training worker, and where it places them."""

    use_gpu: bool = False
    """Give each worker `gpus_per_worker` GPUs and use NCCL (SPEC §4's reference: 4×H100)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Logical CPUs Ray reserves per worker (fractions work on small machines)."""
    gpus_per_worker: float = Field(1.0, ge=0)
    """GPUs per worker when use_gpu."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray's placement of the workers: STRICT_PACK keeps a run of up to 8 GPUs on one NVLink node."""


class TrainConfig(Section):
    seed: int = 0
    """Seeds the model's fresh heads, the sample order, dropout and every shuffle."""
    max_steps: int = Field(-1, ge=-1)
    """Optimizer steps to run; -1 = `epochs` passes over the data."""
    epochs: int = Field(3, ge=1)
    """Passes over the data when max_steps = -1 (SPEC §4: 3)."""
    steps_per_epoch: int | None = Field(None, ge=1)
    """Optimizer steps that make an epoch (β and static weights change per epoch); None = Σ rows / G."""
    batch_size: int = Field(12, ge=1)
    """Pairs per worker per micro-batch (SPEC §4: 12); derived from global_batch_size when that is set."""
    global_batch_size: int | None = Field(None, ge=1)
    """G: pairs per optimizer step over all workers; batch_size = G / (num_workers × grad_accum).
    None = batch_size × grad_accum × num_workers. The global sample order is cut in batches of G,
    so a run keeps its G when it resumes on another number of workers."""
    grad_accum: int = Field(10, ge=1)
    """Micro-batches per optimizer step (SPEC §4: 10)."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """AdamW, its learning rates and schedule (SPEC §4)."""
    bf16: bool = True
    """bf16 autocast where a GPU is used (ignored on CPU) (SPEC §4)."""
    packed_sequences: bool = False
    """Concatenate a micro-batch's documents into one row with no padding (per-document positions
    and attention); pays off with FlashAttention varlen on GPU, equal results on CPU."""
    gradcache_chunk: int = Field(0, ge=0)
    """GradCache (Gao et al. 2021), rows per chunk: embed each micro-batch C rows at a time without
    a graph, take the loss (negatives gathered from every worker) on the cached embeddings, then
    embed each chunk again with a graph and send its gradient back: the gradients of the whole
    batch, in the memory of one chunk's graph, for a second forward. 0 = off."""
    compile: bool = False
    """torch.compile each decoder layer and vision block (fuses their elementwise work): about
    1.5× the eager step on an H100 (docs/benchmarks.md); costs a minute of compiling at the start."""
    strategy: Strategy = Strategy.DDP
    """ddp | deepspeed_zero2 | deepspeed_zero3: how the workers share the model and the optimizer."""
    num_workers: int = Field(1, ge=1)
    """Ray Train workers, one per GPU on a GPU cluster (SPEC §4 reference: 4)."""
    resources: ResourcesConfig = ResourcesConfig()
    """CPUs and GPUs per worker, placement."""
    phases: tuple[int, int] = (2000, 10000)
    """Optimizer steps where exploration ends and where stabilization ends (SPEC §4: 2000, 10000)."""
    dynamic_from_phase: Literal["exploration", "stabilization", "optimization"] = "exploration"
    """First phase in which dynamic STW updates apply (static weights before)."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Periodic and strategic checkpoints, and recovery from failed workers."""
    log_every: int = Field(10, ge=1)
    """Optimizer steps between metrics.jsonl rows (and console lines)."""
    max_bad_steps: int = Field(10, ge=1)
    """Consecutive optimizer steps with a NaN/inf loss that stop the run."""
    stop_after: int | None = Field(None, ge=1)
    """Optimizer steps after which this invocation stops, with a checkpoint; re-run to continue
    (time-boxed allocations)."""

    @model_validator(mode="after")
    def _phases(self):
        if not 0 <= self.phases[0] <= self.phases[1]:
            raise ValueError(f"train.phases must be increasing, got {self.phases}")
        return self


class RunConfig(Section):
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


class DebugConfig(Section):
    """Fault injection for tests and fire drills; all off by default."""

    fail_at_step: int | None = None
    """Kill a worker process (os._exit) once, right after this step; a marker file in run.dir makes it once."""
    fail_rank: int = 0
    """The worker rank that debug.fail_at_step kills."""
    nan_at_steps: list[int] = []
    """Make the loss NaN at these (1-based) steps."""
