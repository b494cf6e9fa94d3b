"""The report on the seed studies' variants: a regulariser is a variant with its own baselines,
the leaderboard's overall score gets its table, and --per-task-best scores each task at its own
best evaluation."""
import json

import pytest

from cluster.report.cli import main
from tests.unit.test_report import read_csv, write_trial


def add_results(root, name, **fields):
    path = root / name / "results.json"
    res = json.loads(path.read_text())
    res.update(fields)
    path.write_text(json.dumps(res))


@pytest.fixture
def variant_study(tmp_path):
    root = tmp_path / "study"
    for seed in (0, 1):
        for reg, bump in (("none", 0.0), ("smart", 0.05)):
            settings = {} if reg == "none" else {"regularize.regularizer": reg}
            suffix = "" if reg == "none" else "-smart"
            for t, base in (("sst", 0.5), ("para", 0.8), ("sts", 0.6)):
                write_trial(root, f"{t}{suffix}-s{seed}", t, {t: base}, seed, settings=settings)
            scores = {"sst": 0.5 + bump, "para": 0.8, "sts": 0.6 + bump}
            name = write_trial(root, f"sst+para+sts{suffix}-s{seed}", "sst,para,sts", scores, seed, settings=settings)
            overall = (scores["sst"] + scores["para"] + (scores["sts"] + 1) / 2) / 3
            # each task's own best evaluation: sst peaked an epoch earlier than the trial's best
            add_results(root, name, best={"epoch": 2, "metrics": {**{f"{t}/{m}": scores[t] for t, m in
                                                                     (("sst", "acc"), ("para", "acc"), ("sts", "pearson"))},
                                                                  "overall": overall}},
                        best_by_task={"sst": {"epoch": 1, "step": 5, "metric": "sst/acc", "value": scores["sst"] + 0.1},
                                      "para": {"epoch": 2, "step": 10, "metric": "para/acc", "value": scores["para"]},
                                      "sts": {"epoch": 2, "step": 10, "metric": "sts/pearson", "value": scores["sts"]}})
    return root


def test_a_regulariser_is_a_variant_with_its_own_baselines_and_the_overall_score_is_tabled(variant_study):
    assert main([str(variant_study)]) == 0
    out = variant_study / "report"
    rows = {(r["task"], r["method"]): r for r in read_csv(out / "scores.csv") if r["grouping"] == "sst+para+sts"}
    assert float(rows[("sst", "addition, regularizer=smart")]["change_pct_mean"]) == pytest.approx(10.0)
    assert float(rows[("sst", "addition, regularizer=none")]["change_pct_mean"]) == pytest.approx(0.0)
    overall = {r["method"]: float(r["overall_mean"]) for r in read_csv(out / "overall.csv")}
    assert overall["addition, regularizer=smart"] == pytest.approx((0.55 + 0.8 + 1.65 / 2) / 3)
    assert overall["addition, regularizer=none"] == pytest.approx((0.5 + 0.8 + 1.6 / 2) / 3)
    assert "## The leaderboard's overall score" in (out / "report.md").read_text()


def test_per_task_best_scores_each_task_at_its_own_best_evaluation(variant_study, tmp_path):
    assert main([str(variant_study), "--per-task-best", "--out", str(tmp_path / "r")]) == 0
    rows = {(r["task"], r["method"]): r for r in read_csv(tmp_path / "r" / "scores.csv") if r["grouping"] == "sst+para+sts"}
    assert float(rows[("sst", "addition, regularizer=none")]["score_mean"]) == pytest.approx(0.6)
    assert float(rows[("para", "addition, regularizer=none")]["score_mean"]) == pytest.approx(0.8)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "each task's own best evaluation (--per-task-best)" in md


def test_per_task_best_refuses_results_without_them(variant_study, tmp_path):
    # single-task results written without best_by_task: named unreadable, with the reason
    assert main([str(variant_study), "--per-task-best", "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "sst-s0 (unreadable: its results have no per-task best epochs" in md
