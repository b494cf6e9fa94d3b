"""The study's answer: which tasks to train together and how to combine their losses.

    python launch/report.py runs/sweep                 # writes runs/sweep/report/
    python launch/report.py s3://bucket/study --out /tmp/report

Reads every trial of a sweep (its own results.json and best/dev_predictions.json, on any fsspec
URL) and writes ``report.md``, PNG figures and the numbers as CSV:

- a protocol paragraph: the examples of each task every trial saw per epoch (size control), the
  test behind the significance marks and why, and how large a change the dev set's size alone
  produces;
- absolute dev scores per task, by grouping and loss combination, the single-task baselines on top;
- each score's change (%) against the single-task baseline of the same task, settings, seed and
  examples per epoch, with a paired-bootstrap 95% interval over dev examples, as a table and heatmap;
- Δm% (the mean of a multi-task model's per-task changes) per pairing, and the methods ranked by it
  over the pairings they all share;
- for each pair, the α sweep as a Pareto view (change of one task against the other's);
- for unitary scalarization, each task's change against its own weight with a fitted quadratic;
- significance: with several seeds a paired t-test across seeds, with one seed the bootstrap;
  Holm-corrected over the report's comparisons;
- each pairing's gradient conflict (mean cosine, conflict fraction) beside its change;
- answers: best partner and combiner per task (on common pairings), pairs that help both ways,
  how much weighting matters; confusion matrices / a scatter for the best model of each task;
- which trials are missing, failed or unreadable (a broken results.json never stops the report).

Scores are each task's primary dev metric (SEN accuracy, PAR accuracy, SIM Pearson), as in the
reference study.  The statistics themselves live in ``cluster/stats.py``.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from cluster import stats
from cluster.stats import Summary, compare_on_common, fit_quadratic, mean_std, summarise  # noqa: F401 - interface
from mtl import storage
from mtl.config import RunConfig
from mtl.errors import MtlError
from mtl.monitor import flatten
from mtl.tasks import TASKS

ORDER = ("sst", "para", "sts")
ALPHA = stats.ALPHA
NOT_SIZED, SIZE_UNKNOWN = "†", "‡"      # marks of a change whose baseline saw another (or an unknown) amount
# The bootstrap's metric for each task's primary metric (others get no interval).
BOOT_METRIC = {"acc": "acc", "pearson": "pearson"}


# ============================================================================================
# Reading a study
# ============================================================================================
@dataclass
class Trial:
    name: str
    status: str                                  # done, failed, missing, unreadable
    tasks: tuple[str, ...] = ()
    method: str = ""                             # addition, α=0.3, PCGrad, ...
    variant: str = ""                            # other settings that vary across the study
    seed: int = 0
    weights: dict = field(default_factory=dict)  # task -> its loss weight (scalarization)
    scores: dict = field(default_factory=dict)   # task -> primary dev metric
    examples: dict = field(default_factory=dict)  # task -> examples of it seen per epoch (None: unknown)
    cos_mean: float | None = None                # mean cosine of the pair's task gradients
    conflict: float | None = None                # fraction of measured steps with a conflict
    error: str = ""                              # why it failed, or why its results are unreadable
    folder: str = ""
    identity: dict = field(default_factory=dict, repr=False)

    @property
    def grouping(self) -> str:
        return "+".join(self.tasks)

    @property
    def label(self) -> str:
        return _label(self.method, self.variant)


@dataclass
class Study:
    root: str
    trials: list[Trial]
    notes: list[str] = field(default_factory=list)   # problems with the study table itself


def method_of(cfg: RunConfig) -> tuple[str, dict]:
    """A readable name for the loss combination, and each task's weight where it is fixed."""
    c, tasks = cfg.combiner, cfg.data.tasks
    if c.combiner == "sum":
        return "addition", {}
    if c.combiner == "scalarize":
        if c.weights:
            return "weights " + ",".join(f"{w:g}" for w in c.weights), dict(zip(tasks, c.weights))
        if len(tasks) == 2:
            return f"α={c.alpha:g}", {tasks[0]: c.alpha, tasks[1]: round(1 - c.alpha, 10)}
        return "addition", {}
    names = {"pcgrad": "PCGrad", "uncertainty": "uncertainty", "dtp": "DTP"}
    name = names.get(c.combiner, c.combiner)
    if c.combiner == "pcgrad" and c.pcgrad_on != "params":
        name += f" ({c.pcgrad_on})"
    return name, {}


def load_study(root: str) -> Study:
    """Every trial the sweep's table lists (or, without a readable table, every trial folder),
    read fresh from its own results.json.  Nothing in a trial's folder stops the reading: a
    broken file makes that trial 'unreadable', with its reason."""
    names, notes = _trial_names(root)
    if not names:
        raise MtlError(f"{root}: no sweep here (no results.json table and no trial folders with results)")
    trials = [_read_trial(root, n) for n in names]
    _name_variants([t for t in trials if t.identity])
    return Study(root, trials, notes)


