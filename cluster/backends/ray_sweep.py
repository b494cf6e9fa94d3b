"""A study grid as one Ray Tune sweep: one Tune trial per RunConfig, each a small driver that
builds and fits that trial's TorchTrainer (Ray Train V2's pattern).

- Concurrency: as many trials at once as the cluster's CPUs (and GPUs) hold their workers.
  A driver never holds CPUs its workers need: it reserves no CPU, only (on a local Ray) its
  workers' demand out of custom budget resources, which admits each trial when it fits.
- Idempotent: a trial whose ``results.json`` exists is done and not run again; an unfinished
  one resumes from its checkpoint (mtl.train does that by itself).
- Stages: trials that start from an upstream trial run in a later Tune sweep than it (one sweep
  per wave, cluster.core.dependencies); the dependents of an upstream that failed are not
  started, and their rows say which upstream failed and why.
- At the end, ``results.csv`` and ``results.json`` at the storage root hold one row per trial
  (its varied settings and best dev metrics), read from the trials' own results files, so a
  trial is counted exactly once however often the sweep ran.  ``_ray/timings/<trial>.json``
  records when the trial's driver started and ended (benchmarks/bench_sweep.py reads it).
- TensorBoard: each trial's own ``<trial>/tb`` run is the only one.  Ray Tune's automatic
  TensorBoard logger is off (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``, with Tune's JSON and CSV
  loggers passed explicitly, which its result grid reads): it wrote a second copy of every trial
  under ``_ray/sweep/<trial>/`` whose hparams (one column, ``trial``) replaced the study's in the
  HParams dashboard.  Copies left by earlier launches are removed at the start of a launch.
- Fractional GPUs (``--gpus-per-worker 0.25``) pack trials onto a GPU: the budgets admit as many
  as fit (four 1-worker trials per GPU), and a packing whose estimated memory exceeds the GPU's is
  refused before Ray starts (cluster/core/memory.py).
- Fused groups (``--fuse K|auto``, cluster/core/fusion.py): one Tune trial, one Ray Train run of
  one worker, trains a group of the launch's unfinished trials in one process; the table and
  ``_ray/timings/<trial>.json`` stay per trial.

The Ray library is imported only where a sweep runs: the submit command's ``--help`` and
``--dry-run`` import this module without it.

Test/dev hook: ``MTL_FAKE_GPUS=N`` makes ``start_local_ray`` declare N GPUs that need not exist
(Ray's GPUs are logical resources; Ray then hands workers fake CUDA_VISIBLE_DEVICES ids).  It
lets a CPU machine exercise GPU admission; the trials must run with ``--device cpu``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time

from mtl import storage
from mtl.config import RunConfig
from mtl.errors import MtlError
from mtl.lease import Lease

from cluster.backends.ray_trial import GPU_DEFAULT, build_group_trainer, build_trainer, ray_storage
from cluster.core.backend import Backend, Flag
from cluster.core.dependencies import fail_dependents, waves
from cluster.core.ending import is_finished, read_results, record, unfinished
from cluster.core.fusion import describe, fuse_groups, group_name, plan
from cluster.core.memory import check_ray_packing
from cluster.core.placement import Placement, units
from cluster.core.study import trial_name

log = logging.getLogger("cluster.backends.ray_sweep")


class RayBackend(Backend):
    name = "ray"
    prog = "launch/ray_submit.py"
    gpu_default = GPU_DEFAULT
    placement_flags = frozenset({"cpus_per_worker", "gpus_per_worker", "max_failures", "gpu_memory", "fuse"})
    flags = (Flag(("--address",), dict(default=None, help="Ray cluster: 'auto', 'host:port', 'ray://host:port' "
                                                         "(default: start a local Ray with this machine's CPUs and "
                                                         "GPUs)")),
             Flag(("--wait-for-nodes",), dict(type=int, default=0, metavar="N",
                                              help="with --address: wait (up to 5 minutes) until N nodes have "
                                                   "joined the cluster")))

    def run(self, trials: list[RunConfig], root: str, placement: Placement,
            args: argparse.Namespace) -> list[dict]:
        return run_sweep(trials, root, placement, address=args.address, wait_for_nodes=args.wait_for_nodes)


RAY = RayBackend()
# Admission budgets: a local Ray is started with these custom resources equal to its CPUs and
# GPUs, and each trial's driver reserves as much of them as its workers will need, so Tune
# starts exactly the trials whose workers fit - per trial, whatever the grid mixes.
CPU_BUDGET, GPU_BUDGET = "mtl_cpus", "mtl_gpus"
DRIVER_MEMORY_TOKEN = 1 << 20


def demand(cfg: RunConfig, placement: Placement) -> tuple[float, float]:
    return placement.demand(cfg, GPU_DEFAULT)


def driver_resources(cfg: RunConfig, placement: Placement, cluster: dict) -> dict:
    """What a trial's driver reserves.  Never a CPU its workers need: 0 CPU, plus (where the
    cluster has the budgets) its workers' demand out of the budgets."""
    if not cluster.get(CPU_BUDGET):
        # A placement group bundle may not be empty: a token of logical memory, which no
        # training worker reserves, keeps it non-empty without taking anything they need.
        return {"CPU": 0, "memory": DRIVER_MEMORY_TOKEN}
    cpus, gpus = demand(cfg, placement)     # rounded to Ray's 0.0001: 2 x 0.5 is exactly 1
    return {"CPU": 0, CPU_BUDGET: cpus, **({GPU_BUDGET: gpus} if gpus else {})}


