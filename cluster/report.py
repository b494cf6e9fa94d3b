"""The study's answer: which tasks to train together and how to combine their losses.

    python launch/report.py runs/sweep                 # writes runs/sweep/report/
    python launch/report.py s3://bucket/study --out /tmp/report

Reads every trial of a sweep (its own results.json and best/dev_predictions.json, on any fsspec
URL) and writes ``report.md``, PNG figures and the numbers as CSV:

- absolute dev scores per task, by grouping and loss combination, the single-task baseline on top;
- each score's change (%) against the same seed's single-task baseline, as a table and heatmap;
- for unitary scalarization, each task's change against its own weight with a fitted quadratic
  (its R² and the weight that maximises it);
- with several seeds, mean ± std and a paired t-test across seeds of every change (Holm-corrected
  over the report's comparisons); with one seed, no significance is claimed;
- each pairing's gradient conflict (mean cosine, conflict fraction) beside its change;
- answers: best partner and combiner per task, pairs that help both ways, how much weighting
  matters; confusion matrices / a scatter for the best model of each task;
- which trials are missing or failed.

Scores are each task's primary dev metric (SEN accuracy, PAR accuracy, SIM Pearson), as in the
reference study.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from mtl import storage
from mtl.config import RunConfig
from mtl.errors import MtlError
from mtl.monitor import flatten
from mtl.tasks import TASKS

ORDER = ("sst", "para", "sts")
ALPHA = 0.05


# ============================================================================================
# Reading a study
# ============================================================================================
@dataclass
class Trial:
    name: str
    status: str                                  # done, failed, missing
    tasks: tuple[str, ...] = ()
    method: str = ""                             # addition, α=0.3, PCGrad, ...
    variant: str = ""                            # other settings that vary across the study
    seed: int = 0
    weights: dict = field(default_factory=dict)  # task -> its loss weight (scalarization)
    scores: dict = field(default_factory=dict)   # task -> primary dev metric
    cos_mean: float | None = None                # mean cosine of the pair's task gradients
    conflict: float | None = None                # fraction of measured steps with a conflict
    error: str = ""
    folder: str = ""

    @property
    def grouping(self) -> str:
        return "+".join(self.tasks)


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


def load_study(root: str) -> list[Trial]:
    """Every trial the sweep's table lists (or, without a table, every trial folder), read
    fresh from its own results.json."""
    table_url = storage.join(root, "results.json")
    if storage.exists(table_url):
        names = [row["trial"] for row in json.loads(storage.read_text(table_url))]
    else:
        names = [n for n in storage.listdir(root) if storage.exists(storage.join(root, n, "results.json"))]
    if not names:
        raise MtlError(f"{root}: no sweep here (no results.json table and no trial folders with results)")
    trials = [_read_trial(root, n) for n in names]
    configs = {t.name: t for t in trials if t.tasks}
    _name_variants(root, configs)
    return trials


def _read_trial(root: str, name: str) -> Trial:
    folder = storage.join(root, name)
    url = storage.join(folder, "results.json")
    if not storage.exists(url):
        return Trial(name, "missing", folder=folder)
    res = json.loads(storage.read_text(url))
    cfg = RunConfig.from_dict(res["config"])
    method, weights = method_of(cfg)
    trial = Trial(name, res.get("status", "done"), cfg.data.tasks, method, seed=cfg.seed, weights=weights,
                  error=res.get("error", ""), folder=folder)
    if trial.status == "done":
        metrics = res["best"].get("metrics", {})
        trial.scores = {t: metrics[f"{t}/{TASKS[t].primary_metric}"] for t in cfg.data.tasks}
        cos = res.get("grad_cos_mean") or {}
        trial.cos_mean = sum(cos.values()) / len(cos) if cos else None
        trial.conflict = res.get("grad_conflict_fraction")
    trial._identity = flatten(cfg.identity())            # noqa: SLF001 - read by _name_variants
    return trial


# Settings the report shows in its own way (tasks, combination, seed), and how the batch is split
# (workers x batch x accumulation: the same steps as one worker with the whole batch; the global
# batch stands for them).
_SHOWN = ("data.tasks", "combiner.", "seed", "parallel.", "optim.batch_size", "optim.grad_accum")


def _name_variants(root: str, trials: dict[str, Trial]) -> None:
    """Other settings that vary across the study (an lr axis, say) become part of the row label,
    so that runs of different settings are never averaged together."""
    identities = []
    for t in trials.values():
        i = t._identity                                      # noqa: SLF001
        i["global batch"] = i["optim.batch_size"] * i["optim.grad_accum"] * i["parallel.workers"]
        identities.append(i)
    keys = sorted({k for i in identities for k in i})
    varied = [k for k in keys if not k.startswith(_SHOWN) and len({json.dumps(i.get(k)) for i in identities}) > 1]
    for t in trials.values():
        t.variant = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(t._identity.get(k))}" for k in varied)  # noqa: SLF001


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


def baselines(trials: list[Trial]) -> dict[tuple[str, str, int], float]:
    """(task, variant, seed) -> the single-task trial's score."""
    return {(t.tasks[0], t.variant, t.seed): t.scores[t.tasks[0]] for t in trials
            if t.status == "done" and len(t.tasks) == 1}


