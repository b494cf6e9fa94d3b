"""The seed studies' metrics (mtl/scores.py, the specs' metric lists, mtl/evaluation.py): class-wise
scores by hand, metric names that list every key, and the leaderboard's overall score."""
from types import SimpleNamespace

import pytest
import torch

from mtl import scores, task_specs
from mtl.errors import ConfigError
from mtl.evaluation import metric_names, score
from mtl.tasks import TASKS, build

PRED = torch.tensor([0, 0, 1, 2, 2, 2, 1])
GOLD = torch.tensor([0, 1, 1, 2, 2, 0, 1])     # class 3 absent from gold and never predicted


def test_class_wise_scores_by_hand():
    # recalls: class 0: 1 of 2, class 1: 2 of 3, class 2: 2 of 2, class 3: 0/0 -> 0
    assert scores.per_class_recall(PRED, GOLD, 4) == pytest.approx([1 / 2, 2 / 3, 1.0, 0.0])
    assert scores.balanced_accuracy(PRED, GOLD, 4) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)   # over classes in gold
    # precisions: class 0: 1 of 2 predicted, class 1: 2 of 2, class 2: 2 of 3, class 3: 0/0 -> 0
    assert scores.precision_macro(PRED, GOLD, 4) == pytest.approx((1 / 2 + 1 + 2 / 3 + 0) / 4)
    assert scores.recall_macro(PRED, GOLD, 4) == pytest.approx((1 / 2 + 2 / 3 + 1 + 0) / 4)


def test_binary_precision_and_recall_of_the_positive_class_and_zero_over_zero():
    pred, gold = torch.tensor([1, 1, 1, 0, 0]), torch.tensor([1, 0, 1, 1, 0])
    assert scores.precision(pred, gold, 1) == pytest.approx(2 / 3) and scores.recall(pred, gold, 1) == pytest.approx(2 / 3)
    none = torch.zeros(4, dtype=torch.long)
    assert scores.precision(none, torch.tensor([1, 0, 1, 0]), 1) == 0.0       # nothing predicted positive
    assert scores.recall(none, none, 1) == 0.0                               # no positive in gold
    assert scores.balanced_accuracy(none, torch.tensor([0, 0, 0, 0]), 2) == 1.0   # class 1 absent: not averaged


def test_sst_and_para_specs_score_the_class_wise_metrics_after_their_primary_one():
    sst = TASKS["sst"]
    got = sst.metrics(PRED, GOLD.float())
    assert list(got) == list(sst.metric_names) and sst.metric_names[0] == sst.primary_metric == "acc"
    assert got["acc"] == pytest.approx(5 / 7)
    assert [got[f"acc_{k}"] for k in range(5)] == pytest.approx([1 / 2, 2 / 3, 1.0, 0.0, 0.0])
    assert got["balanced_acc"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert got["precision_macro"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 5)
    para = TASKS["para"]
    logits = torch.tensor([[2.0], [1.0], [-1.0], [0.5], [-3.0]])             # predicts 1 1 0 1 0
    gold = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    got = para.metrics(para.output(logits), gold)
    assert list(got) == list(para.metric_names) and para.primary_metric == "acc"
    assert got == pytest.approx({"acc": 3 / 5, "f1": 2 * 2 / (2 * 2 + 1 + 1), "balanced_acc": (1 / 2 + 2 / 3) / 2,
                                 "acc_0": 1 / 2, "acc_1": 2 / 3, "precision": 2 / 3, "recall": 2 / 3})


def spec(**fields):
    base = {"name": "nli", "text_columns": ["a", "b"], "label_column": "y", "kind": "classification",
            "labels": ["entailment", "not sure", "contradiction"]}
    return task_specs.normalise({**base, **fields}, "nli.yaml")


def test_a_user_spec_names_the_new_metrics_and_per_class_names_follow_its_labels():
    task = build(spec(metrics=["balanced_acc", "per_class_acc", "recall_macro"]))
    assert task.metric_names == ("balanced_acc", "acc_entailment", "acc_not_sure", "acc_contradiction", "recall_macro")
    got = task.metrics(torch.tensor([0, 1, 1]), torch.tensor([0.0, 1.0, 2.0]))
    assert list(got) == list(task.metric_names) and got["acc_contradiction"] == 0.0 and got["acc_not_sure"] == 1.0
    # Without a metrics field a spec gets the metrics specs had before (its identity as before).
    assert spec()["metrics"] == ["acc", "f1_macro"]
    assert task_specs.normalise({"name": "q", "text_columns": ["a"], "label_column": "y", "kind": "binary"},
                                "q.yaml")["metrics"] == ["acc", "f1"]


@pytest.mark.parametrize("fields, message", [
    ({"metrics": ["per_class_acc", "acc"]}, "primary_metric: 'per_class_acc' is one score per class"),
    ({"metrics": ["acc", "precision"]}, "metrics: .* is not a list of distinct metrics of a classification task"),
    ({"kind": "regression", "labels": None, "range": [0, 1], "metrics": ["balanced_acc"]}, "metrics:"),
])
def test_metrics_a_spec_cannot_name_are_refused_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        spec(**fields)


def dev(labels):
    return SimpleNamespace(labels=torch.tensor(labels, dtype=torch.float32))


def test_overall_is_the_leaderboards_formula_and_named_only_with_the_three_tasks():
    predictions = {"sst": torch.tensor([0, 1, 2, 2]), "para": torch.tensor([1, 0, 0, 1]),
                   "sts": torch.tensor([1.0, 2.0, 3.0, 5.0])}
    devs = {"sst": dev([0, 1, 1, 2]), "para": dev([1, 1, 0, 1]), "sts": dev([0.5, 2.5, 2.0, 4.5])}
    got = score(predictions, devs)
    assert got["sst/acc"] == 0.75 and got["para/acc"] == 0.75
    r = scores.pearson(predictions["sts"], devs["sts"].labels)
    assert 0 < r < 1
    assert got["overall"] == pytest.approx((0.75 + 0.75 + (r + 1) / 2) / 3)
    assert list(got) == metric_names(["sst", "para", "sts"])           # every key named, in order, overall last
    two = score({t: predictions[t] for t in ("sst", "para")}, devs)
    assert "overall" not in two and list(two) == metric_names(["sst", "para"])


def test_a_trial_selects_its_best_weights_by_overall(make_config):
    from mtl.train import train

    res = train(make_config(**{"data.tasks": "sst,para,sts", "select_metric": "overall", "optim.epochs": 2,
                               "data.max_train_rows": 8}))
    for record in res["epochs"]:
        m = record["metrics"]
        assert record["score"] == m["overall"] == pytest.approx(
            (m["sst/acc"] + m["para/acc"] + (m["sts/pearson"] + 1) / 2) / 3)
    assert res["best"]["score"] == max(r["score"] for r in res["epochs"])