def _trial_names(root: str) -> tuple[list[str], list[str]]:
    url = storage.join(root, "results.json")
    notes = []
    if storage.exists(url):
        try:
            rows = json.loads(storage.read_text(url))
            if not isinstance(rows, list) or not rows:
                raise ValueError(f"a JSON {type(rows).__name__}{' with no rows' if rows == [] else ''}, "
                                 "not a list of trial rows")
            names = [row["trial"] for row in rows]
            if not all(isinstance(n, str) and n for n in names):
                raise ValueError("a row's 'trial' is not a name")
            return list(dict.fromkeys(names)), notes
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, MtlError) as exc:
            reason = f"row without {exc}" if isinstance(exc, KeyError) else _one_line(exc)
            notes.append(f"The study table `results.json` is unreadable ({reason}): its trials were found by "
                         "listing the trial folders instead, so trials never started are not named.")
    names = [n for n in storage.listdir(root) if storage.exists(storage.join(root, n, "results.json"))]
    return names, notes


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _read_trial(root: str, name: str) -> Trial:
    folder = storage.join(root, name)
    url = storage.join(folder, "results.json")
    if not storage.exists(url):
        return Trial(name, "missing", folder=folder)

    def unreadable(why: str) -> Trial:
        return Trial(name, "unreadable", error=why, folder=folder)

    try:
        res = json.loads(storage.read_text(url))
    except (ValueError, UnicodeDecodeError, MtlError, OSError) as exc:
        return unreadable(f"results.json is not valid JSON ({_one_line(exc)})")
    why = _results_problem(res)
    if why:
        return unreadable(why)
    status = res.get("status", "done")
    if status == "failed" and not isinstance(res.get("config"), dict):
        return Trial(name, "failed", error=str(res.get("error", "")), folder=folder)
    try:
        cfg = RunConfig.from_dict(res["config"])
    except (MtlError, TypeError, ValueError, AttributeError) as exc:
        if status == "failed":
            return Trial(name, "failed", error=str(res.get("error", "")), folder=folder)
        return unreadable(f"its config does not load ({_one_line(exc)})")
    method, weights = method_of(cfg)
    trial = Trial(name, status, cfg.data.tasks, method, seed=cfg.seed, weights=weights,
                  error=str(res.get("error", "")), folder=folder, identity=flatten(cfg.identity()))
    if status == "done":
        metrics = res["best"]["metrics"]
        for task in cfg.data.tasks:
            key = f"{task}/{TASKS[task].primary_metric}"
            value = metrics.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return unreadable(f"its best metrics have no number for {key}")
            trial.scores[task] = float(value)
        trial.examples = _examples_per_epoch(res, cfg)
        cos = res.get("grad_cos_mean")
        cos = [v for v in cos.values() if isinstance(v, (int, float))] if isinstance(cos, dict) else []
        trial.cos_mean = sum(cos) / len(cos) if cos else None
        conflict = res.get("grad_conflict_fraction")
        trial.conflict = float(conflict) if isinstance(conflict, (int, float)) else None
    return trial


def _results_problem(res) -> str | None:
    """Why a results.json's content is not what a trial writes (None when it is).  Only what the
    report reads is checked: the status, and for a done trial its config and best metrics."""
    if not isinstance(res, dict):
        return f"results.json is a JSON {type(res).__name__}, not a trial's results"
    status = res.get("status", "done")
    if status not in ("done", "failed"):
        return f"results.json has status {status!r}, neither done nor failed"
    if status == "failed":
        return None
    if not isinstance(res.get("config"), dict):
        return "results.json of a done trial has no config"
    if not isinstance(res.get("best"), dict) or not isinstance(res["best"].get("metrics"), dict):
        return "results.json of a done trial has no best metrics"
    return None


def _examples_per_epoch(res: dict, cfg: RunConfig) -> dict:
    """task -> examples of it the trial saw per epoch (all workers): the trial's own record, else
    the pinned ``data.examples_per_task`` (results written before the record), else None."""
    given = res.get("examples_per_epoch")
    given = given if isinstance(given, dict) else {}
    out = {}
    for task in cfg.data.tasks:
        value = given.get(task)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            out[task] = int(value)
        else:
            out[task] = cfg.data.examples_per_task if cfg.data.examples_per_task > 0 else None
    return out


# Settings the report shows in its own way (tasks, combination, seed), how the batch is split
# (workers x batch x accumulation: the same steps as one worker with the whole batch; the global
# batch stands for them), and the examples per task per epoch, which size matching explains (a
# baseline of another size is another baseline row, not another variant).
_SHOWN = ("data.tasks", "combiner.", "seed", "parallel.", "optim.batch_size", "optim.grad_accum",
          "data.examples_per_task")


def _name_variants(trials: list[Trial]) -> None:
    """Other settings that vary across the study (an lr axis, say) become part of the row label,
    so that runs of different settings are never averaged together."""
    for t in trials:
        i = t.identity
        i["global batch"] = i["optim.batch_size"] * i["optim.grad_accum"] * i["parallel.workers"]
    keys = sorted({k for t in trials for k in t.identity})
    varied = [k for k in keys if not k.startswith(_SHOWN) and len({json.dumps(t.identity.get(k)) for t in trials}) > 1]
    for t in trials:
        t.variant = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(t.identity.get(k))}" for k in varied)


def _fmt(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) else str(value)


# ============================================================================================
# Analysis (pure functions of the trials)
# ============================================================================================
def _label(method: str, variant: str) -> str:
    return f"{method}, {variant}" if variant else method


def _method_key(label: str):
    """addition, α ascending, PCGrad, then the rest alphabetically."""
    if label.startswith("addition"):
        return (0, 0.0, label)
    if label.startswith("α="):
        return (1, float(label[2:].split(",")[0]), label)
    if label.startswith("PCGrad"):
        return (2, 0.0, label)
    return (3, 0.0, label)


def _grouping_key(g: str):
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


def _done(trials):
    return [t for t in trials if t.status == "done"]


def match_baselines(trials: list[Trial]) -> tuple[list[Change], list[str]]:
    """Each multi-task trial's task against the single-task trial of the same task, variant and seed
    that saw as many examples of it per epoch; with no such baseline but exactly one of that task,
    variant and seed, that one (the change marked as not size-controlled).  Returns the changes and
    a line for each task left without a baseline."""
    index: dict = defaultdict(list)
    for b in _done(trials):
        if len(b.tasks) == 1:
            index[(b.tasks[0], b.variant, b.seed)].append(b)
    out, problems = [], []
    for t in _done(trials):
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
                sizes = ", ".join(_n(b.examples.get(task)) for b in candidates)
                problems.append(f"{t.name} ({task}): " + (
                    f"no single-task baseline of {task} with seed {t.seed}{', ' + t.variant if t.variant else ''}"
                    if not candidates else
                    f"none of the {len(candidates)} single-task baselines of {task} ({sizes} per epoch) saw "
                    f"{_n(n)} examples per epoch"))
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


def _n(value) -> str:
    return "an unknown number of" if value is None else f"{value:,}"


