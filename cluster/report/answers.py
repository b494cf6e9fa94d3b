"""The report's answers: sentences written from the numbers (best partner and combiner per task on
common pairings, the best method by Δm%, pairs that help both ways, how much weighting matters)."""
from __future__ import annotations

from collections import defaultdict

from cluster.report.comparisons import alpha_curves, grouping_order, method_order
from cluster.report.formatting import marks_in_use, pct, size_mark
from cluster.report.reading import Trial
from cluster.report.stats import Summary, compare_on_common
from mtl.task_specs import order
from mtl.tasks import TASKS


def answers(trials: list[Trial], summaries: dict[tuple, Summary], dm: dict[tuple, Summary] | None = None) -> list[str]:
    """Sentences written from the numbers."""
    mean = {k: s.mean for k, s in summaries.items()}
    lines = []
    for task in order(k[0] for k in mean):
        mine = {k: v for k, v in mean.items() if k[0] == task}
        if not mine:
            continue
        (_, grouping, label), best = max(mine.items(), key=lambda kv: kv[1])
        partner = "+".join(t for t in grouping.split("+") if t != task)
        s = summaries[(task, grouping, label)]
        verdict = "" if s.p is None else (", significant" if s.significant else ", not significant")
        mark = size_mark(s.size, marks_in_use(summaries))
        head = (f"best partner **{partner}** ({pct(best)}{mark} with {label}{verdict})" if best > 0 else
                f"no partner helps; the least harm is with **{partner}** ({pct(best)}{mark} with {label}{verdict})")
        by_method: dict = defaultdict(dict)
        for (_, g, lab), v in mine.items():
            by_method[lab][g] = v
        fair = compare_on_common(by_method, method_order, grouping_order)
        lines.append(f"- **{TASKS[task].title}** ({task}): {head}; " + _best_combiner_text(fair))
    if dm:
        by_method = defaultdict(dict)
        for (g, lab), s in dm.items():
            by_method[lab][g] = s.mean
        fair = compare_on_common(by_method, method_order, grouping_order)
        if fair["ranked"]:
            (method, value), n = fair["ranked"][0], len(fair["common"])
            pairings = f"{n} pairing{'s' * (n > 1)}"
            share = f"over its {pairings}; the only method" if len(fair["ranked"]) == 1 else \
                f"over the {pairings} all {len(fair['ranked'])} methods share"
            lines.append(f"- **Best method by Δm%**: **{method}** (Δm {pct(value)} {share}).")
        elif len(by_method) > 1:
            lines.append("- **Best method by Δm%**: the methods share no pairing, so they cannot be compared.")
    both = []
    for grouping in sorted({k[1] for k in mean if k[1].count("+") == 1}):
        tasks = grouping.split("+")
        for label in sorted({k[2] for k in mean if k[1] == grouping}, key=method_order):
            values = [mean.get((t, grouping, label)) for t in tasks]
            if all(v is not None and v > 0 for v in values):
                both.append(f"{grouping} with {label} ({', '.join(f'{t} {pct(v)}' for t, v in zip(tasks, values))})")
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
        return (f"best combiner **{method}**, the only one run (mean change {pct(value)} over its {n} "
                f"pairing{'s' * (n > 1)}).")
    if not ranked:
        return "the combiners share no pairing, so they cannot be compared."
    (method, value), n = ranked[0], len(common)
    where = ", ".join(common)
    return (f"best combiner **{method}** (mean change {pct(value)} over the {n} pairing{'s' * (n > 1)} all "
            f"{len(ranked)} combiners share: {where}).")
