"""The Ray Train adapter's wiring, without starting Ray: a trial's Ray run folder is the
trial's own folder, on a local path or any fsspec URL (wrapped for pyarrow)."""
import pyarrow.fs

from cluster.backends.ray_trial import build_trainer, fs_path, ray_storage
from cluster.core.placement import Placement
from mtl.config import RunConfig


def test_local_storage_is_handed_to_ray_as_a_path(tmp_path):
    path, fs = ray_storage(str(tmp_path / "study"))
    assert path == str(tmp_path / "study") and fs is None
    assert fs_path(str(tmp_path / "study" / "t" / "checkpoints" / "step-00000001")).startswith(str(tmp_path))


def test_fsspec_storage_is_wrapped_for_pyarrow():
    path, fs = ray_storage("memory://bucket/study")
    assert isinstance(fs, pyarrow.fs.PyFileSystem) and path == "/bucket/study"
    assert fs_path("memory://bucket/study/t/checkpoints/step-00000001") == "/bucket/study/t/checkpoints/step-00000001"


def test_the_trial_folder_is_rays_run_folder(tmp_path):
    cfg = RunConfig().replace(out=str(tmp_path / "study" / "sst+para-pcgrad-s0"), **{"parallel.workers": 2})
    trainer = build_trainer(cfg, Placement(cpus_per_worker=2, max_failures=3))
    run = trainer.run_config
    assert (run.storage_path, run.name) == (str(tmp_path / "study"), "sst+para-pcgrad-s0")
    assert run.failure_config.max_failures == 3
    assert trainer.scaling_config.num_workers == 2
    assert trainer.scaling_config.resources_per_worker == {"CPU": 2}
    assert build_trainer(cfg, Placement(gpus_per_worker=0.25)).scaling_config.resources_per_worker == {
        "CPU": 1, "GPU": 0.25}
    remote = build_trainer(cfg.replace(out="memory://bucket/study/t")).run_config
    assert (remote.storage_path, remote.name) == ("/bucket/study", "t")
    assert isinstance(remote.storage_filesystem, pyarrow.fs.PyFileSystem)


def test_a_trial_pinned_to_the_cpu_uses_gloo_even_on_gpu_workers(tmp_path):
    # Ray picks nccl for workers that hold GPUs; --device cpu (a real GPU left alone, or the fake
    # ones of MTL_FAKE_GPUS in tests) must keep gloo, or the process group cannot start.
    cfg = RunConfig().replace(out=str(tmp_path / "study" / "t"), device="cpu")
    trainer = build_trainer(cfg, Placement(gpus_per_worker=0.5))
    assert trainer.scaling_config.use_gpu and trainer.scaling_config.resources_per_worker == {"CPU": 1, "GPU": 0.5}
    assert trainer.backend_config.backend == "gloo"
    assert build_trainer(cfg.replace(device="auto"), Placement(gpus_per_worker=0.5)).backend_config.backend == "nccl"