def absolute(trials: list[Trial]) -> dict[tuple[str, str, str], dict[int, float]]:
    """(task, grouping, row label) -> {seed: score}; single-task trials under their baseline label."""
    labels = baseline_labels(trials)
    out: dict = defaultdict(dict)
    for t in _done(trials):
        label = labels[t.name] if len(t.tasks) == 1 else t.label
        for task in t.tasks:
            out[(task, t.grouping, label)][t.seed] = t.scores[task]
    return dict(out)


def baseline_labels(trials: list[Trial]) -> dict[str, str]:
    """Single-task trial name -> its row label: 'single task', with its examples per epoch where
    the study has baselines of that task and variant at more than one size."""
    sizes: dict = defaultdict(set)
    for b in _done(trials):
        if len(b.tasks) == 1:
            sizes[(b.tasks[0], b.variant)].add(b.examples.get(b.tasks[0]))
    out = {}
    for b in _done(trials):
        if len(b.tasks) == 1:
            n = b.examples.get(b.tasks[0])
            size = "" if len(sizes[(b.tasks[0], b.variant)]) < 2 else \
                f" ({n:,}/epoch)" if n is not None else " (size unknown)"
            out[b.name] = "single task" + size + (f", {b.variant}" if b.variant else "")
    return out


# --------------------------------------------------------------------------------------------
# The paired bootstrap over dev examples
# --------------------------------------------------------------------------------------------
class Predictions:
    """Each trial's best/dev_predictions.json, read once; a missing or broken file is a reason."""

    def __init__(self):
        self._cache: dict[str, tuple[dict | None, str]] = {}

    def file(self, trial: Trial) -> tuple[dict | None, str]:
        if trial.folder not in self._cache:
            self._cache[trial.folder] = _read_predictions(trial.folder)
        return self._cache[trial.folder]

    def rows(self, trial: Trial, task: str):
        """(ids, pred, gold) of one task as numpy arrays, or (None, reason)."""
        import numpy as np

        data, why = self.file(trial)
        if data is None:
            return None, why
        rows = data.get(task)
        if not isinstance(rows, dict) or not all(isinstance(rows.get(k), list) for k in ("ids", "pred", "gold")):
            return None, f"its dev predictions have no ids/pred/gold for {task}"
        ids, pred, gold = rows["ids"], rows["pred"], rows["gold"]
        if not len(ids) == len(pred) == len(gold) or not ids:
            return None, (f"its dev predictions of {task} have {len(ids)} ids, {len(pred)} predictions, "
                          f"{len(gold)} labels")
        try:
            pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
        except (TypeError, ValueError):
            return None, f"its dev predictions of {task} are not all numbers"
        if pred.ndim != 1 or gold.ndim != 1 or not (np.isfinite(pred).all() and np.isfinite(gold).all()):
            return None, f"its dev predictions of {task} are not all finite numbers"
        return ([str(i) for i in ids], pred, gold), ""


def _read_predictions(folder: str) -> tuple[dict | None, str]:
    url = storage.join(folder, "best", "dev_predictions.json")
    try:
        if not storage.exists(url):
            return None, "no dev predictions saved with its best weights"
        data = json.loads(storage.read_text(url))
    except (ValueError, UnicodeDecodeError, MtlError, OSError) as exc:
        return None, f"best/dev_predictions.json is unreadable ({_one_line(exc)})"
    if not isinstance(data, dict):
        return None, f"best/dev_predictions.json is a JSON {type(data).__name__}, not predictions per task"
    return data, ""


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
    import numpy as np

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
    variant_of = {t.label: (t.method, t.variant) for t in _done(trials)}
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
    for t in _done(trials):
        if len(t.tasks) == 2 and t.method == "addition" and t.cos_mean is not None:
            groups[(t.grouping, t.variant)].append(t)
    for (grouping, variant), ts in sorted(groups.items()):
        row = {"grouping": grouping + (f" ({variant})" if variant else ""),
               "cos_mean": mean_std(t.cos_mean for t in ts)[0],
               "conflict_fraction": mean_std(t.conflict or 0.0 for t in ts)[0]}
        for task in ts[0].tasks:
            s = summaries.get((task, grouping, _label("addition", variant)))
            row[f"change/{task}"] = s.mean if s else None
        rows.append(row)
    return rows


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


def answers(trials: list[Trial], summaries: dict[tuple, Summary], dm: dict[tuple, Summary] | None = None) -> list[str]:
    """Sentences written from the numbers."""
    mean = {k: s.mean for k, s in summaries.items()}
    lines = []
    for task in ORDER:
        mine = {k: v for k, v in mean.items() if k[0] == task}
        if not mine:
            continue
        (_, grouping, label), best = max(mine.items(), key=lambda kv: kv[1])
        partner = "+".join(t for t in grouping.split("+") if t != task)
        s = summaries[(task, grouping, label)]
        verdict = "" if s.p is None else (", significant" if s.significant else ", not significant")
        mark = _size_mark(s.size, _marks_in_use(summaries))
        head = (f"best partner **{partner}** ({_pct(best)}{mark} with {label}{verdict})" if best > 0 else
                f"no partner helps; the least harm is with **{partner}** ({_pct(best)}{mark} with {label}{verdict})")
        by_method: dict = defaultdict(dict)
        for (_, g, lab), v in mine.items():
            by_method[lab][g] = v
        fair = compare_on_common(by_method, _method_key, _grouping_key)
        lines.append(f"- **{TASKS[task].title}** ({task}): {head}; " + _best_combiner_text(fair))
    if dm:
        by_method = defaultdict(dict)
        for (g, lab), s in dm.items():
            by_method[lab][g] = s.mean
        fair = compare_on_common(by_method, _method_key, _grouping_key)
        if fair["ranked"]:
            (method, value), n = fair["ranked"][0], len(fair["common"])
            pairings = f"{n} pairing{'s' * (n > 1)}"
            share = f"over its {pairings}; the only method" if len(fair["ranked"]) == 1 else \
                f"over the {pairings} all {len(fair['ranked'])} methods share"
            lines.append(f"- **Best method by Δm%**: **{method}** (Δm {_pct(value)} {share}).")
        elif len(by_method) > 1:
            lines.append("- **Best method by Δm%**: the methods share no pairing, so they cannot be compared.")
    both = []
    for grouping in sorted({k[1] for k in mean if k[1].count("+") == 1}):
        tasks = grouping.split("+")
        for label in sorted({k[2] for k in mean if k[1] == grouping}, key=_method_key):
            values = [mean.get((t, grouping, label)) for t in tasks]
            if all(v is not None and v > 0 for v in values):
                both.append(f"{grouping} with {label} ({', '.join(f'{t} {_pct(v)}' for t, v in zip(tasks, values))})")
    lines.append("- **Pairs that help both ways**: " + ("; ".join(both) if both else "none") + ".")
    spread = []
    for (task, grouping), curve in sorted(alpha_curves(trials).items()):
        ys = [y for _, y in curve["points"]]
        spread.append(f"{task} in {grouping}: {max(ys) - min(ys):.1f} points between its best and worst weight, "
                      f"fitted best weight {curve['fit']['argmax']:.2f}")
    if spread:
        lines.append("- **How much weighting matters**: " + "; ".join(spread) + ".")
    return lines


