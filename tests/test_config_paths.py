"""Relative paths mean the directory a command was started from, on every worker: `load_config`
makes them absolute; URIs, `tiny` and hub ids stay as typed."""
from __future__ import annotations

from pathlib import Path

from vipoly.config import Config, load_config, resolve_paths

REPO = Path(__file__).resolve().parents[1]


def test_relative_paths_become_absolute_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    cfg = Config.model_validate({
        "model": {"backbone": "models/mine"},
        "data": {"root": "runs/demo/data", "sources": {"extra": "more/*.parquet", "abs": "/srv/x.parquet"},
                 "encoded_dir": "cache"},
        "run": {"dir": "runs/demo"}})
    out = resolve_paths(cfg)
    assert out.model.backbone == str(tmp_path / "models" / "mine")
    assert out.data.root == str(tmp_path / "runs" / "demo" / "data")
    assert out.data.sources == {"extra": str(tmp_path / "more" / "*.parquet"), "abs": "/srv/x.parquet"}
    assert out.data.encoded_dir == str(tmp_path / "cache")
    assert out.run.dir == str(tmp_path / "runs" / "demo")
    assert cfg.run.dir == "runs/demo"  # a copy: the given config is left alone
    assert resolve_paths(cfg, base=Path("/elsewhere")).run.dir == "/elsewhere/runs/demo"


def test_uris_hub_ids_tiny_and_unset_values_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config.model_validate({
        "model": {"backbone": "Qwen/Qwen2-VL-2B-Instruct"},
        "data": {"root": "s3://bucket/data", "sources": {"a": "gs://b/a", "b": "file:///srv/b"}, "encoded_dir": ""},
        "run": {"dir": "s3://bucket/runs/x"}})
    out = resolve_paths(cfg)
    assert out.model_dump() == cfg.model_dump()
    assert out.model.model_fields_set == cfg.model.model_fields_set  # nothing newly "explicit"
    (tmp_path / "tiny").mkdir()  # even where a folder of that name exists
    assert resolve_paths(Config.model_validate({"model": {"backbone": "tiny"}})).model.backbone == "tiny"
    assert resolve_paths(Config()).data.root is None and resolve_paths(Config()).data.encoded_dir is None


def test_load_config_returns_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", ["data.root=runs/demo/data", "data.sources={x: a.parquet}"])
    assert cfg.data.root == str(tmp_path / "runs" / "demo" / "data")
    assert cfg.data.sources == {"x": str(tmp_path / "a.parquet")}
    assert Path(cfg.run.dir).is_absolute() and Path(cfg.run.dir).parent == tmp_path / "runs"
    assert cfg.model.backbone == "tiny"


def test_sweep_heldout_data_becomes_absolute(tmp_path, monkeypatch):
    from tune.config import load_harness

    monkeypatch.chdir(tmp_path)
    harness, cfg = load_harness(None, ["heldout.data=canonical:held", "data.root=train"])
    assert harness.heldout.root == str(tmp_path / "held") and cfg.data.root == str(tmp_path / "train")
