"""How every launch of a study ends, whatever backend ran it: which trials are still to run,
the results table, and (for a launch followed to its end) the report and the summary line.

A trial has *ended* when its ``results.json`` says done or failed (``mtl.results.ended``): no
backend runs it again.  The results table (``results.csv`` and ``results.json`` at the storage
root) has one row per trial, read from the trials' own results files, so a trial is counted
exactly once however often the study was launched."""
from __future__ import annotations

import json

from mtl import results as trial_results, storage
from mtl.config import RunConfig
from mtl.monitor import flatten

from cluster.core.study import trial_name


def is_finished(cfg: RunConfig) -> bool:
    """Whether the trial ran to an end, done or failed: ``mtl.results.ended``."""
    return trial_results.ended(cfg.out) is not None


def read_results(cfg: RunConfig) -> dict | None:
    """The trial's results (mtl.results), None when it has none or they are unreadable."""
    return trial_results.read_or_none(cfg.out)


def results_table(trials: list[RunConfig], failures: dict[str, str] | None = None) -> list[dict]:
    """One row per trial: name, status, the settings that vary across the grid (what the
    trials compute, never where they ran), best dev metrics.  ``failures`` maps a trial name
    to why its launcher saw it end unfinished (a failed or cancelled job)."""
    failures = failures or {}
    configs = [flatten(t.identity()) for t in trials]
    varied = sorted(k for k in configs[0] if len({json.dumps(c[k]) for c in configs}) > 1)
    rows = []
    for cfg, flat in zip(trials, configs):
        name = trial_name(cfg)
        row = {"trial": name, "status": "missing"}
        row.update({k: _cell(flat[k]) for k in varied})
        res = read_results(cfg)
        if res is not None and res.get("status", "done") == "failed":
            row.update(status="failed", error=res["error"])
        elif res is not None:
            row.update(status="done", best_epoch=res["best"].get("epoch"), steps=res["steps"],
                       wall_time_s=round(res["wall_time_s"], 2), train_time_s=round(res["train_time_s"], 2),
                       examples_per_s=round(res["examples_per_s"], 2), world_size=res["world_size"],
                       **{k: res.get(k) for k in trial_results.COST_KEYS},     # None (empty) in older results
                       **{f"examples_per_epoch/{k}": v for k, v in (res.get("examples_per_epoch") or {}).items()},
                       **{f"dev/{k}": v for k, v in res["best"].get("metrics", {}).items()})
        elif name in failures:
            row.update(status="failed", error=failures[name])
        rows.append(row)
    return rows


def _cell(value):
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def write_table(storage_root: str, rows: list[dict]) -> None:
    storage.write_csv(storage.join(storage_root, "results.csv"), rows)
    storage.write_text(storage.join(storage_root, "results.json"), json.dumps(rows, indent=2))


# --------------------------------------------------------------------------------------------
# What each backend does with them
# --------------------------------------------------------------------------------------------
def unfinished(trials: list[RunConfig]) -> list[RunConfig]:
    """The trials a launch still runs: those that have not ended."""
    return [t for t in trials if not is_finished(t)]


def record(storage_root: str, trials: list[RunConfig], failures: dict[str, str] | None = None) -> list[dict]:
    """Write the results table of ``trials`` at the storage root; its rows.  ``failures`` as for
    ``results_table``."""
    rows = results_table(trials, failures)
    write_table(storage_root, rows)
    return rows


def write_study_report(rows: list[dict], root: str) -> None:
    """The study's report (``<root>/report/``) once a launch followed it to its end with a trial done."""
    if not any(r["status"] == "done" for r in rows):
        return
    from cluster.report import write_report     # torch and numpy (seconds): only once trials are done

    print(f"report: {storage.join(write_report(root), 'report.md')}")


SHOWN_REASONS = 10      # a study of hundreds of trials must not bury its last line under them


def summary(rows: list[dict], root: str) -> int:
    """Print why each failed trial failed (a few), then the launch's last line; its exit code: 0
    when every trial is done, else 1."""
    done = sum(r["status"] == "done" for r in rows)
    failed = [r["trial"] for r in rows if r["status"] == "failed"]
    reasons = [r for r in rows if r["status"] == "failed" and r.get("error")]
    for r in reasons[:SHOWN_REASONS]:
        print(f"failed {r['trial']}: {r['error']}")
    if len(reasons) > SHOWN_REASONS:
        print(f"... and {len(reasons) - SHOWN_REASONS} more failed trials (their reasons: the table's error column)")
    print(f"{done}/{len(rows)} trials done" + (f", {len(failed)} failed ({', '.join(failed)})" if failed else "")
          + f"; table: {root.rstrip('/')}/results.csv")
    return 0 if done == len(rows) else 1
