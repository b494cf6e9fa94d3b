"""The study report on synthetic results whose answers are known: a planted quadratic in α (its
maximum and R²), a planted significant and a planted insignificant change across seeds, a
missing and a failed trial, and the answers written from them; a combiner run on fewer
pairings; Δm by hand; planted dev predictions of known accuracy (a large change, a null one)
for the bootstrap; baselines of several sizes; the Pareto front of a planted α sweep; broken
results.json, study tables and prediction files."""
import csv
import io
import json

import numpy as np
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
                conflict=None, predictions=None, examples=None, settings=None, cost=None):
    cfg = RunConfig().replace(out=str(root / name), seed=seed, **{
        "data.tasks": tasks, "combiner.combiner": combiner,
        **({"combiner.alpha": alpha} if combiner == "scalarize" else {}), **(settings or {})})
    res = {"status": status, "config": cfg.to_dict(), "steps": 10, **(cost or {})}
    if examples is not None:
        res["examples_per_epoch"] = examples
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
    assert "best combiner **α=0.6** (mean change +10.0% over the 1 pairing all 5 combiners share: sst+para)" in answers
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


def test_one_seed_without_predictions_claims_no_significance(tmp_path):
    write_trial(tmp_path, "sst-s0", "sst", {"sst": 0.5}, 0)
    write_trial(tmp_path, "para-s0", "para", {"para": 0.8}, 0)
    write_trial(tmp_path, "sst+para-sum-s0", "sst,para", {"sst": 0.6, "para": 0.7}, 0)
    report.write_report(str(tmp_path))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Significance (one seed): a paired bootstrap over dev examples" in md
    assert "No interval for 2 of 2 changes: no dev predictions saved with its best weights" in md
    assert " *" not in md.split("## Answers")[0]
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


# --------------------------------------------------------------------------------------------
# Fair comparisons and Δm
# --------------------------------------------------------------------------------------------
def test_a_combiner_on_fewer_pairings_is_not_ranked_above_a_better_one(tmp_path):
    """addition: sst +6% with para, -4% with sts (mean +1%); PCGrad only with para, +3%.  Over its
    own pairings PCGrad's mean is higher; on the pairing both ran, addition is better for sst."""
    for t, b in BASE.items():
        write_trial(tmp_path, f"{t}-s0", t, {t: b}, 0)
    write_trial(tmp_path, "sst+para-sum-s0", "sst,para", {"sst": 0.53, "para": 0.76}, 0)      # +6%, -5%
    write_trial(tmp_path, "sst+sts-sum-s0", "sst,sts", {"sst": 0.48, "sts": 0.6}, 0)          # -4%, 0%
    write_trial(tmp_path, "sst+para-pcgrad-s0", "sst,para", {"sst": 0.515, "para": 0.824}, 0, "pcgrad")  # +3%, +3%
    report.write_report(str(tmp_path))
    md = (tmp_path / "report" / "report.md").read_text()
    answers = md.split("## Answers")[1].split("##")[0]
    assert ("**SEN** (sst): best partner **para** (+6.0% with addition); best combiner **addition** (mean change "
            "+6.0% over the 1 pairing all 2 combiners share: sst+para)") in answers
    assert "best combiner **PCGrad** (mean change +3.0% over the 1 pairing all 2 combiners share" in answers
    # Δm by hand: addition on sst+para (6 - 5) / 2 = 0.5; PCGrad (3 + 3) / 2 = 3; addition on sst+sts -2.
    dm = {(r["method"], r["grouping"]): r for r in read_csv(tmp_path / "report" / "delta_m.csv")}
    assert float(dm[("addition", "sst+para")]["delta_m_mean"]) == pytest.approx(0.5)
    assert float(dm[("PCGrad", "sst+para")]["delta_m_mean"]) == pytest.approx(3.0)
    assert float(dm[("addition", "sst+sts")]["delta_m_mean"]) == pytest.approx(-2.0)
    assert dm[("PCGrad", "sst+para")]["rank"] == "1" and dm[("addition", "sst+para")]["rank"] == "2"
    assert dm[("addition", "sst+sts")]["common"] == "False"
    ranking = md.split("## Methods ranked by Δm%")[1].split("##")[0]
    assert "Not run on every pairing: PCGrad (lacks sst+sts)." in ranking
    # Results without cost fields (written before trials recorded them) report, their cost n/a.
    assert "| 1 | PCGrad | +3.0% | n/a | +3.0% |  |" in ranking
    assert "| 2 | addition | +0.5% | n/a | +0.5% | -2.0% |" in ranking
    assert "**Best method by Δm%**: **PCGrad** (Δm +3.0% over the 1 pairing all 2 methods share)." in answers


