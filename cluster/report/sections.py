"""The report's sections, in the order ``SECTIONS`` lists them: each reads the study's ``Analysis``
and appends its Markdown lines, its CSV rows and its figures to the ``ReportFiles`` being written."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from cluster.report.answers import answers
from cluster.report.comparisons import (Analysis, Change, Cost, alpha_curves, conflict_summary, grouping_order,
                                        method_cost, method_order, pareto_views)
from cluster.report.figures import (alpha_figure, change_heatmap, conflict_figure, pareto_figure,
                                    prediction_figure)
from cluster.report.formatting import COST_HEAD, change_text, cost_text, pct, seed_cell
from cluster.report.protocol import protocol
from cluster.report.reading import Trial
from cluster.report.stats import compare_on_common, mean_std
from mtl.task_specs import order
from mtl.tasks import TASKS


@dataclass
class ReportFiles:
    """What the sections write: report.md's lines, each CSV file's rows (by name, without .csv) and
    each figure's PNG bytes (by file name)."""
    md: list[str] = field(default_factory=list)
    tables: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    figures: dict[str, bytes] = field(default_factory=dict)


def header_section(analysis: Analysis, out: ReportFiles) -> None:
    """The title, the trials counted by status, problems with the study table, the unfinished trials."""
    trials, seeds = analysis.trials, analysis.seeds
    counts = {s: sum(t.status == s for t in trials) for s in ("done", "failed", "missing", "unreadable")}
    out.md += [f"# Study report: {analysis.study.root}", "",
               f"{len(trials)} trials: {counts['done']} done, {counts['failed']} failed, {counts['missing']} missing"
               + (f", {counts['unreadable']} unreadable" if counts["unreadable"] else "")
               + f"; seeds {', '.join(map(str, seeds)) or '-'}. "
               "Scores: each task's primary dev metric (SEN accuracy, PAR accuracy, SIM Pearson), "
               + ("each task's own best evaluation (--per-task-best)." if analysis.per_task_best else "best epoch."),
               ""]
    out.md += [note + "\n" for note in analysis.study.notes]
    unfinished = [t for t in trials if t.status != "done"]
    if unfinished:
        out.md += ["**Not in the numbers below:** " + "; ".join(
            f"{t.name} ({t.status}{': ' + t.error if t.error else ''})" for t in unfinished), ""]


def protocol_section(analysis: Analysis, out: ReportFiles) -> None:
    out.md += protocol(analysis)


def task_sections(analysis: Analysis, out: ReportFiles) -> None:
    """One section per task run with others: its score table (scores.csv) and its change heatmap."""
    for task in order(k[0] for k in analysis.scores):
        groupings = sorted({k[1] for k in analysis.scores if k[0] == task and "+" in k[1]}, key=grouping_order)
        if not groupings:
            continue
        spec = TASKS[task]
        out.md += [f"## {spec.title} ({task}, dev {spec.primary_metric})", ""]
        out.md += _score_table(analysis, task, groupings, out.tables)
        if any(k[0] == task and k[1] in groupings for k in analysis.summaries):     # no baseline, no changes to draw
            out.figures[f"change-{task}.png"] = change_heatmap(analysis.summaries, analysis.marks, task, groupings)
            out.md += ["", f"![relative change, {task}](change-{task}.png)"]
        out.md.append("")


