"""The report's comparisons, as pure functions of the trials: each multi-task score against its
matched single-task baseline (the change), the paired bootstrap behind its interval, the changes
and Δm% summarised over seeds and Holm-corrected, the Pareto views of each pair, the α curves, the
gradient conflict beside the change, and the dev set's own noise.  ``analyse`` computes them once
for the report's sections.  The statistics themselves live in ``cluster/report/stats.py``."""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from cluster.report import stats
from cluster.report.formatting import count_text, marks_in_use
from cluster.report.reading import Predictions, Study, Trial, done_trials, load_study, row_label
from cluster.report.stats import Summary, fit_quadratic, mean_std, summarise
from mtl.tasks import TASKS


# The bootstrap's metric for each task's primary metric (others get no interval).
BOOT_METRIC = {"acc": "acc", "pearson": "pearson"}


def method_order(label: str):
    """addition, α ascending, PCGrad, then the rest alphabetically."""
    if label.startswith("addition"):
        return (0, 0.0, label)
    if label.startswith("α="):
        return (1, float(label[2:].split(",")[0]), label)
    if label.startswith("PCGrad"):
        return (2, 0.0, label)
    return (3, 0.0, label)


def grouping_order(g: str):
    return (g.count("+"), g)


@dataclass
class Change:
    """One multi-task trial's change on one task against its matched single-task baseline."""
    task: str
    trial: Trial
    baseline: Trial
    pct: float
    size: str                    # equal | unequal | unknown: the two runs' examples of the task per epoch
    samples: object = None       # numpy array of the % change under each bootstrap resample
    lo: float | None = None
    hi: float | None = None
    p_boot: float | None = None
    p_empirical: float | None = None
    rows: int = 0                # dev rows the bootstrap resampled
    no_interval: str = ""        # why there is no interval (naming the run)
    no_interval_kind: str = ""   # the same reason without names, to group them in the report

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.trial.grouping, self.trial.label)


def match_baselines(trials: list[Trial]) -> tuple[list[Change], list[str]]:
    """Each multi-task trial's task against the single-task trial of the same task, variant and seed
    that saw as many examples of it per epoch; with no such baseline but exactly one of that task,
    variant and seed, that one (the change marked as not size-controlled).  Returns the changes and
    a line for each task left without a baseline."""
    index: dict = defaultdict(list)
    for b in done_trials(trials):
        if len(b.tasks) == 1:
            index[(b.tasks[0], b.variant, b.seed)].append(b)
    out, problems = [], []
    for t in done_trials(trials):
        if len(t.tasks) < 2:
            continue
        for task in t.tasks:
            candidates = index.get((task, t.variant, t.seed), [])
            n = t.examples.get(task)
            equal = sorted((b for b in candidates if _same_size(n, b.examples.get(task))),
                           key=lambda b: abs(b.examples[task] - n))
            if equal:
                base, size = equal[0], "equal"
            elif len(candidates) == 1:
                base = candidates[0]
                size = "unknown" if n is None or base.examples.get(task) is None else "unequal"
            else:
                sizes = ", ".join(count_text(b.examples.get(task)) for b in candidates)
                problems.append(f"{t.name} ({task}): " + (
                    f"no single-task baseline of {task} with seed {t.seed}{', ' + t.variant if t.variant else ''}"
                    if not candidates else
                    f"none of the {len(candidates)} single-task baselines of {task} ({sizes} per epoch) saw "
                    f"{count_text(n)} examples per epoch"))
                continue
            pct = stats.relative_change(t.scores[task], base.scores[task])
            if pct is None:
                problems.append(f"{t.name} ({task}): the baseline {base.name} scores 0, no relative change")
                continue
            out.append(Change(task, t, base, pct, size))
    return out, problems


def _same_size(a: int | None, b: int | None) -> bool:
    """Two runs saw the same examples of a task per epoch.  A run's count is whole optimizer steps'
    worth (a last step too small for every worker and micro-batch is dropped, so 2 workers may see
    a few examples fewer than 1 worker at the same pinned size): within 1% is the same size, while
    the sizes a study pins differ by far more (the tasks' own sizes)."""
    return a is not None and b is not None and abs(a - b) <= 0.01 * max(a, b)


def absolute(trials: list[Trial]) -> dict[tuple[str, str, str], dict[int, float]]:
    """(task, grouping, row label) -> {seed: score}; single-task trials under their baseline label."""
    labels = baseline_labels(trials)
    out: dict = defaultdict(dict)
    for t in done_trials(trials):
        label = labels[t.name] if len(t.tasks) == 1 else t.label
        for task in t.tasks:
            out[(task, t.grouping, label)][t.seed] = t.scores[task]
    return dict(out)