def cost(step, peak):
    return {"step_time_s": step, "peak_memory_mb": peak, "peak_memory_kind": "cpu_rss", "backwards_per_step": 1.0,
            "cost_class": "one backward"}


def test_each_method_s_cost_is_shown_against_addition_on_the_same_tasks_and_settings(tmp_path):
    """Planted costs: on sst+para addition takes 0.2 and 0.3 s a step (seeds 0, 1; mean 0.25) at
    1,000 MB, PCGrad 0.5 and 0.6 s at 1,500 and 1,300 MB: x2.0 and x2.4, mean x2.20 time, x1.40
    memory.  On sst+sts addition ran on 2 workers, PCGrad on 1: no reference, no ratio.  On
    para+sts only uncertainty ran: absolute numbers.  The baselines predate cost recording."""
    for s in (0, 1):
        for t, b in BASE.items():
            write_trial(tmp_path, f"{t}-s{s}", t, {t: b}, s)
        write_trial(tmp_path, f"sst+para-sum-s{s}", "sst,para", {"sst": 0.55, "para": 0.82}, s,
                    cost=cost((0.2, 0.3)[s], 1000))
        write_trial(tmp_path, f"sst+para-pcgrad-s{s}", "sst,para", {"sst": 0.52, "para": 0.84}, s, "pcgrad",
                    cost=cost((0.5, 0.6)[s], (1500, 1300)[s]))
    write_trial(tmp_path, "sst+sts-sum-s0", "sst,sts", {"sst": 0.5, "sts": 0.6}, 0, cost=cost(0.3, 1000),
                settings={"parallel.workers": 2, "optim.batch_size": 4})     # the same global batch
    write_trial(tmp_path, "sst+sts-pcgrad-s0", "sst,sts", {"sst": 0.5, "sts": 0.6}, 0, "pcgrad", cost=cost(0.9, 1100))
    write_trial(tmp_path, "para+sts-uncertainty-s0", "para,sts", {"para": 0.8, "sts": 0.6}, 0, "uncertainty",
                cost=cost(0.4, 1200))
    report.write_report(str(tmp_path))
    rows = {(r["task"], r["grouping"], r["method"]): r for r in read_csv(tmp_path / "report" / "scores.csv")}
    pcgrad = rows[("sst", "sst+para", "PCGrad")]
    assert float(pcgrad["step_time_vs_addition"]) == pytest.approx(2.2)
    assert float(pcgrad["peak_memory_vs_addition"]) == pytest.approx(1.4)
    assert float(pcgrad["step_time_s"]) == pytest.approx(0.55)
    assert float(rows[("para", "sst+para", "addition")]["step_time_vs_addition"]) == pytest.approx(1.0)
    other = rows[("sts", "sst+sts", "PCGrad")]            # addition ran on 2 workers: not its reference
    assert other["step_time_vs_addition"] == "" and float(other["step_time_s"]) == pytest.approx(0.9)
    md = (tmp_path / "report" / "report.md").read_text()
    ranking = md.split("## Methods ranked by Δm%")[1].split("##")[0]
    assert "| PCGrad |  | ×2.20 time, ×1.40 memory |" in ranking
    assert "| addition |  | ×1.00 time, ×1.00 memory |" in ranking
    assert "| uncertainty |  | 0.4 s/step, 1,200 MB |" in ranking
    protocol = md.split("## Protocol")[1].split("##")[0]
    assert "- Cost: " in protocol and "On CPU the peak is the process's resident set" in protocol
    assert "On a GPU" not in protocol                    # no trial here recorded a GPU's peak
    para = md.split("## PAR (para")[1].split("##")[0]
    assert "| uncertainty | 0.8000 (+0.0%) |  | 0.4 s/step, 1,200 MB |" in para
    assert "| single task | 0.8000 ± 0.0000 | 0.8000 ± 0.0000 |  |" in para     # a baseline row has no cost
    pareto = md.split("## Pareto view of each pair")[1].split("##")[0]
    assert "| none | PCGrad ×2.20 time, ×1.40 memory; addition ×1.00 time, ×1.00 memory |" in pareto
    trials = {r["trial"]: r for r in read_csv(tmp_path / "report" / "trials.csv")}
    assert float(trials["sst+para-pcgrad-s1"]["step_time_s"]) == pytest.approx(0.6)
    assert trials["sst-s0"]["step_time_s"] == "" and trials["sst+sts-pcgrad-s0"]["cost_class"] == "one backward"


