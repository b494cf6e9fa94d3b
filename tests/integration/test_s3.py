"""Run folders on S3 for real: an S3 API over HTTP on localhost (moto's server) reached through
s3fs, as a user's --out s3://bucket/... would be.  A trial, a kill and resume, and the lease
that refuses a second writer, all against the object store, not the local filesystem."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port, a bucket, and the environment that points
    fsspec/s3fs (in this process and in children) at it."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import fsspec

        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "moto_server did not start"
                time.sleep(0.2)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("mtl-test")
        yield fs
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cli(model: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mtl.train", "--model", model, "--max-length", "32", "--max-dev-rows", "8",
            "--batch-size", "4", "--progress", "off", "--out", out, *extra]


def test_a_trial_writes_its_run_folder_to_s3(s3, tiny_model_dir):
    out = "s3://mtl-test/one"
    done = subprocess.run(cli(tiny_model_dir, out, "--max-train-rows", "16", "--epochs", "2"), capture_output=True,
                          text=True, env=os.environ, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    s3.invalidate_cache()
    results = json.loads(s3.cat("mtl-test/one/results.json"))
    assert results["status"] == "done" and results["steps"] == 8
    assert s3.exists("mtl-test/one/best/encoder/model.safetensors") and s3.exists("mtl-test/one/best/meta.json")
    assert any("tfevents" in p for p in s3.find("mtl-test/one/tb"))
    assert not s3.exists("mtl-test/one/checkpoints") and not s3.exists("mtl-test/one/.lease.json")


def test_kill_and_resume_and_the_lease_on_s3(s3, tiny_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    trial = ["--max-train-rows", "200", "--epochs", "12", "--save-every-steps", "10"]
    whole = subprocess.run(cli(tiny_model_dir, "s3://mtl-test/whole", *trial), capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = "s3://mtl-test/cut"
    first = subprocess.Popen(cli(tiny_model_dir, out, *trial), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None:
        s3.invalidate_cache()
        if s3.exists("mtl-test/cut/checkpoints/latest.json"):
            break
        time.sleep(0.1)
    # A second writer is refused at once, naming the holder; the lease lives in the bucket.
    second = subprocess.run(cli(tiny_model_dir, out, *trial), capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120)
    assert second.returncode == 2 and f"error: {out} is in use by trial of " in second.stderr
    assert f"pid {first.pid} since" in second.stderr
    assert json.loads(s3.cat("mtl-test/cut/.lease.json"))["pid"] == first.pid
    first.send_signal(signal.SIGKILL)
    first.wait()
    s3.invalidate_cache()
    assert not s3.exists("mtl-test/cut/results.json"), "the run finished before it could be killed"
    killed_at = json.loads(s3.cat("mtl-test/cut/checkpoints/latest.json"))["step"]

    again = subprocess.run(cli(tiny_model_dir, out, *trial), capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "taking over" in again.stderr
    a = json.loads(s3.cat("mtl-test/whole/results.json"))
    b = json.loads(s3.cat("mtl-test/cut/results.json"))
    assert b["resumed_from_steps"] == [killed_at] and a["steps"] == b["steps"] == 600
    assert a["weights_digest"] == b["weights_digest"]
    assert [e["metrics"] for e in a["epochs"]] == [e["metrics"] for e in b["epochs"]]
