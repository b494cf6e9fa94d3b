"""What keeps a bad trial from spoiling a study: each case of issue 9's table, as a user would
hit it through the CLI (one line on stderr, exit 2, nothing written or nothing spoiled)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cluster.core.ending import results_table
from mtl.train import main as run_cli
from mtl.config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def base(model, out, *extra):
    return ["--model", model, "--max-length", "32", "--max-train-rows", "16", "--max-dev-rows", "8",
            "--batch-size", "4", "--epochs", "1", "--progress", "off", "--out", str(out), *extra]


def run(argv, capsys):
    code = run_cli(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def test_a_diverged_trial_fails_with_its_step_and_task_and_is_never_done(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "nan"
    code, err = run(base(tiny_model_dir, out, "--lr", "1e6", "--max-train-rows", "32", "--epochs", "2"), capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: step 2: the loss of task sst is nan (training diverged")
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "failed" and saved["steps"] == 2 and "nan" in saved["error"]
    assert not (out / "best").exists()            # no evaluation ran on NaN weights
    # The study counts it as failed, never as a result.
    (row,) = results_table([RunConfig.from_dict(saved["config"])])
    assert row["status"] == "failed" and row["error"] == saved["error"]
    # Running it again retries from its last checkpoint and fails the same way, still not done.
    assert run(base(tiny_model_dir, out, "--lr", "1e6", "--max-train-rows", "32", "--epochs", "2"), capsys)[0] == 2


def test_the_guard_never_lets_non_finite_gradients_reach_the_weights(make_config):
    """fp32: the step is not taken; fp16: the scaler skips it (allowed, and counted)."""
    from mtl.dist import DistContext
    from mtl.strategy import TorchStrategy

    for precision, skips in (("fp32", False), ("fp16", True)):
        model = torch.nn.Linear(2, 2)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        strategy = TorchStrategy(make_config(precision=precision), DistContext())
        strategy.setup(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
        strategy.backward(model(torch.ones(1, 2)).sum() * float("inf"))
        norm, stepped = strategy.step()
        assert not stepped and not math.isfinite(norm)
        assert strategy.skips_overflow is skips
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_second_writer_is_refused_at_once_naming_the_holder(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mtl.train", *base(tiny_model_dir, out, "--max-train-rows", "200", "--epochs", "30")]
    first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest.json").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    started = time.time()
    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
    assert lines[0].startswith(f"error: {out} is in use by trial of ") and f"pid {first.pid} since " in lines[0]
    assert time.time() - started < 30 and first.poll() is None          # refused, not waited; the first goes on
    # The holder dies without releasing (SIGKILL): the next run takes over at once and resumes.
    first.send_signal(signal.SIGKILL)
    first.wait()
    third = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "taking over" in third.stderr and "its process is gone" in third.stderr
    assert json.loads((out / "results.json").read_text())["resumed_from_steps"]
    assert not (out / ".lease.json").exists()                          # released at the end


@pytest.mark.parametrize("change, field", [
    (["--lr", "2e-3"], "optim.lr 0.001 -> 0.002"),
    (["--combiner", "scalarize", "--tasks", "sst,para", "--alpha", "0.3"], "combiner.alpha 0.5 -> 0.3"),
    (["--combiner", "pcgrad", "--tasks", "sst,para"], "combiner.combiner 'sum' -> 'pcgrad'"),
    (["--tasks", "sst,sts"], "data.tasks ['sst', 'para'] -> ['sst', 'sts']"),
])
def test_resuming_with_settings_that_change_the_numbers_is_refused_before_any_write(
        tiny_model_dir, tmp_path, capsys, change, field):
    out = tmp_path / "run"
    args = base(tiny_model_dir, out, "--tasks", "sst,para", "--lr", "1e-3", "--keep-final-state", "true")
    assert run(args, capsys)[0] == 0
    (out / "results.json").unlink()        # a run that stopped before its end, to be resumed
    before = tree(out)
    code, err = run(args + change, capsys)
    assert code == 2 and len(err) == 1 and "holds a trial started with other settings (" in err[0]
    assert field in err[0] and err[0].endswith("resume it with its own settings, or use another --out")
    assert tree(out) == before
    # Settings that do not change the numbers are accepted.
    assert run(args + ["--log-every-steps", "7", "--progress", "off", "--keep-checkpoints", "3"], capsys)[0] == 0


def test_a_finished_trial_returns_its_results_and_refuses_other_settings(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(base(tiny_model_dir, out), capsys)[0] == 0
    before = tree(out)
    assert run(base(tiny_model_dir, out), capsys)[0] == 0          # done: results as they are
    assert tree(out) == before
    code, err = run(base(tiny_model_dir, out, "--epochs", "2"), capsys)
    assert code == 2 and "optim.epochs 1 -> 2" in err[0]


@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "error: device: cuda asked for, but this torch ("),
    (["--combiner", "sum", "--alpha", "0.3"], "error: combiner.alpha: applies to --combiner scalarize or pcgrad or upgrad"),
    (["--combiner", "dtp", "--tasks", "sst,para", "--weights", "0.5,0.5"],
     "error: combiner.weights: applies to --combiner scalarize or pcgrad or upgrad"),
    (["--epoch-mode", "max_size", "--examples-per-task", "8"],
     "error: data.examples_per_task: applies to --epoch-mode fixed_n or min_size"),
    (["--model", "/nonexistent/encoder"], "error: model.model: /nonexistent/encoder: no such folder"),
])
def test_everything_is_checked_before_the_first_write(tiny_model_dir, tmp_path, capsys, flags, message):
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    code, err = run(base(tiny_model_dir, tmp_path / "out") + flags, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(message)
    assert not (tmp_path / "out").exists()


def test_an_output_that_does_not_outlive_the_process_is_refused_unless_asked(tiny_model_dir, capsys):
    code, err = run(base(tiny_model_dir, "memory://mtl-guard"), capsys)
    assert code == 2 and err == ["error: out: memory://mtl-guard lives only in this process and is gone when it "
                                 "ends (pass --allow-ephemeral-out true if that is what you want)"]
    assert run(base(tiny_model_dir, "memory://mtl-guard", "--allow-ephemeral-out", "true"), capsys)[0] == 0


def test_a_finished_trial_keeps_best_weights_results_and_logs_only(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(base(tiny_model_dir, out, "--save-every-steps", "1"), capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["best", "results.json", "tb", "token_cache"]
    kept = tmp_path / "kept"
    assert run(base(tiny_model_dir, kept, "--keep-final-state", "true"), capsys)[0] == 0
    assert [p.name for p in (kept / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-00000004"]


def test_leftovers_of_a_killed_writer_are_cleaned_at_start(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = base(tiny_model_dir, out, "--keep-final-state", "true", "--epochs", "2")
    assert run(args, capsys)[0] == 0
    (out / "results.json").unlink()
    (out / "best" / "meta.json.mtl-partial-0badc0de").write_bytes(b"half")          # a torn atomic write
    (out / "checkpoints" / "step-00000099" / "shards").mkdir(parents=True)  # a save never published
    assert run(args, capsys)[0] == 0
    assert not (out / "best" / "meta.json.mtl-partial-0badc0de").exists()
    assert not (out / "checkpoints" / "step-00000099").exists()


def test_grid_and_data_errors_name_where(tmp_path):
    from cluster.core.study import expand
    from mtl.data import read_split
    from mtl.errors import ConfigError, DataError
    from mtl.tasks import TASKS

    bad = tmp_path / "g.yaml"
    bad.write_text("axes:\n  tasks: [sst\n  lr: [1]\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:3:\d+: not valid YAML \("):
        expand(str(bad), RunConfig(), "runs/x", seeds=[0])
    with pytest.raises(ConfigError, match=r"^--grid: 'pairs' is neither a named grid \(pairings, weighting, methods, smoke, pretraining, sequential, sampling, regularization, architecture\) "):
        expand("pairs", RunConfig(), "runs/x", seeds=[0])
    bad.write_text("axes:\n  seed: [1, 2]\nfixed:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: seed is both an axis and fixed$"):
        expand(str(bad), RunConfig(), "runs/x", seeds=[0])
    data = tmp_path / "data"
    data.mkdir()
    (data / "sst-train.csv").write_bytes(b"\tid\tsentence\tsentiment\n0\ta\tfine\t1\n1\tb\tcaf\xe9\t2\n")
    with pytest.raises(DataError, match=r"sst-train.csv:3: not UTF-8 text \(byte \d+\)$"):
        read_split(str(data), TASKS["sst"], "train")
