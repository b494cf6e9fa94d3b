"""Where a study's trials run: CPUs and GPUs per worker, retries, the SLURM partition, time
limit and account, environment setup.  None of it is part of a trial's identity: a trial
started on Ray and resumed under SLURM with other resources is the same trial, with the same
name, row and checkpoints.  (Workers, strategy and ZeRO stage change the numbers and belong
to the RunConfig.)"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field

from mtl.config import RunConfig
from mtl.errors import ConfigError


@dataclass
class Placement:
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None       # None: the launcher's default (GPU_DEFAULTS)
    max_failures: int = 2                      # Ray: restarts of a trial's workers
    partition: str = ""
    time: str = ""                             # SLURM --time: minutes, or [D-]HH:MM[:SS]
    account: str = ""
    array_parallelism: int = 0                 # SLURM: array tasks at once (0: no limit)
    trials_per_task: int = 1                   # SLURM: trials one array task runs together
    setup: list[str] = field(default_factory=list)        # shell lines run before a job's Python
    sbatch_args: list[str] = field(default_factory=list)  # anything else, passed to sbatch as is

    def __post_init__(self):
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"--cpus-per-worker: {self.cpus_per_worker:g} must be > 0")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker: {self.gpus_per_worker:g} must be >= 0")
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures: {self.max_failures} must be >= 0")
        if self.time and time_minutes(self.time) <= 0:
            raise ConfigError(f"--time: {self.time!r} is not a SLURM time limit (minutes or [D-]HH:MM[:SS])")
        if self.array_parallelism < 0:
            raise ConfigError(f"--array-parallelism: {self.array_parallelism} must be >= 0")
        if self.trials_per_task < 1:
            raise ConfigError(f"--trials-per-task: {self.trials_per_task} must be >= 1")

    def gpus(self, default: float) -> float:
        return default if self.gpus_per_worker is None else self.gpus_per_worker

    def demand(self, cfg: RunConfig, gpu_default: float = 0.0) -> tuple[float, float]:
        """(CPUs, GPUs) a trial's workers hold while it runs."""
        w = cfg.parallel.workers
        return w * self.cpus_per_worker, w * self.gpus(gpu_default)

    def slurm_resources(self, trials: list[RunConfig]) -> tuple[int, int]:
        """(CPUs per task, GPUs) for a SLURM job that runs ``trials`` side by side on one node:
        their demands summed, then rounded up (fractional GPUs pack).  GPUs default to one per
        worker (SLURM clusters are GPU clusters)."""
        needs = [self.demand(t, gpu_default=1.0) for t in trials]
        return max(1, math.ceil(sum(c for c, _ in needs))), math.ceil(sum(g for _, g in needs))


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


# Which launchers read each placement flag (None: the generic submit command, which lists all).
_FLAGS_FOR = {
    "cpus_per_worker": ("ray", "slurm", "submitit"), "gpus_per_worker": ("ray", "slurm", "submitit"),
    "max_failures": ("ray",), "partition": ("slurm", "submitit"), "time": ("slurm", "submitit"),
    "account": ("slurm", "submitit"), "array_parallelism": ("slurm", "submitit"), "trials_per_task": ("slurm",),
    "setup": ("slurm", "submitit"), "sbatch_args": ("slurm",),
}


def add_placement_flags(parser: argparse.ArgumentParser, backend: str | None = None) -> None:
    """The placement flags that ``backend`` reads (all of them for None)."""
    g = parser.add_argument_group("placement (where trials run; never part of a trial's identity)")

    def flag(dest: str, *names: str, **kw) -> None:
        if backend is None or backend in _FLAGS_FOR[dest]:
            g.add_argument(*names, dest=dest, **kw)

    flag("cpus_per_worker", "--cpus-per-worker", type=float, default=1.0, help="CPUs each worker reserves (default: 1)")
    flag("gpus_per_worker", "--gpus-per-worker", type=float, default=None,
         help="GPUs each worker reserves (default: 0 on Ray, 1 on SLURM and submitit's slurm cluster)")
    flag("max_failures", "--max-failures", type=int, default=2,
         help="Ray: restarts of a trial's workers after a failure, resuming from its checkpoint (default: 2)")
    flag("partition", "--partition", default="", help="SLURM partition (default: the cluster's)")
    flag("time", "--time", default="", help="SLURM time limit per job, minutes or [D-]HH:MM[:SS] "
                                            "(default: slurm/sweep.sh's 4 hours; submitit: 4 hours)")
    flag("account", "--account", default="", help="SLURM account to charge")
    flag("array_parallelism", "--array-parallelism", type=int, default=0,
         help="SLURM: array tasks running at once (0: no limit)")
    flag("trials_per_task", "--trials-per-task", type=int, default=1,
         help="SLURM: trials one array task runs side by side (default: 1)")
    flag("setup", "--setup", action="append", default=[], metavar="LINE",
         help="a shell line each job runs before Python, e.g. 'source ~/venvs/mtl/bin/activate' or "
              "'module load cuda; conda activate mtl' (repeatable; default: this Python)")
    flag("sbatch_args", "--sbatch-arg", action="append", default=[], metavar="ARG",
         help="one more sbatch option, e.g. --sbatch-arg=--mem=32G (repeatable)")


def placement_from_args(args: argparse.Namespace) -> Placement:
    defaults = Placement()
    return Placement(**{name: getattr(args, name, getattr(defaults, name)) for name in _FLAGS_FOR})