def _best_combiner_text(fair: dict) -> str:
    ranked, common = fair["ranked"], fair["common"]
    if len(fair["lacking"]) == 0 and len(ranked) == 1:
        (method, value), n = ranked[0], len(common)
        return (f"best combiner **{method}**, the only one run (mean change {_pct(value)} over its {n} "
                f"pairing{'s' * (n > 1)}).")
    if not ranked:
        return "the combiners share no pairing, so they cannot be compared."
    (method, value), n = ranked[0], len(common)
    where = ", ".join(common)
    return (f"best combiner **{method}** (mean change {_pct(value)} over the {n} pairing{'s' * (n > 1)} all "
            f"{len(ranked)} combiners share: {where}).")


def _pct(value: float) -> str:
    return f"{value:+.1f}%"


def _marks_in_use(summaries: dict) -> set[str]:
    """Which size marks the report uses: † always where a baseline saw another number of examples;
    ‡ (size unknown) only when some changes are known to be size-matched, since a study that
    recorded no sizes at all is said to be so once, not in every cell."""
    sizes = {s.size for s in summaries.values()}
    return {"unequal"} | ({"unknown"} if sizes - {"unknown"} else set())


def _size_mark(size: str, in_use: set[str]) -> str:
    if size not in in_use:
        return ""
    return NOT_SIZED if size == "unequal" else SIZE_UNKNOWN if size == "unknown" else ""


def size_protocol(trials: list[Trial], change_list: list[Change]) -> list[str]:
    """Sentences on the examples of each task per epoch: size-controlled, per pairing, or not."""
    done = _done(trials)
    sizes = [t.examples.get(task) for t in done for task in t.tasks]
    if not sizes:
        return []
    if all(n is None for n in sizes):
        return ["Examples per epoch: not recorded by these trials (results.json without `examples_per_epoch`, no "
                "`data.examples_per_task`), so whether a multi-task trial saw as much of each task as its "
                "baseline cannot be checked."]
    if None not in sizes and len(set(sizes)) == 1:
        return [f"Size control: every trial saw {sizes[0]:,} examples of each task per epoch."]
    per_group: dict = defaultdict(lambda: defaultdict(set))
    for t in done:
        for task in t.tasks:
            per_group[t.grouping][task].add(t.examples.get(task))

    def describe(grouping):
        text = ", ".join(f"{task} " + " and ".join(_n(n) if n is not None else "unknown"
                                                   for n in sorted(v, key=lambda n: (n is None, n or 0)))
                         for task, v in per_group[grouping].items())
        return text if "+" not in grouping else f"{grouping}: {text}"

    singles = [g for g in sorted(per_group, key=lambda g: ORDER.index(g) if g in ORDER else 9) if "+" not in g]
    multis = sorted((g for g in per_group if "+" in g), key=_grouping_key)
    listing = (f"single-task baselines: {'; '.join(describe(g) for g in singles)}. " if singles else "") + \
        (f"Multi-task trials: {'; '.join(describe(g) for g in multis)}." if multis else "")
    kinds = defaultdict(list)
    for c in change_list:
        kinds[c.size].append(c)
    lines = []
    if change_list and len(kinds["equal"]) == len(change_list):
        lines.append("Size control per pairing: each change is against a single-task baseline that saw as many "
                     "examples of the task per epoch as the multi-task trial did. Examples per epoch, " + listing)
    else:
        lines.append("Examples per epoch, " + listing)
    if kinds["unequal"]:
        c = kinds["unequal"][0]
        lines.append(f"Not size-controlled: {len(kinds['unequal'])} of {len(change_list)} changes (marked {NOT_SIZED}) "
                     f"compare with the only single-task baseline of their task, which saw another number of examples "
                     f"per epoch (e.g. {c.task}: {c.trial.examples[c.task]:,} in {c.trial.name}, "
                     f"{c.baseline.examples[c.task]:,} in {c.baseline.name}); part of such a change is the amount of "
                     "training data, not the sharing.")
    if kinds["unknown"] and len(kinds["unknown"]) < len(change_list):
        lines.append(f"{len(kinds['unknown'])} changes (marked {SIZE_UNKNOWN}) involve a run whose examples per "
                     "epoch were not recorded: their size control cannot be checked.")
    return lines


