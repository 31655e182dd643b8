"""`ray job submit --working-dir .` against a local head on 127.0.0.1 with token auth, the way
docs/cluster.md tells users to submit to a cluster."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import ray_job_helper as rjh

REPO = Path(__file__).resolve().parents[1]

# Runs inside the job: the uploaded working dir is the cwd, `pipelines` (not installed) imports
# from it, and .venv, .git and runs/ (gitignored or excluded by Ray's defaults) stayed behind.
PROBE = ("import os, pipelines, vipoly; "
         "assert os.path.isfile('pyproject.toml'), os.getcwd(); "
         "assert not any(map(os.path.exists, ['.venv', '.git', 'runs'])), sorted(os.listdir()); "
         "print('probe-ok', os.path.dirname(pipelines.__file__) == os.getcwd() + '/pipelines')")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # A failure, not a skip (as the multinode fixture): the suite would pass without these checks.
    if importlib.util.find_spec("aiohttp") is None:
        pytest.fail("ray[default] (the job server) is not installed: run `make setup`")
    # Ray gives the head's raylet a fixed 30 s to register; on a loaded machine one more try.
    for attempt in range(2):
        try:
            address = rjh.start_head(tmp_path_factory.mktemp("rayjob"))
            break
        except rjh.RayStartError as e:
            if attempt:
                pytest.fail(f"`ray start --head` cannot run here: {e}")
    yield address
    rjh.stop()


def test_job_server_refuses_requests_without_the_token(head):
    assert rjh.http_status(f"{head}/api/jobs/", token=None) == 401
    assert rjh.http_status(f"{head}/api/jobs/", token="not-the-token") == 403


def test_submit_working_dir_runs_entrypoint_from_the_uploaded_repo(head):
    rc, logs = rjh.submit(head, f'python -c "{PROBE}"', working_dir=REPO)
    assert rc == 0, logs[-3000:]
    assert "probe-ok True" in logs


def test_submit_runs_the_tiny_training_job(head, tmp_path, tiny_model_dir):
    from vipoly.data.synthetic import main as synthetic
    from vipoly.train.monitor import read_metrics

    data, run_dir = tmp_path / "data", tmp_path / "runs" / "submitted"
    synthetic(["--out", str(data), "--n", "200", "--seed", "0"])
    # `python` inside the job is the PATH that the head (hence its job drivers) inherited: the head
    # was started with this venv's bin/ first on PATH, so this checks the job ran with the venv.
    entrypoint = ("python -m pipelines.train --config configs/tiny-cpu.yaml "
                  f"--set data.root={data} --set run.dir={run_dir} --set model.backbone={tiny_model_dir} "
                  "--set train.max_steps=3 --set train.checkpoint.every=3 --set run.wandb=disabled "
                  "--set train.num_workers=1 --set train.resources.cpus_per_worker=0.5")
    rc, logs = rjh.submit(head, entrypoint, working_dir=REPO,
                          runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}}, timeout_s=420)
    assert rc == 0, logs[-3000:]
    assert "done:" in logs, logs[-3000:]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert (run_dir / "model").is_dir()


def readme_serve_config() -> dict:
    """The Serve config file README.md tells users to `serve deploy` (its heredoc, parsed)."""
    import yaml

    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("cat > serve.yaml <<'YAML'\n") + len("cat > serve.yaml <<'YAML'\n")
    return yaml.safe_load(text[start:text.index("\nYAML\n", start)])


def test_serve_deploy_of_the_readme_config(head, tmp_path, tiny_model, tiny_model_dir):
    """README's `serve deploy serve.yaml --address …` on the local head, its config as written but
    for this machine's parts (loopback and a free port, the tiny model, no index, no GPU, one
    replica): the application answers /health and POST /v1/embeddings with `encode`'s vectors."""
    import time

    import httpx
    import numpy as np
    import yaml

    cfg = readme_serve_config()
    app = cfg["applications"][0]
    assert app["import_path"] == "vipoly.serve.app:app_builder" and cfg["http_options"]["host"] == "0.0.0.0"
    port = rjh.free_port()
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    args = {k: v for k, v in app["args"].items() if k != "index"}
    app["args"] = {**args, "model": str(tiny_model_dir), "gpus_per_replica": 0, "max_replicas": 1}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    done = rjh.serve_cli(head, "deploy", str(tmp_path / "serve.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        url, deadline, status = f"http://127.0.0.1:{port}", time.monotonic() + 180, None
        while time.monotonic() < deadline and status != 200:
            try:
                status = httpx.get(f"{url}/health", timeout=2).status_code
            except httpx.HTTPError:
                time.sleep(1)
        assert status == 200, rjh.serve_cli(head, "status").stdout
        texts = ["xin chào thế giới", "a cat on a mat"]
        resp = httpx.post(f"{url}/v1/embeddings", json={"model": "vipoly", "input": texts}, timeout=60)
        assert resp.status_code == 200, resp.text
        got = np.asarray([d["embedding"] for d in resp.json()["data"]])
        np.testing.assert_allclose(got, tiny_model.encode(texts), atol=1e-5)
    finally:
        rjh.serve_cli(head, "shutdown", "-y")