def changes(trials: list[Trial]) -> dict[tuple[str, str, str], dict[int, float]]:
    """(task, grouping, row label) -> {seed: % change of the task's score against the same seed's
    (and variant's) single-task baseline}."""
    base = baselines(trials)
    out: dict = defaultdict(dict)
    for t in trials:
        if t.status != "done" or len(t.tasks) < 2:
            continue
        for task in t.tasks:
            b = base.get((task, t.variant, t.seed))
            if b:
                out[(task, t.grouping, _label(t.method, t.variant))][t.seed] = 100.0 * (t.scores[task] - b) / abs(b)
    return dict(out)


def absolute(trials: list[Trial]) -> dict[tuple[str, str, str], dict[int, float]]:
    """(task, grouping, row label) -> {seed: score}; single-task trials under 'single task'."""
    out: dict = defaultdict(dict)
    for t in trials:
        if t.status == "done":
            label = "single task" + (f", {t.variant}" if t.variant else "") if len(t.tasks) == 1 else \
                _label(t.method, t.variant)
            for task in t.tasks:
                out[(task, t.grouping, label)][t.seed] = t.scores[task]
    return dict(out)


def mean_std(values) -> tuple[float, float]:
    v = list(values)
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mean, std


def significance(per_seed: dict[tuple, dict[int, float]]) -> dict[tuple, dict]:
    """Paired t-test across seeds of each change (H0: mean change 0), two-sided, Holm-corrected
    over all the comparisons given.  A change with fewer than 2 seeds gets no p-value."""
    from scipy import stats

    tests = {}
    for key, seeds in per_seed.items():
        values = list(seeds.values())
        p = None
        if len(values) >= 2:
            if max(values) == min(values):
                p = 0.0 if values[0] != 0 else 1.0       # no spread: t is infinite (or undefined)
            else:
                p = float(stats.ttest_1samp(values, 0.0).pvalue)
        tests[key] = {"n": len(values), "p": p}
    ranked = sorted((k for k in tests if tests[k]["p"] is not None), key=lambda k: tests[k]["p"])
    m, running = len(ranked), 0.0
    for i, key in enumerate(ranked):        # Holm: p_(i) * (m - i), made monotone
        running = max(running, min(1.0, tests[key]["p"] * (m - i)))
        tests[key]["p_holm"] = running
        tests[key]["significant"] = running < ALPHA
    return tests


def fit_quadratic(points: list[tuple[float, float]]) -> dict:
    """Least-squares y = a w² + b w + c, its R², and the weight in [0, 1] that maximises it."""
    import numpy as np

    w = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    a, b, c = np.polyfit(w, y, 2)
    fitted = a * w ** 2 + b * w + c
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - fitted) ** 2).sum()) / total if total > 0 else 1.0
    candidates = [0.0, 1.0] + ([-b / (2 * a)] if a != 0 and 0.0 < -b / (2 * a) < 1.0 else [])
    best = max(candidates, key=lambda x: a * x * x + b * x + c)
    return {"coef": (float(a), float(b), float(c)), "r2": r2, "argmax": float(best),
            "max": float(a * best * best + b * best + c)}


def alpha_curves(trials: list[Trial]) -> dict[tuple[str, str], dict]:
    """(task, grouping) -> {"points": [(own weight, % change)], "fit": ...} for unitary
    scalarization of pairs (per seed points, so R² sees the seed noise too)."""
    base = baselines(trials)
    points: dict = defaultdict(list)
    for t in trials:
        if t.status == "done" and t.method.startswith("α=") and len(t.tasks) == 2:
            for task in t.tasks:
                b = base.get((task, t.variant, t.seed))
                if b:
                    key = (task, t.grouping + (f" ({t.variant})" if t.variant else ""))
                    points[key].append((t.weights[task], 100.0 * (t.scores[task] - b) / abs(b)))
    return {k: {"points": sorted(v), "fit": fit_quadratic(v)} for k, v in points.items()
            if len({w for w, _ in v}) >= 3}


