"""A study through submitit: one checkpointable job per trial, on SLURM, local subprocesses or
in this process (``debug``).

Preemption and timeouts: submitit's own handler (SIGUSR2, ``--signal=USR2@90``) calls the job's
``checkpoint()`` and requeues it.  ``checkpoint()`` here only resubmits the same trial: the
trial already checkpoints itself to the shared storage as it trains and resumes from its newest
checkpoint when it starts again, so nothing is pickled but its config.  Saving inside the hook
would run on rank 0 alone, in the middle of a step, and deadlock ZeRO 3's collective gather.
Work since the last checkpoint is redone (``--save-every-steps`` bounds it).

Executors (``--cluster``, default slurm where sbatch is on PATH, else local): ``slurm`` (states from
one sacct call per poll), ``local`` (each job is a controller subprocess of this launcher running one
task per worker; its state is its process's), ``debug`` (each job runs in this process, one after
the other, while the launcher waits; one worker only).  A job that ends without a result (cancelled,
killed) is a failed row within seconds, its error otherwise the job's own exception.

Stages: on SLURM every wave is submitted at once, a dependent's job held until its upstream's
job succeeded (``--dependency=afterok:<job>``, ``--kill-on-invalid-dep=yes``: cancelled when it
failed); the local and debug executors run the waves one after the other.  Dependents of a
failed upstream are failed rows naming it (cluster.core.dependencies).

Fused groups (``--fuse K|auto``, cluster/core/fusion.py): one job (one task, one worker) trains a
group of the launch's unfinished trials in one process; a failed or lost job is a failed row for
each of its trials that has no results of its own.

submitit (and, through the jobs, torch) is imported in the functions that submit and follow jobs:
the submit command's ``--help`` and ``--dry-run`` import this module without it.  What a job
runs is ``submitit_job.TrialJob``.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shutil
import signal
import time
from collections import Counter
from typing import TYPE_CHECKING

from mtl import storage
from mtl.config import RunConfig
from mtl.errors import ConfigError
from mtl.lease import Lease

from cluster.backends.slurm_array import ENDED, GPU_DEFAULT as SLURM_GPU_DEFAULT
from cluster.core.backend import WAIT, Backend, Flag
from cluster.core.dependencies import fail_dependents, waves
from cluster.core.ending import record, unfinished
from cluster.core.fusion import Plan, describe, fuse_groups, group_name, plan
from cluster.core.placement import Placement, time_minutes
from cluster.core.study import trial_name, upstream_of

if TYPE_CHECKING:
    from submitit.local.debug import DebugJob

log = logging.getLogger("cluster.backends.submitit_sweep")
DEFAULT_TIME_MIN = 240
CLUSTERS = ("slurm", "local", "debug")
# GPUs per worker without --gpus-per-worker, by executor: SLURM's default on a SLURM cluster,
# none for the jobs that run on this machine.
GPU_DEFAULTS = {"slurm": SLURM_GPU_DEFAULT, "local": 0.0, "debug": 0.0}
# How long a SLURM job that ended without a result file is given for the file to appear (a shared
# filesystem may show it a moment after the scheduler reports the job ended).  A local job's task
# writes its result before it exits, on this host: no wait.
GRACE_S = 3.0


class SubmititBackend(Backend):
    name = "submitit"
    prog = "launch/submitit_sweep.py"
    gpu_default = GPU_DEFAULTS["slurm"]      # its executor where sbatch is on PATH; local, debug: GPU_DEFAULTS
    placement_flags = frozenset({"cpus_per_worker", "gpus_per_worker", "partition", "time", "account",
                                 "array_parallelism", "fuse", "setup"})
    flags = (WAIT, Flag(("--cluster",), dict(choices=CLUSTERS, default=None,
                                             help="submitit executor: slurm, local (subprocesses) or debug (in this "
                                                  "process) (default: slurm where sbatch is on PATH, else local)")))

    def run(self, trials: list[RunConfig], root: str, placement: Placement,
            args: argparse.Namespace) -> list[dict] | None:
        return run_submitit(trials, root, placement, cluster=args.cluster, wait=args.wait is not False)


SUBMITIT = SubmititBackend()


def run_submitit(trials: list[RunConfig], root: str, placement: Placement, cluster: str | None = None,
                 wait: bool = True, poll_s: float = 2.0) -> list[dict] | None:
    cluster = which_cluster(cluster)
    if cluster == "debug" and not wait:
        raise ConfigError("--no-wait: the debug executor runs the trials in this process while it waits "
                          "(use --cluster local or slurm to submit and return)")
    storage.ensure_writable(root)
    blocked = fail_dependents(trials)       # dependents of an upstream that failed in an earlier launch
    todo = [t for t in unfinished(trials) if trial_name(t) not in blocked]
    if cluster == "debug":
        check_in_process(todo)
    print(f"{len(trials)} trials: {len(trials) - len(unfinished(trials))} finished, {len(todo)} to submit "
          f"(submitit, {cluster} executor)" + (f", {len(blocked)} not run (an upstream failed)" if blocked else ""),
          flush=True)
    levels = waves(todo)
    # Jobs on this machine (local, debug) see its GPUs; SLURM's nodes are not visible from here.
    fuse = plan(todo, placement, GPU_DEFAULTS[cluster], detect=cluster != "slurm") if todo else 1
    if not wait:
        if todo:
            # SLURM holds the dependents itself (afterok); a local executor cannot: only the first
            # wave is submitted, and the same command run again once it ended submits the next.
            submit_all(levels if cluster == "slurm" else levels[:1], root, placement, cluster, fuse)
            if cluster != "slurm" and len(levels) > 1:
                print(f"{len(todo) - len(levels[0])} trials wait for their upstream stages: run the same command "
                      "again once these jobs ended", flush=True)
        record(root, trials, blocked)
        return None
    # A waiting launch holds the study: a second one would submit the same trials beside it.
    with Lease(root, "sweep").acquire():
        if cluster == "slurm":       # every wave at once: SLURM starts each dependent after its upstream
            failures = follow(submit_all(levels, root, placement, cluster, fuse), poll_s) if todo else {}
        else:                        # wave by wave: the next is submitted once this one ended
            failures = {}
            for wave in levels:
                failures.update(fail_dependents(trials, failures))
                wave = [t for t in wave if trial_name(t) not in failures]
                if wave:
                    failures.update(follow(submit(wave, root, placement, cluster, fuse=fuse), poll_s))
        failures.update(fail_dependents(trials, failures))
    return record(root, trials, failures | blocked)


def submit_all(levels: list[list[RunConfig]], root: str, placement: Placement, cluster: str,
               fuse: Plan = 1) -> list:
    """Submit the waves in order, each dependent held by SLURM until its upstream's job succeeded
    (``afterok``; cancelled at once when that job fails, ``kill_on_invalid_dep``); every job (a
    fused group's once per trial, as ``submit`` returns them)."""
    jobs: list = []
    job_of: dict[str, str] = {}            # an upstream's folder -> its job id
    for wave in levels:
        submitted = submit(wave, root, placement, cluster, job_of, fuse)
        job_of.update({t.out: j.job_id for t, j in zip(wave, submitted)})
        jobs += submitted
    return jobs


def check_in_process(trials: list[RunConfig]) -> None:
    """The debug executor runs each job in this one process: a trial of several workers cannot."""
    many = next((t for t in trials if t.parallel.workers > 1), None)
    if many is not None:
        raise ConfigError(f"trial {trial_name(many)} has {many.parallel.workers} workers: the debug executor runs "
                          f"one process (use --cluster local or slurm)")


def which_cluster(cluster: str | None) -> str:
    """The executor asked for, else slurm where sbatch is on PATH, else local."""
    if cluster is None:
        return "slurm" if shutil.which("sbatch") else "local"
    if cluster not in CLUSTERS:
        raise ConfigError(f"--cluster: {cluster!r} is not one of {', '.join(CLUSTERS)}")
    return cluster


def folder(root: str) -> str:
    """submitit's pickles and logs: a folder every node sees (the storage when it is local)."""
    base = storage.join(root, "submitit") if storage.is_local(root) else os.path.abspath("submitit")
    return os.path.join(base, "%j")


def submit(trials: list[RunConfig], root: str, placement: Placement, cluster: str | None,
           upstream_jobs: dict[str, str] | None = None, fuse: Plan = 1) -> list:
    """Submit ``trials`` (one array per worker count and upstream job; with ``fuse``, one job per
    fused group); their jobs, in the order of ``trials`` (a group's job for each of its trials).
    ``upstream_jobs`` (a trial's folder -> its SLURM job id): a trial whose upstream is there
    waits for that job (SLURM only)."""
    import submitit

    from cluster.backends.submitit_job import TrialJob      # submitit and torch: only once jobs are submitted

    executor = submitit.AutoExecutor(folder=folder(root), cluster=which_cluster(cluster))
    on_slurm = executor.cluster == "slurm"
    upstream_jobs = upstream_jobs or {}
    groups = fuse_groups(trials, fuse)        # grouped trials have no upstream: never held by afterok
    describe(trials, groups, fuse)
    by_workers: dict[tuple[int, str | None], list[list[RunConfig]]] = {}
    for g in groups:
        by_workers.setdefault((g[0].parallel.workers, upstream_jobs.get(upstream_of(g[0]))), []).append(g)
    if executor.cluster == "debug":
        check_in_process(trials)
    if executor.cluster != "debug" and any(t.save_every_steps == 0 for t in trials):
        log.warning("checkpoints only at epoch ends (--save-every-steps 0): a job preempted or timed out "
                    "mid-epoch redoes that epoch when it is requeued")
    jobs = {}
    for (workers, after), group in by_workers.items():
        gpus = math.ceil(round(workers * placement.gpus(GPU_DEFAULTS[executor.cluster]), 4))   # 3 x 0.1 is not 0.3
        params = dict(name=f"mtl-{os.path.basename(root.rstrip('/'))}", tasks_per_node=workers,
                      cpus_per_task=max(1, math.ceil(placement.cpus_per_worker)),
                      timeout_min=time_minutes(placement.time) if placement.time else DEFAULT_TIME_MIN)
        if gpus:
            params["gpus_per_node"] = gpus
        if on_slurm:
            extra = {"requeue": True, **({"account": placement.account} if placement.account else {})}
            if after:
                extra.update(dependency=f"afterok:{after}", kill_on_invalid_dep="yes")
            params.update(slurm_additional_parameters=extra, slurm_setup=list(placement.setup))
            if placement.partition:
                params["slurm_partition"] = placement.partition
            if placement.array_parallelism:
                params["slurm_array_parallelism"] = placement.array_parallelism
        executor.update_parameters(**params)
        # A fused group's job gets the list of its configs (TrialJob trains them as one group).
        submitted = executor.map_array(TrialJob(), [g[0].to_dict() if len(g) == 1 else [t.to_dict() for t in g]
                                                    for g in group])
        for g, job in zip(group, submitted):
            job.trial, job.members = group_name(g), [trial_name(t) for t in g]
            jobs.update({t.out: job for t in g})
            print(f"submitted {job.trial}" + (f" ({', '.join(job.members)})" if len(g) > 1 else "")
                  + f" as job {job.job_id}" + (f" after job {after}" if after else ""), flush=True)
    return [jobs[t.out] for t in trials]


def follow(jobs: list, poll_s: float = 2.0) -> dict[str, str]:
    """Wait until every job has ended, with a progress line when the counts change; returns why
    each failed one failed.  A job that ended without a result (cancelled, timed out or killed on
    SLURM; a local job's process killed) is failed within seconds, instead of after submitit's
    fixed wait for a result file.  Debug jobs run here, one after the other."""
    import submitit
    from submitit.local.debug import DebugJob

    jobs = list({id(j): j for j in jobs}.values())      # a fused group's job is listed once per trial
    if jobs and isinstance(jobs[0], DebugJob):
        return _follow_in_process(jobs)
    started, last, failures, pending = time.monotonic(), None, {}, list(jobs)
    lost_since: dict[str, float] = {}
    while pending:
        if isinstance(pending[0], submitit.SlurmJob):
            # One sacct for all jobs, not submitit's growing back-off.  Only SLURM's watcher asks
            # anything: local jobs are this process's children (their state is a poll of the
            # process); the base watcher they share would raise NotImplementedError.
            pending[0].watcher.update()
        still, now = [], time.monotonic()
        for job in pending:
            outcome, why = _outcome(job)
            if (outcome == "lost" and not isinstance(job, submitit.LocalJob)
                    and now - lost_since.setdefault(job.job_id, now) < GRACE_S):
                outcome = "running"   # a result written as the job ended may land a moment later
            if outcome == "running":
                still.append(job)
            elif why:
                failures.update(dict.fromkeys(_members(job), why))
        pending = still
        line = _progress(len(jobs) - len(pending), len(jobs), Counter(_state(j) for j in pending))
        if line != last:
            print(f"[{time.monotonic() - started:6.0f} s] {line}", flush=True)
            last = line
        if pending:
            time.sleep(poll_s)
    return failures


def _follow_in_process(jobs: list) -> dict[str, str]:
    started, failures = time.monotonic(), {}
    for i, job in enumerate(jobs):
        queued = len(jobs) - i - 1
        counts = Counter({"RUNNING (in this process)": 1, **({"QUEUED": queued} if queued else {})})
        print(f"[{time.monotonic() - started:6.0f} s] {_progress(i, len(jobs), counts)}", flush=True)
        why = _run_in_process(job)
        if why:
            failures.update(dict.fromkeys(_members(job), why))
    print(f"[{time.monotonic() - started:6.0f} s] {_progress(len(jobs), len(jobs), Counter())}", flush=True)
    return failures


def _members(job) -> list[str]:
    """The trials a job ran: its fused group's, or its one trial (jobs made before fusion have no list)."""
    return getattr(job, "members", None) or [job.trial]


def _progress(ended: int, total: int, counts: Counter) -> str:
    return f"{ended}/{total} jobs ended" + "".join(f", {n} {s}" for s, n in counts.items())


def _run_in_process(job: DebugJob) -> str | None:
    """Run a debug job here and return why it failed, or None.  As ``DebugJob.results()`` does
    (the job's environment, its log files), but an error is returned, not handed to
    ``pdb.post_mortem``, which would wait on a terminal for a debugger's commands."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(job.environ)          # SUBMITIT_DEBUG_JOB_ID: JobEnvironment() works in the job
    job.paths.stdout.parent.mkdir(parents=True, exist_ok=True)
    handlers = [logging.FileHandler(job.paths.stdout), logging.FileHandler(job.paths.stderr)]
    handlers[1].setLevel(logging.WARNING)
    root = logging.getLogger()
    for h in handlers:
        root.addHandler(h)
    try:
        job.submission().result()
        return None
    except Exception as exc:  # noqa: BLE001 - the trial's own error, as its row's reason
        return _last_line(exc)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for h in handlers:
            root.removeHandler(h)
            h.close()


def _outcome(job) -> tuple[str, str | None]:
    """("done" | "error" | "lost" | "running", why it failed).  A job's result is the pickle each
    of its tasks writes when it returns or raises; "lost": it ended without one."""
    tasks = [job.task(k) for k in range(job.num_tasks)]
    have = [t.paths.result_pickle.exists() for t in tasks]
    ended = _ended(job)
    if not (all(have) or ended):
        return "running", None
    for task, present in zip(tasks, have):
        if present:
            try:
                task.result()
            except Exception as exc:  # noqa: BLE001 - the job's own error, as text
                return "error", _last_line(exc)
    if all(have):
        return "done", None
    return "lost", _lost_reason(job)


def _ended(job) -> bool:
    import submitit

    if isinstance(job, submitit.LocalJob):
        return job.get_info()["jobState"] != "RUNNING"      # its process has exited
    return _state(job) in ENDED


def _lost_reason(job) -> str:
    import submitit

    if isinstance(job, submitit.LocalJob):
        code = job._process.poll() if job._process is not None else None
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 and
               -code in signal.valid_signals() else "its process was killed or exited early")
        return f"local job {job.job_id} ended without a result ({how}; log {job.paths.stderr})"
    return f"{_state(job)} without a result (log {job.paths.stderr})"


def _state(job) -> str:
    state = job.state
    return state.split()[0] if state else "UNKNOWN"


def _last_line(exc: BaseException) -> str:
    """The error's last line: for a job's FailedJobError, the last line of the job's own
    traceback (its exception), not submitit's pointer to the log files."""
    text = str(exc)
    inner = re.search(r"\n-{10,}\n(.*)\n-{10,}\n", text, re.S)
    lines = [line.strip() for line in (inner.group(1) if inner else text).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    if inner:    # "mtl.errors.TrialFailed: step 2: ..." -> "TrialFailed: step 2: ..."
        last = re.sub(r"^(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*: )", r"\1", last)
    return last[:300]
