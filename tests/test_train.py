"""End-to-end training on the tiny model with real Ray Train: DDP and DeepSpeed, resume, faults, guards."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import train as train_pipeline
from vipoly.tasks import TASKS
from vipoly.train.launch import warn_unplaceable
from vipoly.train.monitor import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny-cpu.yaml")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from vipoly.data.synthetic import main as synthetic

    out = tmp_path_factory.mktemp("syn")
    synthetic(["--out", str(out), "--n", "200", "--seed", "0"])
    return out


@pytest.fixture(scope="module")
def init_model(tmp_path_factory, tiny_model_dir) -> Path:
    return tiny_model_dir


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


@pytest.fixture(scope="module")
def straight(tmp_path_factory, ray_session, data_root, init_model) -> Path:
    """The reference run: images decoded in Ray tasks, as a GPU run decodes them. The other runs
    decode in their workers (the CPU default, `data.decode_in_tasks`), and those compared with this
    one below (resumed, GradCache, one worker, a killed worker, ZeRO-3) show both give the same
    samples and losses."""
    run = tmp_path_factory.mktemp("runs") / "straight"
    assert train(run, data_root, init_model, "data.decode_in_tasks=true", wandb="offline") == 0
    return run


def test_run_directory_contract(straight):
    rows = steps(straight)
    assert [r["step"] for r in rows] == list(range(1, 7))
    required = {"step", "epoch", "phase", "loss", "grad_norm", "samples_per_s", "masked_pairs"}
    for t in TASKS:
        required |= {f"weight/{t}", f"share/{t}", f"samples_seen/{t}"}
    assert required <= set(rows[-1])
    assert all(f"loss/{t}" in r for t in TASKS for r in rows[-2:]) or \
        all(any(f"loss/{t}" in r for r in rows) for t in TASKS)
    assert {"grad_norm/vision", "grad_norm/language", "grad_norm/pooling", "grad_norm/projection"} <= set(rows[-1])
    assert rows[0]["params/trainable"] == rows[0]["params/total"] == rows[0]["params/local"] > 0
    assert "params/total" not in rows[1]
    assert (straight / "config.yaml").is_file() and (straight / "report.md").is_file()
    assert (straight / "plots" / "loss_per_task.png").is_file()
    assert len(list((straight / "wandb").glob("offline-run-*/run-*.wandb"))) == 1  # rank 0's offline record
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-0000003", "checkpoint-0000006"]


def test_a_run_starts_no_dataset_manager(straight):
    """The workers read their own rows: Ray Train's DatasetManager actor (a process that imports
    Ray Train and Ray Data for every run) is left out (launch._without_dataset_manager)."""
    from ray._private import state  # ray: GCS's actor table (the state API needs the dashboard)

    names = [a["ActorClassName"] for a in state.actors().values()]
    assert "TrainController" in names and "DatasetManager" not in names


def test_samples_seen_follow_the_mix(straight):
    from vipoly.config import load_config

    mix = load_config(TINY).data.mix
    last = steps(straight)[-1]
    seen = {t: last[f"samples_seen/{t}"] for t in TASKS}
    total = sum(seen.values())
    assert total == 6 * 2 * 10  # steps × workers × batch
    for t in TASKS:  # each worker's stream is exact to ±1 per window: ±2 over two workers
        assert abs(seen[t] - total * mix[t] / sum(mix.values())) <= 2, seen


def test_saved_model_encodes(straight):
    from vipoly.model import PolyEmbedder

    model = PolyEmbedder.from_pretrained(straight / "model")
    v = model.encode(["Xin chào thế giới"], task="instr")
    assert v.shape == (1, model.embedding_dim)


@pytest.fixture(scope="module")
def paused(tmp_path_factory, ray_session, data_root, init_model) -> Path:
    """The straight run paused after step 3 on 2 workers: resumed on 2 workers and on 1 below
    (each test resumes a copy of it)."""
    run = tmp_path_factory.mktemp("runs") / "paused"
    assert train(run, data_root, init_model, "train.stop_after=3", wandb="offline") == 0
    assert [r["step"] for r in steps(run)] == [1, 2, 3]
    return run


def resumable_copy(paused: Path, run: Path) -> Path:
    """A copy of the paused run under another name: Ray Train names a run after its folder."""
    import shutil

    shutil.copytree(paused, run)
    return run


def test_resume_gives_the_same_run(tmp_path, ray_session, straight, paused, data_root, init_model, capfd):
    run = resumable_copy(paused, tmp_path / "split")
    capfd.readouterr()
    assert train(run, data_root, init_model, wandb="offline") == 0
    assert "resumed from step 3" in capfd.readouterr().out
    # wandb resumed the paused run's record (same id) instead of starting another.
    records = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(records) == 2 and len({name.rsplit("-", 1)[1] for name in records}) == 1, records
    a, b = steps(straight), steps(run)
    assert [r["step"] for r in b] == list(range(1, 7))  # no repeated steps
    for ra, rb in zip(a, b):
        assert ra["data_digest"] == rb["data_digest"], ra["step"]  # the same samples
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
        for t in TASKS:
            assert rb[f"weight/{t}"] == pytest.approx(ra[f"weight/{t}"], abs=1e-5)


def test_killed_worker_is_replaced(tmp_path, ray_session, straight, data_root, init_model):
    run = tmp_path / "faulty"
    assert train(run, data_root, init_model, "debug.fail_at_step=4", "debug.fail_rank=1",
                 "train.checkpoint.max_failures=1") == 0
    assert (run / ".fault-injected-4").exists()
    rows = steps(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for ra, rb in zip(steps(straight), rows):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)


def test_nan_losses_are_skipped_then_stop_the_run(tmp_path, ray_session, data_root, init_model, capfd):
    run = tmp_path / "nan"
    rc = train(run, data_root, init_model, "train.num_workers=1", "debug.nan_at_steps=[2, 3]",
               "train.max_bad_steps=2")
    assert rc == 1
    assert "steps in a row had a non-finite loss" in capfd.readouterr().err
    rows = steps(run)
    assert rows[-1]["step"] == 3 and rows[-1]["bad_steps_total"] == 2
    assert rows[1]["bad_steps_total"] == 1


def optimizer_tensors(ckpt: Path) -> dict[str, "torch.Tensor"]:
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


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3+lora"])
def test_deepspeed_trains_and_resumes(tmp_path, ray_session, straight, data_root, init_model, strategy, capfd):
    """ZeRO-2, ZeRO-3, and ZeRO-3 with LoRA adapters (merged at export from the gathered weights):
    paused and resumed, each equals a straight run step for step (DDP's, or its own with GradCache)."""
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
    # ZeRO-2 resumes into a non-finite loss at step 3, checkpointing every step around it.
    resumed = ("debug.nan_at_steps=[3]", "train.checkpoint.every=1") if strategy == "deepspeed_zero2" else ()
    assert train(run, data_root, init_model, *sets, *resumed) == 0
    assert f"resumed from step {pause}" in capfd.readouterr().out
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
    elif not lora:
        # ZeRO-3 paused at 3 and resumed equals the DDP straight run: the same samples, losses,
        # gradient norms per component and projection drift.
        for ra, rb in zip(steps(straight), rows, strict=True):
            assert rb["data_digest"] == ra["data_digest"], ra["step"]
            assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
            for key in ("grad_norm", "grad_norm/vision", "grad_norm/language", "grad_norm/pooling",
                        "grad_norm/projection", "projection_drift"):
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-7), (ra["step"], key)
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


