"""The per-worker training loop (runs inside each Ray Train worker, or in one plain process).

One optimizer step = `grad_accum` micro-batches. Each micro-batch embeds queries and positives in
one forward pass, gathers them across workers (negatives from the global batch), and applies
`dle_loss` with the current STW weights. Task losses are accumulated over a window of K steps,
summed across workers, and turned into new weights on every rank at once, so all ranks always
apply the same λ. Ray-specific lines are marked `# ray`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from vipoly.config import Config
from vipoly.data.plan import PlanState
from vipoly.losses import DLEStats, global_dle_loss, reduce_stats
from vipoly.losses.gather import candidates, is_distributed, masked_pairs
from vipoly.stw import TaskWeighter
from vipoly.tasks import TASKS
from vipoly.train.engine import build_engine, build_model, reshard, saved_model
from vipoly.train.gradcache import CachedBatch
from vipoly.train.launch import Evaluator
from vipoly.train.monitor import (Console, MetricsLog, Volatility, Wandb, pooling_entropy, quiet_worker_logs, say,
                                   weight_drift)
from vipoly.train.phases import dynamic_stw_active, is_checkpoint_step, phase_of
from vipoly.train.report import write_report
from vipoly.train.state import (load_all_data_positions, load_rank_state, load_run_state, save_rank_state,
                                 save_run_state, seed_everything, set_rng_state)


class Context:
    """Where the loop runs: a Ray Train worker, or one plain process (benchmarks, tests)."""

    def __init__(self, use_ray: bool):
        self.use_ray = use_ray
        if use_ray:
            import ray.train  # ray
            import ray.train.torch  # ray

            ctx = ray.train.get_context()  # ray
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            self.device = ray.train.torch.get_device()  # ray
        else:
            self.rank, self.world = 0, 1
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def checkpoint_dir(self) -> Path | None:
        if not self.use_ray:
            return None
        import ray.train  # ray

        ckpt = ray.train.get_checkpoint()  # ray
        return Path(ckpt.path) if ckpt is not None and Path(ckpt.path).exists() else (
            Path(ckpt.to_directory()) if ckpt is not None else None)

    def report(self, metrics: dict, ckpt_dir: Path | None = None, name: str | None = None) -> None:
        if not self.use_ray:
            return
        import ray.train  # ray

        ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None  # ray
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)  # ray


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def train_loop_per_worker(config: dict) -> None:
    """Entry point of a Ray Train worker. `config` = {"cfg": Config as dict, "stream": StreamFactory,
    "evaluate": an optional `vipoly.train.launch.Evaluator`}."""
    run_training(Config.model_validate(config["cfg"]), config["stream"], use_ray=config.get("use_ray", True),
                 evaluate=config.get("evaluate"))


@dataclass(frozen=True)
class Stop:
    """Why the loop ends before its last step: a pause (train.stop_after: re-run to continue) or a
    stop (too many non-finite steps), which also leaves run.dir/STOPPED."""

    reason: str
    paused: bool = False


@dataclass
class LoopState:
    """What the loop carries from step to step; `extra()` is what a checkpoint keeps of it."""

    step: int = 0
    """Optimizer steps done."""
    bad_in_row: int = 0
    bad_total: int = 0
    """Steps skipped for a non-finite loss: in a row now, and in all."""
    seen: torch.Tensor = field(default_factory=lambda: torch.zeros(len(TASKS), dtype=torch.float64))
    """Samples trained on per task (TASKS order), summed over workers."""
    wandb_id: str | None = None

    @classmethod
    def resumed(cls, step: int, extra: dict) -> LoopState:
        return cls(step, extra.get("bad_in_row", 0), extra.get("bad_total", 0),
                   torch.tensor(extra.get("seen", [0] * len(TASKS)), dtype=torch.float64), extra.get("wandb_id"))

    def extra(self) -> dict:
        return {"bad_in_row": self.bad_in_row, "bad_total": self.bad_total, "seen": self.seen.tolist(),
                "wandb_id": self.wandb_id}

    def count(self, out: StepResult, max_bad_steps: int) -> Stop | None:
        """Book a finished step: the samples it saw and whether its loss was finite."""
        self.step += 1
        self.seen += out.stats.task_count.cpu()
        if out.finite:
            self.bad_in_row = 0
            return None
        self.bad_in_row, self.bad_total = self.bad_in_row + 1, self.bad_total + 1
        if self.bad_in_row < max_bad_steps:
            return None
        return Stop(f"stopped: {self.bad_in_row} steps in a row had a non-finite loss (last at step {self.step}); "
                    f"lower train.optimizer.lr or check the data")


@dataclass
class StepResult:
    """One optimizer step, summed over the workers (every rank holds the same numbers)."""

    stats: DLEStats
    """Per-task loss sums and row counts of the global batch (`reduce_stats`)."""
    loss: float
    """The weighted DLE loss, mean over workers; 0 for a skipped step."""
    entropy: float
    """Pooling attention entropy, mean over workers."""
    digest: int
    """Σ crc32(id) mod 2^31 over the global batch: equal for any number of workers."""
    bad_rows: int
    bytes_read: int
    """The data stream's counters: rows quarantined and bytes read, all workers."""
    masked: int
    """Likely false negatives masked out of the loss."""
    columns: float
    """Candidates per query: the similarity matrix's columns (this rank's micro-batches, averaged)."""
    norms: dict | None
    """Gradient norms, total and per component, before clipping (None on a skipped step)."""
    finite: bool


