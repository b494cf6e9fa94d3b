"""Stopping on a scheduler's signal: the step under way finishes, a checkpoint is written, the
trial exits 75, and running it again ends exactly where an uninterrupted run ends.  With two
data-parallel workers a signal that reaches one rank stops both after the same step."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from mtl import checkpoint
from mtl.config import RunConfig
from mtl.dist import DistContext
from mtl.stop import EXIT_STOPPED, StopSignal, TrialStopped
from mtl.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stop_at_first_checkpoint(stop: StopSignal):
    """An on_checkpoint hook that raises the stop flag once, as a signal arriving mid-run would."""
    def hook(published: dict) -> None:
        if stop.signum is None and published["step"] > 0:
            stop.request(signal.SIGUSR1)
    return hook


def test_a_stopped_trial_saves_its_step_and_resumes_to_the_uninterrupted_result(make_config, tmp_path):
    common = {"data.tasks": "sst,para", "data.max_train_rows": 40, "optim.epochs": 2, "save_every_steps": 3}
    whole = train(make_config(out=str(tmp_path / "whole"), **common))
    cfg = make_config(out=str(tmp_path / "cut"), **common)
    stop = StopSignal()
    with pytest.raises(TrialStopped) as info:
        train(cfg, on_checkpoint=stop_at_first_checkpoint(stop), stop=stop)
    # The flag rose while step 3 was being saved: the trial stops right there, on that checkpoint.
    assert info.value.step == 3 and info.value.signal_name == "SIGUSR1"
    assert json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert not (tmp_path / "cut" / "results.json").exists()
    resumed = train(cfg)
    assert resumed["resumed_from_steps"] == [3]
    assert resumed["steps"] == whole["steps"] and resumed["weights_digest"] == whole["weights_digest"]
    assert [e["metrics"] for e in resumed["epochs"]] == [e["metrics"] for e in whole["epochs"]]


def test_sigterm_to_the_cli_checkpoints_and_exits_75(make_config, tmp_path):
    cfg = make_config(out=str(tmp_path / "run"))
    cmd = [sys.executable, "-m", "mtl.train", "--model", cfg.model.model, "--max-length", "32", "--tasks", "sst",
           "--epochs", "50", "--batch-size", "4", "--max-train-rows", "64", "--max-dev-rows", "8",
           "--progress", "off", "--out", cfg.out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pointer = tmp_path / "run" / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline and not pointer.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err[-2000:]
    step = json.loads(pointer.read_text())["step"]
    assert f"stopped: SIGTERM at step {step}: checkpoint " in err
    assert 16 <= step < 800 and not (tmp_path / "run" / "results.json").exists()
    assert checkpoint.load(checkpoint.latest(cfg.out))["state"]["step"] == step


def _worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(cfg_dict)
    stop = StopSignal()
    # Only rank 1 "receives the signal"; rank 0 must learn of it and stop after the same step.
    hook = stop_at_first_checkpoint(stop) if rank == 1 else None
    try:
        train(cfg, DistContext.from_env("cpu"), on_checkpoint=hook, stop=stop)
        outcome = {"stopped_at": None}
    except TrialStopped as exc:
        outcome = {"stopped_at": exc.step}
    with open(os.path.join(cfg.out, f"rank-{rank}.json"), "w") as fh:
        json.dump(outcome, fh)
    torch.distributed.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(make_config, tmp_path):
    from tests.unit.test_dist import free_port

    cfg = make_config(out=str(tmp_path / "two"), save_every_steps=2,
                      **{"data.tasks": "sst,sts", "data.max_train_rows": 40, "optim.epochs": 2, "parallel.workers": 2})
    mp.spawn(_worker, args=(2, free_port(), cfg.to_dict()), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"stopped_at": 2}
    assert json.loads((tmp_path / "two" / "checkpoints" / "latest.json").read_text())["step"] == 2


def test_logging_cadence_does_not_change_the_numbers(make_config, tmp_path):
    """conflict_every, log_every_steps and save_every_steps are left out of a trial's identity:
    they must not change what it computes."""
    common = {"data.tasks": "sst,para", "data.max_train_rows": 24}
    a = train(make_config(out=str(tmp_path / "a"), **common, **{"combiner.conflict_every": 0}))
    b = train(make_config(out=str(tmp_path / "b"), log_every_steps=2, save_every_steps=1,
                          **common, **{"combiner.conflict_every": 1}))
    assert a["weights_digest"] == b["weights_digest"]
