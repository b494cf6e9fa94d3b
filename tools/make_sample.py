"""Cut the small sample of real rows that ships in mtl/sample_data from full task files.

    python tools/make_sample.py --source ../shared/data --train 400 --dev 100

Rows are drawn at random (seeded) among the well-formed ones and written back in the same
tab-separated format, header included, so the sample reads exactly like the full data."""
from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from mtl.data import SAMPLE_DIR, _row_problem
from mtl.tasks import TASKS


def sample_file(src: Path, dst: Path, task, count: int, rng: random.Random) -> int:
    with open(src, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    header, body = rows[0], rows[1:]
    needed = (*task.text_columns, task.label_column)
    where = [header.index(c) for c in needed]
    good = [r for r in body if _row_problem(r, where, needed, task) is None]
    picked = sorted(rng.sample(range(len(good)), min(count, len(good))))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(good[i] for i in picked)
    return len(picked)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="folder with the full sst/quora/sts train and dev files")
    p.add_argument("--dest", default=str(SAMPLE_DIR))
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--dev", type=int, default=100)
    p.add_argument("--seed", type=int, default=224)
    a = p.parse_args()
    rng = random.Random(a.seed)
    for task in TASKS.values():
        for split, count in (("train", a.train), ("dev", a.dev)):
            n = sample_file(Path(a.source) / task.file(split), Path(a.dest) / task.file(split), task, count, rng)
            print(f"{task.file(split)}: {n} rows")


if __name__ == "__main__":
    main()