# ============================================================================================
# Writing the report
# ============================================================================================
def write_report(root: str, out: str | None = None, resamples: int = stats.RESAMPLES) -> str:
    """Write the report folder; returns its URL."""
    import matplotlib

    matplotlib.use("Agg")
    out = out or storage.join(root, "report")
    study = load_study(root)
    trials = study.trials
    done = _done(trials)
    seeds = sorted({t.seed for t in done})
    change_list, no_baseline = match_baselines(trials)
    predictions = Predictions()
    bootstrap(change_list, predictions, resamples)
    summaries = task_summaries(change_list)
    dm = delta_m_summaries(change_list)
    marks = _marks_in_use(summaries)
    figures: dict[str, bytes] = {}
    counts = {s: sum(t.status == s for t in trials) for s in ("done", "failed", "missing", "unreadable")}
    md = [f"# Study report: {root}", "",
          f"{len(trials)} trials: {counts['done']} done, {counts['failed']} failed, {counts['missing']} missing"
          + (f", {counts['unreadable']} unreadable" if counts["unreadable"] else "")
          + f"; seeds {', '.join(map(str, seeds)) or '-'}. "
          "Scores: each task's primary dev metric (SEN accuracy, PAR accuracy, SIM Pearson), best epoch.", ""]
    md += [note + "\n" for note in study.notes]
    unfinished = [t for t in trials if t.status != "done"]
    if unfinished:
        md += ["**Not in the numbers below:** " + "; ".join(
            f"{t.name} ({t.status}{': ' + t.error if t.error else ''})" for t in unfinished), ""]
    md += _protocol(trials, change_list, summaries, dm, seeds, no_baseline, resamples)
    csv: dict[str, list[dict]] = defaultdict(list)
    abs_scores = absolute(trials)
    base_label = baseline_labels(trials)
    for task in ORDER:
        groupings = sorted({k[1] for k in abs_scores if k[0] == task and "+" in k[1]}, key=_grouping_key)
        if not groupings:
            continue
        spec = TASKS[task]
        md += [f"## {spec.title} ({task}, dev {spec.primary_metric})", ""]
        own_baselines = [t for t in done if t.tasks == (task,)]
        md += _table(abs_scores, summaries, change_list, base_label, own_baselines, marks, task, groupings, csv)
        if any(k[0] == task and k[1] in groupings for k in summaries):     # no baseline, no changes to draw
            figures[f"change-{task}.png"] = _heatmap(summaries, marks, task, groupings)
            md += ["", f"![relative change, {task}](change-{task}.png)"]
        md.append("")
    md += _ranking_section(dm, marks, csv)
    views = pareto_views(summaries, trials)
    if views:
        md += _pareto_section(views, csv)
        figures["pareto.png"] = _pareto_figure(views)
        md += ["", "![Pareto view of each pair](pareto.png)", ""]
    curves = alpha_curves(trials, change_list)
    if curves:
        md += ["## Unitary scalarization: change against the task's own weight", "",
               "| task | pairing | R² | best weight (fit) | change there | fitted quadratic |", "|---|---|---|---|---|---|"]
        for (task, grouping), c in sorted(curves.items()):
            a, b, k = c["fit"]["coef"]
            md.append(f"| {task} | {grouping} | {c['fit']['r2']:.3f} | {c['fit']['argmax']:.2f} | "
                      f"{_pct(c['fit']['max'])} | {a:.1f}w² {b:+.1f}w {k:+.1f} |")
            csv["alpha_fits"].append({"task": task, "pairing": grouping, "r2": c["fit"]["r2"],
                                      "best_weight": c["fit"]["argmax"], "max_change_pct": c["fit"]["max"],
                                      "a": a, "b": b, "c": k})
        figures["alpha-curves.png"] = _alpha_figure(curves)
        md += ["", "![alpha curves](alpha-curves.png)", ""]
    conflict = conflict_summary(trials, summaries)
    if conflict:
        md += ["## Gradient conflict and harm (addition runs)", "",
               "| pairing | mean cos(g_i, g_j) | conflict fraction | change of each task |", "|---|---|---|---|"]
        for row in conflict:
            change = ", ".join(f"{k.split('/')[1]} {_pct(v)}" for k, v in row.items() if k.startswith("change/")
                               and v is not None)
            md.append(f"| {row['grouping']} | {row['cos_mean']:.3f} | {row['conflict_fraction']:.2f} | {change} |")
        csv["conflict"] = conflict
        figures["conflict-vs-change.png"] = _conflict_figure(conflict)
        md += ["", "![conflict vs change](conflict-vs-change.png)", ""]
    md += ["## Answers", ""] + (answers(trials, summaries, dm) or ["- Not enough finished trials to answer."]) + [""]
    best = _best_models(trials, predictions)
    if best:
        md += ["## Best model per task (dev predictions of its best epoch)", ""]
        for task, (trial, image, why) in best.items():
            line = f"- {TASKS[task].title}: **{trial.name}** ({trial.scores[task]:.4f})"
            if image is None:
                md.append(f"{line}: {why}")
                continue
            figures[f"best-{task}.png"] = image
            md.append(line + f" ![best {task}](best-{task}.png)")
        md.append("")
    csv["changes"] = [_change_row(c) for c in change_list]
    csv["trials"] = [{"trial": t.name, "status": t.status, "grouping": t.grouping, "method": t.method,
                      "variant": t.variant, "seed": t.seed, **{f"score/{k}": v for k, v in t.scores.items()},
                      **{f"examples_per_epoch/{k}": v for k, v in t.examples.items()},
                      "cos_mean": t.cos_mean, "conflict_fraction": t.conflict, "error": t.error} for t in trials]
    for name, image in figures.items():
        storage.write_bytes(storage.join(out, name), image)
    for name, rows in csv.items():
        if rows:
            storage.write_text(storage.join(out, f"{name}.csv"), _csv(rows))
    storage.write_text(storage.join(out, "report.md"), "\n".join(md) + "\n")
    return out


