"""The SLURM paths on a real one-node SLURM cluster with accounting (slurm/local_cluster.sh):
slurm/sweep.sh arrays by hand and through launch/slurm_submit.py, preemption and requeue,
submitit, Ray inside an allocation, cancelled jobs, and bad input.  The node offers 2 CPUs and 2
"gpu" slots with no CUDA behind them; trials train the tiny model on CPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import assert_ran_after, broken_data, staged_study

pytestmark = [pytest.mark.integration, pytest.mark.slurm]
ROOT = Path(__file__).resolve().parents[2]
TRIAL = ["--max-length", "32", "--max-dev-rows", "8", "--batch-size", "4", "--progress", "off"]


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    up = subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh"), "status"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail("no SLURM cluster answers here: start one with `bash slurm/local_cluster.sh start` (root), "
                    "or deselect these tests with -m 'not slurm'")


@pytest.fixture
def env():
    """The environment jobs inherit (sbatch exports it): this Python, one thread per trial so that
    runs compare bit for bit."""
    return {**os.environ, "MTL_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny(model: str, rows: int = 16, epochs: int = 1) -> list[str]:
    return ["--model", model, "--max-train-rows", str(rows), "--epochs", str(epochs), *TRIAL]


def sbatch(args: list[str], env: dict) -> str:
    done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def states(job: str) -> dict[int, str]:
    from cluster.backends.slurm_array import task_states

    out = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%K"], capture_output=True, text=True).stdout
    acct = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "JobID"], capture_output=True, text=True).stdout
    idx = {int(x) for x in re.findall(r"_(\d+)\b", acct)} | {int(x) for x in out.split() if x.isdigit()}
    return {i: s for (_, i), s in task_states({job: sorted(idx) or [0]}).items()}


def wait_for(predicate, timeout: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_ended(job: str, timeout: float = 240) -> dict[int, str]:
    from cluster.backends.slurm_array import ENDED

    return wait_for(lambda: (s := states(job)) and all(v in ENDED for v in s.values()) and s, timeout,
                    f"job {job} to end")


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def helper(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "slurm_submit.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


# --------------------------------------------------------------------------------------------
def test_sweep_script_by_hand_then_the_helper_finds_every_trial_done(tiny_model_dir, tmp_path, env):
    """`sbatch slurm/sweep.sh` as its header says, on the 6-trial smoke grid (one trial of 2 DDP
    workers): every task COMPLETED, one row per trial; the helper then submits nothing."""
    store, logs = tmp_path / "study", tmp_path / "logs"
    logs.mkdir()
    count = helper(["--grid", "smoke", "--storage", str(store), "--count", *tiny(tiny_model_dir)], env)
    assert count.returncode == 0 and count.stdout.strip() == "6"
    started = time.monotonic()
    job = sbatch(["--array=0-5", "--gres=none", "--cpus-per-task=1", f"--output={logs}/%x-%A_%a.out",
                  "slurm/sweep.sh", "--grid", "smoke", "--storage", str(store), *tiny(tiny_model_dir)], env)
    final = wait_ended(job)
    print(f"6-task array, submit to all COMPLETED: {time.monotonic() - started:.1f} s")
    assert final == {i: "COMPLETED" for i in range(6)}
    assert results(store / "para+sts-pcgrad-batch_size8-s0")["world_size"] == 2

    again = helper(["--grid", "smoke", "--storage", str(store), "--gpus-per-worker", "0", "--wait",
                    *tiny(tiny_model_dir)], env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "6 trials in 6 array tasks: 6 finished, 0 tasks queued or running, 0 to submit" in again.stdout
    rows = json.loads((store / "results.json").read_text())
    assert [(r["trial"], r["status"]) for r in rows] == [
        (n, "done") for n in ("sst-sum-s0", "para-sum-s0", "sts-sum-s0", "para+sts-sum-s0", "sst+para-sum-s0",
                              "para+sts-pcgrad-batch_size8-s0")]
    assert (store / "report" / "report.md").exists()      # a followed sweep ends with its report
    # Finished trials are never run again, even when their array task runs again.
    stamp = (store / "sst-sum-s0" / "results.json").stat().st_mtime
    rerun = sbatch(["--array=0", "--gres=none", "--cpus-per-task=1", f"--output={logs}/rerun-%A_%a.out",
                    "slurm/sweep.sh", "--grid", "smoke", "--storage", str(store), *tiny(tiny_model_dir)], env)
    assert wait_ended(rerun) == {0: "COMPLETED"}
    assert (store / "sst-sum-s0" / "results.json").stat().st_mtime == stamp
    assert "trial sst-sum-s0 is finished: nothing to do" in next(logs.glob("rerun-*")).read_text()


def test_the_helper_submits_what_is_missing_and_follows_it(tiny_model_dir, tmp_path, env):
    store = tmp_path / "study"
    grid = tmp_path / "grid.yaml"
    grid.write_text('axes:\n  tasks: [sst, "sst,para", para]\n')
    args = ["--grid", str(grid), "--storage", str(store), "--gpus-per-worker", "0", "--wait", *tiny(tiny_model_dir)]
    first = helper(args, env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "3 trials in 3 array tasks: 0 finished, 0 tasks queued or running, 3 to submit" in first.stdout
    assert re.search(r"array tasks: 3 COMPLETED", first.stdout) and "3/3 trials done" in first.stdout
    job = re.search(r"submitted job (\d+)", first.stdout).group(1)
    assert wait_ended(job) == {0: "COMPLETED", 1: "COMPLETED", 2: "COMPLETED"}
    assert sorted(p.name for p in (store / "slurm-logs").iterdir()) == [f"mtl-study-{job}_{i}.out" for i in range(3)]
    # One trial lost: a rerun submits exactly that one, as array index 1.
    (store / "sst+para-sum-s0" / "results.json").unlink()
    second = helper(args, env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "2 finished, 0 tasks queued or running, 1 to submit" in second.stdout
    assert re.search(r"submitted job \d+: array 1 \(1 tasks", second.stdout)
    assert [r["status"] for r in json.loads((store / "results.json").read_text())] == ["done"] * 3


def test_a_diverged_trial_fails_alone_and_the_table_says_why(tiny_model_dir, tmp_path, env):
    store = tmp_path / "study"
    grid = tmp_path / "grid.yaml"
    grid.write_text("axes:\n  tasks: [sst]\n  optim.lr: [0.001, 1000000.0]\n")
    run = helper(["--grid", str(grid), "--storage", str(store), "--gpus-per-worker", "0", "--wait",
                  *tiny(tiny_model_dir, rows=32, epochs=2)], env)
    assert run.returncode == 1 and "1/2 trials done, 1 failed (sst-sum-lr1000000.0-s0)" in run.stdout
    rows = {r["trial"]: r for r in json.loads((store / "results.json").read_text())}
    assert rows["sst-sum-lr0.001-s0"]["status"] == "done"
    assert rows["sst-sum-lr1000000.0-s0"]["status"] == "failed"
    assert rows["sst-sum-lr1000000.0-s0"]["error"].startswith("step 2: the loss of task sst is nan")
    # A rerun leaves the failed trial alone (it would diverge again) and submits nothing.
    again = helper(["--grid", str(grid), "--storage", str(store), "--gpus-per-worker", "0",
                    *tiny(tiny_model_dir, rows=32, epochs=2)], env)
    assert "2 finished, 0 tasks queued or running, 0 to submit" in again.stdout


def test_an_array_task_can_run_several_trials_side_by_side(tiny_model_dir, tmp_path, env):
    store = tmp_path / "study"
    grid = tmp_path / "grid.yaml"
    grid.write_text('axes:\n  tasks: [sst, "sst,para", para]\n')
    run = helper(["--grid", str(grid), "--storage", str(store), "--gpus-per-worker", "0", "--trials-per-task", "2",
                  "--wait", *tiny(tiny_model_dir)], env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "3 trials in 2 array tasks" in run.stdout and "3/3 trials done" in run.stdout
    job = re.search(r"submitted job (\d+): array 0 \(1 tasks, 2 CPUs and 0 GPUs each\)", run.stdout).group(1)
    assert "array task 0 (job" in (store / "slurm-logs" / f"mtl-study-{job}_0.out").read_text()
    assert ": sst-sum-s0, sst+para-sum-s0\n" in (store / "slurm-logs" / f"mtl-study-{job}_0.out").read_text()


def test_preemption_signal_requeues_and_the_trial_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path, env):
    """USR1 to the batch step (as --signal=B:USR1@120 sends it): the trial checkpoints after its
    step, the task requeues itself, starts again and resumes; the end equals an uninterrupted run."""
    grid = tmp_path / "grid.yaml"
    grid.write_text('axes:\n  tasks: ["sst,para"]\n')
    trial = ["--grid", str(grid), "--gpus-per-worker", "0", *tiny(tiny_model_dir, rows=200, epochs=12)]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert helper(["--storage", str(whole), *trial], env).returncode == 0
    submitted = helper(["--storage", str(cut), *trial], env)
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    wait_for(lambda: (cut / "sst+para-sum-s0" / "checkpoints" / "latest.json").exists(), 120, "a first checkpoint")
    signalled = time.monotonic()
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{job}_0"], check=True)
    wait_for(lambda: states(job).get(0) == "PENDING", 60, "the requeued task to be pending")
    requeued = time.monotonic()
    # SLURM holds a requeued job ~120 s (BeginTime); release it at once (>= 1 s after the requeue).
    time.sleep(1.2)
    subprocess.run(["scontrol", "update", f"JobId={job}_0", "StartTime=now"], check=True)
    assert wait_ended(job) == {0: "COMPLETED"}
    log = (cut / "slurm-logs" / f"mtl-cut-{job}_0.out").read_text()
    stop = int(re.search(r"stopped: SIGUSR1 at step (\d+): checkpoint", log).group(1))
    assert re.search(rf"resumed \S+ at step {stop} ", log), log[-3000:]
    assert "restart 1)" in log and f"requeued job {job}" in log
    resumed_at = re.search(r"(\d\d:\d\d:\d\d,\d+) INFO mtl.train: resumed", log).group(1)
    print(f"USR1 -> PENDING {requeued - signalled:.1f} s; resumed log line at {resumed_at}")
    wait_for(lambda: (whole / "sst+para-sum-s0" / "results.json").exists(), 240, "the uninterrupted run")
    a, b = results(whole / "sst+para-sum-s0"), results(cut / "sst+para-sum-s0")
    assert b["resumed_from_steps"] == [stop] and a["resumed_from_steps"] == []
    assert a["steps"] == b["steps"] == 600
    assert a["weights_digest"] == b["weights_digest"]
    assert [e["metrics"] for e in a["epochs"]] == [e["metrics"] for e in b["epochs"]]


def slurm_job_of(store: Path) -> str | None:
    return next((m.group(1) for p in (store / "slurm-logs").glob("*") if (m := re.search(r"-(\d+)_0\.out$", p.name))),
                None)


def submitit_job_of(store: Path) -> str | None:
    return next((p.name for p in (store / "submitit").glob("*") if p.name.isdigit()), None)


CANCEL_CASES = {   # launcher: (its flags, how to find the job, how the failed row reads)
    "slurm_submit.py": (["--wait"], slurm_job_of, "SLURM task {job}_0 CANCELLED"),
    "submitit_sweep.py": (["--cluster", "slurm"], submitit_job_of, "CANCELLED without a result"),
}


@pytest.mark.parametrize("launcher", list(CANCEL_CASES))
def test_a_cancelled_job_is_reported_failed_within_seconds(tiny_model_dir, tmp_path, env, launcher):
    flags, job_of, error = CANCEL_CASES[launcher]
    store = tmp_path / "study"
    grid = tmp_path / "grid.yaml"
    grid.write_text('axes:\n  tasks: [sst]\n')
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / launcher), "--grid", str(grid),
                             "--storage", str(store), "--gpus-per-worker", "0", *flags,
                             *tiny(tiny_model_dir, rows=200, epochs=200)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    wait_for(lambda: (store / "sst-sum-s0" / "checkpoints" / "latest.json").exists(), 120, "the trial to train")
    job = wait_for(lambda: job_of(store), 30, "the job's id")
    cancelled = time.monotonic()
    subprocess.run(["scancel", job], check=True)
    out, err = proc.communicate(timeout=60)
    print(f"{launcher}: scancel -> launcher exit {time.monotonic() - cancelled:.1f} s")
    assert time.monotonic() - cancelled < 30
    assert proc.returncode == 1, err[-2000:]
    assert "0/1 trials done, 1 failed (sst-sum-s0)" in out
    (row,) = json.loads((store / "results.json").read_text())
    assert row["status"] == "failed" and row["error"].startswith(error.format(job=job))


def test_bad_input_fails_the_task_at_once_with_one_line(tiny_model_dir, tmp_path, env):
    logs = tmp_path / "logs"
    logs.mkdir()
    base = ["--gres=none", "--cpus-per-task=1", "slurm/sweep.sh", "--grid", "smoke", *tiny(tiny_model_dir)]
    beyond = sbatch(["--array=6", f"--output={logs}/beyond-%A_%a.out", *base, "--storage", str(tmp_path / "s")], env)
    unwritable = sbatch(["--array=0", f"--output={logs}/unwritable-%A_%a.out", *base, "--storage", "/proc/mtl-study"],
                        env)
    no_env = sbatch(["--array=0", f"--output={logs}/noenv-%A_%a.out", *base, "--storage", str(tmp_path / "s")],
                    {**env, "MTL_PYTHON": "/nonexistent/python"})
    for job in (beyond, unwritable, no_env):
        assert list(wait_ended(job, timeout=60).values()) == ["FAILED"]
    lines = {name: [line for line in next(logs.glob(f"{name}-*")).read_text().splitlines() if line.strip()]
             for name in ("beyond", "unwritable", "noenv")}
    assert lines["beyond"][-1] == "error: array index 6 is beyond the grid: 6 trials, so indices 0-5"
    assert lines["unwritable"][-1].startswith("error: storage /proc/mtl-study is not writable")
    assert lines["noenv"] == ["error: /nonexistent/python cannot import cluster.backends.slurm_array: set MTL_PYTHON to the "
                              "environment's python, or MTL_SETUP to the line that activates it"]
    # The helper checks the storage before it submits anything.
    refused = helper(["--grid", "smoke", "--storage", "/proc/mtl-study", *tiny(tiny_model_dir)], env)
    assert refused.returncode == 2 and refused.stderr.strip().startswith("error: storage /proc/mtl-study is not writable")


def test_submitit_runs_the_grid_on_slurm_and_a_preempted_job_resumes(tiny_model_dir, tmp_path, env):
    grid = tmp_path / "grid.yaml"
    grid.write_text('axes:\n  tasks: [sst, "sst,para"]\n')
    store = tmp_path / "study"
    run = subprocess.run([sys.executable, str(ROOT / "launch" / "submitit_sweep.py"), "--grid", str(grid),
                          "--storage", str(store), "--cluster", "slurm", "--gpus-per-worker", "0",
                          *tiny(tiny_model_dir)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2/2 trials done" in run.stdout and "2/2 jobs ended" in run.stdout
    rows = json.loads((store / "results.json").read_text())
    assert [(r["trial"], r["status"]) for r in rows] == [("sst-sum-s0", "done"), ("sst+para-sum-s0", "done")]

    # Preemption: submitit's USR2 -> checkpoint() resubmits -> the trial resumes from its own checkpoint.
    from cluster.backends.submitit_sweep import follow, submit
    from cluster.core.placement import Placement
    from mtl.config import RunConfig

    cfg = RunConfig().replace(out=str(tmp_path / "pre" / "cut"), progress="off", **{
        "model.model": tiny_model_dir, "model.max_length": 32, "data.tasks": "sst,sts", "data.max_train_rows": 200,
        "data.max_dev_rows": 8, "optim.batch_size": 4, "optim.epochs": 12})
    whole = cfg.replace(out=str(tmp_path / "pre" / "whole"))
    os.environ["OMP_NUM_THREADS"] = "1"        # submitit's jobs inherit this process's environment
    jobs = submit([cfg, whole], str(tmp_path / "pre"), Placement(gpus_per_worker=0, time="30"), "slurm")
    wait_for(lambda: Path(cfg.out, "checkpoints", "latest.json").exists(), 120, "a first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", jobs[0].job_id], check=True)
    wait_for(lambda: states(jobs[0].job_id.split("_")[0]).get(0) == "PENDING", 60, "the requeued job")
    time.sleep(1.2)
    subprocess.run(["scontrol", "update", f"JobId={jobs[0].job_id}", "StartTime=now"], check=True)
    assert follow(jobs) == {}
    a, b = results(Path(whole.out)), results(Path(cfg.out))
    assert b["resumed_from_steps"] and b["resumed_from_steps"][0] > 0 and not a["resumed_from_steps"]
    assert a["weights_digest"] == b["weights_digest"] and a["steps"] == b["steps"]
    log = Path(jobs[0].paths.stdout).read_text() + Path(jobs[0].paths.stderr).read_text()
    assert "this job is preempted" in log and f"resumed {cfg.out} at step {b['resumed_from_steps'][0]}" in log


def _ray_rpc(address: str, server: str, token: str | None) -> str:
    """One RPC to a Ray server, as any process on the network could send it: 'OK' or the gRPC
    status ('UNAUTHENTICATED': refused for its token; 'UNAVAILABLE': nothing listening yet).
    ``server`` is 'gcs' (what ray.init and job submission talk to) or 'client' (Ray Client)."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc, ray_client_pb2, ray_client_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        try:
            if server == "gcs":
                gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                    gcs_service_pb2.GetClusterIdRequest(), timeout=10, metadata=metadata)
            else:
                ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(
                    ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), timeout=10,
                    metadata=metadata)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name


