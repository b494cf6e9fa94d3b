"""A small grid on a real local Ray (this machine's CPUs): one trial on 2 DDP workers, the
results table, and a rerun that skips every finished trial."""
import json

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def local_ray():
    import ray

    yield
    ray.shutdown()


def test_sweep_on_local_ray_runs_every_trial_once(make_config, tmp_path, local_ray):
    from cluster.backends.ray_sweep import run_sweep
    from cluster.core.study import expand

    base = make_config(**{"data.max_train_rows": 16, "data.max_dev_rows": 8})
    trials = expand("smoke", base, str(tmp_path / "sweep"), seeds=[0])
    # sst, para+sts x {sum, pcgrad@2}, and para made to diverge: the sweep goes on, the table tells.
    trials = [t for t in trials if t.data.tasks in {("sst",), ("para",), ("para", "sts")}]
    trials = [t.replace(**{"optim.lr": 1e6}) if t.data.tasks == ("para",) else t for t in trials]
    rows = run_sweep(trials, str(tmp_path / "sweep"), verbose=0)
    assert [r["status"] for r in rows] == ["done", "failed", "done", "done"]
    by_name = {r["trial"]: r for r in rows}
    assert by_name["para-sum-s0"]["error"].startswith("step ") and "is nan" in by_name["para-sum-s0"]["error"]
    assert by_name["para+sts-pcgrad-batch_size8-s0"]["world_size"] == 2
    assert all(0.0 <= r["dev/mean"] <= 1.0 for r in rows if r["status"] == "done")
    table = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert table == rows
    stamps = {t.out: (tmp_path / "sweep" / t.out.rsplit("/", 1)[-1] / "results.json").stat().st_mtime for t in trials}

    again = run_sweep(trials, str(tmp_path / "sweep"), verbose=0)      # idempotent: nothing runs again
    assert again == rows
    assert {t.out: (tmp_path / "sweep" / t.out.rsplit("/", 1)[-1] / "results.json").stat().st_mtime
            for t in trials} == stamps