def train_step(engine, stream, cfg: Config, ctx: Context, lam: torch.Tensor, poison: bool = False) -> StepResult:
    """`train.grad_accum` micro-batches, then one optimizer step (skipped, whole, when any worker's
    loss is non-finite). `poison`: make this step's loss NaN (debug.nan_at_steps)."""
    tcfg, device = cfg.train, ctx.device
    dims = cfg.model.projection.matryoshka_dims if cfg.model.projection.matryoshka else None
    stats_sum = None  # Σ over micro-batches of this rank's DLEStats (they combine by addition)
    loss_total, entropy, digest, bad, norms = 0.0, 0.0, 0, False, None
    masked = torch.zeros((), dtype=torch.int64, device=device)  # no host sync per micro-batch
    columns = 0.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.bf16 and device.type == "cuda")
    for _ in range(tcfg.grad_accum):
        batch = stream.next_batch()
        data_counts = [batch.get("bad_rows", 0), batch.get("bytes_read", 0)]  # the stream's running totals
        with autocast:
            if tcfg.gradcache_chunk:  # embeddings with no graph; the chunks' graphs come after the loss
                cache = CachedBatch(engine.model, batch["chunks"], device)
                embedding, batch_entropy = cache.embedding, cache.entropy
            else:
                out = engine.forward(**{k: v.to(device) for k, v in batch["inputs"].items()})
                embedding, batch_entropy = out.embedding, pooling_entropy(out.pooling_weights, out.attention_mask)
        n = batch["task_ids"].shape[0]
        # Rows: the queries, the positives, then the hard negatives (data.negatives).
        a, b = embedding[:n].float(), embedding[n:2 * n].float()      # (n, D) each
        negs = embedding[2 * n:].float() if "neg_owner" in batch else None  # (n·negatives, D)
        if poison:
            a = a * float("nan")
        keys = batch["pos_key"].to(device)
        neg_keys = batch["neg_key"].to(device) if negs is not None else None
        cols = candidates(keys, neg_keys, cfg.loss)  # gathered once: for the loss and for the counts
        loss, stats = global_dle_loss(a, b, batch["task_ids"].to(device), batch["scores"].to(device), lam, cfg.loss,
                                      dims=dims, pos_keys=keys, negatives=negs, neg_keys=neg_keys, column_keys=cols)
        masked += masked_pairs(keys, cols, cfg.loss)
        columns += len(cols) / tcfg.grad_accum
        if all_sum(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device)).item() != 0:
            bad = True
            loss = engine.discard(loss)
        if tcfg.gradcache_chunk:
            with autocast:
                cache.backward(loss, engine.backward_chunk)
        else:
            engine.backward(loss)
        loss_total += float(loss.detach().nan_to_num(0.0)) / tcfg.grad_accum
        t = stats.to_tensor().double()
        stats_sum = t if stats_sum is None else stats_sum + t
        digest += sum(zlib.crc32(i.encode()) for i in batch["id"])
        entropy += batch_entropy / tcfg.grad_accum
        norms = engine.step(skip=bad)

    # Sum over workers: every rank then holds the same task losses and so computes the same λ.
    g = reduce_stats(DLEStats.from_tensor(stats_sum))
    sums = all_sum(torch.cat([torch.tensor([loss_total, entropy, digest % 2**31, *data_counts], dtype=torch.float64,
                                           device=device), masked.double()[None]])).cpu()
    return StepResult(stats=g, loss=sums[0].item() / ctx.world, entropy=sums[1].item() / ctx.world,
                      digest=int(sums[2].item()) % 2**31,  # (Σ_r d_r mod M) mod M: W-independent
                      bad_rows=int(sums[3].item()), bytes_read=int(sums[4].item()), masked=int(sums[5].item()),
                      columns=columns, norms=norms, finite=not bad)