def test_methods_without_a_common_pairing_cannot_be_compared():
    fair = report.compare_on_common({"addition": {"sst+para": 5.0}, "PCGrad": {"para+sts": 9.0}})
    assert report._best_combiner_text(fair) == "the combiners share no pairing, so they cannot be compared."


# --------------------------------------------------------------------------------------------
# The paired bootstrap in the report
# --------------------------------------------------------------------------------------------
def planted(gold, right, k):
    return {"pred": np.where(right, gold, (gold + 1) % k).tolist(), "gold": gold.tolist()}


@pytest.fixture(scope="module")
def boot_study(tmp_path_factory):
    """One seed, 2,000 dev rows: sst's baseline 0.70 and the pair's sst 0.80 (right wherever the
    baseline is, +14.3%); para 0.75 in both, on different rows (a null change); every trial saw 800
    examples of each task per epoch."""
    root = tmp_path_factory.mktemp("boot")
    rng = np.random.default_rng(0)
    n = 2000
    ids = [f"r{i}" for i in range(n)]
    sst_gold, para_gold = rng.integers(0, 5, n), rng.integers(0, 2, n)
    sst_base = rng.permutation(n) < 1400
    sst_pair = sst_base.copy()
    sst_pair[rng.permutation(np.flatnonzero(~sst_base))[:200]] = True
    para_base = rng.permutation(n) < 1500
    para_pair = para_base.copy()
    para_pair[np.flatnonzero(para_base)[:150]] = False
    para_pair[np.flatnonzero(~para_base)[:150]] = True
    order = rng.permutation(n)        # the pair's file lists the rows in another order: matched by id

    def shuffled(p):
        return {"ids": [ids[i] for i in order], **{k: [v[i] for i in order] for k, v in p.items()}}

    write_trial(root, "sst-s0", "sst", {"sst": 0.7}, 0, examples={"sst": 800},
                predictions={"sst": {"ids": ids, **planted(sst_gold, sst_base, 5)}})
    write_trial(root, "para-s0", "para", {"para": 0.75}, 0, examples={"para": 800},
                predictions={"para": {"ids": ids, **planted(para_gold, para_base, 2)}})
    write_trial(root, "sst+para-sum-s0", "sst,para", {"sst": 0.8, "para": 0.75}, 0, examples={"sst": 800, "para": 800},
                predictions={"sst": shuffled(planted(sst_gold, sst_pair, 5)),
                             "para": shuffled(planted(para_gold, para_pair, 2))})
    report.write_report(str(root))
    return root


def test_bootstrap_interval_of_a_planted_change_and_a_null_one(boot_study):
    rows = {(r["trial"], r["task"]): r for r in read_csv(boot_study / "report" / "changes.csv")}
    big, null = rows[("sst+para-sum-s0", "sst")], rows[("sst+para-sum-s0", "para")]
    true = 100 * (0.8 - 0.7) / 0.7
    assert float(big["change_pct"]) == pytest.approx(true)
    assert 0 < float(big["ci_lo"]) < true < float(big["ci_hi"]) and float(big["p_bootstrap"]) < 1e-6
    assert big["dev_rows"] == "2000" and big["size_match"] == "equal"
    assert float(null["change_pct"]) == pytest.approx(0.0, abs=1e-9)
    assert float(null["ci_lo"]) < 0 < float(null["ci_hi"]) and float(null["p_bootstrap"]) == pytest.approx(1.0)
    md = (boot_study / "report" / "report.md").read_text()
    assert f"| addition | 0.8000 (+14.3% [{float(big['ci_lo']):+.1f}, {float(big['ci_hi']):+.1f}]) * |" in md
    assert f"| addition | 0.7500 (+0.0% [{float(null['ci_lo']):+.1f}, {float(null['ci_hi']):+.1f}]) |" in md
    assert "Significance (one seed): a paired bootstrap over dev examples" in md
    assert "Size control: every trial saw 800 examples of each task per epoch." in md
    half = (float(big["ci_hi"]) - float(big["ci_lo"])) / 2
    assert "Dev-set noise:" in md and "(2,000 dev rows, 1 changes)" in md
    assert any(f"SEN ±{half + d:.1f} points" in md for d in (-0.05, 0, 0.05))
    # Δm's interval: the mean of the two tasks' resampled changes, so it lies between theirs.
    dm = read_csv(boot_study / "report" / "delta_m.csv")[0]
    assert float(dm["delta_m_mean"]) == pytest.approx(true / 2) and float(dm["ci_lo"]) > 0


