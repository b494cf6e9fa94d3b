"""A study through submitit: one checkpointable job per trial, on SLURM, local subprocesses or
in this process (``debug``).

Preemption and timeouts: submitit's own handler (SIGUSR2, ``--signal=USR2@90``) calls the job's
``checkpoint()`` and requeues it.  ``checkpoint()`` here only resubmits the same trial: the
trial already checkpoints itself to the shared storage as it trains and resumes from its newest
checkpoint when it starts again, so nothing is pickled but its config.  Saving inside the hook
would run on rank 0 alone, in the middle of a step, and deadlock ZeRO 3's collective gather.
Work since the last checkpoint is redone (``--save-every-steps`` bounds it).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter

import submitit
from submitit.local.debug import DebugJob

from mtl import storage
from mtl.config import RunConfig
from mtl.dist import DistContext
from mtl.errors import MtlError
from mtl.lease import Lease

from cluster.placement import Placement, time_minutes
from cluster.study import is_finished, results_table, trial_name, write_table
from cluster.trial import run_trial

log = logging.getLogger("cluster.submitit_sweep")
DEFAULT_TIME_MIN = 240
# Ended states: SLURM's (sacct) and the local executor's (a finished or killed process).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "FINISHED", "INTERRUPTED", "NO"}


class TrialJob(submitit.helpers.Checkpointable):
    """A trial as a submitit job; every task of a multi-worker job runs it as one rank."""

    def __call__(self, config: dict) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        cfg = RunConfig.from_dict(config)
        if submitit.JobEnvironment().num_tasks > 1:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for the process group; the GPU is
            # chosen by local rank (mtl.dist), so CUDA_VISIBLE_DEVICES is left as SLURM set it.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        results = run_trial(cfg, DistContext.from_env(cfg.device))
        return {"trial": trial_name(cfg), "steps": results["steps"], "best": results["best"]}

    def checkpoint(self, config: dict) -> submitit.helpers.DelayedSubmission:
        # Resubmit only: the trial resumes from its own newest checkpoint (see the module doc).
        return submitit.helpers.DelayedSubmission(self, config)


def run_submitit(trials: list[RunConfig], root: str, placement: Placement, cluster: str | None = None,
                 wait: bool = True, poll_s: float = 2.0) -> list[dict] | None:
    storage.ensure_writable(root)
    todo = [t for t in trials if not is_finished(t)]
    print(f"{len(trials)} trials: {len(trials) - len(todo)} finished, {len(todo)} to submit", flush=True)
    if not wait:
        if todo:
            submit(todo, root, placement, cluster)
        write_table(root, results_table(trials))
        return None
    # A waiting launch holds the study: a second one would submit the same trials beside it.
    with Lease(root, "sweep").acquire():
        failures = follow(submit(todo, root, placement, cluster), poll_s) if todo else {}
    rows = results_table(trials, failures)
    write_table(root, rows)
    return rows


def folder(root: str) -> str:
    """submitit's pickles and logs: a folder every node sees (the storage when it is local)."""
    base = storage.join(root, "submitit") if storage.is_local(root) else os.path.abspath("submitit")
    return os.path.join(base, "%j")


def submit(trials: list[RunConfig], root: str, placement: Placement, cluster: str | None) -> list:
    executor = submitit.AutoExecutor(folder=folder(root), cluster=cluster)
    on_slurm = executor.cluster == "slurm"
    by_workers: dict[int, list[RunConfig]] = {}
    for t in trials:
        by_workers.setdefault(t.parallel.workers, []).append(t)
    if executor.cluster == "debug" and max(by_workers) > 1:
        many = next(t for t in trials if t.parallel.workers > 1)
        raise MtlError(f"trial {trial_name(many)} has {many.parallel.workers} workers: the debug executor runs one "
                       f"process (use --cluster local or slurm)")
    if any(t.save_every_steps == 0 for t in trials):
        log.warning("checkpoints only at epoch ends (--save-every-steps 0): a job preempted or timed out "
                    "mid-epoch redoes that epoch when it is requeued")
    jobs = []
    for workers, group in by_workers.items():
        gpus = math.ceil(round(workers * placement.gpus(1.0 if on_slurm else 0.0), 4))   # 3 x 0.1 is not 0.3
        params = dict(name=f"mtl-{os.path.basename(root.rstrip('/'))}", tasks_per_node=workers,
                      cpus_per_task=max(1, math.ceil(placement.cpus_per_worker)),
                      timeout_min=time_minutes(placement.time) if placement.time else DEFAULT_TIME_MIN)
        if gpus:
            params["gpus_per_node"] = gpus
        if on_slurm:
            extra = {"requeue": True, **({"account": placement.account} if placement.account else {})}
            params.update(slurm_additional_parameters=extra, slurm_setup=list(placement.setup))
            if placement.partition:
                params["slurm_partition"] = placement.partition
            if placement.array_parallelism:
                params["slurm_array_parallelism"] = placement.array_parallelism
        executor.update_parameters(**params)
        submitted = executor.map_array(TrialJob(), [t.to_dict() for t in group])
        for t, job in zip(group, submitted):
            job.trial = trial_name(t)
            print(f"submitted {job.trial} as job {job.job_id}", flush=True)
        jobs += submitted
    return jobs


def follow(jobs: list, poll_s: float = 2.0) -> dict[str, str]:
    """Wait until every job has ended, with a progress line when the counts change; returns why
    each failed one failed.  A job SLURM reports ended without a result (cancelled, timed out,
    killed) is failed at once, instead of after submitit's fixed wait for a result file."""
    started, last, failures, pending = time.monotonic(), None, {}, list(jobs)
    while pending:
        watcher = getattr(pending[0], "watcher", None)
        if hasattr(watcher, "update"):
            watcher.update()               # one sacct for all jobs, not submitit's growing back-off
        still = []
        for job in pending:
            ended, failure = _outcome(job)
            if failure:
                failures[job.trial] = failure
            if not ended:
                still.append(job)
        pending = still
        counts = Counter(_state(j) for j in pending)
        line = f"{len(jobs) - len(pending)}/{len(jobs)} jobs ended" + "".join(f", {n} {s}" for s, n in counts.items())
        if line != last:
            print(f"[{time.monotonic() - started:6.0f} s] {line}", flush=True)
            last = line
        if pending:
            time.sleep(poll_s)
    return failures


def _outcome(job) -> tuple[bool, str | None]:
    """(ended, why it failed or None)."""
    if isinstance(job, DebugJob) or job.paths.result_pickle.exists():
        try:
            job.result()          # a debug job runs here, in this process
            return True, None
        except Exception as exc:  # noqa: BLE001 - the job's own error, as text
            return True, _last_line(exc)
    state = _state(job)
    if state in ENDED:
        return True, f"{state} without a result (log {job.paths.stderr})"
    return False, None


def _state(job) -> str:
    state = job.state
    return state.split()[0] if state else "UNKNOWN"


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]
