"""One submit command for a study grid, whatever runs it: Ray Tune, SLURM job arrays or submitit.

    python launch/submit.py --backend ray --grid pairings --seeds 0,1,2 --storage s3://bucket/study
    python launch/submit.py --backend slurm --grid pairings --seeds 0,1,2 --storage /shared/study --wait
    python launch/submit.py --backend submitit --cluster slurm --grid weighting --storage /shared/study
    python launch/submit.py --grid pairings --seeds 0,1,2 --count        # array tasks: --array=0-(N-1)

(``launch/ray_submit.py``, ``launch/slurm_submit.py`` and ``launch/submitit_sweep.py`` are the
same command with the backend fixed.)  The grid, trial names, done-ness and the results table
come from cluster.core.study; a backend only decides where each trial runs.  Every ``python -m
mtl.train`` flag applies to all trials; placement flags (CPUs, GPUs, partition, time...) never
change a trial's identity.  Running the same command again skips finished trials and resumes
unfinished ones from their checkpoints.
"""
from __future__ import annotations

import argparse
import logging
import sys

from mtl import storage
from mtl.config import RunConfig
from mtl.errors import MtlError

from cluster.backends.registry import BACKENDS, add_placement_flags, backend_flags
from cluster.core.ending import summary, write_study_report
from cluster.core.flags import add_study_flags, trials_from_args
from cluster.core.fusion import fused_slots, plan, task_slots
from cluster.core.placement import placement_from_args
from cluster.core.study import check_storage, trial_name
from cluster.core.tensorboard import write_tensorboard_experiment


def build_parser(backend: str | None) -> argparse.ArgumentParser:
    prog = BACKENDS[backend].prog if backend else "launch/submit.py"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=tuple(BACKENDS), default=backend or "ray",
                   help="where trials run (default: ray)" if backend is None else argparse.SUPPRESS)
    add_study_flags(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the trial list (with --fuse, each trial's fused group) and exit")
    p.add_argument("--count", action="store_true",
                   help="print the number of array tasks (trials / --trials-per-task, or fused groups with --fuse) "
                        "and exit")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write the study's report (<storage>/report/) when the sweep has been followed to its end")
    for flag in backend_flags(backend):
        flag.add_to(p)
    add_placement_flags(p, backend)
    return p


def parse(argv: list[str] | None, backend: str | None) -> argparse.Namespace:
    if backend is None:   # the backend decides which flags exist: read it first
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--backend", choices=tuple(BACKENDS), default="ray")
        backend = pre.parse_known_args(argv)[0].backend if not _asks_help(argv) else None
    return build_parser(backend).parse_args(argv)


def _asks_help(argv) -> bool:
    return any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv))


def print_trials(trials: list[RunConfig], groups: list[list[int]] | None = None) -> None:
    """--dry-run: each trial's folder, workers, strategy and pinned size, then the count.
    ``groups`` (--fuse): each trial's fused group (its array task on SLURM), counted at the end."""
    group_of = {i: g for g, members in enumerate(groups or []) for i in members}
    for i, t in enumerate(trials):
        p, d = t.parallel, t.data
        size = f" examples/task/epoch={d.examples_per_task}" if d.epoch_mode == "min_size" and d.examples_per_task \
            else ""
        after = f" after={trial_name(t.upstream)}" if t.upstream is not None else ""
        fused = f" group={group_of[i]}" if groups is not None else ""
        print(f"{t.out}\tworkers={p.workers} strategy={p.strategy}{size}{after}{fused}")
    upstream = {t.upstream.out for t in trials if t.upstream is not None}
    print(f"{len(trials)} trials" + (f" ({len(upstream)} upstream stages, each run once before the "
                                     f"{sum(t.upstream is not None for t in trials)} trials that start from them)"
                                     if upstream else "")
          + (f" in {len(groups)} fused groups ({sum(len(g) > 1 for g in groups)} of 2 or more)"
             if groups is not None else ""))


def main(argv: list[str] | None = None, backend: str | None = None) -> int:
    args = parse(argv, backend)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        trials, root = trials_from_args(args)
        check_storage(trials)
        placement = placement_from_args(args)
        placement.check_trials(trials)
        from mtl.checks import check_run   # torch (seconds): only once a study is checked, never for --help

        for t in trials:
            check_run(t)
    except MtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.count or args.dry_run:
        # Array tasks: packed within a wave of stages, or one fused group each (--fuse auto sized
        # by --gpu-memory alone: a submit host's GPUs say nothing about the partition's).  The
        # groups shown are the whole list's, as SLURM pins them; Ray and submitit group what is
        # left unfinished at launch.
        try:
            fuse = plan(trials, placement, BACKENDS[args.backend].gpu_default, detect=False)
        except MtlError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.count:
            print(len(task_slots(trials, placement.trials_per_task, fuse)))
        else:
            print_trials(trials, None if placement.fuse == 1 else fused_slots(trials, fuse))
        return 0
    try:
        storage.ensure_writable(root)
        write_tensorboard_experiment(trials, root)
        rows = BACKENDS[args.backend].run(trials, root, placement, args)
        if rows is not None and args.report:
            write_study_report(rows, root)
    except MtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if rows is None else summary(rows, root)


if __name__ == "__main__":
    raise SystemExit(main())