def test_the_report_is_reproducible(boot_study, tmp_path):
    again = report.write_report(str(boot_study), str(tmp_path / "again"))
    assert (tmp_path / "again" / "changes.csv").read_text() == (boot_study / "report" / "changes.csv").read_text()
    assert again.endswith("again")


# --------------------------------------------------------------------------------------------
# Size-aware baselines
# --------------------------------------------------------------------------------------------
def test_each_change_is_against_the_baseline_of_the_same_size(tmp_path):
    write_trial(tmp_path, "para-s0", "para", {"para": 0.8}, 0, examples={"para": 5000})
    write_trial(tmp_path, "para-sum-n800-s0", "para", {"para": 0.7}, 0, examples={"para": 800})
    write_trial(tmp_path, "sts-s0", "sts", {"sts": 0.6}, 0, examples={"sts": 800})
    write_trial(tmp_path, "sst-s0", "sst", {"sst": 0.5}, 0, examples={"sst": 8544})
    write_trial(tmp_path, "para+sts-sum-s0", "para,sts", {"para": 0.77, "sts": 0.66}, 0,
                examples={"para": 800, "sts": 800})
    write_trial(tmp_path, "sst+para-sum-s0", "sst,para", {"sst": 0.45, "para": 0.84}, 0,
                examples={"sst": 5000, "para": 5000})
    report.write_report(str(tmp_path))
    rows = {(r["trial"], r["task"]): r for r in read_csv(tmp_path / "report" / "changes.csv")}
    para = rows[("para+sts-sum-s0", "para")]
    assert para["baseline"] == "para-sum-n800-s0" and float(para["change_pct"]) == pytest.approx(10.0)
    assert para["size_match"] == "equal"
    other = rows[("sst+para-sum-s0", "para")]
    assert other["baseline"] == "para-s0" and float(other["change_pct"]) == pytest.approx(5.0)
    fallback = rows[("sst+para-sum-s0", "sst")]          # sst has one baseline, of another size: used, marked
    assert fallback["baseline"] == "sst-s0" and fallback["size_match"] == "unequal"
    assert float(fallback["change_pct"]) == pytest.approx(-10.0)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| single task (800/epoch) | 0.7000 |  |" in md and "| single task (5,000/epoch) |  | 0.8000 |" in md
    assert "| addition | 0.4500 (-10.0%)† |" in md and "| addition | 0.7700 (+10.0%) | 0.8400 (+5.0%) |" in md
    assert "Not size-controlled: 1 of 4 changes (marked †)" in md
    assert "sst: 5,000 in sst+para-sum-s0, 8,544 in sst-s0" in md
    assert "examples_per_task" not in md                  # explained by the matching, not a variant


def test_sizes_fall_back_to_the_pinned_config_and_unknown_is_said(tmp_path):
    """Results written before examples_per_epoch: the pinned data.examples_per_task decides."""
    fixed = lambda n: {"data.epoch_mode": "fixed_n", "data.examples_per_task": n}  # noqa: E731
    write_trial(tmp_path, "para-n5000-s0", "para", {"para": 0.8}, 0, settings=fixed(5000))
    write_trial(tmp_path, "para-n800-s0", "para", {"para": 0.7}, 0, settings=fixed(800))
    write_trial(tmp_path, "sts-n800-s0", "sts", {"sts": 0.6}, 0, settings=fixed(800))
    write_trial(tmp_path, "para+sts-n800-s0", "para,sts", {"para": 0.77, "sts": 0.6}, 0, settings=fixed(800))
    write_trial(tmp_path, "para+sts-n300-s0", "para,sts", {"para": 0.77, "sts": 0.6}, 0, settings=fixed(300))
    report.write_report(str(tmp_path))
    rows = {(r["trial"], r["task"]): r for r in read_csv(tmp_path / "report" / "changes.csv")}
    assert rows[("para+sts-n800-s0", "para")]["baseline"] == "para-n800-s0"
    assert ("para+sts-n300-s0", "para") not in rows       # two para baselines, neither of 300: no guess
    assert rows[("para+sts-n300-s0", "sts")]["size_match"] == "unequal"
    md = (tmp_path / "report" / "report.md").read_text()
    assert ("para+sts-n300-s0 (para): none of the 2 single-task baselines of para (5,000, 800 per epoch) saw 300 "
            "examples per epoch") in md


