"""pipelines.publish: the dry run checks the folder and lists what would go (real huggingface_hub,
no network); every refusal names the file or key; the upload sends exactly the listed files."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest


from pipelines import publish  # noqa: E402
from vipoly.model.card import CARD_FILE, write_card  # noqa: E402


@pytest.fixture
def folder(tiny_model_dir, tmp_path) -> Path:
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    write_card(model)
    return model


def _publish(model: Path, *extra: str) -> int:
    return publish.main(["--model", str(model), "--repo", "vipoly-test/tiny", *extra])


def test_dry_run_lists_the_files_and_sends_nothing(folder, capsys, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("a dry run must not reach the hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", no_network)
    assert _publish(folder, "--dry-run", "--private") == 0
    out = capsys.readouterr().out
    for name in ("model.safetensors", "heads.safetensors", "config.json", "vipoly.json", "modules.json",
                 "config_sentence_transformers.json", "tokenizer.json", "preprocessor_config.json", CARD_FILE):
        assert re.search(rf"\s{re.escape(name)}$", out, flags=re.M), name
    assert "(private)" in out and "library_name=sentence-transformers" in out
    assert re.search(r"total, \d+ files", out) and "nothing uploaded" in out
    assert "tagged pipeline-demo" in out and "'vipoly-tiny' is not a hub id" in out  # the tiny model is a demo


def test_upload_sends_exactly_the_checked_files(folder, monkeypatch, capsys):
    """The network end is replaced (no hub here): create_repo and one commit with every listed file."""
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["repo"] = (repo_id, kw)

    def create_commit(self, repo_id, operations, commit_message, **kw):
        calls["commit"] = (repo_id, sorted(op.path_in_repo for op in operations), commit_message)
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    assert _publish(folder, "--private") == 0
    assert calls["repo"] == ("vipoly-test/tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    repo, paths, message = calls["commit"]
    assert paths == sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert message == "vipoly: upload vipoly-tiny"


@pytest.mark.parametrize("breakage, expected", [
    (lambda m: (m / "pytorch_model.bin").write_bytes(b"\x80\x04"), r"pytorch_model.bin: pickle-capable file"),
    (lambda m: (m / "modeling_vipoly.py").write_text("import os\n"), r"modeling_vipoly.py: code file"),
    (lambda m: (m / CARD_FILE).unlink(), r"missing \['README.md'\]"),
    (lambda m: (m / "modules.json").unlink(), r"modules.json is missing"),
    (lambda m: (m / "heads.safetensors").write_bytes(b"not safetensors"), r"heads.safetensors: not a readable safetensors"),
    (lambda m: (m / CARD_FILE).write_text((m / CARD_FILE).read_text().replace("license: apache-2.0\n", "")),
     r"README.md: front matter lacks key\(s\) \['license'\]"),
    (lambda m: (m / CARD_FILE).write_text((m / CARD_FILE).read_text().replace("## Usage", "## How to")),
     r"README.md: missing section\(s\) \['## Usage'\]"),
    (lambda m: (m / "vipoly.json").write_text(json.dumps({"format": "inputs-only"})), r"vipoly.json: key 'format'"),
    (lambda m: (m / "vipoly.json").unlink(), r"not a saved model folder \(no vipoly.json"),
])
def test_refusals_name_the_file_or_key(folder, breakage, expected):
    breakage(folder)
    with pytest.raises(SystemExit, match=expected):
        _publish(folder, "--dry-run")


def test_bad_repo_and_missing_folder(folder, tmp_path):
    with pytest.raises(SystemExit, match=r"--repo 'no/such/repo'"):
        publish.main(["--model", str(folder), "--repo", "no/such/repo", "--dry-run"])
    with pytest.raises(SystemExit, match="expected ORG/NAME"):
        publish.main(["--model", str(folder), "--repo", "justaname", "--dry-run"])
    with pytest.raises(SystemExit, match="no such folder"):
        publish.main(["--model", str(tmp_path / "nope"), "--repo", "a/b", "--dry-run"])


def test_hidden_files_stay_behind(folder, monkeypatch, capsys):
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.bin").write_bytes(b"\x80")  # e.g. huggingface_hub's own download cache
    assert _publish(folder, "--dry-run") == 0
    assert ".cache" not in capsys.readouterr().out
