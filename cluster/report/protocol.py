"""The report's protocol paragraph: the examples of each task every trial saw per epoch (size
control), how baselines are matched, what the cost columns compare, the test behind the
significance marks and why, and how large a change the dev set's size alone produces."""
from __future__ import annotations

from collections import defaultdict

from cluster.report.comparisons import Analysis, Change, dev_noise, grouping_order
from cluster.report.formatting import NOT_SIZED, SIZE_UNKNOWN, cost_note, count_text
from cluster.report.reading import Trial, done_trials
from cluster.report.stats import ALPHA
from mtl.task_specs import order
from mtl.tasks import TASKS


def protocol(analysis: Analysis) -> list[str]:
    """The protocol section's lines."""
    change_list, summaries, dm, resamples = analysis.changes, analysis.summaries, analysis.delta_m, analysis.resamples
    md = ["## Protocol", ""]
    md += [f"- {line}" for line in size_protocol(analysis.trials, change_list)]
    md.append("- Baselines: each change is against the single-task run of the same task, settings and seed; of "
              "several such runs, the one that saw as many examples of the task per epoch as the multi-task run. "
              "Δm% is the mean of a multi-task run's per-task changes (Maninis et al. 2019; all metrics here are "
              "higher-is-better).")
    md.append("- " + cost_note({t.memory_kind for t in analysis.done if t.memory_kind}))
    n_task = sum(s.p is not None for s in summaries.values())
    n_dm = sum(s.p is not None for s in dm.values())
    family = (f"Holm-corrected over the report's {n_task} tested per-task changes, and separately over its {n_dm} "
              f"Δm values; α = {ALPHA}; `*` marks a significant change" if n_task else
              "no change could be tested, so none is marked significant")
    boot = (f"a paired bootstrap over dev examples (the multi-task run's and the baseline's predictions on the same "
            f"rows, matched by id, resampled together; {resamples:,} resamples, seeded, so the report is reproducible)")
    if len(analysis.seeds) < 2:
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
                      f"rows, {v['n']} changes)"
                      for t, v in ((t, noise[t]) for t in order(noise)))
                  + ". Smaller changes are not distinguishable from it on one run.")
    missing = [c for c in change_list if c.lo is None]
    if missing:
        reasons: dict = defaultdict(list)
        for c in missing:
            reasons[c.no_interval_kind].append(f"{c.trial.name} {c.task}")
        md.append(f"- No interval for {len(missing)} of {len(change_list)} changes: " + "; ".join(
            f"{why} ({len(who)}: {', '.join(who[:3])}{', ...' if len(who) > 3 else ''})"
            for why, who in sorted(reasons.items(), key=lambda kv: -len(kv[1]))) + ".")
    if analysis.no_baseline:
        md.append(f"- No baseline, so no change, for {len(analysis.no_baseline)}: "
                  + "; ".join(analysis.no_baseline) + ".")
    return md + [""]


def size_protocol(trials: list[Trial], change_list: list[Change]) -> list[str]:
    """Sentences on the examples of each task per epoch: size-controlled, per pairing, or not."""
    done = done_trials(trials)
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
        text = ", ".join(f"{task} " + " and ".join(count_text(n) if n is not None else "unknown"
                                                   for n in sorted(v, key=lambda n: (n is None, n or 0)))
                         for task, v in per_group[grouping].items())
        return text if "+" not in grouping else f"{grouping}: {text}"

    singles = order(g for g in per_group if "+" not in g)
    multis = sorted((g for g in per_group if "+" in g), key=grouping_order)
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
