"""cluster.yaml passes Ray's own launcher validation (offline, no AWS) and keeps the promises its
header makes; the KubeRay manifests carry what KubeRay needs and as many GPUs as the configs and
commands they run ask for; the commands in docs/cluster.md name real config keys and flags."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from vipoly.config import load_config

REPO = Path(__file__).resolve().parents[1]
IMAGE_REPO_DIR = "/home/ray/vipoly"  # where k8s/Dockerfile puts the repository
SHARED = "/mnt/shared"


# ---------------------------------------------------------------- cluster.yaml (Ray cluster launcher)
@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _validate(cfg: dict) -> dict:
    """What `ray up` does before touching the cloud: merge the provider's defaults, then check the
    result against ray/autoscaler/ray-schema.json plus Ray's own cross-field rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(cfg))
    validate_config(full)
    return full


def test_cluster_yaml_passes_ray_launcher_validation(cluster):
    full = _validate(cluster)
    assert full["provider"]["type"] == "aws"
    assert full["head_node_type"] in full["available_node_types"]


@pytest.mark.parametrize("break_it", [
    lambda c: c.update(max_worker=4),                                              # misspelled key
    lambda c: c["available_node_types"]["gpu_h100x8"].update(min_worker=1),       # misspelled, nested
    lambda c: c["available_node_types"]["gpu_h100x8"]["resources"].update(GPU=0.5),  # must be an int
    lambda c: (c["available_node_types"]["cpu_data"].update(min_workers=2),
               c.update(max_workers=1)),                                           # < sum of min_workers
])
def test_validation_catches_a_broken_copy(cluster, break_it):
    import jsonschema

    broken = copy.deepcopy(cluster)
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate(broken)


def test_no_port_is_opened_to_the_world(cluster):
    # A node type with neither SecurityGroupIds nor a launch template (whose network interfaces carry
    # the group) makes Ray create its default group, which allows SSH from 0.0.0.0/0.
    for name, node_type in cluster["available_node_types"].items():
        node_config = node_type["node_config"]
        assert "SecurityGroupIds" in node_config or "LaunchTemplate" in node_config, name
    rules = cluster["provider"].get("security_group", {}).get("IpPermissions", [])
    assert "0.0.0.0/0" not in str(rules) and "::/0" not in str(rules)
    assert cluster["provider"]["use_internal_ips"] is True


def test_head_takes_no_work_and_serves_the_dashboard_on_localhost_only(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


def test_every_ray_process_runs_with_token_auth(cluster):
    for cmd in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert "~/.ray/auth_token" in cluster["file_mounts"]


def test_node_types_keep_the_common_setup(cluster):
    # A node type's own worker_setup_commands *replace* setup_commands for that type (Ray's
    # autoscaler looks the key up per type), which would skip the venv, the EFS mount and the install.
    for name, node_type in cluster["available_node_types"].items():
        assert "worker_setup_commands" not in node_type, name


def test_setup_installs_the_project_with_the_ray_the_tests_use(cluster):
    setup = "\n".join(cluster["setup_commands"])
    assert cluster["file_mounts"]["~/vipoly"] == "."
    assert "pip install" in setup and "-e ~/vipoly" in setup
    pinned = re.findall(r"ray\[[a-z,]+\]==([0-9.]+)", setup)
    assert pinned == [ray.__version__], f"cluster.yaml pins ray {pinned}, tests run {ray.__version__}"


def test_reference_training_fits_one_gpu_node_and_runs_on_shared_storage(cluster):
    cfg = load_config(REPO / "configs" / "qwen2vl-2b.yaml")
    t = cfg.train
    gpu_node = cluster["available_node_types"]["gpu_h100x8"]
    assert t.resources.use_gpu
    assert t.num_workers * t.resources.gpus_per_worker <= gpu_node["resources"]["GPU"]  # one NVLink domain
    assert t.num_workers * t.resources.cpus_per_worker < gpu_node["resources"]["CPU"]  # CPUs left for Ray Data
    assert gpu_node["max_workers"] * gpu_node["resources"]["GPU"] >= 64  # docs/scale.md's largest case
    assert f"{SHARED} " in "\n".join(cluster["setup_commands"])  # the EFS mount
    assert cfg.run.dir.startswith(SHARED + "/") and cfg.data.root.startswith(SHARED + "/")


# ---------------------------------------------------------------- KubeRay manifests
def _manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted((REPO / "k8s").glob("*.yaml"))}


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    out = []
    for name, docs in _manifests().items():
        for doc in docs:
            if doc["kind"] == "RayCluster":
                out.append((name, doc["spec"]))
            elif doc["kind"] == "RayJob":
                out.append((name, doc["spec"]["rayClusterSpec"]))
    return out


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(group: dict) -> int:
    return sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in _containers(group))