def concurrent_slots(trials: list[RunConfig], placement: Placement, cluster: dict) -> int:
    """An upper bound on trials at once.  With budgets: as many as the cluster holds of its
    smallest trials (the budgets admit each one).  Without (a cluster we did not start): as
    many of the largest as fit, so a started trial never waits for workers."""
    fits = []
    for t in trials:
        cpus, gpus = demand(t, placement)
        # In Ray's fixed-point units, as Ray counts: in floats 1 // 0.1 is 9.0, one trial short.
        by_gpu = units(cluster.get("GPU", 0)) // units(gpus) if gpus else math.inf
        fits.append(min(units(cluster.get("CPU", 0)) // units(cpus), by_gpu))
    if min(fits) < 1:
        worst = trials[fits.index(min(fits))]
        cpus, gpus = demand(worst, placement)
        raise RuntimeError(f"trial {worst.out} does not fit the cluster: it needs {cpus:g} CPUs and {gpus:g} GPUs, "
                           f"the cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs")
    slots = max(fits) if cluster.get(CPU_BUDGET) else min(fits)
    return int(min(slots, len(trials)))


FAKE_GPUS_ENV = "MTL_FAKE_GPUS"


def start_local_ray(verbose: int) -> None:
    import ray

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = local_gpu_count()
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake:
        # Test/dev hook: GPUs that need not exist.  Ray's GPUs are logical resources, so admission
        # and fractional packing behave as on a GPU node; what runs on them is the trials' business
        # (--device cpu, or they fail looking for CUDA).
        if not fake.isdigit():
            raise MtlError(f"{FAKE_GPUS_ENV}={fake!r}: a whole number of GPUs is needed")
        gpus = int(fake)
        log.warning("%s=%d: the local Ray declares %d fake GPU(s); trials must run with --device cpu",
                    FAKE_GPUS_ENV, gpus, gpus)
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=verbose > 1,
             resources={CPU_BUDGET: cpus, **({GPU_BUDGET: gpus} if gpus else {})})


def local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:   # noqa: BLE001 - no usable CUDA: a CPU cluster
        return 0


def await_nodes(count: int, timeout_s: float = 300.0) -> None:
    """Wait until ``count`` nodes are alive: workers of a cluster started together join the
    head a few seconds apart, and Tune sizes its concurrency from what has joined."""
    import ray

    deadline = time.monotonic() + timeout_s
    while (alive := sum(n["Alive"] for n in ray.nodes())) < count:
        if time.monotonic() > deadline:
            raise MtlError(f"only {alive} of {count} Ray nodes joined within {timeout_s:.0f} s")
        time.sleep(1)
    if count:
        log.info("%d Ray nodes alive", alive)


def _driver(config: dict, trials: dict, placement: Placement, storage_root: str) -> None:
    """One Tune trial: fit the TorchTrainer of a trial (or of a fused group), forwarding its
    reports to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    launched = time.time()
    name = config["trial"]
    group = [RunConfig.from_dict(c) for c in trials[name]]
    if len(group) == 1:
        build_trainer(group[0], placement, callbacks=[TuneReportCallback()]).fit()
    else:
        build_group_trainer(group, storage.join(storage_root, "_ray", "fused", name), placement,
                            callbacks=[TuneReportCallback()]).fit()
    for cfg in group:      # per trial, fused or not: what benchmarks/bench_sweep.py reads
        storage.write_text(storage.join(storage_root, "_ray", "timings", f"{trial_name(cfg)}.json"),
                           json.dumps({"driver_launched_at": launched, "driver_finished_at": time.time()}))
    results = [read_results(cfg) for cfg in group]
    failed = any(r.get("status", "done") == "failed" for r in results)
    tune.report({"status": "failed" if failed else "done", "best_score": results[0].get("best", {}).get("score"),
                 "steps": max(r["steps"] for r in results)})


# Tune adds CSV, JSON and TensorBoard(X) loggers to every sweep unless this is "1"
# (ray/tune/utils/callback.py, _create_default_callbacks); Tune reads it in the process that runs
# the sweep's loop: this one, or the Tuner's actor on the cluster behind Ray Client.
NO_AUTO_LOGGERS = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


def tune_loggers() -> list:
    """Tune's loggers for our sweeps: JSON and CSV (``result.json``/``progress.csv`` in Tune's
    trial folder, which its result grid reads), never TensorBoard.  Tune's TensorBoard logger wrote
    each trial again under ``_ray/sweep/<trial>/``, and its hparams experiment (one ``trial``
    column) hid the study's in the HParams dashboard, which takes the first it finds."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [JsonLoggerCallback(), CSVLoggerCallback()]


