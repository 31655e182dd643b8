"""Run the tiny training job and a batch embedding job on one Ray, then write what they produced.

    python tests/multinode_script.py multi  OUT_DIR DATA_ROOT MODEL_DIR   # 3 simulated nodes
    python tests/multinode_script.py single OUT_DIR DATA_ROOT MODEL_DIR   # one local node

The multi-node mode runs in its own process because `ray.cluster_utils.Cluster` needs a fresh
driver and the pytest process already holds a Ray session; the test runs the one-node jobs in
that session (`run_jobs`). Both run the same code below, so the only difference between their
results is where Ray placed the work. OUT_DIR/result.json gets the per-step losses, the
embeddings by id and the node id of each Train worker.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Set before any Ray process starts, so the Train controller inherits it (the default 2 s poll
# adds up to 2 s to every fit; see conftest.py).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STARTUP_FAILED = 75  # the simulated cluster did not come up: an environment problem, not a result
TEXTS = ["xin chào thế giới", "a cat on a mat", "mô hình nhúng đa ngôn ngữ", "ray cluster test"]


def start_ray(mode: str, temp_dir: str):
    import ray

    if mode == "single":
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False)
        return None
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    # Cluster.add_node writes the head's address into Ray's default temp dir (/tmp/ray), which no
    # other run may have made on a fresh machine: without it every start fails the same way.
    Path(get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)

    # Ray gives each node a fixed 30 s to register; on a loaded machine that can pass, so try again
    # a few times and tell the test (exit code STARTUP_FAILED) if the cluster never comes up.
    for attempt in range(3):
        cluster = Cluster(initialize_head=False)
        try:
            cluster.add_node(num_cpus=1, include_dashboard=False, temp_dir=temp_dir)
            for _ in range(2):
                cluster.add_node(num_cpus=2)
            cluster.wait_for_nodes()
            break
        except Exception as e:  # Ray raises a bare Exception for a node start timeout
            cluster.shutdown()
            print(f"cluster start attempt {attempt + 1} failed: {e}", file=sys.stderr, flush=True)
    else:
        raise SystemExit(STARTUP_FAILED)
    ray.init(address=cluster.address, configure_logging=False)
    return cluster


def train_worker_nodes() -> list[str]:
    """Node ids of the Train workers of the fit that just ended, from the GCS actor table.
    (`ray.util.state` needs the dashboard, which these clusters run without.)"""
    from ray._private.state import actors

    return sorted(a["Address"]["NodeID"] for a in actors().values()
                  if a.get("ActorClassName") == "RayTrainWorker")


def read_embeddings(out: Path) -> dict[str, list[float]]:
    import pyarrow.parquet as pq

    rows = {}
    for f in sorted(out.glob("*.parquet")):
        if f.name.startswith(("_", ".")):
            continue
        t = pq.read_table(f, columns=["id", "embedding"]).to_pylist()
        rows.update({r["id"]: r["embedding"] for r in t})
    return rows


def run_jobs(mode: str, out: Path, data_root: str, model_dir: str) -> dict:
    """The training and embedding jobs on the Ray this process is connected to; their results."""
    import ray

    from pipelines import embed, train
    from vipoly.train.monitor import read_metrics

    out.mkdir(parents=True, exist_ok=True)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    run_dir = out / "run"
    rc = train.main(["--config", str(REPO / "configs" / "tiny-cpu.yaml"),
                     "--set", f"data.root={data_root}", "--set", f"run.dir={run_dir}",
                     "--set", f"model.backbone={model_dir}", "--set", "run.wandb=disabled",
                     "--set", "train.max_steps=4", "--set", "train.checkpoint.every=4",
                     "--set", "train.num_workers=2", "--set", "train.resources.cpus_per_worker=1",
                     # one worker per node where there are nodes; one node cannot spread
                     "--set", f"train.resources.placement_strategy={'STRICT_SPREAD' if mode == 'multi' else 'PACK'}"])
    if rc != 0:
        raise SystemExit(f"training exited with {rc}")
    workers = train_worker_nodes()
    texts = out / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": f"t{i}", "text": t}, ensure_ascii=False) + "\n"
                             for i, t in enumerate(TEXTS)))
    rc = embed.main(["--model", str(run_dir / "model"), "--input", str(texts), "--output", str(out / "emb")])
    if rc != 0:
        raise SystemExit(f"embedding exited with {rc}")
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    result = {"mode": mode, "nodes": nodes, "train_worker_nodes": workers, "losses": losses,
              "embeddings": read_embeddings(out / "emb")}
    (out / "result.json").write_text(json.dumps(result))
    print(f"multinode_script {mode}: {len(losses)} steps, workers on {workers}", flush=True)
    return json.loads((out / "result.json").read_text())  # as the test reads the other mode's (str keys)


def main(mode: str, out: Path, data_root: str, model_dir: str) -> None:
    import ray

    temp_dir = tempfile.mkdtemp(prefix="vpmn-", dir="/tmp")  # short: Ray's socket paths have a length limit
    cluster = start_ray(mode, temp_dir)
    try:
        run_jobs(mode, out, data_root, model_dir)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4])
