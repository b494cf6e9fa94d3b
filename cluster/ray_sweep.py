"""A study grid as one Ray Tune sweep: one Tune trial per RunConfig, each a small driver that
builds and fits that trial's TorchTrainer (Ray Train V2's pattern).

- Concurrency: as many trials at once as the cluster's CPUs (and GPUs) hold their workers.
  A driver must never hold CPUs its workers need: on a local Ray it reserves only a custom
  ``mtl_driver`` resource (no CPU), on an existing cluster a sliver of one CPU.
- Idempotent: a trial whose ``results.json`` exists is done and not run again; an unfinished
  one resumes from its checkpoint (mtl.train does that by itself).
- At the end, ``results.csv`` and ``results.json`` at the storage root hold one row per trial
  (its varied settings and best dev metrics), read from the trials' own results files, so a
  trial is counted exactly once however often the sweep ran.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time

from mtl import storage
from mtl.config import RunConfig
from mtl.monitor import flatten

from cluster.ray_trial import ray_storage_for

log = logging.getLogger("cluster.ray_sweep")
DRIVER_RESOURCE = "mtl_driver"
RESULTS = "results.json"


def is_finished(cfg: RunConfig) -> bool:
    return storage.exists(storage.join(cfg.out, RESULTS))


def driver_resources(cluster: dict) -> dict:
    return {"CPU": 0, DRIVER_RESOURCE: 1} if cluster.get(DRIVER_RESOURCE) else {"CPU": 0.01}


def concurrent_slots(trials: list[RunConfig], cluster: dict) -> int:
    """How many of these trials the cluster can run at once (by their largest demand)."""
    cpus = max(t.parallel.workers * t.parallel.cpus_per_worker for t in trials) + driver_resources(cluster)["CPU"]
    gpus = max(t.parallel.workers * t.parallel.gpus_per_worker for t in trials)
    by_cpu = cluster.get("CPU", 0) // cpus
    by_gpu = cluster.get("GPU", 0) // gpus if gpus else math.inf
    slots = int(min(by_cpu, by_gpu, len(trials)))
    if slots < 1:
        raise RuntimeError(f"no trial fits the cluster: a trial needs {cpus:g} CPUs and {gpus:g} GPUs, "
                           f"the cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs")
    return slots


def _driver(config: dict) -> None:
    """One Tune trial: fit the trial's TorchTrainer, forwarding its reports to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from cluster.ray_trial import build_trainer

    cfg = RunConfig.from_dict(config["trial"])
    build_trainer(cfg, config["storage_root"], callbacks=[TuneReportCallback()]).fit()


def run_sweep(trials: list[RunConfig], storage_root: str, address: str | None = None,
              verbose: int = 1) -> list[dict]:
    import ray
    from ray import tune

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")   # reports block on this poll
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = time.perf_counter()
    storage.ensure_writable(storage_root)
    todo = [t for t in trials if not is_finished(t)]
    log.info("%d trials, %d already finished, %d to run", len(trials), len(trials) - len(todo), len(todo))
    if todo:
        if not ray.is_initialized():
            extra = {} if address else {"resources": {DRIVER_RESOURCE: 10_000}}
            ray.init(address=address, include_dashboard=False, log_to_driver=verbose > 1, **extra)
        slots = concurrent_slots(todo, ray.cluster_resources())
        ray_path, ray_fs = ray_storage_for(storage_root)
        param_space = {"trial": tune.grid_search([t.to_dict() for t in todo]), "storage_root": storage_root}
        tuner = tune.Tuner(
            tune.with_resources(_driver, driver_resources(ray.cluster_resources())),
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=slots),
            run_config=tune.RunConfig(name="sweep", storage_path=ray_path, storage_filesystem=ray_fs,
                                      verbose=verbose),
        )
        tuner.fit()
    rows = results_table(trials)
    write_table(storage_root, rows)
    log.info("sweep of %d trials done in %.1f s", len(trials), time.perf_counter() - started)
    return rows


def results_table(trials: list[RunConfig]) -> list[dict]:
    """One row per trial: name, the settings that vary across the grid, best dev metrics."""
    configs = [flatten(t.to_dict()) for t in trials]
    varied = sorted(k for k in configs[0] if k != "out" and len({json.dumps(c[k]) for c in configs}) > 1)
    rows = []
    for cfg, flat in zip(trials, configs):
        row = {"trial": cfg.out.rstrip("/").rsplit("/", 1)[-1], "status": "missing"}
        row.update({k: _cell(flat[k]) for k in varied})
        url = storage.join(cfg.out, RESULTS)
        if storage.exists(url):
            res = json.loads(storage.read_text(url))
            row.update(status="done", best_epoch=res["best"].get("epoch"), steps=res["steps"],
                       wall_time_s=round(res["wall_time_s"], 2), train_time_s=round(res["train_time_s"], 2),
                       examples_per_s=round(res["examples_per_s"], 2), world_size=res["world_size"],
                       **{f"dev/{k}": v for k, v in res["best"].get("metrics", {}).items()})
        rows.append(row)
    return rows


def _cell(value):
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def write_table(storage_root: str, rows: list[dict]) -> None:
    import csv
    import io

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(storage_root, "results.csv"), buf.getvalue())
    storage.write_text(storage.join(storage_root, "results.json"), json.dumps(rows, indent=2))

