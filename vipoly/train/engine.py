"""One interface over the two ways we distribute a step: DDP and DeepSpeed ZeRO-2/3.

The loop calls `forward`, `backward(loss)`, `step()` (once per micro-batch; accumulation and clipping
happen inside), `save(dir)`, `load(dir)` and `export(dir)`. Keeping both behind one small class keeps
the loop free of `if deepspeed:` branches.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from vipoly.config import Config
from vipoly.train.config import Strategy
from vipoly.train.launch import zero_world
from vipoly.losses.gather import is_distributed
from vipoly.model.embedder import COMPONENTS, component_of
from vipoly.train.monitor import grad_norms, say
from vipoly.train.optim import build_optimizer, build_scheduler


TRAINABLE_FILE = "trainable.safetensors"  # a LoRA checkpoint's weights: adapters and heads


class DDPEngine:
    def __init__(self, model, cfg: Config, total_steps: int, device: torch.device):
        self.cfg, self.accum = cfg, cfg.train.grad_accum
        self.module = model.to(device)
        self.optimizer = build_optimizer(model, cfg.train.optimizer)
        self.scheduler = build_scheduler(self.optimizer, total_steps, cfg.train.optimizer)
        self.model = model
        if is_distributed():
            # Every trained parameter takes part in every step (a text-only batch still touches the
            # vision tower: PolyEmbedder._blank_image), so DDP need not search the graph for unused ones.
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
        self.micro = 0

    def forward(self, **batch):
        boundary = (self.micro + 1) % self.accum == 0
        ctx = self.model.no_sync() if (not boundary and hasattr(self.model, "no_sync")) else contextlib.nullcontext()
        self._sync_ctx = ctx
        ctx.__enter__()
        return self.model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()
        self._sync_ctx.__exit__(None, None, None)

    def is_boundary(self) -> bool:
        return (self.micro + 1) % self.accum == 0

    def discard(self, loss: torch.Tensor) -> torch.Tensor:
        """What a micro-batch of a skipped step back-propagates (a non-finite loss on some worker).
        The backward still runs, so the workers' gradient hooks stay in step; `step(skip=True)` then
        drops the gradients without touching the optimizer."""
        return loss.nan_to_num(0.0, 0.0, 0.0) * 0.0

    def backward_chunk(self, e: torch.Tensor, grad: torch.Tensor, last: bool) -> None:
        """GradCache's replay: send `grad` (∂L/∂e of this micro-batch's loss) back through one
        chunk's embeddings `e`; gradients are reduced across workers with the last chunk of the
        last micro-batch only."""
        sync = last and self.is_boundary()
        ctx = self.model.no_sync() if not sync and hasattr(self.model, "no_sync") else contextlib.nullcontext()
        with ctx:
            torch.autograd.backward(e, grad_tensors=grad / self.accum)

    def step(self, skip: bool = False) -> dict | None:
        """Close one micro-batch. At an accumulation boundary clip and step (or drop the gradients
        when `skip`) and return the gradient norms measured before clipping; None otherwise."""
        boundary = self.is_boundary()
        self.micro += 1
        if not boundary:
            return None
        norms = grad_norms(self.module)
        if not skip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.optimizer.clip_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]

    def full_weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """float32 CPU copies of the parameters whose names start with `prefix`, whole on every rank
        (under ZeRO-3 a collective: every rank calls it)."""
        return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in self.module.named_parameters() if n.startswith(prefix)}

    def save(self, ckpt_dir: Path, rank: int) -> None:
        if rank == 0:
            if self.module.has_lora:  # the adapters and heads alone: the frozen base is model.backbone
                save_file(self.module.trainable_state(), str(ckpt_dir / TRAINABLE_FILE))
            else:
                self.module.save_pretrained(ckpt_dir / "model")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       ckpt_dir / "optimizer.pt")

    def load(self, ckpt_dir: Path) -> None:
        """The checkpoint's optimizer and schedule, and its trainable weights where it holds those
        alone (a LoRA run's). A whole saved model (`model/`) is not read here: the model was built
        from it (`saved_model`, `build_model`)."""
        from vipoly.folder import is_polyembedder_dir

        if (ckpt_dir / TRAINABLE_FILE).is_file():
            saved = load_file(str(ckpt_dir / TRAINABLE_FILE))
            missing = {n for n, p in self.module.named_parameters() if p.requires_grad} - set(saved)
            unexpected = self.module.load_state_dict(saved, strict=False).unexpected_keys
            if missing or unexpected:
                raise ValueError(f"{ckpt_dir / TRAINABLE_FILE} does not fit this model (model.lora or "
                                 f"model.freeze changed?): missing {sorted(missing)[:3]}, unexpected {unexpected[:3]}")
        elif not is_polyembedder_dir(ckpt_dir / "model"):
            raise ValueError(f"checkpoint {ckpt_dir} holds neither {TRAINABLE_FILE} nor a model/ folder: not a "
                             f"checkpoint of a train.strategy=ddp run")
        opt = torch.load(ckpt_dir / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])

    def export(self, out_dir: Path, rank: int) -> None:
        if rank == 0:
            _write_model(self.module, out_dir, self.cfg)


def deepspeed_config(cfg: Config, device: torch.device) -> dict:
    world = dist.get_world_size() if is_distributed() else 1
    # Under GradCache each chunk's backward is one DeepSpeed micro-step (`backward_chunk`).
    size = cfg.train.gradcache_chunk
    chunks = -(-cfg.train.batch_size // size) if size else 1
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum * chunks,
        "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum * chunks * world,
        "gradient_clipping": cfg.train.optimizer.clip_grad_norm,
        "zero_optimization": {"stage": 3 if cfg.train.strategy == Strategy.ZERO3 else 2},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bool(cfg.train.bf16 and device.type == "cuda")},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def saved_model(cfg: Config, ckpt_dir: Path | None) -> Path | None:
    """The checkpoint's whole model (`model/`, what a DDP run without LoRA saves), else None."""
    from vipoly.folder import is_polyembedder_dir

    if ckpt_dir is None or cfg.train.strategy != Strategy.DDP or not is_polyembedder_dir(ckpt_dir / "model"):
        return None
    return ckpt_dir / "model"


def build_model(cfg: Config, device: torch.device, weights_from: Path | None = None):
    """The PolyEmbedder to train. `weights_from`: a DDP checkpoint's `model/` (`saved_model`) to
    resume from, loaded in place of `model.backbone`: building from the backbone and then loading
    the checkpoint over it read the weights twice and held two copies of the model at once (the
    2B's ≈ 9 GB of float32 per worker). Under ZeRO-3 transformers loads the backbone straight into
    partitions (its zero.Init path, switched on by an HfDeepSpeedConfig it holds a weak reference
    to): no rank ever holds the whole backbone. The heads are small; deepspeed.initialize
    partitions them."""
    from vipoly.model import PolyEmbedder

    if cfg.train.strategy != Strategy.ZERO3:
        return PolyEmbedder.build(cfg.model, weights_from)
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    ds_cfg = deepspeed_config(cfg, device)
    del ds_cfg["train_batch_size"]  # it would be checked against DeepSpeed's world, not set up yet
    zero3 = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 (alive while the model loads)
    try:
        model = PolyEmbedder.build(cfg.model)
    finally:
        unset_hf_deepspeed_config()  # later loads (rank 0's export copy) are whole again
    if not is_distributed() or dist.get_rank() == 0:
        counts = model.parameter_counts()
        say(f"ZeRO-3: the model was built partitioned; rank 0 holds {counts['params/local']:,} of its "
            f"{counts['params/total']:,} parameters")
    return model


def reshard(ckpt_dir: Path, run_dir: Path, rank: int, world: int) -> Path | None:
    """A ZeRO checkpoint saved by another number of workers, as DeepSpeed's universal checkpoint
    (each parameter's weights and Adam moments whole, which any number of workers loads): rank 0
    converts it once into run.dir/.resharded/<checkpoint>/state, the others wait at a barrier.
    None when this many workers saved it (it loads as it is). DeepSpeed itself refuses a
    partitioned checkpoint from another world size. ZeRO-2 only: the driver refuses a ZeRO-3 run
    on another number of workers (`vipoly.train.launch.keep_plan`)."""
    saved = zero_world(ckpt_dir)
    if saved in (0, world):
        return None
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    import time

    out = run_dir / ".resharded" / ckpt_dir.name / "state"
    if rank == 0 and not out.is_dir():
        say(f"{ckpt_dir.name} holds ZeRO partitions of {saved} workers: converting it for {world} "
            f"(DeepSpeed's universal checkpoint, in {out}; minutes for a 2B model: docs/scale.md)")
        tmp = out.with_name("state.partial")  # renamed when whole: a conversion cut short is redone
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        # --inject_missing_state: the converter wants metadata only Megatron-style clients write
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(ckpt_dir / "deepspeed" / "state"), "--output_folder", str(tmp),
               "--inject_missing_state", "--num_extract_workers", str(min(8, os.cpu_count() or 1)),
               "--num_merge_workers", "1"]
        with tempfile.TemporaryFile(mode="w+") as err:  # its progress bars: read only if it fails
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True) as proc:
                for line in proc.stdout:  # its stages ("*** 1. Extracting ZeRO fragments", …) as they start
                    stage = line.strip("* \n.")
                    if line.startswith("***") and stage != "Done!":
                        say(f"  {stage} ({time.monotonic() - start:.0f} s)")
            if proc.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"converting {ckpt_dir} for {world} workers failed:\n{err.read()[-3000:]}")
        tmp.rename(out)
        say(f"converted {ckpt_dir.name} in {time.monotonic() - start:.0f} s")
    if is_distributed():
        dist.barrier()
    return out


