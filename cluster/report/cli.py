"""The study's answer: which tasks to train together and how to combine their losses.

    python launch/report.py runs/sweep                 # writes runs/sweep/report/
    python launch/report.py s3://bucket/study --out /tmp/report

The command line of the report (launch/report.py, the mtl-report console script, python -m
cluster.report): exit 0 with the report's path, 2 with one line on stderr when the study cannot be
read."""
from __future__ import annotations

import argparse
import sys

from cluster.report.writing import write_report
from mtl import storage
from mtl.errors import MtlError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("storage", help="the sweep's storage folder or fsspec URL")
    p.add_argument("--out", default=None, help="report folder or URL (default: <storage>/report)")
    p.add_argument("--per-task-best", action="store_true",
                   help="score each task at its own best evaluation (results' best_by_task) rather than at the "
                        "trial's best epoch (chosen by --select-metric for all tasks at once); no bootstrap then")
    args = p.parse_args(argv)
    try:
        out = write_report(args.storage.rstrip("/"), args.out, per_task_best=args.per_task_best)
    except MtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {storage.join(out, 'report.md')}")
    return 0
