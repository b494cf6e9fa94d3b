"""Run on a machine with CUDA: every loss-combination method trains there in every precision,
mixed precision stays within a stated tolerance of fp32 (the same bounds as on CPU,
tests/unit/test_train.py), a resumed run equals an uninterrupted one, a step syncs the host
at most a fixed number of times, and two workers over nccl equal one worker with twice the
batch (where there are two GPUs)."""
import json
import math
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from mtl import checkpoint
from mtl.config import RunConfig
from mtl.dist import DistContext
from mtl.stop import StopSignal, TrialStopped
from mtl.train import train
from tests.helpers import first_step_gradients
from tests.unit.test_dist import free_port
from tests.unit.test_stop import stop_at_first_checkpoint

METHODS = {
    "sum": {},
    "scalarize": {"combiner.combiner": "scalarize", "combiner.alpha": 0.3},
    "pcgrad": {"combiner.combiner": "pcgrad"},
    "pcgrad-representation": {"combiner.combiner": "pcgrad", "combiner.pcgrad_on": "representation"},
    "uncertainty": {"combiner.combiner": "uncertainty", "combiner.combiner_lr": 0.05},
    "dtp": {"combiner.combiner": "dtp"},
}


FIELD = ["upgrad", "mgda", "cagrad", "nash_mtl", "imtl_g", "aligned_mtl", "dualproj", "gradvac", "graddrop",
         "fairgrad", "excess_mtl", "config", "rgw", "gradnorm", "rlw", "dwa", "imtl_l", "geomean", "stch", "famo"]


@pytest.mark.parametrize("method", FIELD)
def test_the_field_s_methods_train_on_cuda_in_bf16(make_config, device, method):
    # The numbers' exactness is tests/unit/test_aggregators.py's; this is the CUDA path (the
    # broadcast of a solver's weights, fork_rng on the device, ExcessMTL's history on the GPU).
    res = train(make_config(device=device, precision="bf16", **{"data.tasks": "sst,para,sts", "optim.max_steps": 3,
                                                                "combiner.combiner": method}))
    assert res["steps"] == 3 and res["status"] == "done"
    assert res["peak_memory_kind"] == ("cuda_allocated" if device == "cuda" else "cpu_rss")
    assert all(math.isfinite(v) for v in res["best"]["metrics"].values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_cuda(make_config, device, method, precision):
    res = train(make_config(device=device, precision=precision, **{"data.tasks": "sst,para", "optim.max_steps": 6},
                            **METHODS[method]))
    assert res["steps"] == 6 and res["status"] == "done"
    assert all(math.isfinite(v) for v in res["best"]["metrics"].values())
    assert res["skipped_steps"] <= 2        # fp16: the scaler may skip while it finds its scale
    if device == "cuda":
        assert torch.cuda.max_memory_allocated() > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_trial_trains_on_cuda_with_three_tasks(make_config, device, precision):
    res = train(make_config(device=device, precision=precision, **{"data.tasks": "sst,para,sts", "optim.max_steps": 6}))
    assert res["steps"] == 6
    assert all(math.isfinite(v) for v in res["best"]["metrics"].values())


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 0.01), ("fp16", 0.002)])
def test_cuda_gradients_match_cpu_fp32_within_tolerance(make_config, device, precision, tolerance):
    common = {"data.tasks": "para,sts", "data.max_train_rows": 8}
    reference = first_step_gradients(make_config(**common, device="cpu"))
    got = first_step_gradients(make_config(**common, device=device, precision=precision))
    error = float((got - reference).norm() / reference.norm())
    assert error < tolerance, error


@pytest.mark.parametrize("method", ["sum", "pcgrad", "pcgrad-representation", "uncertainty"])
def test_cuda_training_matches_cpu_fp32_for_each_method(make_config, tmp_path, device, method):
    """A few fp32 steps on the GPU land where the same steps on the CPU land: the method's
    arithmetic on the GPU is the CPU's, up to rounding (no tensor left on the wrong device,
    no step computed differently)."""
    common = {"data.tasks": "sst,sts", "optim.max_steps": 4, "precision": "fp32", **METHODS[method]}
    cpu = train(make_config(out=str(tmp_path / "cpu"), device="cpu", **common))
    gpu = train(make_config(out=str(tmp_path / "gpu"), device=device, **common))
    a = checkpoint.load(checkpoint.latest(str(tmp_path / "cpu")))["model"]
    b = checkpoint.load(checkpoint.latest(str(tmp_path / "gpu")))["model"]
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-4, worst
    assert cpu["steps"] == gpu["steps"] == 4