def _protocol(trials, change_list, summaries, dm, seeds, no_baseline, resamples) -> list[str]:
    md = ["## Protocol", ""]
    md += [f"- {line}" for line in size_protocol(trials, change_list)]
    md.append("- Baselines: each change is against the single-task run of the same task, settings and seed; of "
              "several such runs, the one that saw as many examples of the task per epoch as the multi-task run. "
              "Δm% is the mean of a multi-task run's per-task changes (Maninis et al. 2019; all metrics here are "
              "higher-is-better).")
    n_task = sum(s.p is not None for s in summaries.values())
    n_dm = sum(s.p is not None for s in dm.values())
    family = (f"Holm-corrected over the report's {n_task} tested per-task changes, and separately over its {n_dm} "
              f"Δm values; α = {ALPHA}; `*` marks a significant change" if n_task else
              "no change could be tested, so none is marked significant")
    boot = (f"a paired bootstrap over dev examples (the multi-task run's and the baseline's predictions on the same "
            f"rows, matched by id, resampled together; {resamples:,} resamples, seeded, so the report is reproducible)")
    if len(seeds) < 2:
        md.append(f"- Significance (one seed): {boot}. The interval is the 95% percentile interval of the % change; "
                  "p is two-sided, from the resampled changes' normal tail (counting resamples across 0 cannot go "
                  f"below 1/{resamples:,}, which Holm's correction would never let pass); {family}. This sees only "
                  "the dev set's sampling: another training seed may move a change by more (seed-to-seed variance, "
                  "the reference study's main limitation, is not in it). Run with `--seeds 0,1,2` for a test that "
                  "includes it.")
    else:
        md.append(f"- Significance: a paired t-test across seeds of each change (each seed's multi-task run against "
                  f"the same seed's single-task run, so initialisation and data order cancel), two-sided; {family}. "
                  "Seed-to-seed training variance is the noise a change must beat, which a bootstrap over dev "
                  f"examples cannot see. The bracketed intervals are from {boot}, applied to every seed at once and "
                  "the seeds' changes averaged per resample: the dev-set noise of the seed-mean change (each seed's "
                  "own interval is in changes.csv).")
    noise = dev_noise(change_list)
    if noise:
        md.append("- Dev-set noise: the median half-width of the 95% intervals, i.e. the change that resampling the "
                  "dev set alone produces: " + "; ".join(
                      f"{TASKS[t].title} ±{v['half_width']:.1f} points ({'/'.join(f'{r:,}' for r in v['rows'])} dev "
                      f"rows, {v['n']} changes)" for t, v in sorted(noise.items(), key=lambda kv: ORDER.index(kv[0])))
                  + ". Smaller changes are not distinguishable from it on one run.")
    missing = [c for c in change_list if c.lo is None]
    if missing:
        reasons: dict = defaultdict(list)
        for c in missing:
            reasons[c.no_interval_kind].append(f"{c.trial.name} {c.task}")
        md.append(f"- No interval for {len(missing)} of {len(change_list)} changes: " + "; ".join(
            f"{why} ({len(who)}: {', '.join(who[:3])}{', ...' if len(who) > 3 else ''})"
            for why, who in sorted(reasons.items(), key=lambda kv: -len(kv[1]))) + ".")
    if no_baseline:
        md.append(f"- No baseline, so no change, for {len(no_baseline)}: " + "; ".join(no_baseline) + ".")
    return md + [""]


def _cell(seeds: dict[int, float], digits: int, signed: bool = False) -> str:
    if not seeds:
        return ""
    mean, std = mean_std(seeds.values())
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if len(seeds) > 1 else "")


def _change_text(s: Summary, marks: set[str], parens: bool = True) -> str:
    """'(+10.3% [+2.1, +18.0])† *': change over seeds, its interval, size mark, significance."""
    interval = f" [{s.lo:+.1f}, {s.hi:+.1f}]" if s.lo is not None else ""
    body = f"{_cell(s.values, 1, signed=True)}%{interval}"
    return (f"({body})" if parens else body) + _size_mark(s.size, marks) + (" *" if s.significant else "")


def _table(abs_scores, summaries, change_list, base_label, baselines, marks, task, groupings, csv) -> list[str]:
    labels = sorted({k[2] for k in abs_scores if k[0] == task and k[1] in groupings}, key=_method_key)
    base = {k: v for k, v in abs_scores.items() if k[0] == task and k[1] == task}
    used: dict = defaultdict(set)         # grouping -> the baseline rows its changes are against
    for c in change_list:
        if c.task == task:
            used[c.trial.grouping].add(base_label[c.baseline.name])
    lines = ["Absolute score (top rows: the single-task baselines); below, the change against the matched baseline "
             "in %, with its 95% interval.", "",
             "| | " + " | ".join(groupings) + " |", "|---" * (len(groupings) + 1) + "|"]
    by_size = {label: min((b.examples.get(task) or 0 for b in baselines if base_label[b.name] == label), default=0)
               for label in {k[2] for k in base}}
    for (_, _, label), seeds in sorted(base.items(), key=lambda kv: (by_size[kv[0][2]], kv[0][2])):
        show = len(base) == 1
        lines.append(f"| {label} | " + " | ".join(_cell(seeds, 4) if show or label in used[g] else ""
                                                  for g in groupings) + " |")
    for label in labels:
        cells = []
        for g in groupings:
            a = abs_scores.get((task, g, label), {})
            s = summaries.get((task, g, label))
            cells.append(f"{_cell(a, 4)} {_change_text(s, marks)}" if a and s else f"{_cell(a, 4)} (no baseline)"
                         if a else "")
            if a:
                row = {"task": task, "grouping": g, "method": label, "score_mean": mean_std(a.values())[0],
                       "score_std": mean_std(a.values())[1], "seeds": len(a)}
                if s:
                    row.update(change_pct_mean=s.mean, change_pct_std=s.std, ci_lo=s.lo, ci_hi=s.hi, test=s.test,
                               p=s.p, p_holm=s.p_holm, significant=s.significant,
                               size_controlled={"equal": True, "unequal": False}.get(s.size))
                csv["scores"].append(row)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _change_row(c: Change) -> dict:
    return {"trial": c.trial.name, "seed": c.trial.seed, "task": c.task, "grouping": c.trial.grouping,
            "method": c.trial.label, "baseline": c.baseline.name, "score": c.trial.scores[c.task],
            "baseline_score": c.baseline.scores[c.task], "change_pct": c.pct, "ci_lo": c.lo, "ci_hi": c.hi,
            "p_bootstrap": c.p_boot, "p_bootstrap_counted": c.p_empirical, "dev_rows": c.rows or None,
            "examples_per_epoch": c.trial.examples.get(c.task),
            "baseline_examples_per_epoch": c.baseline.examples.get(c.task), "size_match": c.size,
            "no_interval": c.no_interval}


