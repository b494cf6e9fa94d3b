"""Scheduling overhead of a Ray Tune sweep, and Ray's startup cost per trial, measured in one run.

    .venv/bin/python benchmarks/bench_sweep.py                           # 6 smoke trials at two sizes
    .venv/bin/python benchmarks/bench_sweep.py --train-rows 96 --workers 0   # the smoke grid as it is

For each trial size (``--train-rows``, rows per task) it runs the grid on a fresh local Ray
and a fresh storage folder, then sets side by side:

- the sweep's wall time (Ray start to results table), against
- the ideal: the sum over trials of each trial's own time (``train()`` from start to
  results, as plain ``python -m mtl.train`` would spend it) times the CPUs it holds,
  divided by the cluster's CPUs - the trials' work packed perfectly into the slots.

``overhead = wall / ideal`` (target <= 1.25 with 4+ short trials on 2 CPUs).  By default
every trial gets one worker (``--workers 1``) so that perfect packing is possible; the smoke
grid as it is (three 1-worker trials and one of 2) always leaves a CPU idle for one trial.
The excess is split into Ray's start, each trial's startup (driver launched -> ``train()``
entered: Ray Train's controller and worker processes, the process group), its teardown
(``train()`` done -> driver done) and the rest (launching each trial's Tune driver process,
Tune's scheduling, the results table).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="smoke")
    p.add_argument("--seeds", default="0")
    p.add_argument("--preset", default="smoke")
    p.add_argument("--train-rows", default="96,400", help="comma-separated trial sizes, rows per task")
    p.add_argument("--workers", type=int, default=1, help="workers of every trial (0: as the grid says)")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    summary = [measure(a, int(rows)) for rows in a.train_rows.split(",")]
    print("\nside by side:")
    print(f"{'rows/task':>9s} {'trials':>6s} {'own s (median)':>14s} {'wall s':>7s} {'ideal s':>7s} {'overhead':>8s} "
          f"{'startup s (median)':>18s} {'largest part of the excess':>30s}")
    for s in summary:
        print(f"{s['rows']:9d} {s['trials']:6d} {s['own_median']:14.1f} {s['wall']:7.1f} {s['ideal']:7.1f} "
              f"{s['ratio']:8.3f} {s['startup_median']:18.1f} {s['dominant']:>30s}")
    return 0


def measure(a, train_rows: int) -> dict:
    import ray

    from cluster.backends.ray_sweep import demand, run_sweep, start_local_ray
    from cluster.core.placement import Placement
    from cluster.core.study import expand
    from mtl.config import RunConfig
    from mtl.presets import PRESETS

    overrides = dict(PRESETS[a.preset], progress="off", **{"data.max_train_rows": train_rows})
    storage_root = tempfile.mkdtemp(prefix=f"mtl-bench-sweep-{train_rows}-")
    trials = expand(a.grid, RunConfig().replace(**overrides), storage_root, [int(s) for s in a.seeds.split(",")])
    if a.workers:
        trials = [t.replace(**{"parallel.workers": a.workers}) for t in trials]

    started = time.perf_counter()
    start_local_ray(verbose=0)
    ray_init_s = time.perf_counter() - started
    cpus = ray.cluster_resources()["CPU"]
    rows = run_sweep(trials, storage_root, verbose=0)
    wall = time.perf_counter() - started
    ray.shutdown()
    missing = [r["trial"] for r in rows if r["status"] != "done"]
    if missing:
        raise SystemExit(f"error: trials did not finish: {missing}")

    per_trial = []
    for t in trials:
        name = t.out.rsplit("/", 1)[-1]
        res = json.loads(Path(t.out, "results.json").read_text())
        timing = json.loads(Path(storage_root, "_ray", "timings", f"{name}.json").read_text())
        per_trial.append({"trial": name, "cpus": demand(t, Placement())[0], "own_s": res["wall_time_s"],
                          "train_s": res["train_time_s"],
                          "startup_s": res["started_at"] - timing["driver_launched_at"],
                          "teardown_s": timing["driver_finished_at"] - res["finished_at"]})
    packed = lambda key: sum(r[key] * r["cpus"] for r in per_trial) / cpus   # noqa: E731
    ideal = packed("own_s")
    parts = {"trial startup": packed("startup_s"), "ray.init": ray_init_s, "trial teardown": packed("teardown_s")}
    parts["driver launch, scheduling, table"] = wall - ideal - sum(parts.values())

    print(f"\n{len(trials)} trials of grid '{a.grid}' (preset {a.preset}, {train_rows} rows/task) on a local Ray "
          f"with {cpus:g} CPUs; storage {storage_root}")
    print(f"{'trial':28s} {'CPUs':>4s} {'own s':>7s} {'train s':>7s} {'startup s':>9s} {'teardown s':>10s}")
    for r in per_trial:
        print(f"{r['trial']:28s} {r['cpus']:4g} {r['own_s']:7.1f} {r['train_s']:7.1f} {r['startup_s']:9.1f} "
              f"{r['teardown_s']:10.1f}")
    print(f"sweep wall {wall:.1f} s | ideal (sum of own time x CPUs / {cpus:g} CPUs) {ideal:.1f} s | "
          f"overhead ratio {wall / ideal:.3f} (target <= 1.25)")
    startups = [r["startup_s"] for r in per_trial]
    print(f"Ray startup per trial: median {statistics.median(startups):.1f} s (min {min(startups):.1f}, "
          f"max {max(startups):.1f}); ray.init {ray_init_s:.1f} s")
    excess = wall - ideal
    ranked = sorted(parts.items(), key=lambda kv: -kv[1])
    print(f"excess over ideal {excess:.1f} s: " + ", ".join(f"{k} {v:.1f} s ({v / excess:.0%})" for k, v in ranked))
    return {"rows": train_rows, "trials": len(trials), "own_median": statistics.median(r["own_s"] for r in per_trial),
            "wall": wall, "ideal": ideal, "ratio": wall / ideal, "startup_median": statistics.median(startups),
            "dominant": ranked[0][0]}


if __name__ == "__main__":
    raise SystemExit(main())