def test_a_resumed_cuda_run_equals_an_uninterrupted_one(make_config, tmp_path, device):
    common = {"data.tasks": "sst,para", "data.max_train_rows": 40, "optim.epochs": 2, "save_every_steps": 3,
              "precision": "bf16", "combiner.combiner": "pcgrad"}
    # Deterministic kernels where torch has them (warn_only: attention backward may have none),
    # so a replay from the checkpoint takes the same path; compared within rounding, not bits.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        whole = train(make_config(out=str(tmp_path / "whole"), device=device, **common))
        cfg = make_config(out=str(tmp_path / "cut"), device=device, **common)
        stop = StopSignal()
        with pytest.raises(TrialStopped):
            train(cfg, on_checkpoint=stop_at_first_checkpoint(stop), stop=stop)
        resumed = train(cfg)
    finally:
        torch.use_deterministic_algorithms(False)
    assert resumed["resumed_from_steps"] == [3]
    assert resumed["steps"] == whole["steps"]
    a = checkpoint.load(checkpoint.latest(str(tmp_path / "whole")))["model"]
    b = checkpoint.load(checkpoint.latest(str(tmp_path / "cut")))["model"]
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-6, worst
    for x, y in zip(resumed["epochs"], whole["epochs"]):
        assert x["metrics"] == pytest.approx(y["metrics"], abs=1e-6)


@pytest.mark.parametrize("method, most", [("sum", 2), ("pcgrad", 3)])
def test_a_training_step_syncs_the_host_at_most(make_config, monkeypatch, device, method, most):
    """The step's host syncs: the losses for the divergence guard (one, for all tasks) and the
    gradient norm for the non-finite guard; PCGrad adds its T x T Gram matrix.  A float() per
    micro-batch would show up here as more."""
    if device != "cuda":
        pytest.skip("counts CUDA synchronisations")
    import mtl.trainer as trainer

    counts, real = [], trainer.Trainer.step

    def counting(*args, **kwargs):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return real(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                counts.append(sum("synchroniz" in str(w.message) for w in seen))

    monkeypatch.setattr(trainer.Trainer, "step", counting)
    train(make_config(device=device, precision="bf16", **{"data.tasks": "sst,para", "optim.max_steps": 5,
                                                           "combiner.conflict_every": 0, "optim.grad_accum": 2},
                      **METHODS[method]))
    assert len(counts) == 5 and max(counts[1:]) <= most, counts


def _nccl_worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = RunConfig.from_dict(cfg_dict)
    results = train(cfg, DistContext.from_env("auto"))
    with open(os.path.join(cfg.out, f"rank-{rank}.json"), "w") as fh:
        json.dump({"digest": results["weights_digest"]}, fh)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("method", ["sum", "pcgrad", "uncertainty"])
def test_two_nccl_workers_match_one_worker_with_twice_the_batch(make_config, tmp_path, device, method):
    if device != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs for 2 nccl workers; this machine has "
                    f"{torch.cuda.device_count() if device == 'cuda' else 0}")
    common = {"data.tasks": "sst,sts", "data.max_train_rows": 44, "optim.epochs": 1, "precision": "fp32",
              **METHODS[method]}
    one = make_config(out=str(tmp_path / "one"), device="cuda:0", **common, **{"optim.batch_size": 8})
    two = make_config(out=str(tmp_path / "two"), device="auto", **common, **{"optim.batch_size": 4, "parallel.workers": 2})
    train(one)
    mp.spawn(_nccl_worker, args=(2, free_port(), two.to_dict()), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"], "replicas drifted apart"
    a = checkpoint.load(checkpoint.latest(one.out))["model"]
    b = checkpoint.load(checkpoint.latest(two.out))["model"]
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 5e-5, worst