def remove_tune_tensorboard(storage_root: str) -> int:
    """Delete the TensorBoard event files Ray Tune's logger left under ``<root>/_ray/`` (studies
    launched before it was turned off): TensorBoard would list every trial twice and show Tune's
    hparams instead of the study's.  Nothing of ours is written there as events."""
    fs, path = storage.filesystem(storage.join(storage_root, "_ray"))
    stale = fs.glob(f"{path.rstrip('/')}/*/*/events.out.tfevents.*")
    for name in stale:
        fs.rm(name)
    if stale:
        log.info("removed %d TensorBoard event files of Ray Tune's logger under %s", len(stale),
                 storage.join(storage_root, "_ray"))
    return len(stale)


def run_sweep(trials: list[RunConfig], storage_root: str, placement: Placement | None = None,
              address: str | None = None, verbose: int = 1, wait_for_nodes: int = 0) -> list[dict]:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")   # reports block on this poll
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    placement = placement or Placement()
    started = time.perf_counter()
    storage.ensure_writable(storage_root)
    # One launch of a sweep at a time: a second would run the same trials beside the first.
    with Lease(storage_root, "sweep").acquire():
        remove_tune_tensorboard(storage_root)
        failures = _run_todo(trials, storage_root, placement, address, verbose, wait_for_nodes)
    rows = record(storage_root, trials, failures)
    log.info("sweep of %d trials done in %.1f s", len(trials), time.perf_counter() - started)
    return rows


