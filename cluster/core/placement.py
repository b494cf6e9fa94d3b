"""Where a study's trials run: CPUs and GPUs per worker, retries, the SLURM partition, time
limit and account, environment setup.  None of it is part of a trial's identity: a trial
started on Ray and resumed under SLURM with other resources is the same trial, with the same
name, row and checkpoints.  (Workers, strategy and ZeRO stage change the numbers and belong
to the RunConfig.)

Fractional GPUs (``--gpus-per-worker 0.125``: eight workers per GPU) pack small trials onto one
GPU: Ray admits them through its fractional GPU resource, a SLURM array task runs its
``--trials-per-task`` trials side by side on the GPUs their summed demand rounds up to.  Ray
counts resources in fixed point (units of 0.0001, ``RESOURCE_UNITS`` per 1), so a fraction must be
a multiple of 0.0001: then Ray's admission, our concurrency bound and the memory check
(cluster/core/memory.py) agree exactly on how many workers share a GPU.  ``--gpu-memory`` gives that
check the GPU's capacity."""
from __future__ import annotations

import argparse
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field, fields

from mtl.config import RunConfig
from mtl.errors import ConfigError

from cluster.core.study import trial_name


@dataclass
class Placement:
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None       # None: the backend's default (its Backend.gpu_default)
    max_failures: int = 2                      # Ray: restarts of a trial's workers
    partition: str = ""
    time: str = ""                             # SLURM --time: minutes, or [D-]HH:MM[:SS]
    account: str = ""
    array_parallelism: int = 0                 # SLURM: array tasks at once (0: no limit)
    trials_per_task: int = 1                   # SLURM: trials one array task runs together
    gpu_memory: str = ""                       # one GPU's memory ("80G"); "": nvidia-smi where it runs; "off"
    fuse: int | str = 1                        # trials per fused group (cluster/core/fusion.py), or "auto"
    setup: list[str] = field(default_factory=list)        # shell lines run before a job's Python
    sbatch_args: list[str] = field(default_factory=list)  # anything else, passed to sbatch as is

    def __post_init__(self):
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"--cpus-per-worker: {self.cpus_per_worker:g} must be > 0")
        if self.gpus_per_worker is not None:
            check_gpu_fraction(self.gpus_per_worker)
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures: {self.max_failures} must be >= 0")
        if self.time and time_minutes(self.time) <= 0:
            raise ConfigError(f"--time: {self.time!r} is not a SLURM time limit (minutes or [D-]HH:MM[:SS])")
        if self.array_parallelism < 0:
            raise ConfigError(f"--array-parallelism: {self.array_parallelism} must be >= 0")
        if self.trials_per_task < 1:
            raise ConfigError(f"--trials-per-task: {self.trials_per_task} must be >= 1")
        if self.gpu_memory not in ("", "off"):
            parse_size(self.gpu_memory, "--gpu-memory")
        self.fuse = parse_fuse(self.fuse)
        if self.fuse != 1 and self.trials_per_task > 1:
            # Both put several trials into one array task; composed, a task would run several
            # fused processes side by side, which --fuse auto already sizes to fill the GPU alone.
            raise ConfigError(f"--fuse {self.fuse} with --trials-per-task {self.trials_per_task}: a fused group "
                              f"already runs its trials in one task; use one of the two")

    @property
    def gpu_memory_bytes(self) -> int | None:
        """The capacity --gpu-memory states (None: not given, or the check is off)."""
        return None if self.gpu_memory in ("", "off") else parse_size(self.gpu_memory, "--gpu-memory")

    @property
    def memory_check(self) -> bool:
        return self.gpu_memory != "off"

    # ``gpu_default`` below: GPUs per worker where --gpus-per-worker was not given, declared by
    # each backend once (its Backend.gpu_default) and passed by it; 0 (no GPUs unless asked) when
    # a caller passes none.
    def gpus(self, default: float) -> float:
        return default if self.gpus_per_worker is None else self.gpus_per_worker

    def demand(self, cfg: RunConfig, gpu_default: float = 0.0) -> tuple[float, float]:
        """(CPUs, GPUs) a trial's workers hold while it runs."""
        w = cfg.parallel.workers
        # Rounded to Ray's precision: 3 x 0.1 is 0.30000000000000004 in floats, which would
        # round a GPU count up one too many (or trip an exact comparison) downstream.
        return round(w * self.cpus_per_worker, 4), round(w * self.gpus(gpu_default), 4)

    def workers_per_gpu(self, gpu_default: float = 0.0) -> int:
        """How many workers share one GPU: 1/g for a fraction g (in Ray's fixed point, exact for
        the fractions check_gpu_fraction admits), 1 for whole GPUs, 0 without GPUs."""
        g = self.gpus(gpu_default)
        if g <= 0:
            return 0
        return RESOURCE_UNITS // units(g) if g < 1 else 1

    def check_trials(self, trials: list[RunConfig]) -> None:
        """Refuse a fractional GPU for a trial of several workers: its ranks could land on one GPU
        (Ray packs fractions; a SLURM task gets the summed demand rounded up), and NCCL refuses two
        ranks of one communicator on the same device.  Trials pinned to --device cpu never touch
        the GPU (and use gloo), so they may hold fractions of one, as the tests' fake GPUs do."""
        g = self.gpus_per_worker
        if g is None or not 0 < g < 1:
            return
        many = [t for t in trials if t.parallel.workers > 1 and t.device != "cpu"]
        if many:
            raise ConfigError(f"--gpus-per-worker {g:g}: trial {trial_name(many[0])} has {many[0].parallel.workers} "
                              f"workers, whose ranks could share one GPU (NCCL refuses that): give trials of several "
                              f"workers whole GPUs (--gpus-per-worker 1)")

    def slurm_resources(self, trials: list[RunConfig], gpu_default: float = 0.0) -> tuple[int, int]:
        """(CPUs per task, GPUs) for a SLURM job that runs ``trials`` side by side on one node:
        their demands summed, then rounded up (fractional GPUs pack)."""
        needs = [self.demand(t, gpu_default) for t in trials]
        return (max(1, math.ceil(round(sum(c for c, _ in needs), 4))),
                math.ceil(round(sum(g for _, g in needs), 4)))


