"""The per-worker training loop (runs inside each Ray Train worker, or in one plain process).

One optimizer step = `grad_accum` micro-batches. Each micro-batch embeds queries and positives in
one forward pass, gathers them across workers (negatives from the global batch), and applies
`dle_loss` with the current STW weights. Task losses are accumulated over a window of K steps,
summed across workers, and turned into new weights on every rank at once, so all ranks always
apply the same λ. Ray-specific lines are marked `# ray`.
"""
from __future__ import annotations

import os
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from vipoly.config import Config
from vipoly.data.plan import PlanState
from vipoly.losses import DLEStats, global_dle_loss, reduce_stats
from vipoly.losses.gather import candidates, is_distributed, masked_pairs
from vipoly.stw import TaskWeighter
from vipoly.tasks import TASKS
from vipoly.train.engine import build_engine, build_model
from vipoly.train.gradcache import CachedBatch
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
    """Entry point of a Ray Train worker. `config` = {"cfg": Config as dict, "stream": StreamFactory}."""
    run_training(Config.model_validate(config["cfg"]), config["stream"], use_ray=config.get("use_ray", True))


def run_training(cfg: Config, stream_factory, use_ray: bool = True, steps: int | None = None) -> dict:
    ctx = Context(use_ray)
    if use_ray:
        quiet_worker_logs(cfg.run.verbose, ctx.rank, ctx.device)
    run_dir = Path(cfg.run.dir)
    tcfg = cfg.train
    seed_everything(tcfg.seed)  # same seed on every rank: identical fresh heads
    model = build_model(cfg, ctx.device)  # also turns on gradient checkpointing when configured
    if tcfg.compile:
        model.compile_layers()  # in place: parameter names, hence checkpoints, stay the same
    stream = stream_factory(rank=ctx.rank, world=ctx.world)
    total = steps or stream.total_steps(tcfg)
    steps_per_epoch = tcfg.steps_per_epoch or max(1, stream.steps_per_epoch(tcfg))
    counts = model.parameter_counts()  # before ZeRO-3 partitions them; the run's first row carries them
    engine = build_engine(model, cfg, total, ctx.device)
    initial_proj = engine.full_weights("projection.")  # for projection_drift
    weighter = TaskWeighter(cfg.stw)

    start, extra = 0, {}
    seed_everything(tcfg.seed * 1000 + ctx.rank)  # per rank from here on (dropout, shuffles)
    ckpt_dir = ctx.checkpoint_dir()
    if ckpt_dir is not None:
        engine.load(ckpt_dir)
        state = load_run_state(ckpt_dir)
        start, extra = state["step"], state.get("extra", {})
        weighter.load_state_dict(state["stw"])
        initial_proj = state.get("initial_proj", initial_proj)
        # The data position is the same for every number of workers (vipoly.data.plan): merge what
        # the ranks saved, whichever W saved it. RNG states are per rank: restored where one exists.
        stream.load_state_dict(PlanState.merge(load_all_data_positions(ckpt_dir)).to_dict())
        rank_state = load_rank_state(ckpt_dir, ctx.rank)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        if ctx.rank == 0:
            say(f"resumed from step {start}")

    rank0 = ctx.rank == 0
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start)
        console = Console(total, start)
        wb = Wandb(cfg.run.wandb, run_dir, cfg.run.name or run_dir.name, cfg.to_dict(), extra.get("wandb_id"))
        extra["wandb_id"] = wb.id
    volatility = Volatility()
    bad_in_row, bad_total = extra.get("bad_in_row", 0), extra.get("bad_total", 0)
    seen = torch.tensor(extra.get("seen", [0] * len(TASKS)), dtype=torch.float64)
    stopped, done = None, start
    dims = cfg.model.projection.matryoshka_dims if cfg.model.projection.matryoshka else None

    for step in range(start, total):
        t0, done_before = time.time(), step
        epoch, phase = step // steps_per_epoch, phase_of(step, tcfg)
        lam = weighter.as_tensor(epoch).to(ctx.device)
        stats_sum = None  # Σ over micro-batches of this rank's DLEStats (they combine by addition)
        loss_total, entropy, digest, bad = 0.0, 0.0, 0, False
        masked = torch.zeros((), dtype=torch.int64, device=ctx.device)  # false negatives masked (no host sync)
        columns = 0  # candidates per query: the similarity matrix's columns, summed over micro-batches
        for _ in range(tcfg.grad_accum):
            batch = stream.next_batch()
            data_counts = [batch.get("bad_rows", 0), batch.get("bytes_read", 0)]
            autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=tcfg.bf16 and ctx.device.type == "cuda")
            with autocast:
                if tcfg.gradcache_chunk:  # embeddings with no graph; the chunks' graphs come after the loss
                    cache = CachedBatch(engine.model, batch["chunks"], ctx.device)
                    embedding, batch_entropy = cache.embedding, cache.entropy
                else:
                    out = engine.forward(**{k: v.to(ctx.device) for k, v in batch["inputs"].items()})
                    embedding, batch_entropy = out.embedding, pooling_entropy(out.pooling_weights, out.attention_mask)
            n = batch["task_ids"].shape[0]
            # Rows: the queries, the positives, then the hard negatives (data.negatives).
            a, b, negs = (embedding[:n].float(), embedding[n:2 * n].float(),
                          embedding[2 * n:].float() if "neg_owner" in batch else None)
            if done_before + 1 in cfg.debug.nan_at_steps:
                a = a * float("nan")
            keys = batch["pos_key"].to(ctx.device)
            neg_keys = batch["neg_key"].to(ctx.device) if negs is not None else None
            cols = candidates(keys, neg_keys, cfg.loss)  # gathered once: for the loss and for the counts
            loss, stats = global_dle_loss(a, b, batch["task_ids"].to(ctx.device), batch["scores"].to(ctx.device),
                                          lam, cfg.loss, dims=dims, pos_keys=keys, negatives=negs, neg_keys=neg_keys,
                                          column_keys=cols)
            masked += masked_pairs(keys, cols, cfg.loss)
            columns += len(cols) / tcfg.grad_accum
            finite = all_sum(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=ctx.device)).item() == 0
            if not finite:
                bad = True
                loss = engine.discard(loss)
            if tcfg.gradcache_chunk:
                with autocast:
                    cache.backward(loss, engine.backward_chunk)
            else:
                engine.backward(loss)
            loss_total += float(loss.detach().nan_to_num(0.0)) / tcfg.grad_accum  # a skipped step logs 0
            t = stats.to_tensor().double()
            stats_sum = t if stats_sum is None else stats_sum + t
            digest += sum(zlib.crc32(i.encode()) for i in batch["id"])
            entropy += batch_entropy / tcfg.grad_accum
            norms = engine.step(skip=bad)

        # Sum over workers: every rank then holds the same task losses and so computes the same λ.
        g = reduce_stats(DLEStats.from_tensor(stats_sum))
        extras = all_sum(torch.cat([torch.tensor([loss_total, entropy, digest % 2**31, *data_counts], dtype=torch.float64,
                                                 device=ctx.device), masked.double()[None]])).cpu()
        g_loss, g_entropy = extras[0].item() / ctx.world, extras[1].item() / ctx.world
        g_counts = g.task_count.cpu()
        seen += g_counts
        if bad:
            bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
            if bad_in_row >= tcfg.max_bad_steps:
                stopped = (f"stopped: {bad_in_row} steps in a row had a non-finite loss (last at step {step + 1}); "
                           f"lower train.lr or check the data")
        else:
            bad_in_row = 0
            if dynamic_stw_active(step, tcfg):  # the first update sees only steps where updates apply
                weighter.observe(DLEStats.from_tensor(g.to_tensor().cpu()))
        done = step + 1
        if dynamic_stw_active(step, tcfg) and weighter.due(done) and weighter.window_losses():
            weighter.update_from_window(epoch)

        log_now = done % tcfg.log_every == 0 or done == total or stopped  # the same on every rank
        # Under ZeRO-3 the projection is gathered for the drift: a collective, so every rank measures it.
        drift = weight_drift(engine.full_weights("projection."), initial_proj) if log_now else None
        if rank0 and log_now:
            task_mean, shares = g.task_losses(), g.shares()
            row = {"step": done, "epoch": epoch, "phase": phase, "loss": g_loss, "lr": engine.lr(),
                   "samples_per_s": g_counts.sum().item() / max(1e-9, time.time() - t0),
                   "volatility": volatility(g_loss), "pooling_entropy": g_entropy,
                   "projection_drift": drift,
                   "bad_steps_total": bad_total, "data_digest": int(extras[2].item()) % 2**31,  # (Σ_r d_r mod M) mod M: W-independent
                   "bad_rows_total": int(extras[3].item()), "data_bytes_read": int(extras[4].item()),
                   "masked_pairs": int(extras[5].item()), "candidates_per_query": columns, **(norms or {})}
            for i, t in enumerate(TASKS):
                if t in task_mean:
                    row[f"loss/{t}"] = task_mean[t]
                row[f"weight/{t}"] = float(lam[i])
                row[f"share/{t}"] = shares.get(t, 0.0)
                row[f"samples_seen/{t}"] = int(seen[i].item())
            if counts:
                row.update(counts)
                counts = None
            log.write(row)
            wb.log(row)
            say(console.line(row))

        if tcfg.stop_after and done - start >= tcfg.stop_after and done < total:
            stopped = stopped or f"paused after {tcfg.stop_after} steps (train.stop_after); re-run to continue"
        save, strategic = is_checkpoint_step(done, tcfg)
        if save or done == total or stopped:
            extra.update(bad_in_row=bad_in_row, bad_total=bad_total, seen=seen.tolist())
            _checkpoint(ctx, engine, weighter, stream, done, epoch, extra, initial_proj, strategic, run_dir)
        # Ray Train's report is a barrier across workers (≈0.2–2 s): report with checkpoints only;
        # per-step numbers go to metrics.jsonl and wandb.
        if stopped:
            break
        if cfg.debug.fail_at_step == done and ctx.rank == cfg.debug.fail_rank:
            marker = run_dir / f".fault-injected-{done}"
            if not marker.exists():
                marker.write_text("injected\n")
                say(f"debug: killing worker rank {ctx.rank} after step {done}")
                os._exit(1)

    close = getattr(stream, "close", None)
    if close:
        close()  # stops the prefetch thread and the sources' pipelines
    engine.export(run_dir / "model", ctx.rank)
    if rank0:
        write_report(run_dir)
        wb.finish()
        if stopped and not stopped.startswith("paused"):
            (run_dir / "STOPPED").write_text(stopped + "\n")
        if stopped:
            say(stopped)
    return {"step": done, "stopped": stopped}


def _checkpoint(ctx, engine, weighter, stream, step, epoch, extra, initial_proj, strategic, run_dir) -> None:
    with tempfile.TemporaryDirectory(prefix="vipoly-ckpt-") as tmp:
        d = Path(tmp)
        engine.save(d, ctx.rank)
        save_rank_state(d, ctx.rank, stream.state_dict())
        if ctx.rank == 0:
            save_run_state(d, step, epoch, weighter.state_dict(), extra, initial_proj)
            if (run_dir / "metrics.jsonl").exists():
                (d / "metrics.jsonl").write_bytes((run_dir / "metrics.jsonl").read_bytes())
            write_report(run_dir)
        # Strategic checkpoints score above all periodic ones, so the retention policy keeps them.
        score = step + (1e12 if strategic else 0)
        ctx.report({"step": step, "checkpoint_score": score}, d, name=f"checkpoint-{step:07d}")
