"""Data parallelism over gloo on CPU: two workers x batch b train exactly like one worker x 2b,
for every loss-combination method, and the replicas stay bit-identical."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mtl import checkpoint
from mtl.config import RunConfig
from mtl.dist import DistContext
from mtl.train import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(cfg_dict)
    results = train(cfg, DistContext.from_env("cpu"))
    with open(os.path.join(cfg.out, f"rank-{rank}.json"), "w") as fh:
        json.dump({"digest": results["weights_digest"], "steps": results["steps"]}, fh)
    torch.distributed.destroy_process_group()


METHODS = {
    "sum": {},
    "pcgrad": {"combiner.combiner": "pcgrad"},
    "uncertainty": {"combiner.combiner": "uncertainty", "combiner.combiner_lr": 0.05},
    "dtp": {"combiner.combiner": "dtp", "data.tasks": "sst,para"},   # accuracy KPIs add up exactly
}


@pytest.mark.parametrize("method", list(METHODS))
def test_two_gloo_workers_match_one_worker_with_twice_the_batch(make_config, tmp_path, method):
    common = {"data.tasks": "sst,sts", "data.max_train_rows": 44, "optim.epochs": 1, **METHODS[method]}
    one = make_config(out=str(tmp_path / "one"), **common, **{"optim.batch_size": 8})
    two = make_config(out=str(tmp_path / "two"), **common, **{"optim.batch_size": 4, "parallel.workers": 2})
    torch.set_num_threads(1)
    r1 = train(one)
    mp.spawn(_worker, args=(2, free_port(), two.to_dict()), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"], "replicas drifted apart"
    a = checkpoint.load(checkpoint.latest(one.out))
    b = checkpoint.load(checkpoint.latest(two.out))
    assert a["step"] == b["step"] == r1["steps"] == 6      # 44 rows, global batch 8: 5 full steps + 4 left
    worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert worst < 5e-6, worst
    for k in a["combiner"]:      # learnable weights and KPIs too
        assert torch.allclose(a["combiner"][k].double(), b["combiner"][k].double(), atol=1e-6), k


def test_pcgrad_representation_mode_keeps_replicas_identical(make_config, tmp_path):
    cfg = make_config(out=str(tmp_path / "two"), **{"data.tasks": "sst,para,sts", "data.max_train_rows": 24,
                                                     "combiner.combiner": "pcgrad",
                                                     "combiner.pcgrad_on": "representation",
                                                     "parallel.workers": 2})
    mp.spawn(_worker, args=(2, free_port(), cfg.to_dict()), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["steps"] == 3
