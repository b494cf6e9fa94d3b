"""`launch/ray_submit.py --address` against a Ray cluster started separately with `ray start
--head` (as on a real cluster: no budget resources of ours), then a rerun that skips."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A head node of its own (``--block`` in its own process group, so stopping it touches
    no other Ray on this machine).  Its temp dir is short: Ray's socket paths must fit 107 bytes."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
                             "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True).returncode == 0:
            break
        assert head.poll() is None, "ray start --head exited"
        time.sleep(1)
    else:
        pytest.fail("the Ray head did not come up within 120 s")
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_sweep_runs_on_an_existing_cluster_by_address(ray_head, tiny_model_dir, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("axes:\n  tasks: [sst, \"sst,para\"]\n")
    storage = tmp_path / "study"
    cmd = [sys.executable, str(ROOT / "launch" / "ray_submit.py"), "--grid", str(grid), "--storage", str(storage),
           "--address", ray_head, "--model", tiny_model_dir, "--max-length", "32", "--max-train-rows", "16",
           "--max-dev-rows", "8", "--batch-size", "4", "--epochs", "1", "--progress", "off"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2/2 trials done" in first.stdout
    rows = json.loads((storage / "results.json").read_text())
    assert [(r["trial"], r["status"]) for r in rows] == [("sst-sum-s0", "done"), ("sst+para-sum-s0", "done")]
    stamp = (storage / "sst-sum-s0" / "results.json").stat().st_mtime

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and "2 trials, 2 already finished, 0 to run" in again.stderr
    assert (storage / "sst-sum-s0" / "results.json").stat().st_mtime == stamp