def conflict_summary(trials: list[Trial]) -> list[dict]:
    """Per pairing (its addition runs): mean gradient cosine and conflict fraction, beside each
    task's % change."""
    ch = changes(trials)
    rows = []
    groups: dict = defaultdict(list)
    for t in trials:
        if t.status == "done" and len(t.tasks) == 2 and t.method == "addition" and t.cos_mean is not None:
            groups[(t.grouping, t.variant)].append(t)
    for (grouping, variant), ts in sorted(groups.items()):
        row = {"grouping": grouping + (f" ({variant})" if variant else ""),
               "cos_mean": mean_std(t.cos_mean for t in ts)[0],
               "conflict_fraction": mean_std(t.conflict or 0.0 for t in ts)[0]}
        for task in ts[0].tasks:
            seeds = ch.get((task, grouping, _label("addition", variant)), {})
            row[f"change/{task}"] = mean_std(seeds.values())[0] if seeds else None
        rows.append(row)
    return rows


def answers(trials: list[Trial], tests: dict) -> list[str]:
    """Sentences written from the numbers."""
    ch = changes(trials)
    mean = {k: mean_std(v.values())[0] for k, v in ch.items()}
    lines = []
    for task in ORDER:
        mine = {k: v for k, v in mean.items() if k[0] == task}
        if not mine:
            continue
        (_, grouping, label), best = max(mine.items(), key=lambda kv: kv[1])
        partner = "+".join(t for t in grouping.split("+") if t != task)
        sig = tests.get((task, grouping, label), {})
        verdict = "" if sig.get("p") is None else (", significant" if sig.get("significant") else ", not significant")
        head = (f"best partner **{partner}** ({_pct(best)} with {label}{verdict})" if best > 0 else
                f"no partner helps; the least harm is with **{partner}** ({_pct(best)} with {label}{verdict})")
        by_method: dict = defaultdict(list)
        for (_, _, lab), v in mine.items():
            by_method[lab].append(v)
        method, values = max(by_method.items(), key=lambda mv: sum(mv[1]) / len(mv[1]))
        lines.append(f"- **{TASKS[task].title}** ({task}): {head}; best combiner **{method}** (mean change "
                     f"{_pct(sum(values) / len(values))} over its {len(values)} pairing{'s' * (len(values) > 1)}).")
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


def _pct(value: float) -> str:
    return f"{value:+.1f}%"


# ============================================================================================
# Writing the report
# ============================================================================================
def write_report(root: str, out: str | None = None) -> str:
    """Write the report folder; returns its URL."""
    import matplotlib

    matplotlib.use("Agg")
    out = out or storage.join(root, "report")
    trials = load_study(root)
    done = [t for t in trials if t.status == "done"]
    seeds = sorted({t.seed for t in done})
    ch = changes(trials)
    tests = significance(ch)
    figures: dict[str, bytes] = {}
    md = [f"# Study report: {root}", "",
          f"{len(trials)} trials: {len(done)} done, {sum(t.status == 'failed' for t in trials)} failed, "
          f"{sum(t.status == 'missing' for t in trials)} missing; seeds {', '.join(map(str, seeds)) or '-'}. "
          "Scores: each task's primary dev metric (SEN accuracy, PAR accuracy, SIM Pearson), best epoch.", ""]
    unfinished = [t for t in trials if t.status != "done"]
    if unfinished:
        md += ["**Not in the numbers below:** " + "; ".join(
            f"{t.name} ({t.status}{': ' + t.error if t.error else ''})" for t in unfinished), ""]
    if len(seeds) < 2:
        md += ["With one seed no significance can be claimed: a change is one run against one run, and the "
               "reference study named this as its main limitation. Run with `--seeds 0,1,2`.", ""]
    else:
        md += [f"Significance: a paired t-test across seeds of each change (each seed's multi-task run against "
               f"the same seed's single-task run, so initialisation and data order cancel), two-sided, Holm-"
               f"corrected over the report's {sum(v['p'] is not None for v in tests.values())} comparisons, "
               f"α = {ALPHA}. `*` marks a significant change. Seed-to-seed training variance is the noise a "
               "change must beat; a bootstrap over dev examples would only see test-set sampling.", ""]
    csv: dict[str, list[dict]] = defaultdict(list)
    abs_scores = absolute(trials)
    for task in ORDER:
        groupings = sorted({k[1] for k in abs_scores if k[0] == task and "+" in k[1]}, key=lambda g: (g.count("+"), g))
        if not groupings:
            continue
        spec = TASKS[task]
        md += [f"## {spec.title} ({task}, dev {spec.primary_metric})", ""]
        md += _table(abs_scores, ch, tests, task, groupings, csv)
        figures[f"change-{task}.png"] = _heatmap(ch, tests, task, groupings)
        md += ["", f"![relative change, {task}](change-{task}.png)", ""]
    curves = alpha_curves(trials)
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
    conflict = conflict_summary(trials)
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
    md += ["## Answers", ""] + (answers(trials, tests) or ["- Not enough finished trials to answer."]) + [""]
    best = _best_models(trials)
    if best:
        md += ["## Best model per task (dev predictions of its best epoch)", ""]
        for task, (trial, image) in best.items():
            line = f"- {TASKS[task].title}: **{trial.name}** ({trial.scores[task]:.4f})"
            if image is None:
                md.append(line + ": no dev predictions saved with its best weights")
                continue
            figures[f"best-{task}.png"] = image
            md.append(line + f" ![best {task}](best-{task}.png)")
        md.append("")
    csv["trials"] = [{"trial": t.name, "status": t.status, "grouping": t.grouping, "method": t.method,
                      "variant": t.variant, "seed": t.seed, **{f"score/{k}": v for k, v in t.scores.items()},
                      "cos_mean": t.cos_mean, "conflict_fraction": t.conflict, "error": t.error} for t in trials]
    for name, image in figures.items():
        storage.write_bytes(storage.join(out, name), image)
    for name, rows in csv.items():
        storage.write_text(storage.join(out, f"{name}.csv"), _csv(rows))
    storage.write_text(storage.join(out, "report.md"), "\n".join(md) + "\n")
    return out