class Monitor:
    """Rank 0's outputs for each logged step: metrics.jsonl, wandb and the console line."""

    def __init__(self, cfg: Config, run_dir: Path, total: int, state: LoopState, first: dict):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(run_dir / "metrics.jsonl", resume_step=state.step)
        self.console = Console(total, state.step)
        self.wandb = Wandb(cfg.run.wandb, run_dir, cfg.run.name or run_dir.name, cfg.to_dict(), state.wandb_id)
        state.wandb_id = self.wandb.id
        self.volatility = Volatility()
        self.first = first  # the parameter counts: on the run's first row only

    def row(self, out: StepResult, state: LoopState, epoch: int, phase: str, lam: torch.Tensor, lr: float,
            drift: float, seconds: float) -> dict:
        task_mean, shares = out.stats.task_losses(), out.stats.shares()
        row = {"step": state.step, "epoch": epoch, "phase": phase, "loss": out.loss, "lr": lr,
               "samples_per_s": out.stats.task_count.sum().item() / max(1e-9, seconds),
               "volatility": self.volatility(out.loss), "pooling_entropy": out.entropy, "projection_drift": drift,
               "bad_steps_total": state.bad_total, "data_digest": out.digest, "bad_rows_total": out.bad_rows,
               "data_bytes_read": out.bytes_read, "masked_pairs": out.masked, "candidates_per_query": out.columns,
               **(out.norms or {})}
        for i, t in enumerate(TASKS):
            if t in task_mean:
                row[f"loss/{t}"] = task_mean[t]
            row[f"weight/{t}"] = float(lam[i])
            row[f"share/{t}"] = shares.get(t, 0.0)
            row[f"samples_seen/{t}"] = int(state.seen[i].item())
        row.update(self.first)
        self.first = {}
        return row

    def write(self, row: dict) -> None:
        self.log.write(row)
        self.wandb.log(row)
        say(self.console.line(row))


