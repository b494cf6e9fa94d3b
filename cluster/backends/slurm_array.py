"""A study as SLURM job arrays: the array task that runs trials, and the submit side.

In a job (slurm/sweep.sh execs this)::

    python -m cluster.backends.slurm_array --grid pairings --seeds 0 --storage runs/sweep [mtl.train flags]

Array task i expands the grid exactly as the submitter did and runs slot i (trial i, or up
to k consecutive trials of one wave of stages with ``--trials-per-task k``:
cluster.core.dependencies.slots).  A finished trial exits 0 at once.  Each
trial's workers are child processes (``python -m cluster.core.trial``; one per data-parallel
worker, DDP over the task's CPUs or GPUs), and this process relays signals to them:

- SIGUSR1 (``#SBATCH --signal=B:USR1@120``, or ``scancel --batch --signal=USR1``): the trials
  finish their step, checkpoint and exit 75; the task then requeues itself (``scontrol requeue
  $SLURM_JOB_ID``) and, started again, resumes from those checkpoints.
- SIGTERM (preemption, scancel): the same checkpoint, then exit without requeueing (SLURM
  requeues a preempted job itself where the partition says so).

On the submit side ``submit_array`` sizes the array to the trials still missing, submits
slurm/sweep.sh with ``sbatch --parsable`` (one array per distinct resource shape and set of
upstream tasks: dependents wait with ``--dependency=afterok:<job>_<index>``), and with ``wait``
follows the tasks through squeue and sacct until each has ended.  An array submitted by hand
(``sbatch --array=... slurm/sweep.sh --grid ...``) has no dependencies: a dependent whose
upstream has not finished fails at its start, naming it (use the helper for grids with stages).

Fused groups (``--fuse K|auto``, cluster/core/fusion.py): array task i runs group i, one process
(``python -m cluster.core.trial A.json B.json ...``, one worker) on the resources of one trial.
The submitter groups the whole study, finished trials included, and pins the groups with the
trial list, so an index names the same group in every resubmit.  ``--fuse`` and
``--trials-per-task`` are not combined (refused in one line).  A task's memory is not checked
(one process on its GPU, like one trial alone: --fuse auto sizes the groups to the estimate).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from mtl import storage
from mtl.config import RunConfig
from mtl.rendezvous import free_port
from mtl.errors import ConfigError, MtlError
from mtl.stop import EXIT_STOPPED

from cluster.core import memory
from cluster.core.backend import WAIT, Backend, Flag
from cluster.core.dependencies import fail_dependents, slot, slots, waves
from cluster.core.ending import is_finished, record, unfinished
from cluster.core.flags import add_study_flags, trials_from_args
from cluster.core.fusion import describe, fused_slots, group_name, pick, plan, task_slots
from cluster.core.placement import Placement, parse_fuse
from cluster.core.study import index_ranges, trial_name, upstream_of

log = logging.getLogger("cluster.backends.slurm_array")
SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "sweep.sh"
# sacct/squeue states after which a job (an array task, a submitit job) will not run again on its
# own: this backend's and submitit's SLURM executor's one list.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}
GPU_DEFAULT = 1.0     # SLURM clusters are GPU clusters: a GPU per worker unless told --gpus-per-worker


class SlurmBackend(Backend):
    name = "slurm"
    prog = "launch/slurm_submit.py"
    gpu_default = GPU_DEFAULT
    placement_flags = frozenset({"cpus_per_worker", "gpus_per_worker", "partition", "time", "account",
                                 "array_parallelism", "trials_per_task", "gpu_memory", "fuse", "setup",
                                 "sbatch_args"})
    flags = (WAIT, Flag(("--script",), dict(default=None,
                                            help="the sbatch script (default: slurm/sweep.sh of this project)")))

    def run(self, trials: list[RunConfig], root: str, placement: Placement,
            args: argparse.Namespace) -> list[dict] | None:
        return submit_array(trials, root, placement, wait=bool(args.wait), script=args.script)


SLURM = SlurmBackend()


# ============================================================================================
# In the job: one array task
# ============================================================================================
class TrialProcesses:
    """The worker processes of the trials one array task runs, and the relay of the
    scheduler's signals to them.  ``units``: each a trial alone (its workers), or a fused group
    (one process training all of them)."""

    def __init__(self, units: list[list[RunConfig]], signum: int | None = None):
        self.units = units
        self.signum = signum        # a signal that came before the workers existed
        self.procs: dict[str, list[subprocess.Popen]] = {}
        self.tmp = tempfile.mkdtemp(prefix="mtl-array-task-")

    def start(self) -> None:
        # place_workers lists each unit's workers together, in the units' order.
        placed = iter(place_workers([unit[0] for unit in self.units], visible_gpus()))
        for unit in self.units:
            name, world, port = group_name(unit), unit[0].parallel.workers, free_port()
            paths = []
            for cfg in unit:
                paths.append(os.path.join(self.tmp, f"{trial_name(cfg)}.json"))
                with open(paths[-1], "w") as fh:
                    json.dump(cfg.to_dict(), fh)
            self.procs[name] = []
            for _ in range(world):
                _, rank, gpu = next(placed)
                self.procs[name].append(subprocess.Popen([sys.executable, "-m", "cluster.core.trial", *paths],
                                                         env=_worker_env(rank, world, port, gpu)))
        if self.signum is not None:
            self.relay(self.signum, None)

    def relay(self, signum, frame) -> None:
        self.signum = signum
        for procs in self.procs.values():
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signum)

    def wait(self, grace_s: float = 10.0) -> dict[str, int]:
        """Each trial's exit code: 0 when every worker succeeded, EXIT_STOPPED when they stopped
        on a signal, else the first failing worker's.  A worker that crashed leaves its peers
        waiting in a collective that never completes: after ``grace_s`` they are killed."""
        crashed_at: dict[str, float] = {}
        try:
            while True:
                codes = {name: [_stopped_as_75(p.poll()) for p in procs] for name, procs in self.procs.items()}
                if all(c is not None for cs in codes.values() for c in cs):
                    break
                for name, cs in codes.items():
                    if any(c not in (None, 0, EXIT_STOPPED) for c in cs):
                        crashed_at.setdefault(name, time.monotonic())
                        if time.monotonic() - crashed_at[name] > grace_s:
                            for p in self.procs[name]:
                                if p.poll() is None:
                                    p.kill()
                time.sleep(0.2)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return {name: next((c for c in cs if c not in (0, EXIT_STOPPED)), max(cs)) for name, cs in codes.items()}


def _stopped_as_75(code: int | None) -> int | None:
    """A worker the scheduler's signal killed before its handler was up (while it started) has
    lost nothing beyond its last checkpoint: it counts as stopped."""
    return EXIT_STOPPED if code in (-signal.SIGUSR1, -signal.SIGTERM) else code


def place_workers(trials: list[RunConfig], gpus: list[str]) -> list[tuple[RunConfig, int, str | None]]:
    """(trial, rank, GPU) for every worker of ``trials``: workers take the GPUs in turn, one each,
    so trials packed into one task (--trials-per-task) spread over its GPUs instead of all using
    the first; with fewer GPUs than workers, several share one (fractional --gpus-per-worker)."""
    placed = []
    for cfg in trials:
        for rank in range(cfg.parallel.workers):
            placed.append((cfg, rank, gpus[len(placed) % len(gpus)] if gpus else None))
    return placed


def shared_gpus(trials: list[RunConfig], gpus: list[str]) -> dict[str, list[RunConfig]]:
    """The GPUs that run two or more workers, each with the trials of those workers (a trial once
    per worker there)."""
    on: dict[str, list[RunConfig]] = defaultdict(list)
    for cfg, _, gpu in place_workers(trials, gpus):
        if gpu is not None and cfg.device != "cpu":
            on[gpu].append(cfg)
    return {gpu: group for gpu, group in on.items() if len(group) > 1}


def visible_gpus() -> list[str]:
    """The GPUs SLURM gave this task (CUDA_VISIBLE_DEVICES), empty on a CPU task."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [g for g in value.split(",") if g.strip() and value != "NoDevFiles"]


