"""DeepSpeed (CPU accelerator, gloo) trains exactly like plain PyTorch, for every ZeRO stage the
library supports, with PCGrad where its gradients stay whole, and resumes from its shards."""
import json
import os

import pytest
import torch.multiprocessing as mp

from mtl import checkpoint
from mtl.errors import ConfigError
from mtl.checks import check_run
from mtl.train import train
from test_dist import _worker, free_port  # noqa: E402


def weights(out):
    return checkpoint.load(checkpoint.latest(out))["model"]


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


COMMON = {"data.tasks": "sst,para", "data.max_train_rows": 24, "optim.epochs": 1, "optim.weight_decay": 0.01}


@pytest.mark.parametrize("stage,method", [(0, "sum"), (1, "sum"), (2, "uncertainty"), (1, "pcgrad"),
                                          (3, "dtp")])
def test_deepspeed_matches_plain_pytorch(make_config, tmp_path, stage, method):
    extra = {**COMMON, "combiner.combiner": method}
    ref = train(make_config(out=str(tmp_path / "torch"), **extra))
    ds = train(make_config(out=str(tmp_path / "ds"), **extra, **{"parallel.strategy": "deepspeed",
                                                                 "parallel.zero_stage": stage}))
    assert ds["steps"] == ref["steps"] == 6
    assert max_diff(weights(str(tmp_path / "torch")), weights(str(tmp_path / "ds"))) < 1e-5
    assert os.listdir(tmp_path / "ds" / "checkpoints" / "step-00000006" / "shards")


def test_pcgrad_is_refused_at_start_up_where_zero_partitions_gradients(make_config, tmp_path):
    cfg = make_config(**{"combiner.combiner": "pcgrad", "parallel.strategy": "deepspeed", "parallel.zero_stage": 2})
    with pytest.raises(ConfigError, match=r"^parallel.zero_stage: pcgrad needs every task's whole gradient.*stage 2"):
        check_run(cfg)
    for method in ("upgrad", "gradnorm", "graddrop"):      # every method on the task gradients
        cfg = make_config(**{"combiner.combiner": method, "parallel.strategy": "deepspeed", "parallel.zero_stage": 2})
        with pytest.raises(ConfigError, match=rf"^parallel.zero_stage: {method} needs every task's whole gradient"):
            check_run(cfg)
    cfg = make_config(**{"combiner.combiner": "uncertainty", "parallel.strategy": "deepspeed", "parallel.zero_stage": 3})
    with pytest.raises(ConfigError, match=r"^parallel.zero_stage: uncertainty reads its learnable loss weights outside "
                                          r"the model's forward, which ZeRO stage 3 partitions \(use --zero-stage 2"):
        check_run(cfg)
    with pytest.raises(ConfigError, match="parallel.zero_stage: 4 is not 0, 1, 2 or 3"):
        make_config(**{"parallel.zero_stage": 4, "parallel.strategy": "deepspeed"})


@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_resumes_from_its_shards(make_config, tmp_path, stage):
    extra = {**COMMON, "parallel.strategy": "deepspeed", "parallel.zero_stage": stage, "optim.epochs": 2}
    from mtl.stop import StopSignal, TrialStopped
    from tests.unit.test_stop import stop_at_first_checkpoint

    train(make_config(out=str(tmp_path / "whole"), **extra))
    stop = StopSignal()
    with pytest.raises(TrialStopped):        # the flag rises at epoch 1's checkpoint, as on preemption
        train(make_config(out=str(tmp_path / "cut"), **extra), on_checkpoint=stop_at_first_checkpoint(stop), stop=stop)
    res = train(make_config(out=str(tmp_path / "cut"), **extra))     # picks up after epoch 1
    assert res["steps"] == 12 and res["resumed_from_steps"] == [7]   # the step after the flag rose
    assert max_diff(weights(str(tmp_path / "whole")), weights(str(tmp_path / "cut"))) < 1e-6


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_deepspeed_workers_match_one_with_twice_the_batch(make_config, tmp_path, stage):
    extra = {**COMMON, "data.max_train_rows": 40, "parallel.strategy": "deepspeed", "parallel.zero_stage": stage}
    train(make_config(out=str(tmp_path / "one"), **extra, **{"optim.batch_size": 8}))
    two = make_config(out=str(tmp_path / "two"), **extra, **{"optim.batch_size": 4, "parallel.workers": 2})
    mp.spawn(_worker, args=(2, free_port(), two.to_dict()), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert max_diff(weights(str(tmp_path / "one")), weights(str(tmp_path / "two"))) < 5e-6
    shards = sorted(os.listdir(tmp_path / "two" / "checkpoints" / "step-00000005" / "shards"))
    assert [s for s in shards if "optim_states" in s] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