FLAGS = tuple(f.name for f in fields(Placement))     # each field is one placement flag (see add_flags)
RESOURCE_UNITS = 10_000     # Ray's fixed point: resource quantities are whole multiples of 0.0001


def units(quantity: float) -> int:
    """A resource quantity in Ray's fixed-point units."""
    return round(quantity * RESOURCE_UNITS)


def check_gpu_fraction(g: float) -> None:
    """GPUs per worker that every backend packs exactly: a whole number, or a fraction below 1
    that is a multiple of 0.0001.  A finer fraction (1/3 typed as 0.333333) would be stored by
    Ray rounded, and whether the last of 1/g workers still fits would depend on that rounding."""
    if not math.isfinite(g) or g < 0:
        raise ConfigError(f"--gpus-per-worker: {g:g} must be >= 0")
    if g > 1 and not float(g).is_integer():
        raise ConfigError(f"--gpus-per-worker: {g:g}: more than one GPU per worker must be a whole number")
    if 0 < g < 1 and abs(g * RESOURCE_UNITS - round(g * RESOURCE_UNITS)) > 1e-6:
        fit = math.floor(g * RESOURCE_UNITS) / RESOURCE_UNITS
        hint = f"use {fit:g} ({RESOURCE_UNITS // units(fit)} workers per GPU)" if fit > 0 else "use at least 0.0001"
        raise ConfigError(f"--gpus-per-worker: {g:g} is finer than Ray's resource precision (0.0001): {hint}")


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def parse_fuse(value: int | str) -> int | str:
    """--fuse: a whole number of trials >= 1, or 'auto' (as many as the memory estimate fits on one GPU)."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if isinstance(value, bool) or not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise ConfigError(f"--fuse: {value!r} is not a number of trials (1 or more) or auto")
    return int(text)


def parse_size(text: str, flag: str = "size") -> int:
    """Bytes from '80G', '141GB', '143771MiB', '81920M' or a plain byte count.  Units are binary
    (K = 1024), as in SLURM's --mem and nvidia-smi's MiB: '80G' is 80 GiB."""
    m = _SIZE.fullmatch(str(text).strip())
    if not m:
        raise ConfigError(f"{flag}: {text!r} is not a memory size (e.g. 80G, 141GiB, 81920M)")
    number, unit = float(m.group(1)), m.group(2).upper()
    size = int(number * 1024 ** " KMGT".index(unit or " "))
    if size <= 0:
        raise ConfigError(f"{flag}: {text!r} must be more than 0 bytes")
    return size


def time_minutes(text: str) -> int:
    """SLURM's time formats in minutes: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        return -1
    days, a, b, c = m.groups()
    if days is not None:
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
        return int(days) * 1440 + hours * 60 + minutes + (seconds > 0)
    if c is not None:
        return int(a) * 60 + int(b) + (int(c) > 0)
    return int(a) + (b is not None and int(b) > 0)


