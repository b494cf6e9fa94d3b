"""Run on a machine with CUDA: the trial trains on the GPU in bf16 and fp16."""
import pytest
import torch

from mtl.train import train


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_trial_trains_on_cuda(make_config, precision):
    res = train(make_config(device="cuda", precision=precision, **{"data.tasks": "sst,para,sts", "optim.max_steps": 6}))
    assert res["steps"] == 6
    assert all(v == v for v in res["best"]["metrics"].values())
    assert torch.cuda.max_memory_allocated() > 0
