"""What the training tests share: the tiny run as `pipelines.train` starts it, its metrics, and the
DeepSpeed check each ZeRO variant runs. Two modules use it, so that the suite's two xdist workers
can each take one: test_train.py (the runs compared with the DDP reference run) and
test_train_variants.py (the runs that stand on their own)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines import train as train_pipeline
from vipoly.train.monitor import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny-cpu.yaml")


def train(run_dir: Path, data_root: Path, init_model: Path, *sets: str, wandb: str = "disabled") -> int:
    """pipelines.train on the tiny model, 6 steps. wandb runs offline in the straight, paused and
    resumed runs, which check its records; elsewhere it is off (its start-up costs ≈5 CPU-seconds)."""
    args = ["--config", TINY, "--set", f"data.root={data_root}", "--set", f"run.dir={run_dir}",
            "--set", f"model.backbone={init_model}", "--set", f"run.wandb={wandb}",
            "--set", "train.max_steps=6", "--set", "train.checkpoint.every=3", "--set", "train.log_every=1"]
    for s in sets:
        args += ["--set", s]
    return train_pipeline.main(args)


def steps(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


def optimizer_tensors(ckpt: Path) -> dict:
    """Every tensor of a DeepSpeed checkpoint's optimizer files (all ranks), by a path-like key."""
    import torch

    out = {}

    def walk(key, x):
        if isinstance(x, torch.Tensor):
            out[key] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{key}/{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{key}/{i}", v)

    for f in sorted((ckpt / "deepspeed" / "state").glob("*optim_states.pt")):
        walk(f.name, torch.load(f, map_location="cpu", weights_only=False))  # DeepSpeed's own pickles
    return out


def joined_partitions(ckpt: Path) -> dict:
    """A ZeRO-2 checkpoint's optimizer tensors (fp32 weights, Adam's moments) per parameter group,
    the ranks' partitions joined in rank order; the step counts as rank 0 holds them."""
    import torch

    tensors = optimizer_tensors(ckpt)
    files = sorted({k.split("/", 1)[0] for k in tensors}, key=lambda f: int(f.split("zero_pp_rank_")[1].split("_")[0]))
    return {key: t if t.ndim == 0 else torch.cat([tensors[f"{f}/{key}"] for f in files])
            for key, t in ((k.split("/", 1)[1], v) for k, v in tensors.items() if k.startswith(files[0] + "/"))}


def check_conversion(ckpt: Path, tmp_path: Path, capfd) -> None:
    """The conversion that a ZeRO-2 resume on another number of workers runs first (rank 0, here
    in this process): its stages and its time on the console; a damaged checkpoint fails naming it."""
    from vipoly.train.engine import reshard

    capfd.readouterr()
    out = reshard(ckpt, tmp_path / "converted", rank=0, world=1)
    said = capfd.readouterr().out
    assert out == tmp_path / "converted" / ".resharded" / ckpt.name / "state" and out.is_dir()
    assert "1. Extracting ZeRO fragments (" in said and f"converted {ckpt.name} in " in said
    damaged = tmp_path / "damaged" / ckpt.name
    shutil.copytree(ckpt / "deepspeed", damaged / "deepspeed")
    next((damaged / "deepspeed" / "state").glob("*zero_pp_rank_0_*optim_states.pt")).write_bytes(b"")
    with pytest.raises(RuntimeError, match=f"converting {damaged} for 1 workers failed"):
        reshard(damaged, tmp_path / "damaged", rank=0, world=1)
    assert not (tmp_path / "damaged" / ".resharded" / ckpt.name / "state").exists()  # nothing half-made is used


def check_deepspeed_run(tmp_path: Path, strategy: str, straight: Path | None, data_root: Path, init_model: Path,
                        capfd) -> None:
    """ZeRO-2, ZeRO-3, or ZeRO-3 with LoRA adapters (merged at export from the gathered weights),
    paused and resumed: it equals a straight run step for step, DDP's `straight` (ZeRO-3) or its
    own with GradCache (the others, which accumulate micro-batches)."""
    import torch

    run = tmp_path / strategy.replace("+", "_")
    strategy, _, lora = strategy.partition("+")
    # (no LoRA dropout: GradCache's chunks draw other dropout masks than one whole micro-batch does)
    sets = (f"train.strategy={strategy}", f"model.lora.r={4 if lora else 0}", "model.lora.dropout=0")
    accumulate = strategy == "deepspeed_zero2" or lora
    if accumulate:
        # Micro-batches of 5 (ZeRO-2) and of 2 (ZeRO-3 + LoRA), as the reference run accumulates
        # 10: ZeRO reduces at every backward and ZeRO-3 replays the first step's module order, and
        # a micro-batch (or GradCache chunk) with no image on one worker once left the workers out
        # of step (a crash, then wrong sums: PolyEmbedder._blank_image and _input_embeds).
        sets += ("train.max_steps=4", "train.checkpoint.every=2", f"train.grad_accum={5 if lora else 2}",
                 "train.global_batch_size=20")
    pause = 2 if accumulate else 3
    assert train(run, data_root, init_model, *sets, f"train.stop_after={pause}") == 0
    if strategy == "deepspeed_zero2":  # the same pause, to resume on 1 worker below
        shutil.copytree(run, tmp_path / "zero2_on_one")
        check_conversion(run / "checkpoint-0000002", tmp_path, capfd)
    # ZeRO-2 resumes into a non-finite loss at step 3, checkpointing every step around it.
    resumed = ("debug.nan_at_steps=[3]", "train.checkpoint.every=1") if strategy == "deepspeed_zero2" else ()
    assert train(run, data_root, init_model, *sets, *resumed) == 0
    out = capfd.readouterr().out
    assert f"resuming from step {pause}" in out
    if strategy == "deepspeed_zero3":  # ZeRO-3 partitions carry to no other number of workers
        assert "resumable on [2] workers" in out
    rows = steps(run)
    if strategy == "deepspeed_zero3":  # zero.Init: each worker loaded half the backbone, never all of it
        assert 0 < rows[0]["params/local"] < 0.6 * rows[0]["params/total"]
    for r in rows:  # per-component norms from ZeRO's partitions (ZeRO-3's equal DDP's below)
        if r["bad_steps_total"] and r["step"] == 3:
            continue  # the skipped step's gradients were NaN on purpose
        parts = sum(r[f"grad_norm/{c}"] ** 2 for c in ("vision", "language", "pooling", "projection"))
        assert parts ** 0.5 == pytest.approx(r["grad_norm"], rel=1e-4)
        assert r["projection_drift"] > 0
    if strategy == "deepspeed_zero2":
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["bad_steps_total"] == 1
        # The skipped step left ZeRO-2's optimizer (Adam's moments, the fp32 weights) bit for bit as it was.
        before, after = optimizer_tensors(run / "checkpoint-0000002"), optimizer_tensors(run / "checkpoint-0000003")
        assert before.keys() == after.keys() and before
        assert [k for k in before if not torch.equal(before[k], after[k])] == []
        weights = "zero_pp_rank_0_mp_rank_00_optim_states.pt/optimizer_state_dict/single_partition_of_fp32_groups/0"
        assert not torch.equal(after[weights], optimizer_tensors(run / "checkpoint-0000004")[weights])  # step 4 trained
        # The reference config trains with ZeRO-2, and a preempted run may come back on fewer
        # workers: the pause resumed on 1 worker (its 2 partitions converted for 1, `reshard`)
        # trains on the same samples to the same losses as the resume on 2.
        one = tmp_path / "zero2_on_one"
        assert train(one, data_root, init_model, *sets, *resumed, "train.num_workers=1") == 0
        assert not (one / ".resharded" / "checkpoint-0000002").exists()  # spent once step 3 was saved
        for ra, rb in zip(rows, steps(one), strict=True):
            assert rb["data_digest"] == ra["data_digest"], ra["step"]
            assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
        # Its optimizer after the skipped step 3 is the 2 workers' at step 2, partitions joined: the
        # weights and both of Adam's moments came through the conversion bit for bit.
        two, single = joined_partitions(run / "checkpoint-0000002"), joined_partitions(one / "checkpoint-0000003")
        assert two.keys() == single.keys() and [k for k in two if not torch.equal(two[k], single[k])] == []
    elif not lora:
        # ZeRO-3 paused at 3 and resumed equals the DDP straight run: the same samples, losses,
        # gradient norms per component and projection drift.
        for ra, rb in zip(steps(straight), rows, strict=True):
            assert rb["data_digest"] == ra["data_digest"], ra["step"]
            assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
            for key in ("grad_norm", "grad_norm/vision", "grad_norm/language", "grad_norm/pooling",
                        "grad_norm/projection", "projection_drift"):
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-7), (ra["step"], key)
        # A ZeRO-3 run resumes only on the workers that saved it: refused before any worker starts.
        assert train(run, data_root, init_model, *sets, "train.num_workers=1") == 2
        assert "holds the partitions of 2 workers" in capfd.readouterr().err
        # ... and its export, gathered module by module, holds the same weights.
        from vipoly.model import PolyEmbedder

        texts = ["Xin chào", "một con mèo"]
        ours, ddp = (PolyEmbedder.from_pretrained(d / "model").encode(texts) for d in (run, straight))
        assert torch.allclose(torch.as_tensor(ours), torch.as_tensor(ddp), atol=1e-5)
    if accumulate:
        # 4 straight steps with GradCache (micro-batches of 5 in chunks of 2, 2 and 1; of 2 in
        # chunks of 1) equal the 2 + 2 above: GradCache gives ZeRO the whole micro-batch's step,
        # and ZeRO resumes exactly.
        cached = tmp_path / "gradcache"
        assert train(cached, data_root, init_model, *sets, f"train.gradcache_chunk={1 if lora else 2}",
                     *resumed[:1]) == 0
        for ra, rb in zip(rows, steps(cached), strict=True):
            assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
    from vipoly.model import PolyEmbedder

    assert PolyEmbedder.from_pretrained(run / "model").encode(["ok"]).shape[0] == 1
    assert (run / "model" / "adapter" / "adapter_config.json").is_file() == bool(lora)