def baseline_labels(trials: list[Trial]) -> dict[str, str]:
    """Single-task trial name -> its row label: 'single task', with its examples per epoch where
    the study has baselines of that task and variant at more than one size."""
    sizes: dict = defaultdict(set)
    for b in done_trials(trials):
        if len(b.tasks) == 1:
            sizes[(b.tasks[0], b.variant)].add(b.examples.get(b.tasks[0]))
    out = {}
    for b in done_trials(trials):
        if len(b.tasks) == 1:
            n = b.examples.get(b.tasks[0])
            size = "" if len(sizes[(b.tasks[0], b.variant)]) < 2 else \
                f" ({n:,}/epoch)" if n is not None else " (size unknown)"
            out[b.name] = "single task" + size + (f", {b.variant}" if b.variant else "")
    return out


# --------------------------------------------------------------------------------------------
# The paired bootstrap over dev examples
# --------------------------------------------------------------------------------------------
def bootstrap(change_list: list[Change], predictions: Predictions, resamples: int = stats.RESAMPLES) -> None:
    """Give every change its paired-bootstrap samples, 95% interval and p (in place), or the reason
    it has none: the trial's and the baseline's dev predictions matched row by row through their
    ids and resampled together (``stats.paired_changes``)."""
    comparisons, owners = [], []
    for c in change_list:
        got = _comparison(c, predictions)
        if got is not None:
            comparisons.append(got)
            owners.append(c)
    for c, comparison, samples in zip(owners, comparisons, stats.paired_changes(comparisons, resamples)):
        c.samples, c.rows = samples, len(comparison["ids"])
        c.lo, c.hi = stats.percentile_interval(samples)
        c.p_boot, c.p_empirical = stats.bootstrap_p(c.pct, samples), stats.empirical_p(samples)


def _comparison(c: Change, predictions: Predictions) -> dict | None:
    """The change's two prediction sets, aligned, as ``stats.paired_changes`` takes them; or None,
    with the reason in ``c.no_interval`` (named) and ``c.no_interval_kind`` (for grouping)."""
    def none(kind: str, named: str) -> None:
        c.no_interval_kind, c.no_interval = kind, named

    metric = BOOT_METRIC.get(TASKS[c.task].primary_metric)
    if metric is None:
        return none(f"no bootstrap for {TASKS[c.task].primary_metric}", "")
    rows = []
    for who in (c.trial, c.baseline):
        got, why = predictions.rows(who, c.task)
        if got is None:
            return none(why, f"{who.name}: {why}")
        recomputed = stats.score(metric, got[2], got[1])
        if abs(recomputed - who.scores[c.task]) > 1e-4:        # not the predictions behind its recorded score
            return none("dev predictions that do not give the recorded score",
                        f"{who.name}: its dev predictions of {c.task} score {recomputed:.4f}, not the recorded "
                        f"{who.scores[c.task]:.4f}")
        rows.append(got)
    try:
        ids, t_pred, b_pred, gold = stats.align_rows(*rows)
    except ValueError as exc:
        return none(str(exc), f"{c.trial.name} against {c.baseline.name}: {exc}")
    return {"stream": c.task, "metric": metric, "ids": ids, "gold": gold,
            "a": (c.trial.name, t_pred), "b": (c.baseline.name, b_pred)}


# --------------------------------------------------------------------------------------------
# Summaries over seeds, significance
# --------------------------------------------------------------------------------------------
_SIZE_ORDER = {"equal": 0, "unknown": 1, "unequal": 2}


def task_summaries(change_list: list[Change]) -> dict[tuple, Summary]:
    """(task, grouping, label) -> its change over seeds, Holm-corrected over all of them."""
    by_key: dict = defaultdict(list)
    for c in change_list:
        by_key[c.key].append(c)
    out = {}
    for key, cs in by_key.items():
        size = max((c.size for c in cs), key=_SIZE_ORDER.get)
        out[key] = summarise({c.trial.seed: c.pct for c in cs}, {c.trial.seed: c.samples for c in cs}, size, key)
    stats.correct(out)
    return out


def delta_m_per_trial(change_list: list[Change]) -> list[dict]:
    """Δm% of every multi-task trial whose tasks all have a change, with its bootstrap samples (the
    mean of its tasks' resampled changes; the tasks' dev sets are resampled independently)."""
    by_trial: dict = defaultdict(dict)
    for c in change_list:
        by_trial[c.trial.name][c.task] = c
    rows = []
    for cs in by_trial.values():
        trial = next(iter(cs.values())).trial
        if set(cs) != set(trial.tasks):
            continue
        ordered = [cs[t] for t in trial.tasks]
        samples = np.mean(np.stack([c.samples for c in ordered]), axis=0) \
            if all(c.samples is not None for c in ordered) else None
        rows.append({"trial": trial, "delta_m": stats.delta_m(c.pct for c in ordered), "samples": samples,
                     "size": max((c.size for c in ordered), key=_SIZE_ORDER.get)})
    return rows