def _score_table(analysis: Analysis, task: str, groupings: list[str], csv: dict[str, list[dict]]) -> list[str]:
    """The task's table: absolute scores, the baselines on top, each change below with its interval."""
    abs_scores, summaries, base_label, marks = (analysis.scores, analysis.summaries, analysis.baseline_labels,
                                                analysis.marks)
    baselines = [t for t in analysis.done if t.tasks == (task,)]
    labels = sorted({k[2] for k in abs_scores if k[0] == task and k[1] in groupings}, key=method_order)
    base = {k: v for k, v in abs_scores.items() if k[0] == task and k[1] == task}
    used: dict = defaultdict(set)         # grouping -> the baseline rows its changes are against
    for c in analysis.changes:
        if c.task == task:
            used[c.trial.grouping].add(base_label[c.baseline.name])
    lines = ["Absolute score (top rows: the single-task baselines); below, the change against the matched baseline "
             "in %, with its 95% interval; the last column, each method's cost (see Protocol).", "",
             "| | " + " | ".join(groupings) + f" | {COST_HEAD} |", "|---" * (len(groupings) + 2) + "|"]
    by_size = {label: min((b.examples.get(task) or 0 for b in baselines if base_label[b.name] == label), default=0)
               for label in {k[2] for k in base}}
    for (_, _, label), seeds in sorted(base.items(), key=lambda kv: (by_size[kv[0][2]], kv[0][2])):
        show = len(base) == 1
        lines.append(f"| {label} | " + " | ".join(seed_cell(seeds, 4) if show or label in used[g] else ""
                                                  for g in groupings) + " |  |")
    for label in labels:
        cells = []
        for g in groupings:
            a = abs_scores.get((task, g, label), {})
            s = summaries.get((task, g, label))
            cells.append(f"{seed_cell(a, 4)} {change_text(s, marks)}" if a and s else f"{seed_cell(a, 4)} (no baseline)"
                         if a else "")
            if a:
                row = {"task": task, "grouping": g, "method": label, "score_mean": mean_std(a.values())[0],
                       "score_std": mean_std(a.values())[1], "seeds": len(a)}
                if s:
                    row.update(change_pct_mean=s.mean, change_pct_std=s.std, ci_lo=s.lo, ci_hi=s.hi, test=s.test,
                               p=s.p, p_holm=s.p_holm, significant=s.significant,
                               size_controlled={"equal": True, "unequal": False}.get(s.size))
                csv["scores"].append({**row, **_cost_columns(analysis.costs.get((g, label)))})
        cost = method_cost(analysis.costs, label, [g for g in groupings if (task, g, label) in abs_scores])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {cost_text(cost)} |")
    return lines


def _cost_columns(cost: Cost | None) -> dict:
    """A CSV row's cost columns (empty where the trials did not record their cost)."""
    return {"step_time_s": cost and cost.step_s, "peak_memory_mb": cost and cost.peak_mb,
            "step_time_vs_addition": cost and cost.step_ratio, "peak_memory_vs_addition": cost and cost.memory_ratio}


def ranking_section(analysis: Analysis, out: ReportFiles) -> None:
    """The methods ranked by Δm% over the pairings they all share (delta_m.csv)."""
    dm, marks, csv = analysis.delta_m, analysis.marks, out.tables
    if not dm:
        return
    by_method: dict = defaultdict(dict)
    for (g, lab), s in dm.items():
        by_method[lab][g] = s.mean
    fair = compare_on_common(by_method, method_order, grouping_order)
    common, pairings = fair["common"], fair["pairings"]
    md = ["## Methods ranked by Δm% (over the pairings they share)", "",
          "Δm%: the mean over a run's tasks of each task's change against its baseline (mean over seeds, 95% "
          "interval, `*` significant). Methods are ranked by their mean Δm over the pairings _every_ method was run "
          "on; a method's pairings beyond those are shown but not counted. Each method's cost (see Protocol) is over "
          "the pairings its rank counts.", ""]
    if not common:
        md += ["No pairing is common to all methods, so they cannot be ranked together; compare them per pairing.", ""]
    if fair["lacking"]:
        lacking = sorted(fair["lacking"].items(), key=lambda kv: method_order(kv[0]))
        md += ["Not run on every pairing: " + "; ".join(f"{m} (lacks {', '.join(gs)})" for m, gs in lacking) + ".", ""]
    head = ["rank", "method", f"mean Δm over {len(common)} common pairing{'s' * (len(common) != 1)}",
            COST_HEAD] + pairings
    md += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    order = [m for m, _ in fair["ranked"]] or sorted(by_method, key=method_order)
    means = dict(fair["ranked"])
    for rank, method in enumerate(order, 1):
        cells = []
        for g in pairings:
            s = dm.get((g, method))
            cells.append("" if s is None else change_text(s, marks, parens=False))
        # Its cost over the pairings its rank counts (all of its own where none is common).
        cost = cost_text(method_cost(analysis.costs, method, common or pairings))
        md.append(f"| {rank if means else ''} | {method} | {pct(means[method]) if method in means else ''} | {cost} | "
                  + " | ".join(cells) + " |")
        for g in pairings:
            s = dm.get((g, method))
            if s:
                csv["delta_m"].append({"method": method, "grouping": g, "seeds": len(s.values), "delta_m_mean": s.mean,
                                       "delta_m_std": s.std, "ci_lo": s.lo, "ci_hi": s.hi, "test": s.test, "p": s.p,
                                       "p_holm": s.p_holm, "significant": s.significant, "common": g in common,
                                       "rank": rank if means else None,
                                       "mean_over_common": means.get(method),
                                       **_cost_columns(analysis.costs.get((g, method)))})
    out.md += md + [""]