def test_bad_config_fails_before_any_worker(tmp_path, capsys):
    assert train_pipeline.main(["--config", TINY, "--set", "train.strategy=zero9"]) == 2
    assert "train.strategy" in capsys.readouterr().err
    assert train_pipeline.main(["--config", TINY, "--set", f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "data.root" in capsys.readouterr().err
    assert train_pipeline.main(["--config", TINY, "--set", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


def test_packed_sequences_train(tmp_path, ray_session, data_root, init_model):
    """Packed rows through the varlen attention kind (its per-document reference on CPU), as
    configs/qwen2vl-2b.yaml trains. (`train.compile` is left out: inductor compiling forward and
    backward takes minutes on 2 cores; test_packing checks compiled layers.)"""
    run = tmp_path / "packed"
    assert train(run, data_root, init_model, "train.num_workers=1", "train.packed_sequences=true",
                 "model.attn_implementation=vipoly_varlen", "train.max_steps=2", "train.checkpoint.every=2",
                 "data.negatives=1") == 0  # hard negatives packed with the sides
    rows = steps(run)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    assert all(r["candidates_per_query"] > 10 for r in rows)


def test_gradcache_gives_the_same_steps(tmp_path, ray_session, straight, data_root, init_model):
    """train.gradcache_chunk=4 on 2 workers (each worker's 10 rows in chunks of 4, 4 and 2;
    negatives gathered from both): the same samples and the same losses as the plain run's."""
    run = tmp_path / "gradcache"
    assert train(run, data_root, init_model, "train.gradcache_chunk=4") == 0
    for ra, rb in zip(steps(straight), steps(run), strict=True):
        assert ra["data_digest"] == rb["data_digest"], ra["step"]
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4), ra["step"]


@pytest.fixture(scope="module")
def frozen_with_negatives(tmp_path_factory, ray_session, data_root, init_model) -> Path:
    """One 2-step run on 2 workers for two features that do not touch each other: frozen parts
    (the model side) and gathered hard negatives (the data side)."""
    run = tmp_path_factory.mktemp("runs") / "frozen_negatives"
    assert train(run, data_root, init_model, "model.freeze=[vision, embeddings]", "data.negatives=2",
                 "train.max_steps=2", "train.checkpoint.every=2") == 0
    return run


def test_frozen_parts_do_not_move(frozen_with_negatives, init_model):
    """model.freeze=[vision, embeddings] on 2 workers (DDP with no unused-parameter search): the
    frozen tensors end bit for bit as they began, the optimizer holds none of them, and the first
    metrics row counts the trainable parameters."""
    import torch

    from vipoly.model import PolyEmbedder
    from vipoly.model.embedder import component_of

    run = frozen_with_negatives
    before, after = PolyEmbedder.from_pretrained(init_model), PolyEmbedder.from_pretrained(run / "model")
    embeddings = before.backbone.get_input_embeddings().weight
    frozen = {n for n, p in before.named_parameters() if component_of(n) == "vision" or p is embeddings}
    a, b = dict(before.named_parameters()), dict(after.named_parameters())
    assert frozen and all(torch.equal(a[n], b[n]) for n in frozen)
    assert any(component_of(n) == "language" and not torch.equal(a[n], b[n]) for n in a if n not in frozen)
    rows = steps(run)
    assert rows[0]["params/total"] == sum(p.numel() for p in b.values())
    assert rows[0]["params/trainable"] == sum(p.numel() for n, p in b.items() if n not in frozen)
    assert "params/trainable" not in rows[1] and rows[-1]["grad_norm/vision"] == 0.0
    opt = torch.load(run / "checkpoint-0000002" / "optimizer.pt", weights_only=True)["optimizer"]
    assert sum(len(g["params"]) for g in opt["param_groups"]) == len(a) - len(frozen)
    saved = json.loads((run / "model" / "vipoly.json").read_text())["model"]
    assert "freeze" not in saved  # a training setting: the next run from this folder trains it all


def test_lora_trains_resumes_exactly_and_exports_merged(tmp_path, ray_session, data_root, init_model, capfd):
    """model.lora.r=4: only the adapters and the heads train; 2 + 2 steps equal 4 straight ones;
    checkpoints hold those weights alone; model/ is an ordinary folder (adapters merged: the same
    embeddings as the LoRA model, within 1e-5, loading without peft), model/adapter/ peft's own."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from vipoly.config import load_config
    from vipoly.model import PolyEmbedder

    sets = ("model.lora.r=4", "train.num_workers=1", "train.global_batch_size=20", "train.max_steps=4",
            "train.checkpoint.every=2")
    straight, split = tmp_path / "lora", tmp_path / "lora_split"
    assert train(straight, data_root, init_model, *sets) == 0
    assert train(split, data_root, init_model, *sets, "train.stop_after=2") == 0
    capfd.readouterr()
    assert train(split, data_root, init_model, *sets) == 0
    assert "resumed from step 2" in capfd.readouterr().out
    a, b = steps(straight), steps(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]

    ckpt = straight / "checkpoint-0000004"
    trained = load_file(str(ckpt / "trainable.safetensors"))
    assert not (ckpt / "model").exists() and trained
    assert all(".lora_" in n or n.startswith(("pooling.", "projection.")) for n in trained)
    assert a[0]["params/trainable"] == sum(t.numel() for t in trained.values()) < a[0]["params/total"]

    lora = PolyEmbedder.build(load_config(straight / "config.yaml").model)
    lora.load_state_dict(trained, strict=False)
    merged = PolyEmbedder.from_pretrained(straight / "model")
    texts = ["xin chào thế giới", "a cat on a mat", "mô hình nhúng"]
    np_lora, np_merged = lora.eval().encode(texts), merged.eval().encode(texts)
    assert torch.allclose(torch.as_tensor(np_lora), torch.as_tensor(np_merged), atol=1e-5)
    assert "lora" not in json.loads((straight / "model" / "vipoly.json").read_text())["model"]
    assert json.loads((straight / "model" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    no_peft = ("import sys; sys.modules['peft'] = None; from vipoly.model import PolyEmbedder; "
               f"print(PolyEmbedder.from_pretrained({str(straight / 'model')!r}).encode(['ok']).shape)")
    done = subprocess.run([sys.executable, "-c", no_peft], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]


def test_hard_negatives_are_gathered_candidates(frozen_with_negatives, straight):
    """data.negatives=2 on 2 workers: each step's queries are scored against the 20 positives and
    every worker's hard negatives (the synthetic image tasks carry one each), and the run trains.
    (Step 1's loss is the initial weights', frozen or not: it differs from the plain run's by the
    negatives alone.)"""
    rows, plain = steps(frozen_with_negatives), steps(straight)
    seen = rows[-1]
    image_rows = sum(seen[f"samples_seen/{t}"] for t in ("ocr", "vqa_single", "vqa_multi"))  # one negative each
    assert sum(r["candidates_per_query"] for r in rows) == 2 * 20 + image_rows
    assert all(r["candidates_per_query"] > 20 for r in rows) and plain[0]["candidates_per_query"] == 20
    assert all(r["loss"] == r["loss"] for r in rows) and rows[0]["loss"] != plain[0]["loss"]


def test_unplaceable_workers_are_named_before_the_wait(ray_session, capsys):
    from vipoly.config import load_config

    one_node = load_config(TINY, ["train.num_workers=2", "train.resources.placement_strategy=STRICT_SPREAD"])
    warn_unplaceable(one_node)
    err = capsys.readouterr().err
    assert "train.resources.placement_strategy=STRICT_SPREAD needs 2 nodes" in err and "1 node(s)" in err
    warn_unplaceable(load_config(TINY, ["train.num_workers=2", "train.resources.placement_strategy=PACK"]))
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- the global order at the reference run's shape
def test_one_worker_trains_on_the_same_samples_as_two(tmp_path, ray_session, straight, data_root, init_model):
    """The same global batch G on 1 worker as on 2: the same samples at every step (data_digest)
    and the same losses: the step does not depend on how many workers share it."""
    run = tmp_path / "one"
    assert train(run, data_root, init_model, "train.num_workers=1", "train.global_batch_size=20") == 0
    for ra, rb in zip(steps(straight), steps(run), strict=True):
        assert ra["data_digest"] == rb["data_digest"], ra["step"]
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]


def test_paused_on_two_workers_resumes_on_one(tmp_path, ray_session, straight, paused, data_root, init_model, capfd):
    run = resumable_copy(paused, tmp_path / "elastic")
    capfd.readouterr()
    assert train(run, data_root, init_model, "train.num_workers=1") == 0  # G = 20 kept from plan.json
    out = capfd.readouterr().out
    assert "resumed from step 3" in out and "1 worker(s) × 1 × 20" in out
    assert [r["data_digest"] for r in steps(run)] == [r["data_digest"] for r in steps(straight)]
    assert train(run, data_root, init_model, "train.num_workers=3", "train.max_steps=8") == 2
    err = capfd.readouterr().err
    assert "train.num_workers=3 cannot continue" in err and "allowed: [1, 2, 4]" in err


def test_epochs_with_hash_ids_as_a_user_types_them(tmp_path, ray_session, init_model, monkeypatch, capfd):
    """`train.epochs` (no max_steps), hash-like ids and 2 workers, relative paths typed from the
    launch directory: every rank plans the same steps and the run ends at the planned step."""
    import hashlib
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vipoly.data.synthetic import write_synthetic

    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    write_synthetic(tmp_path / "runs/hashed/data", n=100, seed=4)
    for f in (tmp_path / "runs/hashed/data").glob("*/part-*.parquet"):
        t = pq.read_table(f)
        ids = [hashlib.sha1(i.encode()).hexdigest()[:24] for i in t.column("id").to_pylist()]  # as SQuAD/MLQA ids
        pq.write_table(t.set_column(0, "id", pa.array(ids, pa.string())), f)
    args = ["--config", "configs/tiny-cpu.yaml", "--set", "data.root=runs/hashed/data", "--set", "run.dir=runs/hashed",
            "--set", f"model.backbone={init_model}", "--set", "train.max_steps=-1", "--set", "train.steps_per_epoch=null",
            "--set", "train.epochs=2", "--set", "train.batch_size=8", "--set", "run.wandb=disabled",
            "--set", "train.checkpoint.every=100", "--set", "train.checkpoint.strategic=[]"]
    assert train_pipeline.main(args) == 0
    rows = read_metrics(tmp_path / "runs/hashed/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))  # floor(100 rows / G = 16) = 6 steps × 2 epochs
    assert [r["epoch"] for r in rows] == [0] * 6 + [1] * 6
    assert "6 steps an epoch, 12 in all" in capfd.readouterr().out
    assert (tmp_path / "runs/hashed/model/vipoly.json").is_file()
