"""One submit command for a study grid, whatever runs it: Ray Tune, SLURM job arrays or submitit.

    python launch/submit.py --backend ray --grid pairings --seeds 0,1,2 --storage s3://bucket/study
    python launch/submit.py --backend slurm --grid pairings --seeds 0,1,2 --storage /shared/study --wait
    python launch/submit.py --backend submitit --cluster slurm --grid weighting --storage /shared/study
    python launch/submit.py --grid pairings --seeds 0,1,2 --count        # array tasks: --array=0-(N-1)

(``launch/ray_submit.py``, ``launch/slurm_submit.py`` and ``launch/submitit_sweep.py`` are the
same command with the backend fixed.)  The grid, trial names, done-ness and the results table
come from cluster.study; a backend only decides where each trial runs.  Every ``python -m
mtl.train`` flag applies to all trials; placement flags (CPUs, GPUs, partition, time...) never
change a trial's identity.  Running the same command again skips finished trials and resumes
unfinished ones from their checkpoints.
"""
from __future__ import annotations

import argparse
import logging
import sys

from mtl import storage
from mtl.cli import add_config_flags, config_from_args
from mtl.config import RunConfig
from mtl.errors import ConfigError, MtlError

from cluster.placement import Placement, add_placement_flags, placement_from_args
from cluster.study import (NAMED, SIZE_CONTROLS, absolute, check_storage, expand, parse_seeds, slot_count,
                           write_tensorboard_experiment)

BACKENDS = ("ray", "slurm", "submitit")
PROGS = {"ray": "launch/ray_submit.py", "slurm": "launch/slurm_submit.py", "submitit": "launch/submitit_sweep.py"}


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


def build_parser(backend: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROGS.get(backend, "launch/submit.py"), description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=BACKENDS, default=backend or "ray",
                   help="where trials run (default: ray)" if backend is None else argparse.SUPPRESS)
    add_study_flags(p)
    p.add_argument("--dry-run", action="store_true", help="print the trial list and exit")
    p.add_argument("--count", action="store_true",
                   help="print the number of array tasks (trials / --trials-per-task) and exit")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write the study's report (<storage>/report/) when the sweep has been followed to its end")
    if backend in (None, "ray"):
        p.add_argument("--address", default=None, help="Ray cluster: 'auto', 'host:port', 'ray://host:port' "
                                                        "(default: start a local Ray with this machine's CPUs and GPUs)")
        p.add_argument("--wait-for-nodes", type=int, default=0, metavar="N",
                       help="with --address: wait (up to 5 minutes) until N nodes have joined the cluster")
    if backend in (None, "slurm", "submitit"):
        p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                       help="follow the jobs until every trial ended, then write the results table "
                            "(default: slurm no, submitit yes)")
    if backend in (None, "slurm"):
        p.add_argument("--script", default=None, help="the sbatch script (default: slurm/sweep.sh of this project)")
    if backend in (None, "submitit"):
        p.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                       help="submitit executor: slurm, local (subprocesses) or debug (in this process) "
                            "(default: slurm where sbatch is on PATH, else local)")
    add_placement_flags(p, backend)
    return p


def parse(argv: list[str] | None, backend: str | None) -> argparse.Namespace:
    if backend is None:   # the backend decides which flags exist: read it first
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--backend", choices=BACKENDS, default="ray")
        backend = pre.parse_known_args(argv)[0].backend if not _asks_help(argv) else None
    return build_parser(backend).parse_args(argv)


def _asks_help(argv) -> bool:
    return any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv))


def run_backend(trials: list[RunConfig], root: str, placement: Placement,
                args: argparse.Namespace) -> list[dict] | None:
    """Rows of the results table, or None when jobs were submitted without waiting."""
    if args.backend == "ray":
        from cluster.ray_sweep import run_sweep

        return run_sweep(trials, root, placement, address=args.address, wait_for_nodes=args.wait_for_nodes)
    if args.backend == "slurm":
        from cluster.slurm_array import submit_array

        return submit_array(trials, root, placement, wait=bool(args.wait), script=args.script)
    from cluster.submitit_sweep import run_submitit

    return run_submitit(trials, root, placement, cluster=args.cluster, wait=args.wait is not False)


def main(argv: list[str] | None = None, backend: str | None = None) -> int:
    args = parse(argv, backend)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        trials, root = trials_from_args(args)
        check_storage(trials)
        placement = placement_from_args(args)
        placement.check_trials(trials)
        from mtl.checks import check_run

        for t in trials:
            check_run(t)
    except MtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.count:
        print(slot_count(len(trials), placement.trials_per_task))
        return 0
    if args.dry_run:
        for t in trials:
            p, d = t.parallel, t.data
            size = f" examples/task/epoch={d.examples_per_task}" if d.epoch_mode == "min_size" and d.examples_per_task \
                else ""
            print(f"{t.out}\tworkers={p.workers} strategy={p.strategy}{size}")
        print(f"{len(trials)} trials")
        return 0
    try:
        storage.ensure_writable(root)
        write_tensorboard_experiment(trials, root)
        rows = run_backend(trials, root, placement, args)
        if rows is not None and args.report and any(r["status"] == "done" for r in rows):
            from cluster.report import write_report

            print(f"report: {storage.join(write_report(root), 'report.md')}")
    except MtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rows is None:
        return 0
    done = sum(r["status"] == "done" for r in rows)
    failed = [r["trial"] for r in rows if r["status"] == "failed"]
    print(f"{done}/{len(rows)} trials done" + (f", {len(failed)} failed ({', '.join(failed)})" if failed else "")
          + f"; table: {root.rstrip('/')}/results.csv")
    return 0 if done == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
