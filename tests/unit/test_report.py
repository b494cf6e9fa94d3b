"""The study report on synthetic results whose answers are known: a planted quadratic in α (its
maximum and R²), a planted significant and a planted insignificant change across seeds, a
missing and a failed trial, and the answers written from them."""
import csv
import io
import json

import pytest

from cluster import report
from mtl.config import RunConfig

SEEDS = (0, 1, 2)
BASE = {"sst": 0.5, "para": 0.8, "sts": 0.6}


def sst_change(w):            # planted: maximum +10% at the sst weight 0.6
    return -100 * (w - 0.6) ** 2 + 10


def para_change(w):           # planted: maximum +4% at the para weight 0.5
    return -100 * (w - 0.5) ** 2 + 4


def write_trial(root, name, tasks, scores, seed, combiner="sum", alpha=0.5, status="done", cos=None,
                conflict=None, predictions=None):
    cfg = RunConfig().replace(out=str(root / name), seed=seed, **{
        "data.tasks": tasks, "combiner.combiner": combiner,
        **({"combiner.alpha": alpha} if combiner == "scalarize" else {})})
    res = {"status": status, "config": cfg.to_dict(), "steps": 10}
    if status == "done":
        metrics = {}
        for t, v in scores.items():
            metrics[f"{t}/{ {'sst': 'acc', 'para': 'acc', 'sts': 'pearson'}[t] }"] = v
        res.update(best={"epoch": 1, "metrics": metrics}, grad_cos_mean={"pair": cos} if cos is not None else {},
                   grad_conflict_fraction=conflict)
    else:
        res["error"] = "step 2: the loss of task sst is nan (training diverged)"
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(res))
    if predictions:
        (root / name / "best").mkdir()
        (root / name / "best" / "meta.json").write_text("{}")
        (root / name / "best" / "dev_predictions.json").write_text(json.dumps(predictions))
    return name


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    names = []
    noise = {0: 1.0, 1: -1.5, 2: 0.8}             # planted insignificant: sts in sst+sts, mean +0.1%
    for s in SEEDS:
        for t, b in BASE.items():
            pred = {"sst": {"ids": ["a", "b", "c"], "pred": [0, 3, 3], "gold": [0, 3, 4]}} if t == "sst" else None
            names.append(write_trial(root, f"{t}-s{s}", t, {t: b}, s, predictions=pred))
        for alpha in (0.2, 0.4, 0.6, 0.8):
            pred = {"sst": {"ids": ["a", "b", "c", "d"], "pred": [0, 3, 3, 1], "gold": [0, 3, 4, 1]},
                    "para": {"ids": ["e", "f"], "pred": [1, 0], "gold": [1, 1]}}
            names.append(write_trial(root, f"sst+para-a{alpha}-s{s}", "sst,para",
                                     {"sst": BASE["sst"] * (1 + sst_change(alpha) / 100),
                                      "para": BASE["para"] * (1 + para_change(1 - alpha) / 100)},
                                     s, "scalarize", alpha, predictions=pred))
        names.append(write_trial(root, f"sst+para-sum-s{s}", "sst,para",
                                 {"sst": BASE["sst"] * 1.09, "para": BASE["para"] * 1.04}, s, cos=-0.2, conflict=0.6,
                                 predictions={"para": {"ids": ["e", "f", "g"], "pred": [1, 0, 0], "gold": [1, 1, 0]}}))
        planted = {0: 5.0, 1: 5.2, 2: 4.9}[s]    # planted significant: sst in sst+sts, +5.03%
        names.append(write_trial(root, f"sst+sts-sum-s{s}", "sst,sts",
                                 {"sst": BASE["sst"] * (1 + planted / 100), "sts": BASE["sts"] * (1 + noise[s] / 100)},
                                 s, cos=0.3, conflict=0.1))
    names.append(write_trial(root, "para+sts-sum-s0", "para,sts", {}, 0, status="failed"))
    names.append("sst+sts-pcgrad-s0")             # in the table, never run
    (root / "results.json").write_text(json.dumps([{"trial": n} for n in names]))
    out = report.write_report(str(root))
    return root, out


