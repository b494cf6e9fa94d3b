"""The study's own command-line flags, shared by every launcher (cluster/submit.py) and by the
SLURM array task that expands the same grid in its job: the grid, seeds, storage, size control
and every ``python -m mtl.train`` flag."""
from __future__ import annotations

import argparse

from mtl.cli import add_config_flags, config_from_args
from mtl.config import RunConfig
from mtl.errors import ConfigError

from cluster.core.study import NAMED, SIZE_CONTROLS, absolute, expand, parse_seeds


def add_study_flags(p: argparse.ArgumentParser, grid_required: bool = True) -> None:
    """The study's own arguments: shared by every launcher and by the SLURM array task."""
    p.add_argument("--grid", required=grid_required,
                   help=f"a named grid ({', '.join(sorted(NAMED))}) or a YAML grid file")
    p.add_argument("--seeds", default=None, help="comma-separated seeds crossed with the grid (default: 0; a grid "
                                                  "with its own seed axis takes no --seeds)")
    p.add_argument("--storage", default="runs/sweep", help="folder or fsspec URL for every trial's run folder "
                                                           "and the results table (default: runs/sweep)")
    p.add_argument("--size-control", choices=SIZE_CONTROLS, default="study",
                   help="trials that undersample (--epoch-mode min_size) see per epoch as many examples of each "
                        "task as: the study's smallest training set ('study', default: every change against a "
                        "baseline compares equal amounts of data), their own smallest task with one baseline per "
                        "pairing size ('pairing'), or their own smallest task, baselines their whole set ('none')")
    add_config_flags(p)


def trials_from_args(args: argparse.Namespace) -> tuple[list[RunConfig], str]:
    """(trials, absolute storage root) from the study flags."""
    if not args.grid:
        raise ConfigError("--grid: a grid is needed (a named one or a YAML file)")
    root = absolute(args.storage)
    grid = args.grid if args.grid in NAMED else absolute(args.grid)
    return expand(grid, config_from_args(args), root, parse_seeds(args.seeds), args.size_control), root
