"""Run a study grid as one Ray Tune sweep (local Ray by default, or any Ray cluster).

    python launch/ray_submit.py --grid pairings --seeds 0,1,2 --storage s3://bucket/study
    python launch/ray_submit.py --grid weighting --preset paper --workers 4 --gpus-per-worker 1 --address auto
    python launch/ray_submit.py --grid my_grid.yaml --dry-run
    python launch/ray_submit.py --grid smoke --preset smoke --storage runs/smoke-sweep   # minutes on a laptop CPU

Every run-configuration flag of ``python -m mtl.train`` applies to all trials of the grid.
Running the same command again skips finished trials and resumes unfinished ones.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.grids import NAMED, absolute, expand  # noqa: E402
from mtl.cli import add_config_flags, config_from_args  # noqa: E402
from mtl.errors import MtlError  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/ray_submit.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", required=True, help=f"a named grid ({', '.join(sorted(NAMED))}) or a YAML grid file")
    p.add_argument("--seeds", default="0", help="comma-separated seeds crossed with the grid (default: 0)")
    p.add_argument("--storage", default="runs/sweep", help="folder or fsspec URL for every trial's run folder "
                                                           "and the results table (default: runs/sweep)")
    p.add_argument("--address", default=None, help="Ray cluster: 'auto', 'ray://host:port' (default: start a "
                                                    "local Ray with this machine's CPUs and GPUs)")
    p.add_argument("--dry-run", action="store_true", help="print the trial list and exit")
    add_config_flags(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.storage = absolute(args.storage)
        base = config_from_args(args)
        trials = expand(args.grid, base, args.storage, seeds)
        from mtl.train import check_run

        for t in trials:
            check_run(t)
    except (ValueError, MtlError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for t in trials:
            p = t.parallel
            print(f"{t.out}\tworkers={p.workers} strategy={p.strategy}")
        print(f"{len(trials)} trials")
        return 0
    from cluster.ray_sweep import run_sweep

    try:
        rows = run_sweep(trials, args.storage, address=args.address)
    except MtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = sum(r["status"] == "done" for r in rows)
    print(f"{done}/{len(rows)} trials done; table: {args.storage}/results.csv")
    return 0 if done == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
