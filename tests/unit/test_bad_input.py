"""Issue 15's bad cases, as a new user hits them: each refused in one line (naming the file,
line or field; exit 2; nothing written) or survived as it must be.  tools/fault_matrix.py drives
the same cases through the command line in CI's log."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtl.train import main as run_cli
from tests.unit.test_guards import base, run, tree

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("flags, message", [
    (["--seed", "99999999999999999999"], "error: seed: 99999999999999999999 is outside [0, 4294967295]"),
    (["--seed", "-1"], "error: seed: -1 is outside [0, 4294967295]"),
    (["--eps", "inf"], "error: optim.eps: inf is not a finite number"),
    (["--weight-decay", "inf"], "error: optim.weight_decay: inf is not a finite number"),
    (["--grad-clip", "inf"], "error: optim.grad_clip: inf is not a finite number"),
    (["--lr", "inf"], "error: optim.lr: inf is not a finite number"),
    (["--lr", "nan"], "error: optim.lr: nan is not a finite number"),
    (["--combiner", "dtp", "--tasks", "sst,para", "--dtp-gamma", "inf"],
     "error: combiner.dtp_gamma: inf is not a finite number"),
    (["--head-hidden", "100000000"], "error: model.head_hidden: 100000000 is outside [0, 65536]"),
    (["--select-metric", "sst/f1"],
     "error: select_metric: 'sst/f1' is not a metric of sst (its metrics: sst/acc, sst/f1_macro, sst/balanced_acc, "
     "sst/acc_0, sst/acc_1, sst/acc_2, sst/acc_3, sst/acc_4, sst/precision_macro, sst/recall_macro; or 'mean')"),
    (["--workers", "2"], "error: parallel.workers: 2 asked for, but 1 process(es) train this trial: run it as "
                         "torchrun --nproc-per-node 2 -m mtl.train ... --workers 2"),
    (["--combiner", "scalarize", "--tasks", "sst,para", "--weights", "0.4,0.6", "--alpha", "0.3"],
     "error: combiner.weights: given with --alpha 0.3: the method takes one of them"),
    (["--config", '{"config": 5}'], "error: --config: a config is a JSON object of settings"),
    (["--config", '{"optim": {"lrr": 1}}'], "error: --config: optim.lrr: unknown setting"),
    (["--config", '{"optim": 3}'], "error: --config: optim: a section of settings, not an integer"),
    (["--data-dir", "https://example.invalid/minbert"],
     "error: https://example.invalid/minbert/sst-train.csv: cannot read ("),
])
def test_refused_in_one_line_before_anything_is_written(tiny_model_dir, tmp_path, capsys, flags, message):
    code, err = run(base(tiny_model_dir, tmp_path / "out") + flags, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "out").exists()


def test_an_out_name_longer_than_a_file_name_may_be_is_refused(tiny_model_dir, tmp_path, capsys):
    code, err = run(base(tiny_model_dir, tmp_path / ("x" * 300)), capsys)
    assert code == 2 and err == [f"error: out: the name {'x' * 40}... is 300 bytes, over the 255 a file name may have"]


def test_a_partial_config_merges_with_the_flags(tiny_model_dir, tmp_path, capsys):
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"optim": {"lr": 0.002}, "model": {"pooling": "mean"}}))
    code = run_cli(base(tiny_model_dir, tmp_path / "out", "--config", str(partial), "--tasks", "sst,para",
                        "--print-config"))
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["optim"]["lr"] == 0.002 and printed["model"]["pooling"] == "mean"
    assert printed["data"]["tasks"] == ["sst", "para"] and printed["optim"]["batch_size"] == 4
    partial.write_text(json.dumps({"data": {"taskz": "sst"}}))
    code, err = run(base(tiny_model_dir, tmp_path / "out", "--config", str(partial)), capsys)
    assert code == 2 and err == [f"error: {partial}: data.taskz: unknown setting"]


def test_resuming_on_changed_data_is_refused_naming_the_file(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(ROOT / "mtl" / "sample_data", data)
    out = tmp_path / "run"
    args = base(tiny_model_dir, out, "--data-dir", str(data), "--keep-final-state", "true")
    assert run(args, capsys)[0] == 0
    assert run(args, capsys)[0] == 0                       # done, same data: its results stand
    lines = (data / "sst-train.csv").read_text().splitlines(keepends=True)
    (data / "sst-train.csv").write_text("".join(lines[:1] + lines[1:][::-1]))   # same path, other order
    code, err = run(args, capsys)                           # a done trial
    assert code == 2 and len(err) == 1 and f"{data}/sst-train.csv changed (sha256" in err[0]
    (out / "results.json").unlink()                         # a stopped one, with a checkpoint
    before = tree(out)
    code, err = run(args, capsys)
    assert code == 2 and "holds a trial started on other data" in err[0] and "sst-train.csv changed" in err[0]
    assert tree(out) == before


def test_start_up_clean_up_removes_only_its_own_partial_writes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = base(tiny_model_dir, out, "--keep-final-state", "true")
    assert run(args, capsys)[0] == 0
    (out / "results.json").unlink()
    mine = [out / "notes.tmp-0badc0de", out / "best" / "draft.tmp-12345678", out / "sub" / "x.mtl-partial-0badc0de"]
    for path in mine:
        path.parent.mkdir(exist_ok=True)
        path.write_text("the user's own")
    ours = out / "best" / "meta.json.mtl-partial-0badc0de"
    ours.write_text("half")
    assert run(args, capsys)[0] == 0
    assert all(p.read_text() == "the user's own" for p in mine) and not ours.exists()


@pytest.mark.parametrize("content, why", [
    ('{"status": "done", "best": {"epo', "not valid JSON"),
    ("[]", "a JSON list, not a trial's results"),
    ('{"status": "done"}', "a done trial's results without 'config'"),
])
def test_an_unreadable_results_file_is_not_a_finished_trial(tiny_model_dir, tmp_path, caplog, content, why):
    from cluster.core.ending import is_finished, results_table
    from cluster.core.study import check_storage, expand
    from mtl.config import RunConfig

    trials = expand("smoke", RunConfig(), str(tmp_path), seeds=None)[:2]
    (tmp_path / "sst-sum-s0").mkdir()
    (tmp_path / "sst-sum-s0" / "results.json").write_text(content)
    assert not is_finished(trials[0])
    assert f"sst-sum-s0/results.json: {why}" in caplog.text and "the trial runs again" in caplog.text
    check_storage(trials)
    assert [r["status"] for r in results_table(trials)] == ["missing", "missing"]


def test_launchers_say_an_unreadable_results_file_runs_again(tmp_path):
    (tmp_path / "sst-sum-s0").mkdir(parents=True)
    (tmp_path / "sst-sum-s0" / "results.json").write_text("[]")
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), "--grid", "smoke", "--count",
                           "--storage", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "6"
    assert "sst-sum-s0/results.json: a JSON list, not a trial's results: not counted as finished" in done.stderr


@pytest.mark.parametrize("text, message", [
    ("axes: [1, 2]\n", "g.yaml: axes must be a mapping of setting: [values], not a list"),
    ("fixed: 5\n", "g.yaml: fixed must be a mapping of setting: value, not an integer"),
    ("axes:\n  1: [2]\n", "g.yaml: axes.1: a setting's name is text, not an integer"),
    ("axes:\n  alpha: [0.2, 1.5]\n  combiner: [scalarize]\n  tasks: ['sst,para']\n",
     "g.yaml: axes.combiner.alpha: 1.5 is outside [0, 1]"),
    ("axes:\n  seed: [1, 2]\n", "--seeds: {grid} sets the seed itself (an axis); give the seeds in one place"),
    ("axes:\n  cache_dir: [a, b]\n", "g.yaml: axes.data.cache_dir: not a setting of what a trial computes"),
    ("axes:\n  out: [a, b]\n", "g.yaml: axes.out: not a setting of what a trial computes"),
    ("fixed:\n  out: elsewhere\n", "g.yaml: fixed.out: every trial's folder is <storage>/<trial name>"),
])
def test_bad_grids_name_the_file_and_key(tmp_path, text, message):
    from cluster.core.study import expand
    from mtl.config import RunConfig
    from mtl.errors import ConfigError

    grid = tmp_path / "g.yaml"
    grid.write_text(text)
    with pytest.raises(ConfigError) as err:
        expand(str(grid), RunConfig(), str(tmp_path / "s"), seeds=[0, 1] if "seed:" in text else None)
    assert message.format(grid=grid) in str(err.value)


def test_a_trial_name_over_255_bytes_is_refused_before_anything_runs(tmp_path):
    from cluster.core.study import expand
    from mtl.config import RunConfig
    from mtl.errors import ConfigError

    grid = tmp_path / "g.yaml"
    grid.write_text("axes:\n  tasks: [sst]\n  data_dir: [" + ", ".join(
        f"'{tmp_path}/{'d' * 200}{i}'" for i in range(2)) + "]\n")
    for i in range(2):
        shutil.copytree(ROOT / "mtl" / "sample_data", tmp_path / f"{'d' * 200}{i}")
    with pytest.raises(ConfigError, match=r"g.yaml: trial name sst-sum-data_dir.*\.\.\. is \d+ bytes, over the 255"):
        expand(str(grid), RunConfig(), str(tmp_path / "s"), seeds=None)


def test_seeds_outside_the_range_are_refused_in_a_dry_run(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), "--grid", "smoke", "--dry-run",
                           "--seeds", "0,99999999999999999999", "--storage", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == \
        "error: --seeds: 99999999999999999999 is outside [0, 4294967295]"


def _start(tiny_model_dir, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mtl.train", *base(tiny_model_dir, out, "--max-train-rows", "400",
                                                                       "--epochs", "50", *extra)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(out: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not list((out / "tb").glob("events*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)          # in the loop, a few steps in


def test_ctrl_c_stops_at_a_step_with_a_checkpoint_and_a_second_aborts(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = _start(tiny_model_dir, out)
    _wait_for_steps(out, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert "stopped: SIGINT at step" in stderr and "Traceback" not in stderr
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] >= 1
    # Twice: the second Ctrl-C does not wait for the step.
    # Long steps (all 400 rows each), so the second signal comes while the first step still runs.
    again = _start(tiny_model_dir, tmp_path / "again", "--batch-size", "25", "--grad-accum", "16")
    _wait_for_steps(tmp_path / "again", again)
    again.send_signal(signal.SIGINT)
    time.sleep(0.05)
    again.send_signal(signal.SIGINT)
    stdout, stderr = again.communicate(timeout=60)
    assert again.returncode == 130 and "error: interrupted (a second Ctrl-C)" in stderr, stderr
    assert "Traceback" not in stderr
