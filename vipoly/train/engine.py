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

from vipoly.config import Config, Strategy
from vipoly.train.monitor import grad_norms
from vipoly.train.optim import build_optimizer, build_scheduler


TRAINABLE_FILE = "trainable.safetensors"  # a LoRA checkpoint's weights: adapters and heads


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DDPEngine:
    def __init__(self, model, cfg: Config, total_steps: int, device: torch.device):
        self.cfg, self.accum = cfg, cfg.train.grad_accum
        self.module = model.to(device)
        self.optimizer = build_optimizer(model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, total_steps, cfg.train)
        self.model = model
        if _distributed():
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
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.clip_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]

    def save(self, ckpt_dir: Path, rank: int) -> None:
        if rank == 0:
            if self.module.has_lora:  # the adapters and heads alone: the frozen base is model.backbone
                save_file(self.module.trainable_state(), str(ckpt_dir / TRAINABLE_FILE))
            else:
                self.module.save_pretrained(ckpt_dir / "model")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       ckpt_dir / "optimizer.pt")

    def load(self, ckpt_dir: Path) -> None:
        from vipoly.model import PolyEmbedder

        if (ckpt_dir / TRAINABLE_FILE).is_file():
            saved = load_file(str(ckpt_dir / TRAINABLE_FILE))
            missing = {n for n, p in self.module.named_parameters() if p.requires_grad} - set(saved)
            unexpected = self.module.load_state_dict(saved, strict=False).unexpected_keys
            if missing or unexpected:
                raise ValueError(f"{ckpt_dir / TRAINABLE_FILE} does not fit this model (model.lora or "
                                 f"model.freeze changed?): missing {sorted(missing)[:3]}, unexpected {unexpected[:3]}")
        else:
            src = PolyEmbedder.from_pretrained(ckpt_dir / "model")
            self.module.load_state_dict(src.state_dict())
        opt = torch.load(ckpt_dir / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])

    def export(self, out_dir: Path, rank: int) -> None:
        if rank == 0:
            from vipoly.model.card import write_run_card
            from vipoly.st import default_task

            self.module.merge_lora(out_dir / "adapter")  # training is over: fold the adapters in
            self.module.save_pretrained(out_dir, default_task=default_task(self.cfg))  # + sentence-transformers files
            write_run_card(out_dir, self.cfg, self.module.device)  # README.md, the model card


class DeepSpeedEngine(DDPEngine):
    """ZeRO-2/3 via deepspeed.initialize with our AdamW groups (differential LRs) and schedule."""

    def __init__(self, model, cfg: Config, total_steps: int, device: torch.device):
        import deepspeed

        self.cfg, self.accum, self.micro = cfg, cfg.train.grad_accum, 0
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, total_steps, cfg.train)
        world = dist.get_world_size() if _distributed() else 1
        # Under GradCache each chunk's backward is one DeepSpeed micro-step (`backward_chunk`).
        size = cfg.train.gradcache_chunk
        self.chunks = -(-cfg.train.batch_size // size) if size else 1
        ds_cfg = {
            "train_micro_batch_size_per_gpu": cfg.train.batch_size,
            "gradient_accumulation_steps": cfg.train.grad_accum * self.chunks,
            "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum * self.chunks * world,
            "gradient_clipping": cfg.train.clip_grad_norm,
            "zero_optimization": {"stage": 3 if cfg.train.strategy == Strategy.ZERO3 else 2},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": bool(cfg.train.bf16 and device.type == "cuda")},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
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

    def step(self, skip: bool = False) -> dict | None:
        boundary = self.model.is_gradient_accumulation_boundary()
        self.micro += 1
        if skip and boundary:
            # DeepSpeed keeps its own step counters, so the step still runs, on zero gradients
            # (Adam's momentum still moves the weights a little; DDP skips the update entirely).
            self.model.zero_grad()
        self.model.step()
        if not boundary:
            return None
        # ZeRO partitions gradients, so only the global norm is available per step.
        norm = self.model.get_global_grad_norm()
        return {"grad_norm": float(norm) if norm is not None else float("nan")}

    def save(self, ckpt_dir: Path, rank: int) -> None:
        # Every rank writes its ZeRO shard; Ray Train merges the ranks' folders.
        self.model.save_checkpoint(str(ckpt_dir / "deepspeed"), tag="state")

    def load(self, ckpt_dir: Path) -> None:
        self.model.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="state")

    def export(self, out_dir: Path, rank: int) -> None:
        import deepspeed

        params = list(self.module.parameters())
        # ZeRO-3 shards weights: gather them (a collective, so every rank enters) before rank 0 saves.
        gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                  if self.cfg.train.strategy == Strategy.ZERO3 else contextlib.nullcontext())
        with gather:
            if rank == 0:
                from vipoly.model.card import write_run_card
                from vipoly.st import default_task

                self.module.merge_lora(out_dir / "adapter")  # on the gathered weights; the run is over
                self.module.save_pretrained(out_dir, default_task=default_task(self.cfg))
                write_run_card(out_dir, self.cfg, self.module.device)


def build_engine(model, cfg: Config, total_steps: int, device: torch.device) -> DDPEngine:
    cls = DDPEngine if cfg.train.strategy == Strategy.DDP else DeepSpeedEngine
    return cls(model, cfg, total_steps, device)
