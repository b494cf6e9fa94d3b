"""The commands a user types: the console scripts pyproject.toml installs into the environment's
bin folder (mtl-train, mtl-submit, mtl-report, mtl-evaluate) and the README's launch/ command
lines, each run as its own process, with its exit code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SCRIPTS = {"mtl-train": "mtl.train:main", "mtl-submit": "cluster.submit:main", "mtl-report": "cluster.report:main",
           "mtl-evaluate": "mtl.evaluate:main"}


def script(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.fail(f"{path} is missing: install the project into this environment again "
                    f"(bash .ci/setup.sh, or {sys.executable} -m pip install --no-deps -e .)")
    return str(path)


def run_all(commands: list[list[str]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run the commands side by side (each is mostly imports) and return their outcomes in order."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
             for c in commands]
    done = []
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def test_the_installed_console_scripts_are_the_declared_ones():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == SCRIPTS
    # The environment's own record of the install (not a build's mtl_cluster.egg-info in the checkout).
    (dist,) = metadata.distributions(name="mtl-cluster", path=[sysconfig.get_paths()["purelib"]])
    installed = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert installed == declared, "the environment's install is stale: run bash .ci/setup.sh"
    for name, target in declared.items():
        assert callable(metadata.EntryPoint(name, target, "console_scripts").load())


def test_every_console_script_answers_help():
    helps = run_all([[script(name), "--help"] for name in SCRIPTS])
    for name, done in zip(SCRIPTS, helps):
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
        assert done.stdout.startswith("usage: "), name
    train, submit, report, evaluate = (h.stdout for h in helps)
    assert "--combiner" in train and "--backend {ray,slurm,submitit}" in submit
    assert "storage" in report and "--split" in evaluate


def test_a_trial_then_its_predictions_a_dry_run_and_the_exit_codes(tiny_model_dir, tmp_path):
    trial = tmp_path / "trial"
    tiny = ["--model", tiny_model_dir, "--max-train-rows", "16", "--max-dev-rows", "8", "--max-length", "32",
            "--epochs", "1", "--batch-size", "4", "--progress", "off"]
    train = subprocess.run([script("mtl-train"), "--tasks", "sst,para", "--out", str(trial), *tiny],
                           capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads(train.stdout.strip().splitlines()[-1])
    results = json.loads((trial / "results.json").read_text())
    assert summary["out"] == str(trial) and results["status"] == "done"
    assert summary["best"] == results["best"]["metrics"]

    grid = tmp_path / "grid.yaml"
    grid.write_text("axes:\n  tasks: [sst, para]\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    evaluate, dry, report, bad = run_all([
        [script("mtl-evaluate"), str(trial), "--split", "dev", "--out", str(tmp_path / "pred")],
        [script("mtl-submit"), "--backend", "submitit", "--grid", str(grid), "--storage", str(tmp_path / "study"),
         "--dry-run", *tiny],
        [script("mtl-report"), str(empty)],
        [script("mtl-train"), "--tasks", "sst,nope", "--out", str(tmp_path / "bad")],
    ])
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    scored = json.loads(evaluate.stdout.strip().splitlines()[-1])
    assert scored["split"] == "dev" and scored["metrics"] == pytest.approx(results["best"]["metrics"])
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["para-dev-output.csv", "sst-dev-output.csv"]
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert dry.stdout.splitlines()[-1] == "2 trials"
    assert [line.split("\t")[0] for line in dry.stdout.splitlines()[:-1]] == [
        str(tmp_path / "study" / "sst-sum-s0"), str(tmp_path / "study" / "para-sum-s0")]
    assert not (tmp_path / "study").exists()                    # a dry run writes nothing
    # The functions' own exit codes come through (2: bad input, one line), not just 0 or 1.
    assert report.returncode == 2 and report.stderr.startswith(f"error: {empty}: ") and report.stderr.count("\n") == 1
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].startswith("error: data.tasks: unknown task 'nope'")
    assert not (tmp_path / "bad").exists()


def test_the_readmes_launcher_lines_size_the_reference_study(tmp_path):
    """README: `launch/ray_submit.py --grid pairings --seeds 0,1,2 --dry-run` (the 108-trial reference
    study), `launch/slurm_submit.py --grid G --seeds S --count` (the array size for sbatch), the same
    through `launch/submit.py`, and `launch/submitit_sweep.py --grid weighting` (5 trials)."""
    storage = ["--storage", str(tmp_path / "study")]
    ray, slurm, submit, packed, submitit = run_all([
        [sys.executable, "launch/ray_submit.py", "--grid", "pairings", "--seeds", "0,1,2", "--dry-run", *storage],
        [sys.executable, "launch/slurm_submit.py", "--grid", "pairings", "--seeds", "0,1,2", "--count", *storage],
        [sys.executable, "launch/submit.py", "--grid", "pairings", "--seeds", "0,1,2", "--count", *storage],
        [sys.executable, "launch/submit.py", "--backend", "slurm", "--grid", "pairings", "--seeds", "0,1,2", "--count",
         "--trials-per-task", "8", *storage],
        [sys.executable, "launch/submitit_sweep.py", "--grid", "weighting", "--dry-run", *storage],
    ])
    for done in (ray, slurm, submit, packed, submitit):
        assert done.returncode == 0, f"{done.args}: {done.stderr[-2000:]}"
    assert ray.stdout.splitlines()[-1] == "108 trials" and len(ray.stdout.splitlines()) == 109
    assert slurm.stdout == submit.stdout == "108\n" and packed.stdout == "14\n"
    assert submitit.stdout.splitlines()[-1] == "5 trials"
    assert not (tmp_path / "study").exists()


def test_torchrun_runs_one_trial_on_two_data_parallel_workers(tiny_model_dir, tmp_path):
    """README: `torchrun --nproc-per-node N -m mtl.train ...` runs DDP (gloo on CPU); the trial's
    --workers must say N (it is part of what the trial computes).  --standalone only lets torchrun
    pick a free port on this shared machine."""
    out = tmp_path / "ddp"
    done = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
                           "-m", "mtl.train", "--workers", "2", "--model", tiny_model_dir, "--tasks", "sst",
                           "--max-train-rows", "16", "--max-dev-rows", "8", "--max-length", "32", "--epochs", "1",
                           "--batch-size", "4", "--progress", "off", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "done" and results["world_size"] == 2
    assert {json.loads(line)["out"] for line in done.stdout.strip().splitlines()} == {str(out)}   # each rank's summary