def _not_mpu_notice(record) -> bool:
    """A logging filter (a callable serves): drops DeepSpeed's "MPU is not provided" record."""
    return not record.getMessage().startswith("MPU is not provided")


class DeepSpeedEngine(DDPEngine):
    """ZeRO-2/3 via deepspeed.initialize with our AdamW groups (differential LRs) and schedule.
    `universal`: the checkpoint to resume from, converted for this world size (`reshard`)."""

    def __init__(self, model, cfg: Config, total_steps: int, device: torch.device, universal: Path | None = None):
        import deepspeed

        self.cfg, self.accum, self.micro, self.universal = cfg, cfg.train.grad_accum, 0, universal
        optimizer = build_optimizer(model, cfg.train.optimizer)
        scheduler = build_scheduler(optimizer, total_steps, cfg.train.optimizer)
        ds_cfg = deepspeed_config(cfg, device)
        if universal is not None:
            ds_cfg["checkpoint"] = {"load_universal": True}
        self.chunks = ds_cfg["gradient_accumulation_steps"] // cfg.train.grad_accum
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg, dist_init_required=False)
        self.module = self.model.module

    def forward(self, **batch):
        return self.model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # DeepSpeed scales by 1/accum itself

    def backward_chunk(self, e: torch.Tensor, grad: torch.Tensor, last: bool) -> None:
        """GradCache's replay under ZeRO: each chunk is one of DeepSpeed's accumulation micro-steps
        (its gradient_accumulation_steps counts grad_accum × chunks), so ZeRO accumulates them as
        it accumulates micro-batches. DeepSpeed scales a backward by 1/(grad_accum × chunks):
        × chunks leaves the 1/grad_accum of the plain step. `step` closes the last chunk."""
        self.model.backward(self.chunks * (e * grad).sum())
        if not last:
            self.model.step()  # not a boundary: DeepSpeed only counts the micro-step

    def discard(self, loss: torch.Tensor) -> torch.Tensor:
        """NaN gradients, on purpose: ZeRO's own overflow check then discards the step whole (Adam's
        moments, the weights and the LR schedule stay as they were, bit for bit). Zeroed gradients
        would not do: DeepSpeed steps anyway, and Adam's momentum still moves the weights."""
        return loss.nan_to_num(0.0, 0.0, 0.0) * float("nan")

    def step(self, skip: bool = False) -> dict | None:
        boundary = self.model.is_gradient_accumulation_boundary()
        self.micro += 1
        # At the boundary, ZeRO holds the reduced gradients until its step: measure them first.
        norms = self._component_norms() if boundary else None
        self.model.step()  # a skipped step's gradients are NaN (`discard`): ZeRO drops it
        if not boundary:
            return None
        norm = self.model.get_global_grad_norm()
        norms["grad_norm"] = float(norm) if norm is not None and not skip else float("nan")
        return norms

    def _component_norms(self) -> dict[str, float]:
        """Per-component gradient norms as DDPEngine reports them, from the gradient partitions ZeRO
        holds: each rank sums the squares of the part it owns, and one all-reduce adds the ranks."""
        sq = torch.zeros(len(COMPONENTS), dtype=torch.float64, device=self.module.device)
        for name, p in self.module.named_parameters():
            grad = _local_grad(p) if p.requires_grad else None
            if grad is not None:
                sq[COMPONENTS.index(component_of(name))] += grad.double().pow(2).sum()
        if is_distributed():
            dist.all_reduce(sq)
        return {f"grad_norm/{c}": v for c, v in zip(COMPONENTS, sq.sqrt().tolist())}

    def full_weights(self, prefix: str) -> dict[str, torch.Tensor]:
        if self.cfg.train.strategy != Strategy.ZERO3:
            return super().full_weights(prefix)
        from deepspeed.utils import safe_get_full_fp32_param

        # Read from the optimizer's fp32 master copy (an all-reduce of its partitions). Gathering
        # the parameters themselves between steps broke ZeRO-3's prefetch trace after a resume.
        return {n: safe_get_full_fp32_param(p).to("cpu", copy=True)
                for n, p in self.module.named_parameters() if n.startswith(prefix)}

    def save(self, ckpt_dir: Path, rank: int) -> None:
        # Every rank writes its ZeRO shard; Ray Train merges the ranks' folders.
        self.model.save_checkpoint(str(ckpt_dir / "deepspeed"), tag="state")

    def load(self, ckpt_dir: Path) -> None:
        if self.universal is not None:  # saved by another number of workers (`reshard`)
            from deepspeed.utils import logger

            # DeepSpeed warns "MPU is not provided, setting tp size to 1" on every universal load:
            # true of every vipoly run (no tensor parallelism), and nothing for a user to act on.
            logger.addFilter(_not_mpu_notice)
            try:
                self.model.load_checkpoint(str(self.universal.parent), tag=self.universal.name)
            finally:
                logger.removeFilter(_not_mpu_notice)
        else:
            self.model.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="state")  # ZeRO's shards hold the weights

    def export(self, out_dir: Path, rank: int) -> None:
        if self.cfg.train.strategy != Strategy.ZERO3:
            return super().export(out_dir, rank)
        # ZeRO-3 shards the weights. DeepSpeed's consolidation gathers them one module at a time
        # (a collective: every rank enters) into rank 0's CPU memory, so no GPU ever holds the
        # whole model; rank 0 then writes them from a plain copy of the model built there.
        state = self.model._zero3_consolidated_16bit_state_dict()  # the params' own dtype, despite the name
        if rank == 0:
            from vipoly.model import PolyEmbedder

            plain = PolyEmbedder.build(self.cfg.model)  # the same modules (adapters included), whole
            plain.load_state_dict(state)
            del state
            _write_model(plain, out_dir, self.cfg)


