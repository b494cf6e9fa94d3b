"""One trial as a Ray Train job: every worker runs the same mtl.train loop, with rank, world
size and device from Ray (which has already started the process group: gloo on CPU, nccl
on GPU).

Checkpoints: the trial library's checkpoints on the run's storage are the only ones.  Ray
gets metrics, never a checkpoint copy; when a worker dies, Ray restarts the worker group
(up to ``parallel.max_failures`` times) and ``train`` resumes from ``latest.json``."""
from __future__ import annotations

from mtl.config import RunConfig
from mtl.dist import DistContext


def ray_dist_context() -> DistContext:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return DistContext(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                       local_rank=ctx.get_local_rank(), device=ray.train.torch.get_device())


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    from mtl.train import train

    cfg = RunConfig.from_dict(config)

    def report(record: dict) -> None:
        # Every rank reports (Ray's report is a barrier); rank 0's metrics are the trial's.
        ray.train.report({"epoch": record["epoch"], "step": record["step"], "score": record["score"],
                          "best_score": record["best_score"], **record["metrics"]})

    train(cfg, ray_dist_context(), on_epoch_end=report)


def ray_storage_for(storage_root: str):
    """(storage_path, storage_filesystem) for Ray's bookkeeping, under <storage_root>/_ray:
    local paths as they are, other fsspec URLs wrapped for pyarrow."""
    import os

    from mtl import storage

    if storage.is_local(storage_root):
        return os.path.abspath(storage.join(storage_root, "_ray")), None
    import pyarrow.fs

    fs, path = storage.filesystem(storage_root)
    return f"{path.rstrip('/')}/_ray", pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def build_trainer(cfg: RunConfig, storage_root: str, callbacks: list | None = None):
    """A TorchTrainer for one trial; Ray's own bookkeeping goes under <storage_root>/_ray."""
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    p = cfg.parallel
    ray_path, ray_fs = ray_storage_for(storage_root)
    resources = {"CPU": p.cpus_per_worker}
    if p.gpus_per_worker:
        resources["GPU"] = p.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=p.workers, use_gpu=p.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(name=trial_name(cfg), storage_path=ray_path, storage_filesystem=ray_fs,
                                failure_config=FailureConfig(max_failures=p.max_failures),
                                callbacks=callbacks or []),
    )


def trial_name(cfg: RunConfig) -> str:
    return cfg.out.rstrip("/").rsplit("/", 1)[-1]