def pareto_section(analysis: Analysis, out: ReportFiles) -> None:
    """Each pair's methods, the Pareto front among them (pareto.csv), and the figure."""
    views = pareto_views(analysis.summaries, analysis.trials)
    if views:
        out.md += _pareto_table(views, out.tables, analysis.costs)
        out.figures["pareto.png"] = pareto_figure(views)
        out.md += ["", "![Pareto view of each pair](pareto.png)", ""]


def _pareto_table(views: list[dict], csv: dict[str, list[dict]], costs: dict[tuple[str, str], Cost]) -> list[str]:
    md = ["## Pareto view of each pair", "",
          "Each method's change of the pair's first task against its second (mean over seeds). A setting is on the "
          "Pareto front when no other setting is at least as good for both tasks and better for one; only the front "
          "is worth choosing from, and where on it depends on which task matters more; the last column is what each "
          "setting on the front costs against addition.", "",
          f"| pairing | on the front (change of each task) | dominated | {COST_HEAD}, on the front |",
          "|---|---|---|---|"]
    for v in views:
        a, b = v["tasks"]
        pts = v["points"]
        front = "; ".join(f"{m} ({a} {pct(pts[m]['x'])}, {b} {pct(pts[m]['y'])})" for m in v["front"])
        dominated = ", ".join(sorted((m for m in pts if m not in v["front"]), key=method_order)) or "none"
        cost = "; ".join(f"{m} {cost_text(costs.get((v['grouping'], pts[m]['label'])))}" for m in v["front"])
        md.append(f"| {v['grouping']}{' (' + v['variant'] + ')' if v['variant'] else ''} | {front} | {dominated} | "
                  f"{cost} |")
        for m, p in pts.items():
            csv["pareto"].append({"grouping": v["grouping"], "variant": v["variant"], "method": m,
                                  "change_first": p["x"], "change_second": p["y"], "first_task": a, "second_task": b,
                                  "on_front": m in v["front"], **_cost_columns(costs.get((v["grouping"], p["label"])))})
    return md


def alpha_section(analysis: Analysis, out: ReportFiles) -> None:
    """Unitary scalarization: each task's change against its own weight, a quadratic fitted (alpha_fits.csv)."""
    curves = alpha_curves(analysis.trials, analysis.changes)
    if not curves:
        return
    md, csv = out.md, out.tables
    md += ["## Unitary scalarization: change against the task's own weight", "",
           "| task | pairing | R² | best weight (fit) | change there | fitted quadratic |", "|---|---|---|---|---|---|"]
    for (task, grouping), c in sorted(curves.items()):
        a, b, k = c["fit"]["coef"]
        md.append(f"| {task} | {grouping} | {c['fit']['r2']:.3f} | {c['fit']['argmax']:.2f} | "
                  f"{pct(c['fit']['max'])} | {a:.1f}w² {b:+.1f}w {k:+.1f} |")
        csv["alpha_fits"].append({"task": task, "pairing": grouping, "r2": c["fit"]["r2"],
                                  "best_weight": c["fit"]["argmax"], "max_change_pct": c["fit"]["max"],
                                  "a": a, "b": b, "c": k})
    out.figures["alpha-curves.png"] = alpha_figure(curves)
    md += ["", "![alpha curves](alpha-curves.png)", ""]


def conflict_section(analysis: Analysis, out: ReportFiles) -> None:
    """Each pairing's gradient conflict (its addition runs) beside its change (conflict.csv)."""
    conflict = conflict_summary(analysis.trials, analysis.summaries)
    if not conflict:
        return
    md = out.md
    md += ["## Gradient conflict and harm (addition runs)", "",
           "| pairing | mean cos(g_i, g_j) | conflict fraction | change of each task |", "|---|---|---|---|"]
    for row in conflict:
        change = ", ".join(f"{k.split('/')[1]} {pct(v)}" for k, v in row.items() if k.startswith("change/")
                           and v is not None)
        md.append(f"| {row['grouping']} | {row['cos_mean']:.3f} | {row['conflict_fraction']:.2f} | {change} |")
    out.tables["conflict"] = conflict
    out.figures["conflict-vs-change.png"] = conflict_figure(conflict)
    md += ["", "![conflict vs change](conflict-vs-change.png)", ""]