def _ranking_section(dm: dict[tuple, Summary], marks: set[str], csv) -> list[str]:
    if not dm:
        return []
    by_method: dict = defaultdict(dict)
    for (g, lab), s in dm.items():
        by_method[lab][g] = s.mean
    fair = compare_on_common(by_method, _method_key, _grouping_key)
    common, pairings = fair["common"], fair["pairings"]
    md = ["## Methods ranked by Δm% (over the pairings they share)", "",
          "Δm%: the mean over a run's tasks of each task's change against its baseline (mean over seeds, 95% "
          "interval, `*` significant). Methods are ranked by their mean Δm over the pairings _every_ method was run "
          "on; a method's pairings beyond those are shown but not counted.", ""]
    if not common:
        md += ["No pairing is common to all methods, so they cannot be ranked together; compare them per pairing.", ""]
    if fair["lacking"]:
        lacking = sorted(fair["lacking"].items(), key=lambda kv: _method_key(kv[0]))
        md += ["Not run on every pairing: " + "; ".join(f"{m} (lacks {', '.join(gs)})" for m, gs in lacking) + ".", ""]
    head = ["rank", "method", f"mean Δm over {len(common)} common pairing{'s' * (len(common) != 1)}"] + pairings
    md += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    order = [m for m, _ in fair["ranked"]] or sorted(by_method, key=_method_key)
    means = dict(fair["ranked"])
    for rank, method in enumerate(order, 1):
        cells = []
        for g in pairings:
            s = dm.get((g, method))
            cells.append("" if s is None else _change_text(s, marks, parens=False))
        md.append(f"| {rank if means else ''} | {method} | {_pct(means[method]) if method in means else ''} | "
                  + " | ".join(cells) + " |")
        for g in pairings:
            s = dm.get((g, method))
            if s:
                csv["delta_m"].append({"method": method, "grouping": g, "seeds": len(s.values), "delta_m_mean": s.mean,
                                       "delta_m_std": s.std, "ci_lo": s.lo, "ci_hi": s.hi, "test": s.test, "p": s.p,
                                       "p_holm": s.p_holm, "significant": s.significant, "common": g in common,
                                       "rank": rank if means else None,
                                       "mean_over_common": means.get(method)})
    return md + [""]


def _pareto_section(views, csv) -> list[str]:
    md = ["## Pareto view of each pair", "",
          "Each method's change of the pair's first task against its second (mean over seeds). A setting is on the "
          "Pareto front when no other setting is at least as good for both tasks and better for one; only the front "
          "is worth choosing from, and where on it depends on which task matters more.", "",
          "| pairing | on the front (change of each task) | dominated |", "|---|---|---|"]
    for v in views:
        a, b = v["tasks"]
        pts = v["points"]
        front = "; ".join(f"{m} ({a} {_pct(pts[m]['x'])}, {b} {_pct(pts[m]['y'])})" for m in v["front"])
        dominated = ", ".join(sorted((m for m in pts if m not in v["front"]), key=_method_key)) or "none"
        md.append(f"| {v['grouping']}{' (' + v['variant'] + ')' if v['variant'] else ''} | {front} | {dominated} |")
        for m, p in pts.items():
            csv["pareto"].append({"grouping": v["grouping"], "variant": v["variant"], "method": m,
                                  "change_first": p["x"], "change_second": p["y"], "first_task": a, "second_task": b,
                                  "on_front": m in v["front"]})
    return md


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _heatmap(summaries, marks, task, groupings) -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    labels = sorted({k[2] for k in summaries if k[0] == task and k[1] in groupings}, key=_method_key)
    data = np.full((len(labels), len(groupings)), np.nan)
    for i, label in enumerate(labels):
        for j, g in enumerate(groupings):
            if (task, g, label) in summaries:
                data[i, j] = summaries[(task, g, label)].mean
    # A floor on the colour scale: changes all near 0 stay pale instead of filling the scale with noise.
    limit = max(0.5, float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groupings), 0.9 + 0.42 * len(labels)))
    image = ax.imshow(data, cmap="RdBu", norm=TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit), aspect="auto")
    for i, label in enumerate(labels):
        for j, g in enumerate(groupings):
            if np.isfinite(data[i, j]):
                s = summaries[(task, g, label)]
                star = " *" if s.significant else ""
                ax.text(j, i, f"{data[i, j]:+.1f}{_size_mark(s.size, marks)}{star}", ha="center", va="center",
                        fontsize=8, color="white" if abs(data[i, j]) > 0.6 * limit else "black")
    ax.set_xticks(range(len(groupings)), groupings)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(f"{TASKS[task].title} ({task}): change against single-task, %")
    fig.colorbar(image, ax=ax, label="% change")
    return _figure_bytes(fig)