def run_training(cfg: Config, stream_factory, use_ray: bool = True, steps: int | None = None,
                 evaluate: Evaluator | None = None) -> dict:
    ctx = Context(use_ray)
    if use_ray:
        quiet_worker_logs(cfg.run.verbose, ctx.rank)
    run_dir, tcfg = Path(cfg.run.dir), cfg.train
    seed_everything(tcfg.seed)  # same seed on every rank: identical fresh heads
    ckpt_dir = ctx.checkpoint_dir()  # Ray Train's latest, when this run resumes
    model = build_model(cfg, ctx.device, saved_model(cfg, ckpt_dir))  # also turns on gradient checkpointing
    if tcfg.compile:
        model.compile_layers()  # in place: parameter names, hence checkpoints, stay the same
    stream = stream_factory(rank=ctx.rank, world=ctx.world)
    total = steps or stream.total_steps(tcfg)
    steps_per_epoch = tcfg.steps_per_epoch or max(1, stream.steps_per_epoch(tcfg))
    counts = model.parameter_counts()  # before ZeRO-3 partitions them; the run's first row carries them
    # a ZeRO checkpoint of another number of workers is converted before DeepSpeed starts
    universal = reshard(ckpt_dir, run_dir, ctx.rank, ctx.world) if ckpt_dir is not None else None
    engine = build_engine(model, cfg, total, ctx.device, universal)
    initial_proj = engine.full_weights("projection.")  # for projection_drift (a checkpoint's own replaces it)
    weighter = TaskWeighter(cfg.stw)
    state, saved_proj = resume(ctx, ckpt_dir, engine, weighter, stream, cfg.train.seed)
    initial_proj = saved_proj if saved_proj is not None else initial_proj
    start, stop = state.step, None
    monitor = Monitor(cfg, run_dir, total, state, counts) if ctx.rank == 0 else None

    for step in range(start, total):
        t0, epoch, phase = time.time(), step // steps_per_epoch, phase_of(step, tcfg)
        lam = weighter.as_tensor(epoch).to(ctx.device)
        out = train_step(engine, stream, cfg, ctx, lam, poison=step + 1 in cfg.debug.nan_at_steps)
        stop = state.count(out, tcfg.max_bad_steps)
        if dynamic_stw_active(step, tcfg):  # the first update sees only steps where updates apply
            if out.finite:
                weighter.observe(DLEStats.from_tensor(out.stats.to_tensor().cpu()))
            if weighter.due(state.step) and weighter.window_losses():
                weighter.update_from_window(epoch)
        if state.step % tcfg.log_every == 0 or state.step == total or stop:  # the same on every rank
            # Under ZeRO-3 the projection is gathered for the drift: a collective, so every rank measures it.
            drift = weight_drift(engine.full_weights("projection."), initial_proj)
            if monitor:
                monitor.write(monitor.row(out, state, epoch, phase, lam, engine.lr(), drift, time.time() - t0))
        if tcfg.stop_after and state.step - start >= tcfg.stop_after and state.step < total:
            stop = stop or Stop(f"paused after {tcfg.stop_after} steps (train.stop_after); re-run to continue",
                                paused=True)
        save, strategic = is_checkpoint_step(state.step, tcfg)
        # An evaluation step is a checkpoint too: a restored Tune trial continues from there.
        evaluating = bool(evaluate and evaluate.every and state.step % evaluate.every == 0 and state.step < total)
        if save or evaluating or state.step == total or stop:
            last = state.step == total or stop is not None  # finish() writes the report after the export
            _checkpoint(ctx, engine, weighter, stream, state.step, epoch, state.extra(), initial_proj, strategic,
                        run_dir, report=not last)
            if universal is not None and ctx.rank == 0:  # this world's own checkpoint replaces the conversion
                shutil.rmtree(universal.parent, ignore_errors=True)
            universal = None
        if stop:
            break
        if evaluating:
            report_evaluation(ctx, engine, evaluate, state.step, run_dir)
        inject_fault(cfg, ctx.rank, state.step, run_dir)
    finish(ctx, engine, stream, monitor, stop, run_dir)
    if evaluate and stop is None:  # also when a resumed run had nothing left to train
        report_evaluation(ctx, engine, evaluate, state.step, run_dir, final=True)
    return {"step": state.step, "stopped": stop}


