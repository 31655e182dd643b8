"""A worker's training batches: prefetching in a background thread changes neither the batches
nor the recorded position, and a stream restored from a position continues where it stopped."""
from __future__ import annotations

import pytest
import torch

from vipoly.config import load_config
from vipoly.data.stream import build_plan
from vipoly.model.inputs import write_inputs
from vipoly.train.batches import Prefetcher, TrainStream

TINY = "configs/tiny-cpu.yaml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from vipoly.data.synthetic import main as synthetic

    out = tmp_path_factory.mktemp("syn")
    synthetic(["--out", str(out), "--n", "120", "--seed", "3"])
    return out


def stream(data_root, model_dir, prefetch: int, in_tasks: bool = False) -> TrainStream:
    cfg = load_config(TINY, [f"data.root={data_root}", f"model.backbone={model_dir}", "train.num_workers=1",
                             f"data.prefetch_batches={prefetch}", "train.batch_size=4", f"run.dir={data_root}/run",
                             f"data.decode_in_tasks={str(in_tasks).lower()}",
                             "data.decode_task_cpus=3"])  # 2 tasks at once of the session's 8 CPUs, not 7
    write_inputs(cfg)  # as pipelines.train does before the workers start
    return TrainStream(cfg, build_plan(cfg), rank=0, world=1)


def same(a: dict, b: dict) -> bool:
    return a["id"] == b["id"] and all(torch.equal(a["inputs"][k], b["inputs"][k]) for k in a["inputs"]) \
        and torch.equal(a["task_ids"], b["task_ids"]) and torch.equal(a["scores"].nan_to_num(-1), b["scores"].nan_to_num(-1))


def test_prefetched_batches_and_positions_equal_inline_ones(ray_session, data_root, tiny_model_dir):
    """Inline: no prefetch, images decoded in this process (a CPU run's default); ahead: 3 batches
    prefetched by a thread that hands the images to Ray tasks (a GPU run's way)."""
    inline, ahead = stream(data_root, tiny_model_dir, 0), stream(data_root, tiny_model_dir, 3, in_tasks=True)
    try:
        for _ in range(5):
            a, b = inline.next_batch(), ahead.next_batch()
            assert same(a, b)
            # the position is the one after the batch handed out, not after what was prefetched
            assert ahead.state_dict() == inline.state_dict()
        assert ahead.state_dict()["chunk"] == 5 and sum(ahead.state_dict()["taken"].values()) == 20
        position = ahead.state_dict()
        expected = [inline.next_batch() for _ in range(2)]
        ahead.load_state_dict(position)
        assert all(same(ahead.next_batch(), e) for e in expected)
    finally:
        inline.close()
        ahead.close()


def test_prefetch_errors_reach_the_consumer():
    made = iter([1, 2])

    def make():
        return next(made)  # the third call raises StopIteration

    p = Prefetcher(make, depth=1)
    assert [p.get(), p.get()] == [1, 2]
    with pytest.raises(StopIteration):
        p.get()
    p.close()
