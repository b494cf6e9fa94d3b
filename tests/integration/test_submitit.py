"""submitit's local and debug executors, end to end: `launch/submit.py --backend submitit
--cluster local|debug` (and `launch/submitit_sweep.py`) as a user runs them, on the tiny model.
Local jobs are real subprocesses of the launcher (submitit's controller, one task per worker);
debug jobs run inside the launcher's own process.  No SLURM is needed (test_slurm.py covers
`--cluster slurm`)."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def tiny(model: str, rows: int = 16, epochs: int = 1) -> list[str]:
    return ["--model", model, "--max-train-rows", str(rows), "--max-dev-rows", "8", "--max-length", "32",
            "--epochs", str(epochs), "--batch-size", "4", "--progress", "off"]


def launch(args: list[str], script: str = "submit.py", timeout: float = 240) -> subprocess.CompletedProcess:
    backend = ["--backend", "submitit"] if script == "submit.py" else []
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *backend, *args], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=timeout)


def grid(tmp_path: Path, text: str, name: str = "grid") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def table(store: Path) -> list[dict]:
    with open(store / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def job_folders(store: Path) -> set[str]:
    return {p.name for p in (store / "submitit").iterdir() if p.name != "%j"}


@pytest.mark.parametrize("cluster", ["local", "debug"])
def test_a_study_runs_to_its_table_and_a_rerun_submits_nothing(tiny_model_dir, tmp_path, cluster):
    store = tmp_path / "study"
    args = ["--cluster", cluster, "--grid", grid(tmp_path, "axes:\n  tasks: [sst, para]\n"), "--storage", str(store),
            "--no-report", *tiny(tiny_model_dir)]
    run = launch(args)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert f"2 trials: 0 finished, 2 to submit (submitit, {cluster} executor)" in out
    jobs = re.findall(r"submitted (\S+) as job (\S+)", out)
    assert [t for t, _ in jobs] == ["sst-sum-s0", "para-sum-s0"]
    assert re.search(r"^\[ +\d+ s\] 0/2 jobs ended, ", out, re.M)                # progress lines, to the end
    assert re.search(r"^\[ +\d+ s\] 2/2 jobs ended$", out, re.M)
    assert f"2/2 trials done; table: {store}/results.csv" in out

    rows = table(store)
    assert [(r["trial"], r["status"]) for r in rows] == [("sst-sum-s0", "done"), ("para-sum-s0", "done")]
    assert json.loads((store / "results.json").read_text())[0]["dev/sst/acc"] == float(rows[0]["dev/sst/acc"])
    for row, task, metric in ((rows[0], "sst", "sst/acc"), (rows[1], "para", "para/acc")):
        trial = store / row["trial"]
        res = json.loads((trial / "results.json").read_text())
        assert res["status"] == "done" and res["config"]["data"]["tasks"] == [task]
        assert float(row[f"dev/{metric}"]) == res["best"]["metrics"][metric]
        assert (trial / "best" / "encoder" / "config.json").exists() and (trial / "best" / "heads.safetensors").exists()
        assert not (trial / ".lease.json").exists()          # every trial let its run folder go
    assert not (store / ".lease.json").exists()              # and the launcher its study
    assert not (store / "report").exists()                   # --no-report
    # Each job's logs are in its own folder; debug jobs (this process) get the trial's log lines there too.
    assert job_folders(store) == {job for _, job in jobs}
    logs = store / "submitit" / jobs[0][1]
    trial_log = logs / f"{jobs[0][1]}_0_log.{'out' if cluster == 'debug' else 'err'}"   # logging: stderr, or here
    assert "epoch 1 step 4 dev sst/acc=" in trial_log.read_text()
    if cluster == "local":     # README: launch/report.py <storage> [--out elsewhere]
        report = subprocess.run([sys.executable, str(ROOT / "launch" / "report.py"), str(store), "--out",
                                 str(tmp_path / "report")], capture_output=True, text=True, env=ENV, cwd=ROOT,
                                timeout=120)
        assert report.returncode == 0 and report.stdout.strip() == f"report: {tmp_path}/report/report.md", report.stderr
        assert "sst-sum-s0" in (tmp_path / "report" / "report.md").read_text()

    stamps = {r["trial"]: (store / r["trial"] / "results.json").stat().st_mtime_ns for r in rows}
    rerun = launch(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"2 trials: 2 finished, 0 to submit (submitit, {cluster} executor)" in rerun.stdout
    assert "submitted" not in rerun.stdout and "2/2 trials done" in rerun.stdout
    assert job_folders(store) == {job for _, job in jobs}
    assert {r["trial"]: (store / r["trial"] / "results.json").stat().st_mtime_ns for r in rows} == stamps
    assert [r["status"] for r in table(store)] == ["done", "done"]


def test_a_diverged_trial_a_refused_one_and_a_killed_job_are_failed_rows_within_seconds(tiny_model_dir, tmp_path):
    """launch/submitit_sweep.py --cluster local, three trials: one diverges (--lr 1e6; its
    results.json says why), one finds its run folder held by another writer (its job raises: the
    error comes back through the job's result), and the third's process is killed from outside
    while it trains.  The launcher reports all three as failed, exit 1, seconds after the kill (not
    after submitit's wait for a result file that never comes)."""
    from mtl.lease import Lease

    store = tmp_path / "study"
    good, bad, held = (store / f"sst-sum-lr{lr}-s0" for lr in ("0.001", "1000000.0", "0.01"))
    axes = "axes:\n  tasks: [sst]\n  optim.lr: [0.001, 1000000.0, 0.01]\n"
    with Lease(str(held), "trial").acquire():      # this test's process holds that trial's folder
        proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "submitit_sweep.py"), "--cluster", "local",
                                 "--grid", grid(tmp_path, axes),
                                 "--storage", str(store), "--no-report", *tiny(tiny_model_dir, rows=200, epochs=200)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**ENV, "MTL_LEASE_TTL_S": "4"})     # the held trial gives up after 10 s
        try:
            deadline = time.monotonic() + 240
            # Until the good trial trains and the other two jobs have ended (each left its result:
            # an error), so that the time measured below is the killed job's alone.
            while not ((good / ".lease.json").exists() and len(list(store.glob("submitit/*/*_result.pkl"))) == 2):
                assert proc.poll() is None and time.monotonic() < deadline, "the trials did not start"
                time.sleep(0.2)
            pid = json.loads((good / ".lease.json").read_text())["pid"]     # the process training that trial
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
            took = time.monotonic() - killed
        finally:   # on a failure, end what this test started: the launcher, its jobs' controllers and trials
            if proc.poll() is None:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
                proc.wait()
    print(f"SIGKILL of a local job's trial -> launcher exit {took:.1f} s")
    assert took < 30
    assert proc.returncode == 1, err[-3000:]
    assert f"0/3 trials done, 3 failed ({good.name}, {bad.name}, {held.name})" in out
    job = re.search(rf"submitted {good.name} as job (\d+)", out).group(1)
    rows = {r["trial"]: r for r in table(store)}
    assert [rows[t.name]["status"] for t in (good, bad, held)] == ["failed"] * 3
    assert re.match(r"step \d+: .*training diverged", rows[bad.name]["error"])
    assert rows[good.name]["error"].startswith(f"local job {job} ended without a result (")
    assert rows[held.name]["error"].startswith(f"LeaseHeld: {held} is in use by trial of ")
    assert not (good / "results.json").exists() and not (held / "results.json").exists()   # a rerun runs them