def _pareto_figure(views) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cols = min(3, len(views))
    rows = math.ceil(len(views) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.6 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    styles = {"addition": ("s", "black"), "PCGrad": ("^", "tab:red")}
    for ax, view in zip(axes.flat, views):
        a, b = view["tasks"]
        front = set(view["front"])
        for method, p in view["points"].items():
            if method.startswith("α="):
                marker, color = "o", cmap(0.1 + 0.8 * float(method[2:]))
            else:
                marker, color = styles.get(method, ("D", "tab:orange"))
            (xlo, xhi), (ylo, yhi) = p["x_ci"], p["y_ci"]
            if xlo is not None and ylo is not None:
                ax.errorbar(p["x"], p["y"], xerr=[[p["x"] - xlo], [xhi - p["x"]]],
                            yerr=[[p["y"] - ylo], [yhi - p["y"]]], fmt="none", ecolor="lightgrey", lw=0.8, zorder=1)
            on = method in front
            ax.scatter(p["x"], p["y"], marker=marker, color=color, s=70 if on else 40, zorder=3,
                       edgecolors="black" if on else "none", linewidths=1.3)
        _place_labels(ax, [(m[2:] if m.startswith("α=") else m, p["x"], p["y"], m in front)
                           for m, p in view["points"].items()])
        xs = [view["points"][m]["x"] for m in view["front"]]
        ys = [view["points"][m]["y"] for m in view["front"]]
        ax.plot(xs, ys, "-", color="black", lw=1.0, alpha=0.6, zorder=2)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"% change of {a} ({TASKS[a].title}); α is {a}'s loss weight")
        ax.set_ylabel(f"% change of {b} ({TASKS[b].title})")
        ax.set_title(view["grouping"] + (f" ({view['variant']})" if view["variant"] else ""))
    for ax in list(axes.flat)[len(views):]:
        ax.set_visible(False)
    handles = [Line2D([], [], marker="o", ls="", color=cmap(0.5), label="scalarization, labelled by α"),
               Line2D([], [], marker="s", ls="", color="black", label="addition"),
               Line2D([], [], marker="^", ls="", color="tab:red", label="PCGrad"),
               Line2D([], [], marker="D", ls="", color="tab:orange", label="other"),
               Line2D([], [], marker="o", ls="-", color="black", markerfacecolor="white", markeredgewidth=1.3,
                      label="Pareto front (ringed)")]
    axes.flat[0].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle("Change of one task against the other's, per method (95% dev-bootstrap intervals in grey)",
                 fontsize=10)
    fig.tight_layout()
    return _figure_bytes(fig)


def _place_labels(ax, labels) -> None:
    """Label points without piling labels onto each other: each label takes the first of a few
    offsets around its point (nearest first) that keeps clear of the points and labels placed so
    far, else the clearest one.  α settings are labelled by their α alone (the legend says so)."""
    import numpy as np

    ax.autoscale_view()
    to_px = ax.transData.transform
    scale = ax.figure.dpi / 72                                # offsets are in points, positions in pixels
    taken = [tuple(to_px((x, y))) for _, x, y, _ in labels]
    offsets = [(5, 3), (5, -9), (-5, 3), (-5, -9), (5, 10), (-5, -16)]
    for text, x, y, bold in sorted(labels, key=lambda item: (item[1], item[2])):
        px, py = to_px((x, y))

        def clearance(o):
            cx, cy = px + (o[0] + 6 * np.sign(o[0])) * scale, py + (o[1] + 3) * scale   # the label's centre, roughly
            return min(np.hypot(cx - tx, cy - ty) for tx, ty in taken)
        best = next((o for o in offsets if clearance(o) > 11 * scale), max(offsets, key=clearance))
        taken.append((px + (best[0] + 6 * np.sign(best[0])) * scale, py + (best[1] + 3) * scale))
        ax.annotate(text, (x, y), xytext=best, textcoords="offset points", fontsize=7.5,
                    ha="left" if best[0] > 0 else "right", fontweight="bold" if bold else "normal")


def _alpha_figure(curves) -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = sorted({t for t, _ in curves}, key=ORDER.index)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, grouping), c in sorted(curves.items()):
            if t != task:
                continue
            w = np.array([p[0] for p in c["points"]])
            line = ax.plot(w, [p[1] for p in c["points"]], "o", alpha=0.7)[0]
            grid = np.linspace(0, 1, 101)
            a, b, k = c["fit"]["coef"]
            ax.plot(grid, a * grid ** 2 + b * grid + k, "-", color=line.get_color(),
                    label=f"{grouping}: R²={c['fit']['r2']:.2f}, max at {c['fit']['argmax']:.2f}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"weight of {task}'s loss")
        ax.set_ylabel("% change against single-task")
        ax.set_title(TASKS[task].title)
        ax.legend(fontsize=7)
    return _figure_bytes(fig)


def _conflict_figure(rows) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for row in rows:
        for key, value in row.items():
            if key.startswith("change/") and value is not None:
                ax.scatter(row["cos_mean"], value)
                ax.annotate(f"{key.split('/')[1]} in {row['grouping']}", (row["cos_mean"], value), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("mean cosine of the two tasks' gradients (training)")
    ax.set_ylabel("% change against single-task")
    ax.set_title("Does gradient conflict predict harm?")
    return _figure_bytes(fig)


def _best_models(trials: list[Trial], predictions: Predictions) -> dict[str, tuple[Trial, bytes | None, str]]:
    """The trial with the best score of each task, and a figure of its dev predictions (or why not)."""
    out = {}
    for task in ORDER:
        candidates = [t for t in _done(trials) if task in t.scores]
        if not candidates:
            continue
        best = max(candidates, key=lambda t: t.scores[task])
        rows, why = predictions.rows(best, task)
        out[task] = (best, None, why) if rows is None else (best, _prediction_figure(task, rows[1], rows[2]), "")
    return out


def _prediction_figure(task: str, pred, gold) -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    if TASKS[task].regression:
        ax.scatter(gold, pred, s=8, alpha=0.6)
        ax.plot([0, 5], [0, 5], "--", color="grey", label="ideal")
        ax.set_xlabel("true similarity")
        ax.set_ylabel("predicted similarity")
        ax.legend(fontsize=7)
    else:
        k = TASKS[task].num_outputs if TASKS[task].num_outputs > 1 else 2
        matrix = np.zeros((k, k), dtype=int)
        for g, p in zip(gold.astype(int), pred.astype(int)):
            if 0 <= g < k and 0 <= p < k:          # a label outside the task's classes is not drawn
                matrix[g, p] += 1
        ax.imshow(matrix, cmap="Blues")
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    ax.set_title(f"{TASKS[task].title} ({task}), best model")
    return _figure_bytes(fig)


def _csv(rows: list[dict]) -> str:
    import csv as csvlib

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csvlib.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("storage", help="the sweep's storage folder or fsspec URL")
    p.add_argument("--out", default=None, help="report folder or URL (default: <storage>/report)")
    args = p.parse_args(argv)
    try:
        out = write_report(args.storage.rstrip("/"), args.out)
    except MtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {storage.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
