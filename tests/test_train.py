"""End-to-end training on the tiny model with real Ray Train, against one DDP reference run (the
`straight` fixture): resumed on as many and on fewer workers, a killed worker, GradCache, ZeRO-3,
one worker, frozen parts and hard negatives. The runs that stand on their own are in
test_train_variants.py; what both use is in train_runs.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_runs import TINY, check_deepspeed_run, steps, train

from vipoly.tasks import TASKS


@pytest.fixture(scope="module")
def straight(tmp_path_factory, ray_session, data_root, init_model) -> Path:
    """The reference run: images decoded in Ray tasks, as a GPU run decodes them. The other runs
    decode in their workers (the CPU default, `data.decode_in_tasks`), and those compared with this
    one below (resumed, GradCache, one worker, a killed worker, ZeRO-3) show both give the same
    samples and losses."""
    run = tmp_path_factory.mktemp("runs") / "straight"
    # 3 of the session's 8 logical CPUs a task: 2 decode at once, so 2 task processes start, not 7
    assert train(run, data_root, init_model, "data.decode_in_tasks=true", "data.decode_task_cpus=3",
                 wandb="offline") == 0
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


def test_a_run_starts_no_idle_helper_actors(straight):
    """The workers read their own rows: Ray Train's DatasetManager actor (a process that imports
    Ray Train and Ray Data for every run) is left out; so is its placement-group cleaner where the
    cluster has no dashboard, as here (launch._without_idle_helpers), and only there."""
    from ray._private import state  # ray: GCS's actor table (the state API needs the dashboard)
    from ray.train.torch import TorchTrainer

    from vipoly.train.launch import _without_idle_helpers

    names = [a["ActorClassName"] for a in state.actors().values()]
    assert "TrainController" in names and "DatasetManager" not in names and "PlacementGroupCleaner" not in names
    for state_api in (True, False):
        trainer = _without_idle_helpers(TorchTrainer, state_api=state_api)(lambda config: None)
        kept = {type(cb).__name__ for cb in trainer._create_default_callbacks()}
        assert "DatasetsCallback" not in kept and "BackendSetupCallback" in kept
        assert ("PlacementGroupCleanerCallback" in kept) == state_api


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
    assert "resuming from step 3" in capfd.readouterr().out
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


@pytest.fixture(scope="module")
def gradcache_killed(tmp_path_factory, ray_session, data_root, init_model) -> Path:
    """One run on 2 workers for two checks against the straight run that do not touch each other:
    GradCache (train.gradcache_chunk=4: each worker's 10 rows in chunks of 4, 4 and 2, negatives
    gathered from both) and a worker killed after step 4 (rank 1; Ray Train restarts the group
    from the step-3 checkpoint). One fit instead of two (issue 15: one trainer per group of checks)."""
    run = tmp_path_factory.mktemp("runs") / "gradcache_killed"
    assert train(run, data_root, init_model, "train.gradcache_chunk=4", "debug.fail_at_step=4",
                 "debug.fail_rank=1", "train.checkpoint.max_failures=1") == 0
    return run


def test_killed_worker_is_replaced(gradcache_killed, straight):
    run = gradcache_killed
    assert (run / ".fault-injected-4").exists()
    rows = steps(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for ra, rb in zip(steps(straight), rows):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)


def test_gradcache_gives_the_same_steps(gradcache_killed, straight):
    """GradCache: the same samples and the same losses and gradient norms as the plain run's."""
    for ra, rb in zip(steps(straight), steps(gradcache_killed), strict=True):
        assert ra["data_digest"] == rb["data_digest"], ra["step"]
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4), ra["step"]


def test_deepspeed_zero3_trains_resumes_and_equals_ddp(tmp_path, ray_session, straight, data_root, init_model,
                                                     capfd):
    check_deepspeed_run(tmp_path, "deepspeed_zero3", straight, data_root, init_model, capfd)


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


def test_a_resumed_ddp_run_reads_only_the_checkpoints_weights(paused):
    """On resume a DDP run builds its model from the checkpoint's model/ alone: model.backbone is
    not read (here it names no folder), so a worker never holds two copies of the model."""
    import torch

    from vipoly.config import load_config
    from vipoly.model import PolyEmbedder
    from vipoly.train.engine import build_model, saved_model

    cfg, ckpt = load_config(paused / "config.yaml"), paused / "checkpoint-0000003"
    assert saved_model(cfg, ckpt) == ckpt / "model"
    assert saved_model(cfg, None) is None
    assert saved_model(cfg.model_copy(update={"train": cfg.train.model_copy(update={"strategy": "deepspeed_zero2"})}),
                       ckpt) is None  # ZeRO's own shards hold its weights
    cfg.model.backbone = str(paused / "no-such-backbone")
    model = build_model(cfg, torch.device("cpu"), saved_model(cfg, ckpt))
    want = PolyEmbedder.from_pretrained(ckpt / "model").state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


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
    assert "resuming from step 3" in out and "1 worker(s) × 1 × 20" in out
    assert [r["data_digest"] for r in steps(run)] == [r["data_digest"] for r in steps(straight)]
    assert train(run, data_root, init_model, "train.num_workers=3", "train.max_steps=8") == 2
    err = capfd.readouterr().err
    assert "train.num_workers=3 cannot continue" in err and "allowed: [1, 2, 4]" in err