def _cell(seeds: dict[int, float], digits: int, signed: bool = False) -> str:
    if not seeds:
        return ""
    mean, std = mean_std(seeds.values())
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if len(seeds) > 1 else "")


def _table(abs_scores, ch, tests, task, groupings, csv) -> list[str]:
    labels = sorted({k[2] for k in abs_scores if k[0] == task and k[1] in groupings}, key=_method_key)
    base = {k: v for k, v in abs_scores.items() if k[0] == task and k[1] == task}
    lines = ["Absolute score (top row: the single-task baseline); below it, change against that baseline in %.", "",
             "| | " + " | ".join(groupings) + " |", "|---" * (len(groupings) + 1) + "|"]
    for (_, _, label), seeds in sorted(base.items()):
        lines.append(f"| {label} | " + " | ".join(_cell(seeds, 4) for _ in groupings) + " |")
    for label in labels:
        cells = []
        for g in groupings:
            a = abs_scores.get((task, g, label), {})
            c = ch.get((task, g, label), {})
            star = " *" if tests.get((task, g, label), {}).get("significant") else ""
            change = f" ({_cell(c, 1, signed=True)}%){star}" if c else " (no baseline)"
            cells.append(f"{_cell(a, 4)}{change}" if a else "")
            if a:
                row = {"task": task, "grouping": g, "method": label, "score_mean": mean_std(a.values())[0],
                       "score_std": mean_std(a.values())[1], "seeds": len(a)}
                if c:
                    t = tests.get((task, g, label), {})
                    row.update(change_pct_mean=mean_std(c.values())[0], change_pct_std=mean_std(c.values())[1],
                               p=t.get("p"), p_holm=t.get("p_holm"), significant=t.get("significant"))
                csv["scores"].append(row)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _heatmap(ch, tests, task, groupings) -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    labels = sorted({k[2] for k in ch if k[0] == task and k[1] in groupings}, key=_method_key)
    data = np.full((len(labels), len(groupings)), np.nan)
    for i, label in enumerate(labels):
        for j, g in enumerate(groupings):
            if (task, g, label) in ch:
                data[i, j] = mean_std(ch[(task, g, label)].values())[0]
    limit = max(1e-9, float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groupings), 0.9 + 0.42 * len(labels)))
    image = ax.imshow(data, cmap="RdBu", norm=TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit), aspect="auto")
    for i, label in enumerate(labels):
        for j, g in enumerate(groupings):
            if np.isfinite(data[i, j]):
                star = " *" if tests.get((task, g, label), {}).get("significant") else ""
                ax.text(j, i, f"{data[i, j]:+.1f}{star}", ha="center", va="center", fontsize=8,
                        color="white" if abs(data[i, j]) > 0.6 * limit else "black")
    ax.set_xticks(range(len(groupings)), groupings)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(f"{TASKS[task].title} ({task}): change against single-task, %")
    fig.colorbar(image, ax=ax, label="% change")
    return _figure_bytes(fig)


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


def _best_models(trials: list[Trial]) -> dict[str, tuple[Trial, bytes | None]]:
    """The trial with the best score of each task, and a figure of its dev predictions."""
    from mtl.export import read_predictions

    out = {}
    for task in ORDER:
        candidates = [t for t in trials if t.status == "done" and task in t.scores]
        if not candidates:
            continue
        best = max(candidates, key=lambda t: t.scores[task])
        try:
            out[task] = (best, _prediction_figure(task, read_predictions(best.folder)[task]))
        except (MtlError, KeyError, OSError):
            out[task] = (best, None)
    return out


def _prediction_figure(task: str, predictions: dict) -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np

    pred, gold = np.array(predictions["pred"], dtype=float), np.array(predictions["gold"], dtype=float)
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
