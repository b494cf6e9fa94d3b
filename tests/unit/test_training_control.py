"""Training control beside the reference protocol: early stopping on the selection metric, the
per-task best epochs, and the optimizers a seed study may need beside AdamW."""
import json

import pytest
import torch

from mtl import checkpoint
from mtl.train import train


def test_early_stopping_ends_the_trial_at_the_patience_and_says_why(make_config, tmp_path):
    # A learning rate too small to move any score: the first evaluation is the only gain, so
    # with patience 2 the trial ends after its third epoch of six.
    cfg = make_config(out=str(tmp_path / "es"), **{"optim.epochs": 6, "optim.lr": 1e-12,
                                                  "optim.early_stop_patience": 2, "optim.early_stop_delta": 1e-4})
    res = train(cfg)
    assert [e["epoch"] for e in res["epochs"]] == [1, 2, 3]
    assert res["stopped_early"]["epoch"] == 3 and res["stopped_early"]["of_epochs"] == 6
    assert "--early-stop-patience 2" in res["stopped_early"]["reason"]
    assert res["best"]["epoch"] == 1
    saved = json.loads((tmp_path / "es" / "results.json").read_text())
    assert saved["stopped_early"] == res["stopped_early"]


def test_without_patience_or_with_gains_every_epoch_runs(make_config, tmp_path):
    res = train(make_config(out=str(tmp_path / "all"), **{"optim.epochs": 3, "optim.lr": 1e-12}))
    assert len(res["epochs"]) == 3 and "stopped_early" not in res
    # patience not reached before the last epoch: no early stop either
    res = train(make_config(out=str(tmp_path / "late"), **{"optim.epochs": 2, "optim.lr": 1e-12,
                                                           "optim.early_stop_patience": 1, "optim.early_stop_delta": 1e-4}))
    assert len(res["epochs"]) == 2 and "stopped_early" not in res


def test_results_name_each_tasks_best_epoch(make_config, tmp_path):
    res = train(make_config(out=str(tmp_path / "two"), **{"data.tasks": "sst,sts", "optim.epochs": 3}))
    for task, metric in (("sst", "sst/acc"), ("sts", "sts/pearson")):
        best = res["best_by_task"][task]
        values = [e["metrics"][metric] for e in res["epochs"]]
        assert best["metric"] == metric and best["value"] == max(values)
        assert best["epoch"] == res["epochs"][values.index(max(values))]["epoch"]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_other_optimizers_train_and_differ_from_adamw(make_config, tmp_path, optimizer):
    common = {"optim.max_steps": 3, "optim.weight_decay": 0.1}
    train(make_config(out=str(tmp_path / "adamw"), **common))
    res = train(make_config(out=str(tmp_path / optimizer), **common, **{"optim.optimizer": optimizer}))
    assert res["steps"] == 3
    a = checkpoint.load(checkpoint.latest(str(tmp_path / "adamw")))
    b = checkpoint.load(checkpoint.latest(str(tmp_path / optimizer)))
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) > 1e-6
    kind = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
    state = b["strategy"]["optimizer"]["state"]
    assert state and (("momentum_buffer" in next(iter(state.values()))) == (kind is torch.optim.SGD))
