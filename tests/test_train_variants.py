"""End-to-end training on the tiny model with real Ray Train, the runs that stand on their own:
DeepSpeed ZeRO-2 and ZeRO-3 with LoRA (each against its own GradCache run), LoRA under DDP, packed
rows, non-finite losses, `train.epochs` with hash-like ids, and the guards before any worker starts.
The runs compared with the DDP reference run are in test_train.py; what both use is in train_runs.py."""
from __future__ import annotations

import json

import pytest
from train_runs import REPO, TINY, check_deepspeed_run, steps, train

from pipelines import train as train_pipeline
from vipoly.train.launch import warn_unplaceable
from vipoly.train.monitor import read_metrics


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3+lora"])
def test_deepspeed_trains_and_resumes(tmp_path, ray_session, data_root, init_model, strategy, capfd):
    check_deepspeed_run(tmp_path, strategy, None, data_root, init_model, capfd)


def test_nan_losses_are_skipped_then_stop_the_run(tmp_path, ray_session, data_root, init_model, capfd):
    run = tmp_path / "nan"
    rc = train(run, data_root, init_model, "train.num_workers=1", "debug.nan_at_steps=[2, 3]",
               "train.max_bad_steps=2")
    assert rc == 1
    assert "steps in a row had a non-finite loss" in capfd.readouterr().err
    rows = steps(run)
    assert rows[-1]["step"] == 3 and rows[-1]["bad_steps_total"] == 2
    assert rows[1]["bad_steps_total"] == 1


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
    assert "resuming from step 2" in capfd.readouterr().out
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


def test_unplaceable_workers_are_named_before_the_wait(ray_session, capsys):
    from vipoly.config import load_config

    one_node = load_config(TINY, ["train.num_workers=2", "train.resources.placement_strategy=STRICT_SPREAD"])
    warn_unplaceable(one_node)
    err = capsys.readouterr().err
    assert "train.resources.placement_strategy=STRICT_SPREAD needs 2 nodes" in err and "1 node(s)" in err
    warn_unplaceable(load_config(TINY, ["train.num_workers=2", "train.resources.placement_strategy=PACK"]))
    assert capsys.readouterr().err == ""


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