def report_evaluation(ctx: Context, engine, evaluate: Evaluator, step: int, run_dir: Path,
                      final: bool = False) -> None:
    """Export model/ (every rank: ZeRO-3 gathers), evaluate it on rank 0, report the metrics.
    `final`: the run's last evaluation, after `finish` has exported model/ already."""
    if not final:
        engine.export(run_dir / "model", ctx.rank)
    metrics = evaluate(run_dir / "model") if ctx.rank == 0 else {}
    ctx.report({"step": step, "final": final, **metrics})  # every rank reports; Ray Train passes on rank 0's


def resume(ctx: Context, ckpt_dir: Path | None, engine, weighter: TaskWeighter, stream,
           seed: int) -> tuple[LoopState, dict | None]:
    """The loop's state from Ray Train's checkpoint `ckpt_dir` (a fresh one without), with the
    engine (`engine.load`), STW, data position and this rank's RNG restored; also the projection's
    weights at step 0 when saved."""
    seed_everything(seed * 1000 + ctx.rank)  # per rank from here on (dropout, shuffles)
    if ckpt_dir is None:
        return LoopState(), None
    engine.load(ckpt_dir)
    saved = load_run_state(ckpt_dir)
    weighter.load_state_dict(saved["stw"])
    # The data position is the same for every number of workers (vipoly.data.plan): merge what
    # the ranks saved, whichever W saved it. RNG states are per rank: restored where one exists.
    stream.load_state_dict(PlanState.merge(load_all_data_positions(ckpt_dir)).to_dict())
    rank_state = load_rank_state(ckpt_dir, ctx.rank)
    if rank_state is not None:
        set_rng_state(rank_state["rng"])
    if ctx.rank == 0:
        say(f"resumed from step {saved['step']}")
    return LoopState.resumed(saved["step"], saved.get("extra", {})), saved.get("initial_proj")


def inject_fault(cfg: Config, rank: int, step: int, run_dir: Path) -> None:
    """debug.fail_at_step: kill this worker once (a marker file in run.dir) to exercise recovery."""
    if cfg.debug.fail_at_step != step or rank != cfg.debug.fail_rank:
        return
    marker = run_dir / f".fault-injected-{step}"
    if not marker.exists():
        marker.write_text("injected\n")
        say(f"debug: killing worker rank {rank} after step {step}")
        os._exit(1)


def finish(ctx: Context, engine, stream, monitor: Monitor | None, stop: Stop | None, run_dir: Path) -> None:
    close = getattr(stream, "close", None)
    if close:
        close()  # stops the prefetch thread and the sources' pipelines
    engine.export(run_dir / "model", ctx.rank)
    if monitor is None:
        return
    write_report(run_dir)
    monitor.wandb.finish()
    if stop and not stop.paused:
        (run_dir / "STOPPED").write_text(stop.reason + "\n")
    if stop:
        say(stop.reason)


def _checkpoint(ctx, engine, weighter, stream, step, epoch, extra, initial_proj, strategic, run_dir,
                report: bool = True) -> None:
    with tempfile.TemporaryDirectory(prefix="vipoly-ckpt-") as tmp:
        d = Path(tmp)
        engine.save(d, ctx.rank)
        save_rank_state(d, ctx.rank, stream.state_dict())
        if ctx.rank == 0:
            save_run_state(d, step, epoch, weighter.state_dict(), extra, initial_proj)
            if (run_dir / "metrics.jsonl").exists():
                (d / "metrics.jsonl").write_bytes((run_dir / "metrics.jsonl").read_bytes())
            if report:  # refreshed for whoever watches a long run (its plots cost ≈0.5 s of CPU)
                write_report(run_dir)
        # Strategic checkpoints score above all periodic ones, so the retention policy keeps them.
        score = step + (1e12 if strategic else 0)
        ctx.report({"step": step, "checkpoint_score": score}, d, name=f"checkpoint-{step:07d}")