def _write_model(module, out_dir: Path, cfg: Config) -> None:
    """The run's `model/` folder: adapters folded in (training is over), the sentence-transformers
    files, and the model card."""
    from vipoly.model.card import write_run_card
    from vipoly.st import default_task

    module.merge_lora(out_dir / "adapter")
    module.save_pretrained(out_dir, default_task=default_task(cfg))
    write_run_card(out_dir, cfg, module.device)


def _local_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's share of a parameter's reduced gradient under ZeRO (None: it owns none of it).
    ZeRO-3 has a public call for it; ZeRO-2 reaches it through the fragment map that DeepSpeed's own
    `safe_get_full_grad` reads (which would all-reduce the whole tensor, once per parameter)."""
    from deepspeed.utils import safe_get_local_grad

    if hasattr(p, "ds_id"):  # ZeRO-3
        return safe_get_local_grad(p)
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    grad = mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
    address = mapping.lp_fragment_address
    # bf16 keeps the whole accumulated gradient on every rank: count only the owned fragment
    return grad.narrow(0, address.start, address.numel) if grad.numel() == p.numel() != address.numel else grad


def build_engine(model, cfg: Config, total_steps: int, device: torch.device, universal: Path | None = None) -> DDPEngine:
    """`universal`: a ZeRO checkpoint converted for this world size (`reshard`), to resume from."""
    if cfg.train.strategy == Strategy.DDP:
        return DDPEngine(model, cfg, total_steps, device)
    return DeepSpeedEngine(model, cfg, total_steps, device, universal)
