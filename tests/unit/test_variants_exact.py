"""The model and loss variants stay exact: a trial using many at once (a shared layer, per-task
heads, second-to-last-layer pooling, mixed pair encoding with extra siamese features, class
weights, the cosine-embedding loss, MSE + Lasso, ReLU output, Adam) trains the same on 2 gloo
workers x b as on 1 x 2b and with gradient accumulation, and resumes exactly.  (The triplet
loss's in-batch negatives depend on the split: the one stated exception, mtl/losses.py.)"""
import json

import torch
import torch.multiprocessing as mp

from mtl import checkpoint
from mtl.train import train
from tests.unit.test_dist import _worker, free_port

VARIANTS = {"data.tasks": "sst,para,sts", "data.max_train_rows": 44, "optim.epochs": 1,
            "model.shared_layer": 24, "model.head_depth": "sst=0,sts=2", "model.head_activation": "sts=gelu",
            "model.pooling": "sst=mean_penultimate,para=mean", "model.pair_encoding": "para=siamese,sts=siamese",
            "model.siamese_features": "prod,cos", "model.regression_activation": "relu",
            "loss.class_weights": "balanced", "loss.task_loss": "para=cosine_embedding,sts=mse_lasso",
            "optim.optimizer": "adam"}


def weights(out):
    return checkpoint.load(checkpoint.latest(out))["model"]


def worst(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_many_variants_at_once_are_exact_across_workers_and_accumulation(make_config, tmp_path):
    torch.set_num_threads(1)
    one = make_config(out=str(tmp_path / "one"), **VARIANTS, **{"optim.batch_size": 8})
    acc = make_config(out=str(tmp_path / "acc"), **VARIANTS, **{"optim.batch_size": 4, "optim.grad_accum": 2})
    two = make_config(out=str(tmp_path / "two"), **VARIANTS, **{"optim.batch_size": 4, "parallel.workers": 2})
    r1, ra = train(one), train(acc)
    mp.spawn(_worker, args=(2, free_port(), two.to_dict()), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert r1["steps"] == ra["steps"] == ranks[0]["steps"] == 6
    w1 = weights(one.out)
    assert any(k.startswith("shared.") for k in w1) and "heads.para.net.1.weight" not in w1   # para: no head
    assert worst(w1, weights(acc.out)) < 5e-6
    assert worst(w1, weights(two.out)) < 5e-6
    plain = make_config(out=str(tmp_path / "plain"), **{k: VARIANTS[k] for k in ("data.tasks", "data.max_train_rows")},
                        **{"optim.batch_size": 8})
    train(plain)
    assert set(weights(plain.out)) != set(w1)        # the variants changed the model


def test_many_variants_resume_exactly(make_config, tmp_path):
    import pytest
    from mtl.stop import StopSignal, TrialStopped
    from tests.unit.test_stop import stop_at_first_checkpoint

    common = {**VARIANTS, "optim.epochs": 2}
    whole = train(make_config(out=str(tmp_path / "whole"), **common))
    cfg = make_config(out=str(tmp_path / "cut"), **common)
    stop = StopSignal()
    with pytest.raises(TrialStopped):               # the flag rises at epoch 1's checkpoint: stops after the next step
        train(cfg, on_checkpoint=stop_at_first_checkpoint(stop), stop=stop)
    resumed = train(cfg)
    assert resumed["resumed_from_steps"] == [whole["steps"] // 2 + 1] and resumed["steps"] == whole["steps"]
    assert resumed["weights_digest"] == whole["weights_digest"]


README_FLAGS = [
    ["--tasks", "sst,para,sts", "--pooling", "mean_penultimate", "--pair-encoding", "para=joint,sts=siamese",
     "--siamese-features", "prod,cos", "--head-depth", "sst=0,sts=2", "--head-activation", "gelu",
     "--head-dropout", "sst=0.1", "--head-widths", "sts=16", "--shared-layer", "24",
     "--regression-activation", "relu", "--class-weights", "balanced", "--task-loss", "sts=mse_lasso",
     "--lasso-weight", "0.02", "--optimizer", "sgd", "--momentum", "0.8", "--select-metric", "overall",
     "--early-stop-patience", "3", "--early-stop-delta", "0.001"],
    ["--tasks", "para", "--pair-encoding", "siamese", "--task-loss", "para=triplet", "--optimizer", "adam"],
    ["--tasks", "para", "--pair-encoding", "siamese", "--task-loss", "para=cosine_embedding", "--regularizer", "linf"],
    ["--tasks", "sst,sts", "--regularizer", "smart", "--smart-epsilon", "1e-4", "--smart-mu", "0.5",
     "--smart-beta", "0.9", "--smart-steps", "2", "--smart-sigma", "1e-5", "--smart-step", "1e-3", "--reg-weight", "2"],
    ["--tasks", "sst", "--regularizer", "l1"],
]


def test_the_readme_s_variant_flags_train_from_the_command_line(tiny_model_dir, tmp_path):
    from mtl.train import main
    from tests.unit.test_cli import base

    for i, flags in enumerate(README_FLAGS):
        out = tmp_path / f"run{i}"
        assert main(base(tiny_model_dir, out) + flags) == 0, flags
        res = json.loads((out / "results.json").read_text())
        assert res["status"] == "done"
        cfg = res["config"]
        assert cfg["data"]["tasks"] == flags[1].split(",")
    saved = json.loads((tmp_path / "run0" / "results.json").read_text())
    assert saved["config"]["model"]["shared_layer"] == 24 and "overall" in saved["best"]["metrics"]
    assert json.loads((tmp_path / "run3" / "results.json").read_text())["config"]["regularize"]["smart_steps"] == 2