def _ray_job(tmp_path: Path, env: dict, model: str, grid: str, auth: dict) -> tuple[str, Path, Path]:
    """slurm/ray_cluster.sh submitted as its header says, with the authentication settings ``auth``
    (nothing of Ray's authentication inherited from this process: an in-process sweep sets some)."""
    store, logs = tmp_path / "study", tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "grid.yaml").write_text(grid)
    job_env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    job = sbatch(["--gres=none", "--cpus-per-task=2", f"--output={logs}/ray-%j.out", "slurm/ray_cluster.sh",
                  "--grid", str(tmp_path / "grid.yaml"), "--storage", str(store), *tiny(model)],
                 {**job_env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", **auth})
    return job, store, logs / f"ray-{job}.out"


def _ray_addresses(log: Path) -> tuple[str, str] | None:
    """(GCS, Ray Client) addresses from the job's log line, once it is written."""
    found = re.search(r"Ray head on \S+ \((\S+), Ray Client (\S+)\)", log.read_text() if log.exists() else "")
    return found and (found.group(1), found.group(2))


def _ended(job: str) -> str | None:
    s = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "State"], capture_output=True,
                       text=True).stdout.split()
    return s[0] if s and s[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None


def _up(job: str, address: str, server: str):
    """Whether the server answers (or the job ended, so that waiting is over)."""
    return _ended(job) or _ray_rpc(address, server, None) != "UNAVAILABLE"


def _no_ray_left(job: str) -> None:
    time.sleep(1)
    left = [p.info for p in psutil.process_iter(["pid", "cmdline", "status"])
            if f"/tmp/ray-{job}/" in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert left == [] and not os.path.exists(f"/tmp/ray-{job}")


def test_ray_cluster_inside_an_allocation_runs_a_grid_with_token_auth_and_leaves_no_ray_behind(
        tiny_model_dir, tmp_path, env):
    """The default: token authentication with a fresh token for the job.  While the job runs, its
    GCS and Ray Client ports refuse a caller without the token (or with another) and answer one
    with it; the sweep itself (head, driver, trial workers) runs with it; nothing is left after."""
    job, store, log_path = _ray_job(tmp_path, env, tiny_model_dir, 'axes:\n  tasks: [sst, "sst,para"]\n', {})
    gcs, client = wait_for(lambda: _ray_addresses(log_path) or _ended(job) and ("", ""), 120, "the job's Ray head")
    assert gcs, log_path.read_text()[-3000:]
    token_file = Path(f"/tmp/ray-{job}/auth/token")      # for the user's own tools (the header)
    token = token_file.read_text()
    assert len(token) == 64
    for address, server in ((gcs, "gcs"), (client, "client")):
        wait_for(lambda: _up(job, address, server), 120, f"the job's {server} server", poll=0.5)
        assert _ray_rpc(address, server, None) == "UNAUTHENTICATED", server
        assert _ray_rpc(address, server, "0" * 64) == "UNAUTHENTICATED", server
        assert _ray_rpc(address, server, token) == "OK", server      # the same probe, with the token: answered
    # Ray's own client, as another user on the network would run it: refused, naming the token.
    ray_cli = [str(Path(sys.executable).with_name("ray")), "status", "--address", gcs]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run(ray_cli, env={**clean, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0 and "AuthenticationError" in refused.stderr, refused.stderr[-2000:]
    answered = subprocess.run(ray_cli, env={**clean, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)},
                              capture_output=True, text=True, timeout=120)
    assert answered.returncode == 0 and "AuthenticationError" not in answered.stderr, answered.stderr[-2000:]
    # Readable by the user alone, also once Ray has opened its temp folder to everyone.
    assert token_file.stat().st_mode & 0o777 == 0o600 and token_file.parent.stat().st_mode & 0o777 == 0o700
    # The token is on no command line (ps shows those to every user).
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if token in " ".join(p.info["cmdline"] or [])]
    final = wait_for(lambda: _ended(job), 300, "the Ray job", poll=1)
    log = log_path.read_text()
    assert final == "COMPLETED", log[-4000:]
    assert "2/2 trials done" in log and "1 Ray nodes alive" in log and "token authentication" in log
    assert token not in log
    assert [r["status"] for r in json.loads((store / "results.json").read_text())] == ["done", "done"]
    _no_ray_left(job)     # and the token file with the job's temp folder


def test_ray_cluster_auth_can_be_turned_off_explicitly(tiny_model_dir, tmp_path, env):
    """`RAY_AUTH_MODE=disabled sbatch slurm/ray_cluster.sh ...` (the header's opt-out): the job
    warns, its Ray answers a caller without a token, and the sweep runs."""
    job, store, log_path = _ray_job(tmp_path, env, tiny_model_dir, "axes:\n  tasks: [sst]\n",
                                    {"RAY_AUTH_MODE": "disabled"})
    gcs, _ = wait_for(lambda: _ray_addresses(log_path) or _ended(job) and ("", ""), 120, "the job's Ray head")
    assert gcs, log_path.read_text()[-3000:]
    assert not os.path.exists(f"/tmp/ray-{job}/auth")
    wait_for(lambda: _up(job, gcs, "gcs"), 120, "the job's GCS", poll=0.5)
    assert _ray_rpc(gcs, "gcs", None) == "OK"
    final = wait_for(lambda: _ended(job), 300, "the Ray job", poll=1)
    log = log_path.read_text()
    assert final == "COMPLETED", log[-4000:]
    assert "warning: RAY_AUTH_MODE=disabled" in log and "NO authentication" in log and "1/1 trials done" in log
    assert [r["status"] for r in json.loads((store / "results.json").read_text())] == ["done"]
    _no_ray_left(job)


# --------------------------------------------------------------------------------------------
# Upstream stages: one shared upstream, three dependents
# --------------------------------------------------------------------------------------------
def test_a_shared_upstream_runs_once_before_its_three_dependents_on_slurm(tiny_model_dir, tmp_path, monkeypatch,
                                                                          capsys):
    from cluster.backends.slurm_array import submit_array
    from cluster.core.placement import Placement

    monkeypatch.setenv("OMP_NUM_THREADS", "1")       # the jobs inherit this process's environment
    store = tmp_path / "study"
    trials = staged_study(tiny_model_dir, store)
    rows = submit_array(trials, str(store), Placement(gpus_per_worker=0), wait=True)
    out = capsys.readouterr().out
    assert [r["status"] for r in rows] == ["done"] * 4, out
    up_job = re.search(r"submitted job (\d+): array 0 \(1 tasks", out).group(1)
    assert re.search(rf"submitted job \d+: array 1-3 \(3 tasks, 1 CPUs and 0 GPUs each\) after {up_job}_0;", out)
    assert_ran_after(trials)
    # The upstream ran in one array task, once: one log names it, with one training run in it.
    logs = [p.read_text() for p in (store / "slurm-logs").iterdir()]
    mine = [log for log in logs if re.search(r"array task 0 .*: sst\+para\+sts-s0\n", log)]
    assert len(mine) == 1 and len(re.findall(r"epoch 1 step \d+ dev", mine[0])) == 1
    stamp = (store / "sst+para+sts-s0" / "results.json").stat().st_mtime
    # A rerun submits nothing.
    again = submit_array(trials, str(store), Placement(gpus_per_worker=0), wait=True)
    out = capsys.readouterr().out
    assert "4 trials in 4 array tasks: 4 finished, 0 tasks queued or running, 0 to submit" in out
    assert "submitted job" not in out and [r["status"] for r in again] == ["done"] * 4
    assert (store / "sst+para+sts-s0" / "results.json").stat().st_mtime == stamp


def test_a_failed_upstream_on_slurm_fails_its_dependents_and_a_fixed_one_runs_them(tiny_model_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    from cluster.backends.slurm_array import submit_array
    from cluster.core.placement import Placement

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store, data = tmp_path / "study", broken_data(tmp_path)
    trials = staged_study(tiny_model_dir, store, data_dir=str(data))
    started = time.monotonic()
    rows = submit_array(trials, str(store), Placement(gpus_per_worker=0), wait=True)
    print(f"failed upstream -> dependents reported: {time.monotonic() - started:.1f} s")
    out = capsys.readouterr().out
    up_job = re.search(r"submitted job (\d+): array 0 ", out).group(1)
    assert rows[0]["status"] == "failed" and rows[0]["error"].startswith(f"SLURM task {up_job}_0 FAILED")
    for row in rows[1:]:      # cancelled by SLURM (kill-on-invalid-dep), reported with the upstream's reason
        assert row["status"] == "failed" and row["error"].startswith(
            f"upstream sst+para+sts-s0 failed: SLURM task {up_job}_0 FAILED"), row
        assert not (store / row["trial"] / "results.json").exists()
    dep_job = re.search(r"submitted job (\d+): array 1-3 ", out).group(1)
    from cluster.backends.slurm_array import task_states
    assert set(task_states({dep_job: [1, 2, 3]}).values()) == {"CANCELLED"}
    # Fixed (the file is back): the same study runs the upstream, then its dependents.
    (tmp_path / "quora-train.csv").rename(data / "quora-train.csv")
    rows = submit_array(trials, str(store), Placement(gpus_per_worker=0), wait=True)
    assert [r["status"] for r in rows] == ["done"] * 4, capsys.readouterr().out
    assert_ran_after(trials)


def test_submitit_on_slurm_holds_dependents_with_afterok_and_fails_them_with_the_upstream(tiny_model_dir, tmp_path,
                                                                                          monkeypatch, capsys):
    """submitit on SLURM: dependents wait on the upstream's job (afterok), a failed upstream fails
    them with its reason; once fixed all run, and that upstream then serves dependents run as
    SLURM arrays by the helper (placement is not identity)."""
    from cluster.backends.submitit_sweep import run_submitit
    from cluster.core.placement import Placement

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store, data = tmp_path / "study", broken_data(tmp_path)
    trials = staged_study(tiny_model_dir, store, data_dir=str(data))
    rows = run_submitit(trials, str(store), Placement(gpus_per_worker=0), cluster="slurm", poll_s=0.5)
    out = capsys.readouterr().out
    up_job = re.search(r"submitted sst\+para\+sts-s0 as job (\S+)", out).group(1)
    assert len(re.findall(rf"as job \S+ after job {up_job}", out)) == 3
    assert rows[0]["status"] == "failed" and "quora-train.csv" in rows[0]["error"]
    assert all(r["status"] == "failed" and r["error"] == f"upstream sst+para+sts-s0 failed: {rows[0]['error']}"
               for r in rows[1:])
    (tmp_path / "quora-train.csv").rename(data / "quora-train.csv")      # fixed: the same study runs them all
    rows = run_submitit(trials, str(store), Placement(gpus_per_worker=0), cluster="slurm", poll_s=0.5)
    assert [r["status"] for r in rows] == ["done"] * 4, capsys.readouterr().out
    assert_ran_after(trials)
    # Placement is not identity: the upstream submitit ran serves dependents run as SLURM arrays.
    import shutil
    from cluster.backends.slurm_array import submit_array

    stamp = (store / "sst+para+sts-s0" / "results.json").stat().st_mtime
    for dep in trials[1:]:
        shutil.rmtree(dep.out)
    rows = submit_array(trials, str(store), Placement(gpus_per_worker=0), wait=True)
    out = capsys.readouterr().out
    assert "4 trials in 4 array tasks: 1 finished, 0 tasks queued or running, 3 to submit" in out
    assert re.search(r"submitted job \d+: array 1-3 \(3 tasks, 1 CPUs and 0 GPUs each\); logs", out)   # no afterok
    assert [r["status"] for r in rows] == ["done"] * 4
    assert (store / "sst+para+sts-s0" / "results.json").stat().st_mtime == stamp