def _run_todo(trials: list[RunConfig], storage_root: str, placement: Placement, address: str | None, verbose: int,
              wait_for_nodes: int) -> dict[str, str]:
    """Run the unfinished trials as Tune sweeps, one per wave of stages (every upstream in a
    sweep before its dependents'); returns why those that did not finish failed: Tune's error,
    or the upstream that failed before them (those are never started)."""
    import ray

    failures = fail_dependents(trials)          # an upstream that failed in an earlier launch
    todo = [t for t in unfinished(trials) if trial_name(t) not in failures]
    log.info("%d trials, %d already finished, %d to run%s", len(trials), sum(map(is_finished, trials)), len(todo),
             f", {len(failures)} not run (an upstream failed)" if failures else "")
    if not todo:
        return failures
    placement.check_trials(todo)
    # Before Ray starts (seconds, and minutes of trials queued behind a bad packing).  nvidia-smi
    # here sees the GPUs of a local Ray or of the node this launcher runs on in a cluster it
    # joined (--address auto); behind Ray Client (ray://) this machine's GPUs say nothing.
    detect = not (address or "").startswith("ray://")
    fuse = plan(todo, placement, GPU_DEFAULT, detect)
    check_ray_packing(todo, placement, GPU_DEFAULT, detect, groups=fuse_groups(todo, fuse) if fuse != 1 else None)
    if not ray.is_initialized():
        if address:
            # Behind Ray Client the sweep's loop runs in an actor on the cluster: it needs the
            # logger setting in its environment, not only in ours.
            runtime_env = {"env_vars": dict(NO_AUTO_LOGGERS)} if address.startswith("ray://") else None
            ray.init(address=address, include_dashboard=False, log_to_driver=verbose > 1, runtime_env=runtime_env)
            await_nodes(wait_for_nodes)
        else:
            start_local_ray(verbose)
    cluster = ray.cluster_resources()
    levels = waves(todo)
    for n, wave in enumerate(levels):
        # One Tuner per wave: Tune has no dependencies between trials, and a wave is short
        # compared with a stage's training; the cost is one Tuner's startup (seconds) per wave.
        failures.update(fail_dependents(trials, failures))
        wave = [t for t in wave if trial_name(t) not in failures]
        if len(levels) > 1:
            log.info("wave %d of %d (stages): %d trials", n + 1, len(levels), len(wave))
        if wave:
            groups = fuse_groups(wave, fuse)      # grouped trials never have an upstream: wave 0 only
            describe(wave, groups, fuse)
            failures.update(_tune(groups, storage_root, placement, cluster, verbose))
    return failures


def _tune(groups: list[list[RunConfig]], storage_root: str, placement: Placement, cluster: dict,
          verbose: int) -> dict[str, str]:
    """One Tune sweep, one Tune trial per group (a trial alone, or fused ones); why the trials of
    those Tune saw fail failed."""
    from ray import tune
    from ray.tune import PlacementGroupFactory

    units = {group_name(g): g for g in groups}
    by_name = {name: g[0] for name, g in units.items()}     # whose workers each Tune trial holds
    ray_path, ray_fs = ray_storage(storage.join(storage_root, "_ray"))
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(_driver, trials={n: [t.to_dict() for t in g] for n, g in units.items()},
                                 placement=placement, storage_root=storage_root),
            lambda spec: PlacementGroupFactory([driver_resources(by_name[spec["trial"]], placement, cluster)])),
        param_space={"trial": tune.grid_search(list(by_name))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_slots(list(by_name.values()), placement, cluster),
                                    trial_name_creator=lambda trial: trial.config["trial"],
                                    trial_dirname_creator=lambda trial: trial.config["trial"]),
        run_config=tune.RunConfig(name="sweep", storage_path=ray_path, storage_filesystem=ray_fs,
                                  verbose=verbose, callbacks=tune_loggers()),
    )
    with environment(NO_AUTO_LOGGERS):
        results = tuner.fit()
    return {trial_name(t): _first_line(r.error) for r in results if r.error for t in units[r.config["trial"]]}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """``values`` in this process's environment for the block, as it was after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]