# --------------------------------------------------------------------------------------------
# The Pareto view
# --------------------------------------------------------------------------------------------
def test_pareto_front_of_the_planted_alpha_sweep(study):
    root, _ = study
    points = {r["method"]: r for r in read_csv(root / "report" / "pareto.csv") if r["grouping"] == "sst+para"}
    # sst, para changes: addition (+9, +4), α=0.2 (-6, -5), α=0.4 (+6, +3), α=0.6 (+10, +3), α=0.8 (+6, -5)
    assert {m for m, r in points.items() if r["on_front"] == "True"} == {"addition", "α=0.6"}
    assert float(points["α=0.4"]["change_first"]) == pytest.approx(6.0) and points["α=0.4"]["first_task"] == "sst"
    md = (root / "report" / "report.md").read_text()
    assert ("| sst+para | addition (sst +9.0%, para +4.0%); α=0.6 (sst +10.0%, para +3.0%) | α=0.2, α=0.4, α=0.8 |"
            in md)
    data = (root / "report" / "pareto.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# --------------------------------------------------------------------------------------------
# Broken results never stop the report
# --------------------------------------------------------------------------------------------
def test_broken_results_are_named_and_the_rest_reported(tmp_path):
    write_trial(tmp_path, "sst-s0", "sst", {"sst": 0.5}, 0,
                predictions={"sst": {"ids": ["a", "b"], "pred": [0, 1], "gold": [0, 2]}})
    write_trial(tmp_path, "para-s0", "para", {"para": 0.8}, 0)
    write_trial(tmp_path, "sst+para-sum-s0", "sst,para", {"sst": 0.55, "para": 0.8}, 0,
                predictions={"sst": {"ids": ["a", "b"], "pred": [0, 1], "gold": [0, 2]}})
    (tmp_path / "sst+para-sum-s0" / "best" / "dev_predictions.json").write_text('{"sst": {"ids": ["a", ')
    write_trial(tmp_path, "para+sts-sum-s0", "para,sts", {"para": 0.8, "sts": 0.6}, 0,
                predictions={"para": {"ids": ["a"], "pred": [1, 0], "gold": [1]}})
    broken = {"trunc-s0": '{"status": "done", "config": {', "list-s0": "[]", "bare-s0": '{"status": "done"}',
              "running-s0": '{"status": "running"}',
              "nometric-s0": json.dumps({"status": "done", "config": RunConfig().to_dict(), "best": {"metrics": {}}}),
              "badconfig-s0": json.dumps({"status": "done", "config": {"data": {"nope": 1}}, "best": {"metrics": {}}})}
    for name, text in broken.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(text)
    (tmp_path / "results.json").write_text('[{"trial": "sst-s0"}, {"tri')         # the study table, truncated
    report.write_report(str(tmp_path))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "10 trials: 4 done, 0 failed, 0 missing, 6 unreadable" in md
    assert "The study table `results.json` is unreadable (" in md and "listing the trial folders instead" in md
    assert "trunc-s0 (unreadable: results.json is not valid JSON (" in md
    assert "list-s0 (unreadable: results.json is a JSON list, not a trial's results)" in md
    assert "bare-s0 (unreadable: results.json of a done trial has no config)" in md
    assert "running-s0 (unreadable: results.json has status 'running', neither done nor failed)" in md
    assert "nometric-s0 (unreadable: its best metrics have no number for sst/acc)" in md
    assert "badconfig-s0 (unreadable: its config does not load (data.nope: unknown field))" in md
    assert "| addition | 0.5500 (+10.0%) |" in md                       # the rest is reported
    assert "best/dev_predictions.json is unreadable (" in md               # the pair's truncated predictions
    assert "its dev predictions of para have 1 ids, 2 predictions, 1 labels" in md
    trials = {r["trial"]: r for r in read_csv(tmp_path / "report" / "trials.csv")}
    assert trials["bare-s0"]["status"] == "unreadable" and trials["sst+para-sum-s0"]["status"] == "done"


def test_sizes_within_a_step_of_rounding_match():
    """Two workers drop a last example one worker keeps: 798 and 800 are the same size, 5,000 not."""
    def trial(name, tasks, examples):
        return report.Trial(name, "done", tasks, "addition", seed=0, scores={t: 0.5 for t in tasks}, examples=examples)

    trials = [trial("para-n800", ("para",), {"para": 800}), trial("para", ("para",), {"para": 5000}),
              trial("pair", ("para", "sts"), {"para": 798, "sts": 798})]
    [change], problems = report.match_baselines(trials)
    assert change.baseline.name == "para-n800" and change.size == "equal"
    assert problems == ["pair (sts): no single-task baseline of sts with seed 0"]
