"""Predictions from a trained trial's best model, in the leaderboard's format: on dev they
recompute the trial's recorded scores; a test split without labels gets predictions only."""
import json

import pytest

from mtl.data import read_split
from mtl.evaluate import main as evaluate_cli, read_predictions_csv
from mtl.tasks import TASKS
from mtl.train import train


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    from mtl.config import RunConfig

    out = tmp_path_factory.mktemp("evaluate") / "trial"
    cfg = RunConfig().replace(out=str(out), progress="off", **{
        "model.model": tiny_model_dir, "model.max_length": 32, "data.tasks": "sst,para,sts",
        "data.max_train_rows": 32, "data.max_dev_rows": 24, "optim.batch_size": 4, "optim.epochs": 2,
        "optim.lr": 1e-3, "precision": "bf16"})      # scored again under the trial's own autocast
    return cfg, train(cfg)


def test_dev_predictions_recompute_the_recorded_scores(trained, tmp_path, capsys):
    cfg, results = trained
    assert evaluate_cli([cfg.out, "--split", "dev", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    best = results["best"]["metrics"]
    assert printed["metrics"] == pytest.approx(best)
    for task, column in (("sst", "Predicted_Sentiment"), ("para", "Predicted_Is_Paraphrase"),
                         ("sts", "Predicted_Similiary")):
        text = (tmp_path / f"{task}-dev-output.csv").read_text()
        assert text.splitlines()[0] == f"id \t {column} "
        preds = read_predictions_csv(text)
        gold = read_split("embedded:sample", TASKS[task], "dev", max_rows=24)
        assert list(preds) == gold.ids                                         # every example, in file order
        if task != "sts":
            accuracy = sum(preds[i] == y for i, y in zip(gold.ids, gold.labels)) / len(gold.ids)
            assert accuracy == pytest.approx(best[f"{task}/acc"])
    from mtl import scores
    import torch

    sts = read_predictions_csv((tmp_path / "sts-dev-output.csv").read_text())
    gold = read_split("embedded:sample", TASKS["sts"], "dev", max_rows=24)
    r = scores.pearson(torch.tensor([sts[i] for i in gold.ids]), torch.tensor(gold.labels))
    assert r == pytest.approx(best["sts/pearson"], abs=1e-6)


def test_a_test_split_without_labels_gets_predictions_only(trained, tmp_path, capsys):
    from mtl.data import SAMPLE_DIR

    cfg, _ = trained
    data = tmp_path / "data"
    data.mkdir()
    for task in ("sst", "para", "sts"):
        lines = (SAMPLE_DIR / TASKS[task].file("dev")).read_text().splitlines()
        # Drop the label column (the last), as the course's *-test-student.csv files have none.
        (data / TASKS[task].file("test")).write_text("\n".join(l.rsplit("\t", 1)[0] for l in lines) + "\n")
    assert evaluate_cli([cfg.out + "/best", "--split", "test", "--data-dir", str(data), "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == {}
    preds = read_predictions_csv((tmp_path / "sst-test-output.csv").read_text())
    assert len(preds) == 100 and set(preds.values()) <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_a_folder_without_a_best_model_is_one_line(tmp_path, capsys):
    assert evaluate_cli([str(tmp_path), "--split", "dev"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: no best model (neither {tmp_path}/best/meta.json " \
                                              f"nor {tmp_path}/meta.json)"
