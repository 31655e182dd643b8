"""Training and batch embedding on a simulated 3-node Ray cluster (`ray.cluster_utils.Cluster`)
agree with the same jobs on one node: the Train workers really sit on different nodes
(STRICT_SPREAD), and neither the losses nor the embeddings depend on where the work ran."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# A fresh 3-node Ray cluster in a subprocess, and the same jobs on the session's one-node Ray.

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("multinode_script.py")
STARTUP_FAILED = 75  # multinode_script.STARTUP_FAILED


def run_script(mode: str, out: Path, data: Path, model: Path) -> dict:
    # A subprocess per mode: the simulated cluster needs a driver of its own, and this process may
    # already hold the session's Ray (the ray_session fixture).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = subprocess.run([sys.executable, str(SCRIPT), mode, str(out), str(data), str(model)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{mode} run still going after {e.timeout} s:\n{(e.stderr or b'')[-3000:]!r}")
    if done.returncode == STARTUP_FAILED:  # a failure, not a skip: the suite would pass without the check
        pytest.fail(f"the simulated Ray cluster did not start here (load average {os.getloadavg()[0]:.0f}):\n"
                    f"{done.stderr[-1500:]}")
    assert done.returncode == 0, f"{mode} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_model_dir, ray_session) -> dict[str, dict]:
    from multinode_script import run_jobs

    from vipoly.data.synthetic import main as synthetic

    data = tmp_path_factory.mktemp("mn_data")
    synthetic(["--out", str(data), "--n", "200", "--seed", "0"])
    multi = run_script("multi", tmp_path_factory.mktemp("mn_multi"), data, tiny_model_dir)
    single = run_jobs("single", tmp_path_factory.mktemp("mn_single"), str(data), str(tiny_model_dir))
    return {"multi": multi, "single": single}


def test_train_workers_ran_on_different_nodes(results):
    multi, single = results["multi"], results["single"]
    assert len(multi["nodes"]) == 3 and len(single["nodes"]) == 1
    # One entry per Train worker actor ever started (a restarted group adds two more).
    workers = multi["train_worker_nodes"]
    assert len(workers) >= 2 and len(workers) % 2 == 0, workers
    assert len(set(workers)) >= 2 and set(workers) <= set(multi["nodes"]), (workers, multi["nodes"])
    assert set(single["train_worker_nodes"]) == set(single["nodes"])


def test_losses_match_single_node(results):
    multi, single = results["multi"]["losses"], results["single"]["losses"]
    assert sorted(multi) == sorted(single) == ["1", "2", "3", "4"]
    for step in single:
        assert abs(multi[step] - single[step]) <= 1e-5, (step, multi[step], single[step])


def test_embeddings_match_single_node(results):
    multi, single = results["multi"]["embeddings"], results["single"]["embeddings"]
    assert sorted(multi) == sorted(single) == ["t0", "t1", "t2", "t3"]
    for key in single:
        a, b = np.asarray(multi[key]), np.asarray(single[key])
        assert a.shape == b.shape and np.isfinite(a).all()
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
