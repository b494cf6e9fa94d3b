"""What a backend is to the core: the one interface through which the submit command
(cluster/submit.py) runs a study on Ray, SLURM job arrays or submitit.

A backend declares who it is (``name``, its own command ``prog``), what it reads from the command
line (the placement flags of cluster.core.placement it honours, and flags of its own), how many
GPUs a worker gets when ``--gpus-per-worker`` is not given, and ``run``: run or submit the
trials that have not ended.  Everything else is the core's: the grid and its trials
(cluster.core.study), their checks, the TensorBoard experiment, and the ending
(cluster.core.ending: what is left to run, the results table, the report, the summary line).
The backends are listed by name in cluster/backends/registry.py.  A backend module imports its
heavy dependency (ray, submitit) only inside ``run``'s path: the registry imports every
backend for ``--help``."""
from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from mtl.config import RunConfig

from cluster.core.placement import Placement


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a backend: argparse's names and keywords.  Two backends may
    declare the same Flag; the generic command (every backend's flags) adds it once."""
    names: tuple[str, ...]
    options: dict = field(default_factory=dict)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(*self.names, **self.options)


# Backends that submit jobs and may return before they end (SLURM arrays, submitit) share --wait.
WAIT = Flag(("--wait",), dict(action=argparse.BooleanOptionalAction, default=None,
                              help="follow the jobs until every trial ended, then write the results table "
                                   "(default: slurm no, submitit yes)"))


class Backend(ABC):
    """Where a study's trials run.  Subclasses set the class attributes and implement ``run``."""

    name: str                          # --backend NAME
    prog: str                          # the command with this backend fixed (launch/<...>.py)
    gpu_default: float                 # GPUs per worker where --gpus-per-worker is not given
    placement_flags: frozenset[str]    # the Placement fields (placement flags) it reads
    flags: tuple[Flag, ...] = ()       # its own flags, in --help's order

    @abstractmethod
    def run(self, trials: list[RunConfig], root: str, placement: Placement,
            args: argparse.Namespace) -> list[dict] | None:
        """Run, or submit, the trials that have not ended (``cluster.core.ending.unfinished``).
        Followed to their end: the rows of the results table, written at ``root`` with
        ``cluster.core.ending.record``.  Submitted without waiting: None (the table written as
        it stands)."""
