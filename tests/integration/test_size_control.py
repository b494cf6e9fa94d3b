"""Size control through the launcher, as a user runs a study on tasks of unequal sizes (PAR 400
training rows, SEN 150, SIM 80): under undersampling every trial sees, per epoch, as many
examples of each task as the study's smallest task has, so PAR's baseline and PAR inside both
pairings see the same 80 examples per epoch, and the report says so."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "mtl" / "sample_data"


def unequal_data(folder: Path) -> Path:
    folder.mkdir()
    for prefix, rows in (("quora", 400), ("sst", 150), ("sts", 80)):
        lines = (SAMPLE / f"{prefix}-train.csv").read_text().splitlines(keepends=True)
        (folder / f"{prefix}-train.csv").write_text("".join(lines[:1 + rows]))
        (folder / f"{prefix}-dev.csv").write_text((SAMPLE / f"{prefix}-dev.csv").read_text())
    return folder


def launch(tiny_model_dir, tmp_path, *extra) -> subprocess.CompletedProcess:
    grid = tmp_path / "grid.yaml"
    grid.write_text("axes:\n  tasks: [para, 'sst,para', 'para,sts']\n")
    cmd = [sys.executable, str(ROOT / "launch" / "submit.py"), "--backend", "submitit", "--cluster", "debug",
           "--grid", str(grid), "--data-dir", str(tmp_path / "data"), "--model", tiny_model_dir,
           "--max-length", "32", "--batch-size", "8", "--epochs", "1", "--max-dev-rows", "16", "--lr", "1e-3",
           "--progress", "off", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_every_trial_sees_the_studys_smallest_task_and_the_report_says_so(tiny_model_dir, tmp_path):
    unequal_data(tmp_path / "data")
    store = tmp_path / "study"
    done = launch(tiny_model_dir, tmp_path, "--storage", str(store))
    assert done.returncode == 0, done.stderr[-2000:]
    seen = {name: json.loads((store / name / "results.json").read_text())["examples_per_epoch"]
            for name in ("para-sum-s0", "sst+para-sum-s0", "para+sts-sum-s0")}
    assert seen == {"para-sum-s0": {"para": 80}, "sst+para-sum-s0": {"sst": 80, "para": 80},
                    "para+sts-sum-s0": {"para": 80, "sts": 80}}
    report = (store / "report" / "report.md").read_text()
    assert "every trial saw 80 examples of each task per epoch" in report
    table = (store / "results.csv").read_text().splitlines()
    assert "examples_per_epoch/para" in table[0]


def test_without_size_control_the_baseline_sees_its_whole_file_and_pairing_control_adds_baselines(
        tiny_model_dir, tmp_path):
    unequal_data(tmp_path / "data")
    # What the issue measured: uncontrolled, PAR saw 400, 150 and 80 examples in its three trials.
    done = launch(tiny_model_dir, tmp_path, "--storage", str(tmp_path / "none"), "--size-control", "none")
    assert done.returncode == 0, done.stderr[-2000:]
    seen = [json.loads((tmp_path / "none" / n / "results.json").read_text())["examples_per_epoch"]["para"]
            for n in ("para-sum-s0", "sst+para-sum-s0", "para+sts-sum-s0")]
    assert seen == [400, 150, 80]
    assert "Not size-controlled" in (tmp_path / "none" / "report" / "report.md").read_text()
    # Per pairing: one PAR baseline per size PAR sees in a pairing.
    dry = launch(tiny_model_dir, tmp_path, "--storage", str(tmp_path / "pairing"), "--size-control", "pairing",
                 "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    lines = [line.split("\t")[0].rsplit("/", 1)[-1] + " " + line.rsplit("=", 1)[-1]
             for line in dry.stdout.splitlines() if "\t" in line]
    assert sorted(lines) == ["para+sts-sum-s0 80", "para-sum-n150-s0 150", "para-sum-n80-s0 80",
                             "sst+para-sum-s0 150"]