def read_csv(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_the_alpha_curve_finds_the_planted_maximum_and_fit(study):
    root, out = study
    fits = {(r["task"], r["pairing"]): r for r in read_csv(root / "report" / "alpha_fits.csv")}
    sst, para = fits[("sst", "sst+para")], fits[("para", "sst+para")]
    assert float(sst["r2"]) == pytest.approx(1.0) and float(sst["best_weight"]) == pytest.approx(0.6)
    assert float(sst["max_change_pct"]) == pytest.approx(10.0)
    assert float(para["best_weight"]) == pytest.approx(0.5) and float(para["r2"]) == pytest.approx(1.0)
    # A noisy curve: R² as numpy computes it for the same points.
    points = [(0.2, 1.0), (0.4, 3.0), (0.6, 2.5), (0.8, -1.0), (0.5, 2.0)]
    fit = report.fit_quadratic(points)
    import numpy as np

    w, y = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    residual = y - np.polyval(np.polyfit(w, y, 2), w)
    assert fit["r2"] == pytest.approx(1 - (residual ** 2).sum() / ((y - y.mean()) ** 2).sum())


def test_tables_changes_and_significance(study):
    root, _ = study
    rows = {(r["task"], r["grouping"], r["method"]): r for r in read_csv(root / "report" / "scores.csv")}
    best = rows[("sst", "sst+para", "α=0.6")]
    assert float(best["score_mean"]) == pytest.approx(0.55) and float(best["change_pct_mean"]) == pytest.approx(10.0)
    assert best["seeds"] == "3"
    planted = rows[("sst", "sst+sts", "addition")]
    assert float(planted["change_pct_mean"]) == pytest.approx(5.0333, abs=1e-3)
    assert planted["significant"] == "True" and float(planted["p_holm"]) < 0.05
    noise = rows[("sts", "sst+sts", "addition")]
    assert abs(float(noise["change_pct_mean"]) - 0.1) < 1e-6
    assert noise["significant"] == "False" and float(noise["p"]) > 0.5
    md = (root / "report" / "report.md").read_text()
    assert "| α=0.6 | 0.5500 ± 0.0000 (+10.0 ± 0.0%) * |  |" in md
    assert "| addition | 0.5450 ± 0.0000 (+9.0 ± 0.0%) * | 0.5252 ± 0.0008 (+5.0 ± 0.2%) * |" in md
    assert "paired t-test across seeds" in md


def test_missing_and_failed_trials_are_named_and_left_out(study):
    root, _ = study
    md = (root / "report" / "report.md").read_text()
    assert "29 trials: 27 done, 1 failed, 1 missing" in md
    assert "sst+sts-pcgrad-s0 (missing)" in md and "para+sts-sum-s0 (failed: step 2: the loss" in md


def test_answers_come_from_the_numbers(study):
    root, _ = study
    md = (root / "report" / "report.md").read_text()
    answers = md.split("## Answers")[1].split("##")[0]
    assert "**SEN** (sst): best partner **para** (+10.0% with α=0.6, significant)" in answers
    assert "best combiner **α=0.6** (mean change +10.0% over its 1 pairing)" in answers
    assert "sst+para with addition (sst +9.0%, para +4.0%)" in answers
    assert "sst+para with α=0.4" in answers and "sst+para with α=0.6" in answers
    assert "sst+para with α=0.2" not in answers               # para's weight 0.8: para harmed
    assert "**SIM** (sts): best partner **sst** (+0.1% with addition, not significant)" in answers


def test_figures_and_conflict(study):
    root, _ = study
    for name in ("change-sst.png", "change-para.png", "change-sts.png", "alpha-curves.png",
                 "conflict-vs-change.png", "best-sst.png", "best-para.png"):
        data = (root / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    conflict = {r["grouping"]: r for r in read_csv(root / "report" / "conflict.csv")}
    assert float(conflict["sst+para"]["cos_mean"]) == pytest.approx(-0.2)
    assert float(conflict["sst+para"]["conflict_fraction"]) == pytest.approx(0.6)
    assert float(conflict["sst+sts"]["change/sst"]) == pytest.approx(5.0333, abs=1e-3)
    md = (root / "report" / "report.md").read_text()
    assert "- SEN: **sst+para-a0.6-s0** (0.5500) ![best sst](best-sst.png)" in md
    assert "- PAR: **sst+para-sum-s0** (0.8320) ![best para](best-para.png)" in md
    assert "- SIM: **sst+sts-sum-s0** (0.6060): no dev predictions saved with its best weights" in md


def test_one_seed_claims_no_significance(tmp_path):
    write_trial(tmp_path, "sst-s0", "sst", {"sst": 0.5}, 0)
    write_trial(tmp_path, "para-s0", "para", {"para": 0.8}, 0)
    write_trial(tmp_path, "sst+para-sum-s0", "sst,para", {"sst": 0.6, "para": 0.7}, 0)
    report.write_report(str(tmp_path))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "With one seed no significance can be claimed" in md and " *" not in md.split("## Answers")[0]
    assert "(+20.0%)" in md and "(-12.5%)" in md
    assert "**PAR** (para): no partner helps; the least harm is with **sst** (-12.5% with addition)" in md


def test_a_study_on_any_fsspec_url(study):
    """The report reads trials and writes itself through fsspec: here a memory:// study."""
    import fsspec

    root, _ = study
    fs = fsspec.filesystem("memory")
    for path in root.rglob("*"):
        if path.is_file() and "report" not in path.parts:
            fs.pipe_file(f"/report-study/{path.relative_to(root)}", path.read_bytes())
    out = report.write_report("memory://report-study")
    assert out == "memory://report-study/report"
    md = fs.cat_file("/report-study/report/report.md").decode()
    assert "29 trials: 27 done, 1 failed, 1 missing" in md
    assert fs.cat_file("/report-study/report/alpha-curves.png")[:4] == b"\x89PNG"
