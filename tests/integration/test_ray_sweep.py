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


def test_a_shared_upstream_runs_once_before_its_three_dependents_on_ray(tiny_model_dir, tmp_path, local_ray):
    """Waves on one local Ray: an upstream that fails at its start leaves its three dependents
    unstarted and failed with its reason; a good one runs once, in its own sweep before theirs,
    and a rerun runs nothing."""
    from cluster.backends.ray_sweep import run_sweep
    from tests.helpers import assert_ran_after, broken_data, staged_study

    bad = staged_study(tiny_model_dir, tmp_path / "bad", data_dir=str(broken_data(tmp_path)))
    rows = run_sweep(bad, str(tmp_path / "bad"), verbose=0)
    assert [r["status"] for r in rows] == ["failed"] * 4
    assert "quora-train.csv" in rows[0]["error"]
    for row in rows[1:]:
        assert row["error"] == f"upstream sst+para+sts-s0 failed: {rows[0]['error']}"
        assert not (tmp_path / "bad" / "_ray" / "timings" / f"{row['trial']}.json").exists()    # never started

    root = tmp_path / "sweep"
    trials = staged_study(tiny_model_dir, root)
    rows = run_sweep(trials, str(root), verbose=0)
    assert [r["status"] for r in rows] == ["done"] * 4
    assert_ran_after(trials)
    timings = {r["trial"]: json.loads((root / "_ray" / "timings" / f"{r['trial']}.json").read_text()) for r in rows}
    up = timings.pop("sst+para+sts-s0")
    assert all(t["driver_launched_at"] >= up["driver_finished_at"] for t in timings.values())
    stamps = {t.out: (root / t.out.rsplit("/", 1)[-1] / "results.json").stat().st_mtime for t in trials}
    up_timing = (root / "_ray" / "timings" / "sst+para+sts-s0.json").stat().st_mtime
    assert run_sweep(trials, str(root), verbose=0) == rows              # a rerun runs nothing
    assert {t.out: (root / t.out.rsplit("/", 1)[-1] / "results.json").stat().st_mtime for t in trials} == stamps
    assert (root / "_ray" / "timings" / "sst+para+sts-s0.json").stat().st_mtime == up_timing