def test_in_process_a_diverged_trial_is_a_failed_row_and_what_cannot_run_is_one_line(tiny_model_dir, tmp_path):
    from mtl.lease import Lease

    store = tmp_path / "study"
    diverging = ["--grid", grid(tmp_path, "axes:\n  optim.lr: [1000000.0]\n", "lr"), "--tasks", "sst", "--no-report",
                 *tiny(tiny_model_dir)]
    run = launch(["--cluster", "debug", "--storage", str(store), *diverging], script="submitit_sweep.py")
    assert run.returncode == 1, run.stderr[-3000:]
    assert "0/1 trials done, 1 failed (sst-sum-lr1000000.0-s0)" in run.stdout
    (row,) = table(store)
    assert row["status"] == "failed" and re.match(r"step \d+: .*training diverged", row["error"])
    assert not (store / ".lease.json").exists() and not (store / row["trial"] / ".lease.json").exists()

    # A study another launcher follows is refused (its lease), before anything is submitted.
    other = tmp_path / "other"
    with Lease(str(other), "sweep").acquire():
        held = launch(["--cluster", "debug", "--storage", str(other), *diverging])
    assert held.returncode == 2
    assert re.fullmatch(rf"error: {other} is in use by sweep of \S+ on \S+ pid {os.getpid()} since .+",
                        held.stderr.splitlines()[-1])
    assert not (other / "submitit").exists() and not (other / "sst-sum-lr1000000.0-s0").exists()
    # Two workers cannot run in this one process; debug jobs run only while the launcher waits.
    two = ["--grid", grid(tmp_path, "axes:\n  tasks: [sst]\nfixed:\n  parallel.workers: 2\n", "two"),
           "--no-report", *tiny(tiny_model_dir)]
    many = launch(["--cluster", "debug", "--storage", str(tmp_path / "many"), *two])
    assert many.returncode == 2
    assert many.stderr.splitlines()[-1] == ("error: trial sst-sum-s0 has 2 workers: the debug executor runs one "
                                            "process (use --cluster local or slurm)")
    nowait = launch(["--cluster", "debug", "--no-wait", "--storage", str(tmp_path / "nowait"), *diverging])
    assert nowait.returncode == 2 and nowait.stderr.splitlines()[-1].startswith(
        "error: --no-wait: the debug executor runs the trials in this process while it waits")
    assert not (tmp_path / "many" / "submitit").exists() and not (tmp_path / "nowait" / "submitit").exists()


