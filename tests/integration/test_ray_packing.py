"""Fractional GPUs on a real local Ray: with one GPU, two 1-worker trials at --gpus-per-worker 0.5
run together, and at 0.75 one after the other.

What this proves is admission, and only admission: the GPU is fake (``MTL_FAKE_GPUS=1`` makes
start_local_ray declare a GPU that Ray counts as a logical resource, with no CUDA behind it), the
same budgets (mtl_cpus/mtl_gpus) and concurrency bound a real GPU node gets decide which trials
start, and Ray hands the workers their GPU fractions.  The trials themselves train on CPU
(``--device cpu``: gloo, not nccl), so nothing here says anything about GPU memory or speed
(tests/unit/test_memory.py and benchmarks/bench_pack.py do)."""
import json

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def one_fake_gpu(monkeypatch):
    import ray

    monkeypatch.setenv("MTL_FAKE_GPUS", "1")
    yield
    ray.shutdown()


def driver_intervals(root, trials) -> list[tuple[float, float]]:
    """When each trial's Tune driver started and ended (written by the sweep)."""
    out = []
    for t in trials:
        name = t.out.rsplit("/", 1)[-1]
        timing = json.loads((root / "_ray" / "timings" / f"{name}.json").read_text())
        out.append((timing["driver_launched_at"], timing["driver_finished_at"]))
    return out


@pytest.mark.parametrize("fraction, together", [(0.5, True), (0.75, False)])
def test_fractional_gpus_admit_what_fits_one_gpu(make_config, tmp_path, one_fake_gpu, fraction, together):
    import ray

    from cluster.backends.ray_sweep import run_sweep
    from cluster.core.placement import Placement
    from cluster.core.study import expand

    root = tmp_path / "sweep"
    base = make_config(device="cpu", **{"data.max_train_rows": 16, "data.max_dev_rows": 8})
    trials = [t for t in expand("smoke", base, str(root), seeds=[0]) if t.data.tasks in {("sst",), ("para",)}]
    rows = run_sweep(trials, str(root), Placement(gpus_per_worker=fraction), verbose=0)
    assert ray.cluster_resources()["GPU"] == 1 and ray.cluster_resources()["mtl_gpus"] == 1
    assert [r["status"] for r in rows] == ["done", "done"]
    (a0, b0), (a1, b1) = driver_intervals(root, trials)
    overlap = min(b0, b1) - max(a0, a1)
    # 2 CPUs hold both trials' workers either way: only the GPU's fractions differ.
    if together:
        assert overlap > 0, f"the trials ran one after the other ({overlap:.1f} s apart) at {fraction} GPU each"
    else:
        assert overlap < 0, f"the trials overlapped {overlap:.1f} s at {fraction} GPU each"