def _worker_env(rank: int, world: int, port: int, gpu: str | None) -> dict:
    # torchrun's variables, always set (a value exported from the submitting shell must not
    # leak in): DistContext.from_env starts the process group when world > 1.
    env = dict(os.environ, PYTHONUNBUFFERED="1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    if gpu is not None:       # one GPU per worker process: it is that process's cuda:0
        env.update(CUDA_VISIBLE_DEVICES=gpu, LOCAL_RANK="0")
    return env


def requeue() -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        print("error: not in a SLURM job: cannot requeue (run the same command again to resume)", file=sys.stderr)
        return False
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode:
        print(f"error: scontrol requeue {job} failed: {done.stderr.strip() or done.stdout.strip()} "
              f"(the trials resume from their checkpoints when the task runs again)", file=sys.stderr)
        return False
    print(f"requeued job {job}: the trials resume from their checkpoints when it starts again", flush=True)
    return True


def check_task_memory(todo: list[RunConfig], gpu_memory: str, pinned: dict[str, int] | None) -> None:
    """At the task's start, before any worker: refuse workers sharing a GPU whose estimated sum
    exceeds its memory (--gpu-memory, else nvidia-smi here).  Costs nothing when every worker has
    its own GPU; otherwise an nvidia-smi call, and (only without estimates pinned by the
    submitter) importing torch and transformers to estimate, seconds."""
    placement = Placement(gpu_memory=gpu_memory)
    packed = shared_gpus(todo, visible_gpus())
    if not packed or not placement.memory_check:
        return
    capacity, source = memory.gpu_capacity(placement, detect=True)
    if capacity is None:
        print(f"GPU memory unknown (no nvidia-smi, no --gpu-memory): {len(packed)} shared GPU(s) not checked",
              flush=True)
        return
    names = {trial_name(t) for group in packed.values() for t in group}
    sizes = pinned if pinned is not None and names <= set(pinned) else memory.estimates(todo)
    if sizes is not None:
        memory.check_slurm_gpus(packed, sizes, capacity, source)


def run_task(group: list[RunConfig], index: int, early: list[int], gpu_memory: str = "",
             pinned: dict[str, int] | None = None, blocked: dict[str, str] | None = None, fused: bool = False) -> int:
    """Run the task's unfinished trials (``fused``: as one group, in one process); those in
    ``blocked`` (name: why, an upstream failed) are skipped, so that a task-mate's failed upstream
    does not fail this task and, through afterok, cancel the dependents of the trials it did run."""
    blocked = blocked or {}
    todo = [t for t in unfinished(group) if trial_name(t) not in blocked]
    env = os.environ
    print(f"array task {index} (job {env.get('SLURM_ARRAY_JOB_ID', '-')}_{env.get('SLURM_ARRAY_TASK_ID', '-')}, "
          f"id {env.get('SLURM_JOB_ID', '-')}, restart {env.get('SLURM_RESTART_COUNT', '0')}) on "
          f"{socket.gethostname()}: {', '.join(trial_name(t) for t in group)}", flush=True)
    for t in group:
        if trial_name(t) in blocked:
            print(f"trial {trial_name(t)} is not run: {blocked[trial_name(t)]}", flush=True)
        elif t not in todo:
            print(f"trial {trial_name(t)} is finished: nothing to do", flush=True)
    if not todo:
        return 0
    try:
        if not fused:      # a fused group is one process on its GPU (see the module's docstring)
            check_task_memory(todo, gpu_memory, pinned)
    except MtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    procs = TrialProcesses([todo] if fused else [[t] for t in todo], early[-1] if early else None)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, procs.relay)
    procs.start()
    codes = procs.wait()
    failed = {n: c for n, c in codes.items() if c not in (0, EXIT_STOPPED)}
    stopped = [n for n, c in codes.items() if c == EXIT_STOPPED]
    if failed:
        print(f"error: trial {', '.join(f'{n} exited {c}' for n, c in failed.items())}", file=sys.stderr)
        return next(iter(failed.values()))
    if stopped:
        if procs.signum == signal.SIGUSR1 and requeue():
            return 0
        return EXIT_STOPPED
    return 0