def test_the_default_executor_is_slurm_where_sbatch_is_on_path_else_local(tmp_path, monkeypatch):
    from cluster.backends.submitit_sweep import which_cluster

    monkeypatch.setenv("PATH", str(tmp_path))
    assert which_cluster(None) == "local"
    sbatch = tmp_path / "sbatch"
    sbatch.write_text("#!/bin/sh\n")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
    assert which_cluster(None) == "slurm"
    assert which_cluster("debug") == "debug"


def test_the_local_executor_runs_an_upstream_before_its_dependents_wave_by_wave(tiny_model_dir, tmp_path,
                                                                                monkeypatch, capsys):
    from cluster.backends.submitit_sweep import run_submitit
    from cluster.core.placement import Placement
    from tests.helpers import assert_ran_after, broken_data, staged_study

    monkeypatch.setenv("OMP_NUM_THREADS", "1")         # local jobs inherit this process's environment
    bad = staged_study(tiny_model_dir, tmp_path / "bad", data_dir=str(broken_data(tmp_path)))
    rows = run_submitit(bad, str(tmp_path / "bad"), Placement(), cluster="local", poll_s=0.5)
    out = capsys.readouterr().out
    assert [r["status"] for r in rows] == ["failed"] * 4 and "quora-train.csv" in rows[0]["error"]
    assert all(r["error"] == f"upstream sst+para+sts-s0 failed: {rows[0]['error']}" for r in rows[1:])
    assert re.findall(r"submitted (\S+) as job", out) == ["sst+para+sts-s0"]       # the dependents never were

    root = tmp_path / "study"
    trials = staged_study(tiny_model_dir, root)
    rows = run_submitit(trials, str(root), Placement(), cluster="local", poll_s=0.5)
    out = capsys.readouterr().out
    assert [r["status"] for r in rows] == ["done"] * 4, out
    assert_ran_after(trials)
    # One job for the upstream, submitted before the three (once its job had ended).
    assert re.findall(r"submitted (\S+) as job", out) == [t.out.rsplit("/", 1)[-1] for t in trials]
    assert out.index("1/1 jobs ended") < out.index("submitted sst+para+sts-then-sst-sum-s0")
    stamp = (root / "sst+para+sts-s0" / "results.json").stat().st_mtime
    assert run_submitit(trials, str(root), Placement(), cluster="local") == rows
    assert "4 trials: 4 finished, 0 to submit" in capsys.readouterr().out
    assert (root / "sst+para+sts-s0" / "results.json").stat().st_mtime == stamp
