"""Data parallelism over gloo on CPU: two workers x batch b train exactly like one worker x 2b."""
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
    dist = DistContext.from_env("cpu")
    train(cfg, dist)
    torch.distributed.destroy_process_group()


def test_two_gloo_workers_match_one_worker_with_twice_the_batch(make_config, tmp_path):
    common = {"data.tasks": "sst,sts", "data.max_train_rows": 44, "optim.epochs": 1}   # 5 full steps + 4 left
    one = make_config(out=str(tmp_path / "one"), **common, **{"optim.batch_size": 8})
    two = make_config(out=str(tmp_path / "two"), **common, **{"optim.batch_size": 4})
    torch.set_num_threads(1)
    r1 = train(one)
    mp.spawn(_worker, args=(2, free_port(), two.to_dict()), nprocs=2, join=True)
    a = checkpoint.load(checkpoint.latest(one.out))
    b = checkpoint.load(checkpoint.latest(two.out))
    assert a["step"] == b["step"] == r1["steps"] == 6
    worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert worst < 5e-6, worst
    assert a["state"]["history"][0]["metrics"]["sts/pearson"] == pytest.approx(
        b["state"]["history"][0]["metrics"]["sts/pearson"], abs=1e-5)