def overall_section(analysis: Analysis, out: ReportFiles) -> None:
    """The course leaderboard's overall score, (SEN acc + PAR acc + (SIM r + 1) / 2) / 3, of every
    trial that trained the three tasks, over seeds (overall.csv); at each trial's best epoch."""
    groups: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for t in analysis.done:
        if t.overall is not None:
            groups[(t.grouping, t.label)][t.seed] = t.overall
    if not groups:
        return
    out.md += ["## The leaderboard's overall score", "",
               "(SEN acc + PAR acc + (SIM r + 1) / 2) / 3 at each trial's best epoch, over seeds.", "",
               "| tasks | method | overall | seeds |", "|---|---|---|---|"]
    for (grouping, label), by_seed in sorted(groups.items(), key=lambda kv: -sum(kv[1].values()) / len(kv[1])):
        mean, std = mean_std(list(by_seed.values()))
        out.md.append(f"| {grouping} | {label} | {mean:.4f}{f' ± {std:.4f}' if len(by_seed) > 1 else ''} | {len(by_seed)} |")
        out.tables["overall"].append({"tasks": grouping, "method": label, "overall_mean": mean,
                                      "overall_std": std, "seeds": len(by_seed)})
    out.md.append("")


def answers_section(analysis: Analysis, out: ReportFiles) -> None:
    out.md += ["## Answers", ""] + (answers(analysis.trials, analysis.summaries, analysis.delta_m)
                                    or ["- Not enough finished trials to answer."]) + [""]


def best_models_section(analysis: Analysis, out: ReportFiles) -> None:
    """The best trial of each task, with a figure of its dev predictions (or why there is none)."""
    best = _best_models(analysis)
    if not best:
        return
    md = out.md
    md += ["## Best model per task (dev predictions of its best epoch)", ""]
    for task, (trial, image, why) in best.items():
        line = f"- {TASKS[task].title}: **{trial.name}** ({trial.scores[task]:.4f})"
        if image is None:
            md.append(f"{line}: {why}")
            continue
        out.figures[f"best-{task}.png"] = image
        md.append(line + f" ![best {task}](best-{task}.png)")
    md.append("")


def _best_models(analysis: Analysis) -> dict[str, tuple[Trial, bytes | None, str]]:
    """The trial with the best score of each task, and a figure of its dev predictions (or why not)."""
    out = {}
    for task in order(task for t in analysis.done for task in t.scores):
        candidates = [t for t in analysis.done if task in t.scores]
        if not candidates:
            continue
        best = max(candidates, key=lambda t: t.scores[task])
        rows, why = analysis.predictions.rows(best, task)
        out[task] = (best, None, why) if rows is None else (best, prediction_figure(task, rows[1], rows[2]), "")
    return out


def data_tables(analysis: Analysis, out: ReportFiles) -> None:
    """No Markdown: every change (changes.csv) and every trial (trials.csv) as numbers."""
    out.tables["changes"] = [_change_row(c) for c in analysis.changes]
    out.tables["trials"] = [
        {"trial": t.name, "status": t.status, "grouping": t.grouping, "method": t.method,
         "variant": t.variant, "seed": t.seed, **{f"score/{k}": v for k, v in t.scores.items()},
         **{f"examples_per_epoch/{k}": v for k, v in t.examples.items()},
         "cos_mean": t.cos_mean, "conflict_fraction": t.conflict, "step_time_s": t.step_time_s,
         "peak_memory_mb": t.peak_memory_mb, "peak_memory_kind": t.memory_kind or None,
         "backwards_per_step": t.backwards_per_step, "cost_class": t.cost_class or None, "error": t.error}
        for t in analysis.trials]


def _change_row(c: Change) -> dict:
    return {"trial": c.trial.name, "seed": c.trial.seed, "task": c.task, "grouping": c.trial.grouping,
            "method": c.trial.label, "baseline": c.baseline.name, "score": c.trial.scores[c.task],
            "baseline_score": c.baseline.scores[c.task], "change_pct": c.pct, "ci_lo": c.lo, "ci_hi": c.hi,
            "p_bootstrap": c.p_boot, "p_bootstrap_counted": c.p_empirical, "dev_rows": c.rows or None,
            "examples_per_epoch": c.trial.examples.get(c.task),
            "baseline_examples_per_epoch": c.baseline.examples.get(c.task), "size_match": c.size,
            "no_interval": c.no_interval}


# The report, top to bottom.  A new section is a function (Analysis, ReportFiles) -> None placed here.
SECTIONS = (header_section, protocol_section, task_sections, ranking_section, pareto_section, alpha_section,
            conflict_section, overall_section, answers_section, best_models_section, data_tables)
