"""Session-wide fixtures: one tiny model, one Ray instance, the shared real eval data; the order
the suite runs its files in (heaviest first, for xdist)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# train_runs.py holds the DeepSpeed check both training modules run: its asserts explain themselves too.
pytest.register_assert_rewrite("train_runs")

REPO = Path(__file__).resolve().parents[1]
EVAL_DATA = Path(os.environ.get("VIPOLY_EVAL_DATA", REPO.parent / "shared" / "data" / "eval"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train V2's controller polls its workers every 2 s by default, and a fit ends only at the
# poll after the workers finish. Polling every 0.2 s cost ≈5 CPU-seconds a fit on 2 cores (22–25 s
# a 6-step fit against 19–21 s at 1 s, measured in one session): 1 s is the balance.
HEALTH_CHECK_S = "1"
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_S)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# As `vipoly.ray_init` does for a local instance: no preemption watcher actor (a process a fit, for
# a drain notice one machine never gets).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# No worker processes started ahead of need (Ray starts some when a driver connects and more for a
# backlog of leases; on 2 cores they take CPU from the tests and most are never used: 63 in one
# profiled suite run). test_embed_job + test_data_stream, twice each: 188–213 CPU-s against 200–222.
os.environ.setdefault("RAY_enable_worker_prestart", "0")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
# DeepSpeed's CPU communication op, built by `make setup` (scripts/build_ops.py) into the venv. Set
# before the session's Ray starts, so its workers (where deepspeed.comm loads the op) inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))


# The heaviest files first (seconds each, run alone on the 2-core CI machine at 5356dd2, the training
# module before its split: 441). `make test` runs two xdist workers (--dist loadfile
# --no-loadscope-reorder): a worker takes a whole file, so a module's shared runs are made once, and
# the next file in this order as it frees up, so that neither waits alone on a long file at the end.
# test_lower_bounds.py (its own pytest, ≈ 90 s) comes after test_packing.py, so that one of the two
# finds the compiled layers' kernels in the inductor cache, not both compiling them at once.
HEAVY_FIRST = ("test_train.py", "test_train_variants.py", "test_packing.py",  # 224, 217, 134
               "test_tune.py", "test_cluster_multinode.py", "test_cluster_job_submit.py",  # 82, 80, 79
               "test_lower_bounds.py",
               "test_data_stream.py", "test_embed_lance.py", "test_embed_job.py",  # 44, 40, 40
               "test_train_stream.py", "test_mine.py", "test_serve.py")  # 20, 18, 18


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(scope="session")
def eval_data() -> Path:
    """../shared/data/eval; a test that needs it fails (it is not skipped) saying where it looked."""
    if not EVAL_DATA.is_dir():
        pytest.fail(f"real eval data not found at {EVAL_DATA} (set VIPOLY_EVAL_DATA)")
    return EVAL_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL-architecture PolyEmbedder, built once per session."""
    from vipoly.model.tiny import build_tiny

    out = tmp_path_factory.mktemp("tiny_model")
    build_tiny(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from vipoly.model import PolyEmbedder

    return PolyEmbedder.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="session")
def plain_qwen_dir(tiny_model, tmp_path_factory) -> Path:
    """A Qwen2-VL checkpoint as the hub ships one (LM head, no task tokens, no vipoly.json): the
    tiny architecture with random weights and a tokenizer with no spare rows."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from vipoly.model.processor import save_processor
    from vipoly.model.tiny import corpus, train_tokenizer

    out = tmp_path_factory.mktemp("plain") / "qwen"  # the model is named after its folder
    tokenizer = train_tokenizer(corpus())
    config = tiny_model.backbone.config.to_dict()
    config["text_config"]["vocab_size"] = len(tokenizer)  # no spare rows: the task tokens need a resize
    torch.manual_seed(1)
    Qwen2VLForConditionalGeneration(Qwen2VLConfig(**{k: v for k, v in config.items()
                                                     if k not in ("architectures", "transformers_version")})
                                    ).save_pretrained(out)
    save_processor(tiny_model.processor.__class__(image_processor=tiny_model.processor.image_processor,
                                                  tokenizer=tokenizer), out)
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The training tests' synthetic data (200 rows shared by the tasks, seed 0), made once per module."""
    from vipoly.data.synthetic import main as synthetic

    out = tmp_path_factory.mktemp("syn")
    synthetic(["--out", str(out), "--n", "200", "--seed", "0"])
    return out


@pytest.fixture(scope="module")
def init_model(tiny_model_dir) -> Path:
    """The folder the training tests start from."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole session, with more logical CPUs than cores so that
    fractional Train workers and Ray Data stages can run side by side on 2 cores."""
    import ray

    tmp = Path("/tmp") / f"vipoly-ray-{os.getpid()}"  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=str(tmp), log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": HEALTH_CHECK_S,
                                       "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()
