"""--fuse on every launcher, end to end: a small grid whose trials share batches (PAR+SIM by
addition, by scalarisation at alpha 0.8 and by uncertainty weighting, and a PCGrad trial that
cannot fuse) run
with `--fuse 3` gives the results table the same grid gives without it (same trials, statuses,
steps and best epochs; dev metrics within fp32 rounding), on a real local Ray, real SLURM arrays
(slurm/local_cluster.sh) and submitit's local executor.  The unfused table is made once, by
submitit's in-process executor (the cheapest), for all of them.  The tiny model, 16 rows, one
epoch.

Tolerances: every member's best weights (encoder and heads) within 1e-5 of its trial alone's (fp32
rounding: the stacked matmuls sum in another order; measured ~2e-7), every table metric within
1e-5, except the correlations: the tiny model's SIM predictions span ~4e-4 around 2.56, where one
fp32 step (2.4e-7) is ~1e-3 of the spread, so a weight difference of 1e-7 moves Pearson by ~1e-4
(measured 1.3e-4, with the weights 2e-7 apart): those, and the mean of the tasks, get 1e-3."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "MTL_PYTHON": sys.executable}
GRID = 'axes:\n  tasks: ["para,sts"]\n  combiner: [sum, scalarize, uncertainty, pcgrad]\n  alpha: [0.8]\n'
FUSED = ["para+sts-sum-s0", "para+sts-scalarize-a0.8-s0", "para+sts-uncertainty-s0"]     # one group
ALONE = ["para+sts-pcgrad-a0.8-s0"]                                                      # cannot fuse
TOL, CORRELATION_TOL = 1e-5, 1e-3


def flags(model: str, grid: Path, store: Path) -> list[str]:
    return ["--grid", str(grid), "--storage", str(store), "--no-report", "--model", model, "--max-train-rows", "16",
            "--max-dev-rows", "16", "--max-length", "32", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3",
            "--progress", "off"]


def launch(script: str, args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)


def rows(store: Path) -> list[dict]:
    return json.loads((store / "results.json").read_text())


# What a trial computed, never where or how fast: the table's columns fusion must not change.
SAME = ("trial", "status", "steps", "best_epoch", "world_size", "combiner", "alpha")


def assert_same_table(fused: list[dict], plain: list[dict]) -> None:
    assert [r["trial"] for r in fused] == [r["trial"] for r in plain] and sorted(r["trial"] for r in plain) == \
        sorted(FUSED + ALONE)
    for a, b in zip(fused, plain):
        assert a["status"] == b["status"] == "done", (a, b)
        assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}
        metrics = sorted(k for k in b if k.startswith(("dev/", "examples_per_epoch/")))
        assert metrics and sorted(k for k in a if k.startswith(("dev/", "examples_per_epoch/"))) == metrics
        off = {k: (a[k], b[k]) for k in metrics if not math.isclose(
            a[k], b[k], rel_tol=0, abs_tol=CORRELATION_TOL if k.endswith(("pearson", "spearman", "/mean")) else TOL)}
        assert not off, f"{a['trial']}: fused and alone differ beyond {TOL} ({CORRELATION_TOL} for correlations): {off}"


def assert_same_weights(store: Path, plain: Path) -> None:
    """Each trial's best weights, fused or alone: equal to fp32 rounding."""
    from safetensors.torch import load_file

    for name in FUSED + ALONE:
        for part in ("encoder/model.safetensors", "heads.safetensors"):
            a, b = load_file(str(store / name / "best" / part)), load_file(str(plain / name / "best" / part))
            assert a.keys() == b.keys()
            worst = max((a[k] - b[k]).abs().max().item() for k in a)
            assert worst < TOL, f"{name} {part}: fused and alone differ by {worst:g}"


@pytest.fixture(scope="module")
def study(tiny_model_dir, tmp_path_factory):
    """The grid and its table without --fuse (submitit, in one process)."""
    tmp = tmp_path_factory.mktemp("fuse")
    grid = tmp / "grid.yaml"
    grid.write_text(GRID)
    run = launch("submit.py", ["--backend", "submitit", "--cluster", "debug",
                               *flags(tiny_model_dir, grid, tmp / "plain")])
    assert run.returncode == 0, run.stderr[-3000:]
    plain = rows(tmp / "plain")
    assert sorted(r["trial"] for r in plain) == sorted(FUSED + ALONE)
    return grid, plain, tmp / "plain"


