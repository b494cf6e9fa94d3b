"""Trials on a real local Ray (2 CPUs): a worker process killed mid-trial is restarted by Ray
and the trial finishes with the metrics and weights of an uninterrupted run; 2 workers x b
equal 1 worker x 2b; DeepSpeed ZeRO 1, 2 and 3 on 2 CPU workers survive the same kill by
resuming from their sharded checkpoints.  Ray's checkpoint is the trial's own folder."""
import json
import os
import signal
import threading
import time

import psutil
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def fit(cfg, kill_after_first_checkpoint: bool = False):
    """Fit the trial's TorchTrainer here (this test is the Ray driver).  With ``kill_...``, a
    watcher SIGKILLs one training worker process once the trial's first checkpoint is
    published; returns (Ray's Result, the pid it killed or None)."""
    from cluster.backends.ray_trial import build_trainer

    killed = []
    stop = threading.Event()

    def train_workers() -> list:
        return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]

    # Workers of an earlier trial may still be exiting (slowly, on a loaded machine): killing
    # one of those would leave this trial unharmed and the test asserting a resume that never was.
    earlier = {p.pid for p in train_workers()}

    def kill_a_worker():
        pointer = os.path.join(cfg.out, "checkpoints", "latest.json")
        while not stop.is_set():
            if os.path.exists(pointer):
                workers = [p for p in train_workers() if p.pid not in earlier]
                if workers:
                    victim = workers[-1]
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.append(victim.pid)
                    return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_a_worker, daemon=True)
    if kill_after_first_checkpoint:
        watcher.start()
    try:
        result = build_trainer(cfg).fit()
    finally:
        stop.set()
    return result, (killed[0] if killed else None)


def results(cfg) -> dict:
    with open(os.path.join(cfg.out, "results.json")) as fh:
        return json.load(fh)


def dev_history(res: dict) -> list:
    return [(e["epoch"], e["step"], e["metrics"]) for e in res["epochs"]]


def assert_same_metrics(a: dict, b: dict, tol: float) -> None:
    assert [e[:2] for e in dev_history(a)] == [e[:2] for e in dev_history(b)]
    for (_, _, ma), (_, _, mb) in zip(dev_history(a), dev_history(b)):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert ma[k] == pytest.approx(mb[k], abs=tol), k


@pytest.fixture(scope="module")
def trial_config(tiny_model_dir, tmp_path_factory):
    from mtl.config import RunConfig

    root = tmp_path_factory.mktemp("ray-trials")

    def make(name: str, **overrides):
        base = {"out": str(root / name), "progress": "off", "model.model": tiny_model_dir,
                "model.max_length": 32, "model.dropout": 0.0, "model.encoder_dropout": 0.0,
                "data.tasks": "sst,para", "data.max_train_rows": 64, "data.max_dev_rows": 32,
                "optim.epochs": 6, "optim.lr": 1e-3, "optim.batch_size": 4,
                "parallel.workers": 2, "log_every_steps": 4, "keep_final_state": True}
        base.update(overrides)
        base = {k: v for k, v in base.items() if v is not None}
        return RunConfig().replace(**base)
    return make


@pytest.fixture(scope="module")
def uninterrupted(local_ray, trial_config):
    cfg = trial_config("whole")
    result, _ = fit(cfg)
    return cfg, result, results(cfg)


def test_a_killed_worker_is_restarted_and_the_trial_matches_an_uninterrupted_one(uninterrupted, trial_config):
    whole_cfg, whole_result, whole = uninterrupted
    cfg = trial_config("killed")
    result, pid = fit(cfg, kill_after_first_checkpoint=True)
    res = results(cfg)
    assert pid is not None and not psutil.pid_exists(pid)
    assert res["resumed_from_steps"] and res["resumed_from_steps"][0] > 0     # resumed, not restarted
    assert res["steps"] == whole["steps"] and res["world_size"] == 2
    assert_same_metrics(res, whole, tol=1e-6)
    assert res["weights_digest"] == whole["weights_digest"]
    # Ray's checkpoint is the trial's own newest checkpoint folder, not a copy.
    latest = json.loads(open(os.path.join(cfg.out, "checkpoints", "latest.json")).read())["checkpoint"]
    assert os.path.realpath(result.checkpoint.path) == os.path.realpath(os.path.join(cfg.out, "checkpoints", latest))
    assert os.path.realpath(whole_result.checkpoint.path).startswith(os.path.realpath(whole_cfg.out))


def test_two_workers_at_b_match_one_worker_at_2b(uninterrupted, trial_config):
    _, _, whole = uninterrupted
    cfg = trial_config("single", **{"parallel.workers": 1, "optim.batch_size": 8})
    fit(cfg)
    res = results(cfg)
    assert res["world_size"] == 1 and res["steps"] == whole["steps"]
    assert_same_metrics(res, whole, tol=1e-3)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_on_two_cpu_workers_resumes_after_a_kill(uninterrupted, trial_config, stage):
    _, _, whole = uninterrupted
    cfg = trial_config(f"zero{stage}", **{"parallel.strategy": "deepspeed", "parallel.zero_stage": stage})
    _, pid = fit(cfg, kill_after_first_checkpoint=True)
    res = results(cfg)
    assert pid is not None and res["resumed_from_steps"] and res["resumed_from_steps"][0] > 0
    shards = os.path.join(cfg.out, "checkpoints", f"step-{res['steps']:08d}", "shards")
    assert len([n for n in os.listdir(shards) if "optim_states" in n]) == 2    # one optimizer partition per rank
    assert res["steps"] == whole["steps"]
    assert_same_metrics(res, whole, tol=1e-3)                                  # DeepSpeed == DDP
