"""Run on a machine with CUDA: the trial trains on the GPU, and mixed precision there stays
within a stated tolerance of fp32 (the same bounds as on CPU, tests/unit/test_train.py)."""
import math

import pytest
import torch

from mtl.train import train
from tests.helpers import first_step_gradients


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_trial_trains_on_cuda(make_config, precision):
    res = train(make_config(device="cuda", precision=precision, **{"data.tasks": "sst,para,sts", "optim.max_steps": 6}))
    assert res["steps"] == 6
    assert all(math.isfinite(v) for v in res["best"]["metrics"].values())
    assert torch.cuda.max_memory_allocated() > 0


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 0.01), ("fp16", 0.002)])
def test_cuda_gradients_match_cpu_fp32_within_tolerance(make_config, precision, tolerance):
    common = {"data.tasks": "para,sts", "data.max_train_rows": 8}
    reference = first_step_gradients(make_config(**common, device="cpu"))
    got = first_step_gradients(make_config(**common, device="cuda", precision=precision))
    error = float((got - reference).norm() / reference.norm())
    assert error < tolerance, error
