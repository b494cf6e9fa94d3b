"""SLURM's own latencies for a study's array task, measured on a running cluster (the local one:
``bash slurm/local_cluster.sh start``): submit to start, and preemption to resumed training.

    .venv/bin/python benchmarks/bench_slurm.py                     # smoke preset, embedded MiniLM
    .venv/bin/python benchmarks/bench_slurm.py --model /path/to/encoder --epochs 20

One array task of slurm/sweep.sh trains one trial.  Events are timed by polling squeue and the
task's log every 0.1 s, so each figure is good to about 0.1 s:

- submit -> RUNNING (squeue), -> the array task's first line (Python started), -> first step;
- after its first checkpoint the task gets SIGUSR1 on the batch step (what ``--signal=B:USR1``
  sends): -> "requeued" in the log, -> PENDING; SLURM then holds a requeued job (BeginTime,
  ~120 s here), which the benchmark releases (``scontrol update StartTime=now``) 1.2 s after
  PENDING, as an operator or a short-hold cluster would: release -> RUNNING -> "resumed" log
  line -> first step after the resume.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:all-MiniLM-L6-v2")
    p.add_argument("--epochs", default="6")
    p.add_argument("--rows", default="96")
    a = p.parse_args(argv)
    store = Path(tempfile.mkdtemp(prefix="mtl-bench-slurm-"))
    grid = store / "grid.yaml"
    grid.write_text('axes:\n  tasks: ["sst,para"]\n')
    (store / "logs").mkdir()
    env = {**os.environ, "MTL_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    cmd = ["sbatch", "--parsable", "--array=0", "--gres=none", "--cpus-per-task=2", f"--output={store}/logs/t.out",
           str(ROOT / "slurm" / "sweep.sh"), "--grid", str(grid), "--storage", str(store), "--preset", "smoke",
           "--model", a.model, "--epochs", a.epochs, "--max-train-rows", a.rows, "--progress", "off",
           "--log-every-steps", "1"]
    log = store / "logs" / "t.out"
    t0 = time.time()
    job = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT).stdout.strip()
    task = f"{job}_0"
    ev = {"submitted": t0}
    watch(ev, task, log, {"running": state_is("RUNNING"), "python up": has(r"^array task 0"),
                          "first step": has(r"INFO mtl.train: step 1/")})
    pointer = store / "sst+para-sum-s0" / "checkpoints" / "latest.json"
    until(lambda: pointer.exists(), 600)
    ev["signalled"] = time.time()
    subprocess.run(["scancel", "--batch", "--signal=USR1", task], check=True)
    watch(ev, task, log, {"requeued (log)": has(r"^requeued job"), "pending": state_is("PENDING")})
    time.sleep(1.2)
    ev["released"] = time.time()
    subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)
    watch(ev, task, log, {"running again": state_is("RUNNING", after="restart 1"),
                          "resumed (log)": has(r"INFO mtl.train: resumed"),
                          "first step after resume": has(r"resumed[\s\S]*INFO mtl.train: step \d+/")})
    stop = re.search(r"SIGUSR1 at step (\d+)", log.read_text())
    print(f"job {task}, storage {store}; stopped at step {stop.group(1) if stop else '?'}")
    for start, ends in (("submitted", ["running", "python up", "first step"]),
                        ("signalled", ["requeued (log)", "pending"]),
                        ("released", ["running again", "resumed (log)", "first step after resume"])):
        for end in ends:
            print(f"{start:>10s} -> {end:<24s} {ev[end] - ev[start]:6.2f} s")
    subprocess.run(["scancel", task])
    return 0


def state_is(want: str, after: str | None = None):
    def check(task: str, text: str) -> bool:
        if after and after not in text:
            return False
        out = subprocess.run(["squeue", "-h", "-j", task, "-o", "%T"], capture_output=True, text=True).stdout
        return out.strip() == want
    return check


def has(pattern: str):
    return lambda task, text: re.search(pattern, text, re.M) is not None


def watch(ev: dict, task: str, log: Path, checks: dict, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while any(k not in ev for k in checks):
        text = log.read_text() if log.exists() else ""
        now = time.time()
        for name, check in checks.items():
            if name not in ev and check(task, text):
                ev[name] = now
        if now > deadline:
            raise SystemExit(f"error: timed out waiting for {[k for k in checks if k not in ev]}")
        time.sleep(0.1)


def until(predicate, timeout: float) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise SystemExit("error: timed out")
        time.sleep(0.1)


if __name__ == "__main__":
    raise SystemExit(main())