def _cpus(group: dict) -> float:
    total = 0.0
    for c in _containers(group):
        q = str(c["resources"]["limits"]["cpu"])
        total += float(q[:-1]) / 1000 if q.endswith("m") else float(q)
    return total


def test_manifests_parse_and_declare_their_kind():
    found = {(d["apiVersion"], d["kind"]) for docs in _manifests().values() for d in docs}
    assert ("ray.io/v1", "RayCluster") in found and ("ray.io/v1", "RayJob") in found
    assert {"raycluster.yaml", "rayjob-train.yaml", "rayjob-embed.yaml"} <= set(_manifests())


@pytest.mark.parametrize("name,spec", _ray_cluster_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_ray_cluster_spec_has_the_required_fields(name, spec):
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # nothing exposed outside the k8s cluster
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert _gpus(head) == 0
    groups = spec["workerGroupSpecs"]
    assert any(_gpus(g) > 0 for g in groups), "no GPU worker group"
    for group in [head, *groups]:
        for c in _containers(group):
            assert c["image"] and c["resources"]["limits"] and c["resources"]["requests"] == c["resources"]["limits"]
            assert {"name": "shared", "mountPath": SHARED} in c["volumeMounts"]
    for g in groups:
        assert isinstance(g["rayStartParams"], dict) and g["groupName"]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        if _gpus(g):
            assert any(m["mountPath"] == "/dev/shm" for c in _containers(g) for m in c["volumeMounts"])


def test_every_pod_runs_the_image_the_dockerfile_builds():
    base = re.search(r"^FROM rayproject/ray:(\S+)", (REPO / "k8s" / "Dockerfile").read_text(), re.M)
    assert base and base.group(1).startswith(f"{ray.__version__}-")
    images = {c["image"] for _, spec in _ray_cluster_specs()
              for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]] for c in _containers(g)}
    assert len(images) == 1 and f"ray{ray.__version__}" in images.pop()


def _rayjob(name: str) -> dict:
    return _manifests()[name][0]["spec"]


def _entrypoint_args(spec: dict, module: str) -> list[str]:
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", module], argv
    assert (REPO / (module.replace(".", "/") + ".py")).is_file()
    return argv[3:]


def test_rayjob_train_has_the_gpus_and_cpus_its_config_asks_for():
    spec = _rayjob("rayjob-train.yaml")
    argv = _entrypoint_args(spec, "pipelines.train")
    config = argv[argv.index("--config") + 1].replace(IMAGE_REPO_DIR, str(REPO))
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    t = load_config(config, overrides).train
    gpu_groups = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if _gpus(g)]
    assert sum(_gpus(g) * g["replicas"] for g in gpu_groups) == t.num_workers * t.resources.gpus_per_worker
    for g in gpu_groups:
        workers_per_pod = _gpus(g) / t.resources.gpus_per_worker
        assert workers_per_pod == int(workers_per_pod)
        assert _cpus(g) > workers_per_pod * t.resources.cpus_per_worker
    assert load_config(config, overrides).run.dir.startswith(SHARED + "/")


def test_rayjob_embed_has_a_gpu_for_every_actor():
    spec = _rayjob("rayjob-embed.yaml")
    argv = _entrypoint_args(spec, "pipelines.embed")
    flags = dict(zip(argv[::2], argv[1::2]))
    need = int(flags["--num-actors"]) * float(flags["--num-gpus-per-actor"])
    have = sum(_gpus(g) * g["replicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert need <= have
    embed_src = (REPO / "pipelines" / "embed.py").read_text()
    assert all(f'"{f}"' in embed_src for f in flags), "a flag the manifest passes is not in pipelines/embed.py"


# ---------------------------------------------------------------- docs/cluster.md and README commands
def _doc_commands() -> list[list[str]]:
    text = (REPO / "docs" / "cluster.md").read_text() + (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    joined = "\n".join(b.replace("\\\n", " ") for b in blocks)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if "python -m pipelines." in line]


def test_docs_commands_use_real_config_keys_and_flags():
    commands = _doc_commands()
    assert {"pipelines.train", "pipelines.embed"} <= {a for c in commands for a in c if a.startswith("pipelines.")}
    for argv in commands:
        module = argv[argv.index("-m") + 1]
        args = argv[argv.index("-m") + 2:]
        if module == "pipelines.train":
            overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
            load_config(REPO / args[args.index("--config") + 1], overrides)  # raises on unknown keys
        src = (REPO / (module.replace(".", "/") + ".py")).read_text()
        for flag in (a for a in args if a.startswith("--") and a not in ("--config", "--set")):
            assert f'"{flag}"' in src, f"{module} has no {flag}"