def test_fused_on_ray_gives_the_table_of_trials_run_alone(tiny_model_dir, tmp_path, study):
    grid, plain, plain_store = study
    store = tmp_path / "ray"
    run = launch("ray_submit.py", [*flags(tiny_model_dir, grid, store), "--fuse", "3"])
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert f"--fuse 3: 4 trials in 2 processes (fused: {', '.join(FUSED)}); 1 cannot fuse" in log
    assert_same_table(rows(store), plain)
    assert_same_weights(store, plain_store)
    # One Ray Train run for the group, in a folder of its own; the table and timings stay per trial.
    assert (store / "_ray" / "fused" / f"fused3-{FUSED[0]}").is_dir()
    assert all((store / "_ray" / "timings" / f"{name}.json").exists() for name in FUSED + ALONE)
    assert sorted(p.name for p in (store / "_ray" / "sweep").iterdir() if p.is_dir()) == sorted(
        [f"fused3-{FUSED[0]}", *ALONE])


@pytest.mark.slurm
def test_fused_on_slurm_gives_the_same_table_and_resubmits_find_the_same_groups(tiny_model_dir, tmp_path, study):
    up = subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh"), "status"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail("no SLURM cluster answers here: start one with `bash slurm/local_cluster.sh start` (root), "
                    "or deselect these tests with -m 'not slurm'")
    grid, plain, plain_store = study
    store = tmp_path / "slurm"
    args = [*flags(tiny_model_dir, grid, store), "--gpus-per-worker", "0", "--wait"]
    count = launch("slurm_submit.py", [*args, "--fuse", "3", "--count"])
    assert count.returncode == 0 and count.stdout.strip() == "2"
    run = launch("slurm_submit.py", [*args, "--fuse", "3"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 trials in 2 array tasks: 0 finished, 0 tasks queued or running, 2 to submit" in run.stdout
    job = re.search(r"submitted job (\d+): array 0-1 \(2 tasks, 1 CPUs and 0 GPUs each\)", run.stdout).group(1)
    assert_same_table(rows(store), plain)
    assert_same_weights(store, plain_store)
    task0 = (store / "slurm-logs" / f"mtl-slurm-{job}_0.out").read_text()
    assert f": {', '.join(FUSED)}\n" in task0 and "fused group of 3" in task0      # one task, one process
    (pinned,) = (store / "_slurm").glob("study-*.json")
    assert json.loads(pinned.read_text())["groups"] == [[0, 1, 2], [3]]
    # A resubmit finds the same pinned groups, all finished; without --fuse every trial is done too.
    again = launch("slurm_submit.py", [*args, "--fuse", "3"])
    assert "4 trials in 2 array tasks: 4 finished, 0 tasks queued or running, 0 to submit" in again.stdout
    unfused = launch("slurm_submit.py", args)
    assert "4 trials in 4 array tasks: 4 finished, 0 tasks queued or running, 0 to submit" in unfused.stdout
    assert unfused.returncode == 0 and len(list((store / "_slurm").glob("study-*.json"))) == 2


def test_fused_on_submitit_gives_the_same_table_and_an_unfused_rerun_runs_nothing(tiny_model_dir, tmp_path, study):
    grid, plain, plain_store = study
    store = tmp_path / "submitit"
    run = launch("submit.py", ["--backend", "submitit", "--cluster", "local", *flags(tiny_model_dir, grid, store),
                               "--fuse", "3"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(rf"submitted fused3-{re.escape(FUSED[0])} \({re.escape(', '.join(FUSED))}\) as job \d+",
                     run.stdout)
    assert re.findall(r"submitted (\S+) as job", run.stdout) == ALONE      # the one that cannot fuse: its own job
    assert "2/2 jobs ended" in run.stdout and "4/4 trials done" in run.stdout
    assert_same_table(rows(store), plain)
    assert_same_weights(store, plain_store)
    # Done-ness is per trial: a rerun without --fuse runs nothing and leaves every result as it was.
    stamps = {n: (store / n / "results.json").stat().st_mtime_ns for n in FUSED + ALONE}
    rerun = launch("submit.py", ["--backend", "submitit", "--cluster", "local", *flags(tiny_model_dir, grid, store)])
    assert rerun.returncode == 0 and "4 trials: 4 finished, 0 to submit" in rerun.stdout, rerun.stderr[-2000:]
    assert {n: (store / n / "results.json").stat().st_mtime_ns for n in FUSED + ALONE} == stamps
    assert_same_table(rows(store), plain)