def delta_m_summaries(change_list: list[Change]) -> dict[tuple, Summary]:
    """(grouping, label) -> Δm% over seeds, Holm-corrected as its own family (Δm restates the
    per-task changes: pooling both in one family would count the same evidence twice)."""
    by_key: dict = defaultdict(list)
    for row in delta_m_per_trial(change_list):
        by_key[(row["trial"].grouping, row["trial"].label)].append(row)
    out = {}
    for key, rows in by_key.items():
        size = max((r["size"] for r in rows), key=_SIZE_ORDER.get)
        out[key] = summarise({r["trial"].seed: r["delta_m"] for r in rows},
                             {r["trial"].seed: r["samples"] for r in rows}, size, key)
    stats.correct(out)
    return out


def pareto_views(summaries: dict[tuple, Summary], trials: list[Trial]) -> list[dict]:
    """For each pair (and variant) run with at least two methods: every method's point (mean change
    of the first task, of the second), their intervals, and which are on the Pareto front."""
    variant_of = {t.label: (t.method, t.variant) for t in done_trials(trials)}
    views = []
    pairs = sorted({(k[1], variant_of[k[2]][1]) for k in summaries if k[1].count("+") == 1 and k[2] in variant_of})
    for grouping, variant in pairs:
        a, b = grouping.split("+")
        points = {}
        for label, (method, v) in variant_of.items():
            sa, sb = summaries.get((a, grouping, label)), summaries.get((b, grouping, label))
            if v == variant and sa and sb:
                points[method] = {"label": label, "x": sa.mean, "y": sb.mean, "x_ci": (sa.lo, sa.hi),
                                  "y_ci": (sb.lo, sb.hi)}
        if len(points) < 2:
            continue
        front = stats.pareto_front({m: (p["x"], p["y"]) for m, p in points.items()})
        views.append({"grouping": grouping, "variant": variant, "tasks": (a, b), "points": points, "front": front})
    return views


def alpha_curves(trials: list[Trial], change_list: list[Change] | None = None) -> dict[tuple[str, str], dict]:
    """(task, grouping) -> {"points": [(own weight, % change)], "fit": ...} for unitary
    scalarization of pairs (per seed points, so R² sees the seed noise too)."""
    change_list = match_baselines(trials)[0] if change_list is None else change_list
    points: dict = defaultdict(list)
    for c in change_list:
        t = c.trial
        if t.method.startswith("α=") and len(t.tasks) == 2:
            key = (c.task, t.grouping + (f" ({t.variant})" if t.variant else ""))
            points[key].append((t.weights[c.task], c.pct))
    return {k: {"points": sorted(v), "fit": fit_quadratic(v)} for k, v in points.items()
            if len({w for w, _ in v}) >= 3}


def conflict_summary(trials: list[Trial], summaries: dict[tuple, Summary]) -> list[dict]:
    """Per pairing (its addition runs): mean gradient cosine and conflict fraction, beside each
    task's % change."""
    rows = []
    groups: dict = defaultdict(list)
    for t in done_trials(trials):
        if len(t.tasks) == 2 and t.method == "addition" and t.cos_mean is not None:
            groups[(t.grouping, t.variant)].append(t)
    for (grouping, variant), ts in sorted(groups.items()):
        row = {"grouping": grouping + (f" ({variant})" if variant else ""),
               "cos_mean": mean_std(t.cos_mean for t in ts)[0],
               "conflict_fraction": mean_std(t.conflict or 0.0 for t in ts)[0]}
        for task in ts[0].tasks:
            s = summaries.get((task, grouping, row_label("addition", variant)))
            row[f"change/{task}"] = s.mean if s else None
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# What each method's steps cost, against addition's
# --------------------------------------------------------------------------------------------
# Settings that change a step's cost without being part of a row's label (reading._SHOWN): a
# method's step is compared with addition's only under the same split of the batch over workers
# and micro-batches, strategy and ZeRO stage, and on the same kind of device (the memory kind).
COST_SETTINGS = ("parallel.", "optim.batch_size", "optim.grad_accum")


@dataclass
class Cost:
    """A row's cost over its trials: mean seconds per step and peak MB, and the mean of each
    trial's ratio to addition's on the same tasks and settings (None where no addition run matches
    or the trials did not record it)."""
    step_s: float | None
    peak_mb: float | None
    step_ratio: float | None
    memory_ratio: float | None


