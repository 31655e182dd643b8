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
    if importlib.util.find_spec("aiohttp") is None:
        pytest.skip("ray[default] (the job server) is not installed")
    try:
        address = rjh.start_head(tmp_path_factory.mktemp("rayjob"))
    except rjh.RayStartError as e:
        pytest.skip(f"`ray start --head` cannot run here: {e}")
    yield address
    rjh.stop()


def test_job_server_refuses_requests_without_the_token(head):
    assert rjh.http_status(f"{head}/api/jobs/", token=None) == 401
    assert rjh.http_status(f"{head}/api/jobs/", token="not-the-token") == 403


def test_submit_working_dir_runs_entrypoint_from_the_uploaded_repo(head):
    rc, logs = rjh.submit(head, f'python -c "{PROBE}"', working_dir=REPO)
    assert rc == 0, logs[-3000:]
    assert "probe-ok True" in logs