def task_main(argv: list[str] | None = None) -> int:
    # The scheduler's signals are caught from the first moment: until the workers exist they
    # are only remembered (the default action would end the task and lose the requeue).
    early: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: early.append(signum))
    p = argparse.ArgumentParser(prog="python -m cluster.backends.slurm_array",
                                description="Run one array task of a study.")
    add_study_flags(p, grid_required=False)
    p.add_argument("--trials", default=None, metavar="URL",
                   help="the study's trial list as written by launch/slurm_submit.py (instead of --grid)")
    p.add_argument("--index", type=int, default=None, help="array index (default: $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--trials-per-task", type=int, default=1, help="trials this task runs side by side")
    p.add_argument("--gpu-memory", default="", help="one GPU's memory for the packing check (default: nvidia-smi; "
                                                     "'off': no check)")
    p.add_argument("--fuse", default="1", metavar="K", help="with --grid: task i runs fused group i of at most K "
                                                            "trials (a list from launch/slurm_submit.py pins its own)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # Bad sizes and combinations are refused here, in one line.
        Placement(gpu_memory=args.gpu_memory, fuse=args.fuse, trials_per_task=args.trials_per_task)
        pinned, groups = None, None
        if args.trials:
            trials, root, pinned, groups = load_study(args.trials)
        else:
            trials, root = trials_from_args(args)
        index = args.index if args.index is not None else _array_index()
        groups = groups if groups is not None else task_groups(trials, args.fuse)
        members = slot(trials, index, args.trials_per_task) if groups is None else pick(groups, index, len(trials))
        storage.ensure_writable(root)
    except MtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_task([trials[i] for i in members], index, early, args.gpu_memory, pinned, fail_dependents(trials),
                    fused=groups is not None)


def task_groups(trials: list[RunConfig], fuse: str) -> list[list[int]] | None:
    """An array submitted by hand with ``--fuse K``: the groups, from the grid alone (None: K = 1)."""
    k = parse_fuse(fuse)
    if k == "auto":
        raise ConfigError("--fuse auto: an array task cannot size groups by itself (each would judge its own GPU): "
                          "give a number, or submit with launch/slurm_submit.py, which pins the groups")
    return fused_slots(trials, k) if k != 1 else None


def _array_index() -> int:
    value = os.environ.get("SLURM_ARRAY_TASK_ID")
    if value is None:
        raise ConfigError("no array index: not an array task (SLURM_ARRAY_TASK_ID is unset) and no --index given")
    return int(value)


# ============================================================================================
# Submitting and following
# ============================================================================================
def submit_array(trials: list[RunConfig], root: str, placement: Placement, wait: bool = False,
                 script: str | None = None) -> list[dict] | None:
    """Submit the array tasks whose trials are unfinished and not already queued or running;
    with ``wait``, follow them (and those already queued) to the end and return the results
    table.  The trial list is pinned in the storage: a task finds its trial by index in that
    very list, whatever happens to the grid file or the command line later.  Upstream stages
    go first; a task of dependents waits for its upstreams' tasks (``afterok``, see
    ``_submit_waves``); dependents of an upstream that failed are not submitted, and are
    reported failed with the reason."""
    _need("sbatch")
    storage.ensure_writable(root)
    placement.check_trials(trials)
    k = placement.trials_per_task
    # The whole list, finished trials included: the groups, like the slots, must be the same in
    # every resubmit (cluster/core/fusion.py).
    fuse = plan(trials, placement, GPU_DEFAULT, detect=False)
    groups = task_slots(trials, k, fuse)
    fused = fuse != 1
    if fused:
        describe(trials, [[trials[i] for i in g] for g in groups], fuse)
    study = pin_trials(trials, root, k, None if fused else packing_estimates(trials, placement, groups),
                       groups if fused else None)
    live = live_slots(study)
    blocked = fail_dependents(trials)
    todo = [s for s, members in enumerate(groups) if s not in live and
            any(not is_finished(trials[i]) and trial_name(trials[i]) not in blocked for i in members)]
    print(f"{len(trials)} trials in {len(groups)} array tasks: "
          f"{sum(map(is_finished, trials))} finished, {len(live)} tasks queued or running, {len(todo)} to submit"
          + (f", {len(blocked)} not run (an upstream failed)" if blocked else ""), flush=True)
    jobs = _submit_waves(trials, groups, todo, live, root, placement, study, script, fused)
    if not wait:
        record(root, trials, blocked)
        if jobs:
            print(f"follow: squeue -j {','.join(jobs)}; the same command with --wait follows them and writes "
                  f"the results table when they end")
        return None
    failures = {}
    for (job, s), state in (follow(dict(jobs)) if jobs else {}).items():
        for i in groups[s]:
            if not is_finished(trials[i]):
                why = "ended without results" if state == "COMPLETED" else state
                failures[trial_name(trials[i])] = f"SLURM task {job}_{s} {why} (log {_log_dir(root)})"
    # A dependent cancelled because its upstream's task failed (--kill-on-invalid-dep) says so.
    failures.update(fail_dependents(trials, failures))
    return record(root, trials, failures)


def _submit_waves(trials: list[RunConfig], groups: list[list[int]], todo: list[int], live: dict[int, str],
                  root: str, placement: Placement, study: str, script: str | None,
                  fused: bool = False) -> dict[str, list[int]]:
    """Submit the ``todo`` slots wave by wave; {job id: its slots} with the ``live`` ones.  A slot
    of dependents depends on exactly the tasks of its unfinished upstreams, queued earlier or
    now (``afterok:<job>_<index>``): per task rather than per array job, so a dependent starts
    as soon as its own upstream is done and one failed upstream cancels its own dependents only
    (``--kill-on-invalid-dep``: they would otherwise stay pending for ever).  Slots that wait for
    different tasks are therefore separate arrays."""
    jobs: dict[str, list[int]] = defaultdict(list)
    where = dict(live)                      # slot -> the job that runs it
    for s, job in live.items():
        jobs[job].append(s)
    level = {t.out: n for n, wave in enumerate(waves(trials)) for t in wave}
    slot_of = {i: s for s, members in enumerate(groups) for i in members}
    index = {t.out: i for i, t in enumerate(trials)}
    for wave in sorted({level[trials[groups[s][0]].out] for s in todo}):
        batches = defaultdict(list)
        for s in (s for s in todo if level[trials[groups[s][0]].out] == wave):
            ups = {index[u] for u in (upstream_of(trials[i]) for i in groups[s]) if u in index}
            after = sorted({f"{where[slot_of[u]]}_{slot_of[u]}" for u in ups
                            if not is_finished(trials[u]) and slot_of[u] in where})
            # A fused group is one worker: the resources of one of its trials.
            on = [trials[groups[s][0]]] if fused else [trials[i] for i in groups[s]]
            batches[(placement.slurm_resources(on, GPU_DEFAULT), tuple(after))].append(s)
        for (shape, after), batch in batches.items():
            job = _sbatch(batch, shape, root, placement, study, script, list(after))
            jobs[job] = batch
            where.update({s: job for s in batch})
            print(f"submitted job {job}: array {index_ranges(batch)} ({len(batch)} tasks, "
                  f"{shape[0]} CPUs and {shape[1]} GPUs each)"
                  + (f" after {', '.join(after)}" if after else "") + f"; logs in {_log_dir(root)}", flush=True)
    return dict(jobs)


def packing_estimates(trials: list[RunConfig], placement: Placement,
                      groups: list[list[int]] | None = None) -> dict[str, int] | None:
    """Where a task's workers would share a GPU: each such trial's estimated worker memory (for the
    task to check without importing torch), after refusing, when --gpu-memory states the GPU's
    size, a task that cannot fit.  Without --gpu-memory the check waits for the task, which sees
    its GPU (this submit host's GPUs, if any, say nothing about the partition's)."""
    packs = {}
    for s, members in enumerate(groups if groups is not None else slots(trials, placement.trials_per_task)):
        group = [trials[i] for i in members]
        gpus = [str(g) for g in range(placement.slurm_resources(group, GPU_DEFAULT)[1])]
        packs[s] = shared_gpus(group, gpus)
    involved = list({trial_name(t): t for p in packs.values() for ts in p.values() for t in ts}.values())
    if not involved or not placement.memory_check:
        return None
    sizes = memory.estimates(involved)
    capacity = placement.gpu_memory_bytes
    if sizes is not None and capacity is not None:
        for packed in packs.values():
            memory.check_slurm_gpus(packed, sizes, capacity, f"--gpu-memory {placement.gpu_memory}")
    elif sizes is not None:
        print(f"GPU memory: {sum(bool(p) for p in packs.values())} array tasks share GPUs between workers; each "
              f"checks its packing at its start (nvidia-smi); --gpu-memory checks now", flush=True)
    return sizes


def pin_trials(trials: list[RunConfig], root: str, per_task: int, estimates: dict[str, int] | None = None,
               groups: list[list[int]] | None = None) -> str:
    """Write the trial list (with how many trials a task runs) to the storage, once; returns its
    URL, named by a hash of the list.  ``estimates`` (GPU memory per worker of the trials that
    share a GPU) ride along outside the hash: a list pinned by an earlier submit keeps its name,
    and its tasks compute what is missing themselves.  ``groups`` (--fuse: task i runs the trials
    groups[i]) are part of the hash, and absent without fusion (earlier lists keep their names)."""
    study = {"storage": root, "trials_per_task": per_task, "trials": [t.to_dict() for t in trials],
             **({"groups": groups} if groups is not None else {})}
    text = json.dumps(study, sort_keys=True)
    url = storage.join(root, "_slurm", f"study-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json")
    if not storage.exists(url):
        storage.write_text(url, json.dumps({**study, "worker_memory": estimates}, sort_keys=True)
                           if estimates else text)
    return url


def load_study(url: str) -> tuple[list[RunConfig], str, dict[str, int] | None, list[list[int]] | None]:
    """(trials, storage root, pinned worker-memory estimates or None, fused groups or None) from a
    pinned trial list."""
    try:
        study = json.loads(storage.read_text(url))
        return ([RunConfig.from_dict(t) for t in study["trials"]], study["storage"], study.get("worker_memory"),
                study.get("groups"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{url}: not a trial list written by launch/slurm_submit.py ({exc})") from None


def _need(program: str) -> None:
    if shutil.which(program) is None:
        raise MtlError(f"{program} is not on PATH: this machine is not a SLURM submit host")


def _log_dir(root: str) -> str:
    """SLURM writes logs to a local path only: the storage's slurm-logs/ when it is a folder,
    else ./slurm-logs."""
    return storage.join(root, "slurm-logs") if storage.is_local(root) else os.path.abspath("slurm-logs")


def _sbatch(batch: list[int], shape: tuple[int, int], root: str, placement: Placement, study: str,
            script: str | None, after: list[str] | None = None) -> str:
    cpus, gpus = shape
    logs = _log_dir(root)
    os.makedirs(logs, exist_ok=True)   # SLURM fails a job whose log folder is missing (exit 0:53)
    array = index_ranges(batch) + (f"%{placement.array_parallelism}" if placement.array_parallelism else "")
    cmd = ["sbatch", "--parsable", f"--array={array}", f"--job-name=mtl-{os.path.basename(root.rstrip('/'))}",
           f"--comment={_comment(study)}", f"--output={logs}/%x-%A_%a.out", f"--cpus-per-task={cpus}",
           f"--gres=gpu:{gpus}" if gpus else "--gres=none"]
    if after:      # the upstreams' tasks; cancelled at once when one of them fails, not pending for ever
        cmd += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    cmd += [f"--{name}={value}" for name, value in (("partition", placement.partition), ("time", placement.time),
                                                     ("account", placement.account)) if value]
    cmd += placement.sbatch_args + [script or str(SCRIPT), "--trials", study, "--storage", root,
                                    "--trials-per-task", str(placement.trials_per_task)]
    if placement.gpu_memory:
        cmd += ["--gpu-memory", placement.gpu_memory]
    env = dict(os.environ, MTL_ROOT=str(SCRIPT.parents[1]))     # where the scripts find slurm/env.sh
    if placement.setup:
        env["MTL_SETUP"] = "; ".join(placement.setup)
        env.pop("MTL_PYTHON", None)
    else:
        env["MTL_PYTHON"] = sys.executable     # the jobs use the Python this command runs in
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode or not done.stdout.strip():
        said = (done.stderr or done.stdout).strip().splitlines()
        raise MtlError(f"sbatch refused the array: {said[-1] if said else f'exit {done.returncode}, no output'}")
    return done.stdout.strip().split(";")[0]


def _comment(study: str) -> str:
    """Marks a job as running this trial list, so a rerun does not submit a task still queued."""
    return "mtl:" + study.removesuffix(".json").rsplit("study-", 1)[-1]


def _squeue(*args: str) -> str:
    done = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True)
    if done.returncode and "Invalid job id" not in done.stderr:
        raise MtlError(f"squeue failed: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def live_slots(study: str) -> dict[int, str]:
    """{array index: job id} of this trial list's tasks that are queued or running now."""
    live = {}
    for line in _squeue("--me", "-r", "-o", "%k|%K|%F|%T").splitlines():
        comment, task, job, state = (line.split("|") + ["", "", ""])[:4]
        if comment == _comment(study) and task.isdigit() and state not in ENDED:
            live[int(task)] = job
    return live


def task_states(jobs: dict[str, list[int]]) -> dict[tuple[str, int], str]:
    """The state of every (array job, index): squeue for tasks still queued or running, sacct
    for those that left the queue; a task in neither yet counts as PENDING."""
    ids = ",".join(jobs)
    queued = _squeue("-r", "-j", ids, "-o", "%F|%K|%T")
    accounted = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State"], capture_output=True,
                               text=True)
    if accounted.returncode:
        raise MtlError(f"sacct failed ({accounted.stderr.strip()}): following jobs needs SLURM accounting")
    states = {}
    for line in accounted.stdout.splitlines():
        job_id, _, state = line.partition("|")
        m = re.fullmatch(r"(\d+)_(\d+|\[[^\]]*\])", job_id)
        if m:
            for i in _indices(m.group(2)):
                states[(m.group(1), i)] = state.split()[0] if state else "PENDING"
    for line in queued.splitlines():
        job, task, state = (line.split("|") + ["", ""])[:3]
        if task.isdigit():
            states[(job, int(task))] = state
    return {(job, i): states.get((job, i), "PENDING") for job, slots in jobs.items() for i in slots}


def _indices(spec: str) -> list[int]:
    """'7' or '[0-3,5%2]' as indices."""
    spec = spec.strip("[]").split("%")[0]
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def follow(jobs: dict[str, list[int]], poll_s: float = 2.0) -> dict[tuple[str, int], str]:
    """Poll until every task has ended, printing a progress line whenever the counts change
    (and every minute); returns each task's final state.  Polls every ``poll_s`` at first and
    back off to every 10 s over the first few minutes (squeue and sacct load slurmctld/slurmdbd)."""
    started, last, shown_at = time.monotonic(), None, 0.0
    while True:
        states = task_states(jobs)
        counts = Counter(states.values())
        line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        now = time.monotonic()
        if line != last or now - shown_at > 60:
            print(f"[{now - started:6.0f} s] {len(states)} array tasks: {line}", flush=True)
            last, shown_at = line, now
        if all(s in ENDED for s in states.values()):
            return states
        time.sleep(min(10.0, poll_s + (now - started) / 30))


if __name__ == "__main__":
    raise SystemExit(task_main())