def _cost_setting(t: Trial) -> tuple:
    settings = sorted((k, str(v)) for k, v in t.identity.items() if k.startswith(COST_SETTINGS))
    return (t.grouping, t.variant, t.memory_kind, tuple(settings))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def costs(trials: list[Trial]) -> dict[tuple[str, str], Cost]:
    """(grouping, row label) -> its Cost.  The reference of each trial is the mean of the addition
    trials (any seed) on its tasks, variant and cost settings; a row mixing trials with and
    without one gets the mean of the ratios it has."""
    measured = [t for t in done_trials(trials) if t.step_time_s is not None or t.peak_memory_mb is not None]
    sums: dict = defaultdict(list)
    for t in measured:
        if t.method == "addition":
            sums[_cost_setting(t)].append(t)
    by_row: dict = defaultdict(list)
    for t in measured:
        ref = sums.get(_cost_setting(t), [])
        ref_step, ref_peak = _mean(r.step_time_s for r in ref), _mean(r.peak_memory_mb for r in ref)
        by_row[(t.grouping, t.label)].append((
            t, t.step_time_s / ref_step if t.step_time_s and ref_step else None,
            t.peak_memory_mb / ref_peak if t.peak_memory_mb and ref_peak else None))
    return {key: Cost(_mean(t.step_time_s for t, _, _ in rows), _mean(t.peak_memory_mb for t, _, _ in rows),
                      _mean(r for _, r, _ in rows), _mean(m for _, _, m in rows)) for key, rows in by_row.items()}


def method_cost(all_costs: dict[tuple[str, str], Cost], label: str, groupings: list[str]) -> Cost | None:
    """A method's cost over several groupings: the mean of each measure where it is known."""
    rows = [all_costs[(g, label)] for g in groupings if (g, label) in all_costs]
    if not rows:
        return None
    return Cost(_mean(c.step_s for c in rows), _mean(c.peak_mb for c in rows), _mean(c.step_ratio for c in rows),
                _mean(c.memory_ratio for c in rows))


def dev_noise(change_list: list[Change]) -> dict[str, dict]:
    """task -> dev rows and the median half-width of its changes' 95% intervals: the size of change
    that resampling the dev set alone produces."""
    widths: dict = defaultdict(list)
    rows: dict = defaultdict(set)
    for c in change_list:
        if c.lo is not None:
            widths[c.task].append((c.hi - c.lo) / 2)
            rows[c.task].add(c.rows)
    return {t: {"rows": sorted(rows[t]), "half_width": statistics.median(w), "n": len(w)} for t, w in widths.items()}


# --------------------------------------------------------------------------------------------
# Everything the report's sections read
# --------------------------------------------------------------------------------------------
@dataclass
class Analysis:
    """A study and its comparisons, computed once (the bootstrap is the costly part: minutes for a
    hundred trials); every section of the report reads from it."""
    study: Study
    resamples: int
    changes: list[Change]               # each multi-task score against its baseline, with its interval
    no_baseline: list[str]              # a line for each task left without a baseline
    predictions: Predictions            # read once: the bootstrap and the best-model figures share them
    summaries: dict[tuple, Summary]     # (task, grouping, label) -> its change over seeds
    delta_m: dict[tuple, Summary]       # (grouping, label) -> Δm% over seeds
    marks: set[str]                     # the size marks the report uses (marks_in_use)
    scores: dict                        # (task, grouping, label) -> {seed: absolute score}
    baseline_labels: dict[str, str]     # single-task trial name -> its row label
    costs: dict[tuple[str, str], Cost]  # (grouping, label) -> its steps' cost against addition's
    per_task_best: bool = False         # each task scored at its own best evaluation

    @property
    def trials(self) -> list[Trial]:
        return self.study.trials

    @property
    def done(self) -> list[Trial]:
        return done_trials(self.study.trials)

    @property
    def seeds(self) -> list[int]:
        return sorted({t.seed for t in self.done})


def analyse(root: str, resamples: int = stats.RESAMPLES, per_task_best: bool = False) -> Analysis:
    """Read the study at ``root`` and compute every comparison the report shows (``per_task_best``:
    each task scored at its own best evaluation; no bootstrap then, as only the predictions of
    each trial's one best epoch are kept)."""
    study = load_study(root, per_task_best)
    changes, no_baseline = match_baselines(study.trials)
    predictions = Predictions("per-task best epochs: only the best epoch's dev predictions are kept"
                              if per_task_best else "")
    bootstrap(changes, predictions, resamples)
    summaries = task_summaries(changes)
    return Analysis(study, resamples, changes, no_baseline, predictions, summaries, delta_m_summaries(changes),
                    marks_in_use(summaries), absolute(study.trials), baseline_labels(study.trials), costs(study.trials),
                    per_task_best)
