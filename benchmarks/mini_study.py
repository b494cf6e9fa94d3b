"""The reference study in miniature, on real data: the pairings grid (36 trials per seed) through
the Ray launcher, as a user runs it, under a protocol scaled to fit a CPU, then its report.

    .venv/bin/python benchmarks/mini_study.py --data-dir ../shared/data                  # 3 seeds
    .venv/bin/python benchmarks/mini_study.py --data-dir ../shared/data --seeds 0 --examples 200   # a look

The scaled protocol (every flag is the launcher's; override any with ``--set --flag value``):
the embedded MiniLM, one epoch of ``--examples`` examples of each task per trial (the study's
size control pins the same number for every trial, baselines included, drawn afresh from each
task's whole training file), batch 8 (63 steps a pair trial), lr 1e-4, dropout 0.1, gradient
conflict probed every 10 steps, fp32 (bf16 is emulated on CPUs
without AVX512-BF16/AMX: 80x slower matmuls measured on this machine kind), at most
``--dev-rows`` dev rows per task, malformed rows skipped and counted (the Quora file has two).
The reference protocol differs (BERT-base, 10 epochs, lr 1e-5, dropout 0.5, whole files): this
measures whether the study's machinery finds its effects in small, not their sizes.

Prints the wall time, each seed's single-task scores and the report's answers; the report is
``<storage>/report/report.md``.  Not part of CI: 2 h 44 min on 2 cores for 3 seeds (measured;
``--examples 300`` or two seeds for ~90 minutes).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def protocol(a) -> list[str]:
    return ["--grid", "pairings", "--seeds", a.seeds, "--storage", a.storage, "--data-dir", a.data_dir,
            "--on-bad-row", "skip", "--examples-per-task", str(a.examples), "--epochs", "1", "--batch-size", "8",
            "--lr", "1e-4", "--dropout", "0.1", "--precision", "fp32", "--max-dev-rows", str(a.dev_rows),
            "--conflict-every", "10", "--log-every-steps", "10", "--progress", "off", *a.set]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with sst-, quora-, sts-{train,dev}.csv (full data)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--examples", type=int, default=500, help="examples of each task per trial (one epoch)")
    p.add_argument("--dev-rows", type=int, default=1000, help="dev rows per task (0: all)")
    p.add_argument("--storage", default=str(ROOT / "runs" / "mini-study"))
    p.add_argument("--backend", default="ray", choices=("ray", "slurm", "submitit"))
    p.add_argument("--set", nargs=argparse.REMAINDER, default=[], help="further launcher flags, as given")
    a = p.parse_args(argv)
    a.data_dir = os.path.abspath(a.data_dir)
    cmd = [sys.executable, str(ROOT / "launch" / "submit.py"), "--backend", a.backend, *protocol(a)]
    if a.backend == "slurm":
        cmd.append("--wait")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    print("running:", " ".join(cmd), flush=True)
    started = time.time()
    code = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    wall = time.time() - started
    rows = list(csv.DictReader(io.StringIO(Path(a.storage, "results.csv").read_text())))
    done = [r for r in rows if r["status"] == "done"]
    print(f"\nwall time {wall / 60:.1f} min for {len(rows)} trials ({len(done)} done; launcher exit {code})")
    print("single-task baselines (dev: SEN acc, PAR acc, SIM Pearson):")
    for r in done:
        if "+" not in r["trial"]:
            task = r["trial"].split("-")[0]
            metric = {"sst": "dev/sst/acc", "para": "dev/para/acc", "sts": "dev/sts/pearson"}[task]
            print(f"  {r['trial']:24s} {float(r[metric]):.4f}")
    report = Path(a.storage, "report", "report.md")
    if report.exists():
        text = report.read_text()
        answers = text.split("## Answers", 1)[-1].split("\n## ", 1)[0].strip()
        print(f"\nreport: {report}\n{answers}")
    Path(a.storage, "mini-study.json").write_text(json.dumps(
        {"wall_time_s": wall, "command": cmd, "trials": len(rows), "done": len(done), "exit": code}, indent=2))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