def add_flags(parser: argparse.ArgumentParser, reads: Collection[str] = FLAGS) -> None:
    """The placement flags whose Placement field is in ``reads``: a backend's ``placement_flags``
    (cluster.core.backend), all of them by default."""
    g = parser.add_argument_group("placement (where trials run; never part of a trial's identity)")

    def flag(dest: str, *names: str, **kw) -> None:
        if dest in reads:
            g.add_argument(*names, dest=dest, **kw)

    flag("cpus_per_worker", "--cpus-per-worker", type=float, default=1.0, help="CPUs each worker reserves (default: 1)")
    flag("gpus_per_worker", "--gpus-per-worker", type=float, default=None,
         help="GPUs each worker reserves (default: 0 on Ray, 1 on SLURM and submitit's slurm cluster); a "
              "fraction packs workers onto one GPU (0.125: eight), a multiple of 0.0001 (Ray's precision). "
              "Trials of 2+ workers need whole GPUs (NCCL refuses two ranks on one GPU)")
    flag("max_failures", "--max-failures", type=int, default=2,
         help="Ray: restarts of a trial's workers after a failure, resuming from its checkpoint (default: 2)")
    flag("partition", "--partition", default="", help="SLURM partition (default: the cluster's)")
    flag("time", "--time", default="", help="SLURM time limit per job, minutes or [D-]HH:MM[:SS] "
                                            "(default: slurm/sweep.sh's 4 hours; submitit: 4 hours)")
    flag("account", "--account", default="", help="SLURM account to charge")
    flag("array_parallelism", "--array-parallelism", type=int, default=0,
         help="SLURM: array tasks running at once (0: no limit)")
    flag("trials_per_task", "--trials-per-task", type=int, default=1,
         help="SLURM: trials one array task runs side by side, their workers taking the task's GPUs in turn "
              "(default: 1); with --gpus-per-worker 0.25 and 4, one GPU runs four trials")
    flag("gpu_memory", "--gpu-memory", default="", metavar="SIZE",
         help="memory of one GPU, e.g. 80G or 141GiB (binary units, as SLURM's --mem): a packing of several "
              "workers on one GPU whose estimated peak (cluster/core/memory.py) exceeds it is refused. Default: "
              "what nvidia-smi reports where the trials run (a local Ray; a SLURM array task at its start), "
              "no check where unknown; 'off': never check")
    flag("fuse", "--fuse", default=1, metavar="K|auto",
         help="trials that share batches (same model, tasks, data, seed, sampler; differing only in loss weights, "
              "combiner, lr, weight decay...) train K at a time as one stacked model in one process "
              "(cluster/core/fusion.py; one worker each). On a GPU that is faster, on a CPU slower; auto = as many "
              "as fit one GPU by the memory estimate (no GPU: 1). Never part of a trial's identity (default: 1, "
              "no fusion)")
    flag("setup", "--setup", action="append", default=[], metavar="LINE",
         help="a shell line each job runs before Python, e.g. 'source ~/venvs/mtl/bin/activate' or "
              "'module load cuda; conda activate mtl' (repeatable; default: this Python)")
    flag("sbatch_args", "--sbatch-arg", action="append", default=[], metavar="ARG",
         help="one more sbatch option, e.g. --sbatch-arg=--mem=32G (repeatable)")


def placement_from_args(args: argparse.Namespace) -> Placement:
    """The placement the flags give; a flag the backend does not read keeps its default."""
    defaults = Placement()
    return Placement(**{name: getattr(args, name, getattr(defaults, name)) for name in FLAGS})
