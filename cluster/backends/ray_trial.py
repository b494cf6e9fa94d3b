"""One trial as a Ray Train job: every worker runs the same mtl.train loop, with rank, world
size and device from Ray (which has already started the process group: gloo on CPU, nccl
on GPU).

Checkpoints: Ray Train's run folder *is* the trial's run folder (storage_path = its parent,
name = the trial's name), and each checkpoint mtl.train publishes there is reported to Ray as
it stands (``CheckpointUploadMode.NO_UPLOAD``): one set of files that is both the trial
library's checkpoint and Ray's ``Result.checkpoint``.  When a worker dies, Ray restarts the
worker group (up to ``placement.max_failures`` times) and ``train`` resumes from the newest
published checkpoint, which is the one Ray last registered or one step newer.

A fused group (--fuse, cluster/core/fusion.py) is one Ray Train run of one worker that trains
every member (``cluster.core.trial.run_group``).  Its Ray run folder is its own, under
``<storage>/_ray/fused/``, never a member's: each member's folder holds what the member writes
alone.  Its checkpoints are not reported to Ray (Ray keeps one checkpoint list per run, and the
group has one per member); after a worker died, Ray restarts it and every member resumes from its
own newest checkpoint, as a trial does."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mtl import storage
from mtl.config import RunConfig
from mtl.errors import TrialFailed

from cluster.core.placement import Placement
from cluster.core.trial import run_group, run_trial

if TYPE_CHECKING:
    from mtl.dist import DistContext

GPU_DEFAULT = 0.0     # Ray trials train on CPU unless told --gpus-per-worker (the Ray backend's default)


def ray_dist_context(device: str = "auto") -> DistContext:
    """Rank and world from Ray; the device is Ray's (the GPU it assigned, else CPU) unless the
    trial says ``--device cpu``, which holds wherever its workers run."""
    import torch
    import ray.train
    import ray.train.torch

    from mtl.dist import DistContext     # torch: in a Ray worker, never in the launcher's --help

    ctx = ray.train.get_context()
    return DistContext(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                       local_rank=ctx.get_local_rank(),
                       device=torch.device("cpu") if device == "cpu" else ray.train.torch.get_device())


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    cfg = RunConfig.from_dict(config)
    ray_fs = ray.train.get_context().get_storage().storage_filesystem

    def report(published: dict) -> None:
        # Every rank reports (Ray's report is a barrier); rank 0's metrics are the trial's.
        metrics = {"epoch": published["epoch"], "step": published["step"]}
        evaluation = published["evaluation"]
        if evaluation:
            metrics.update(score=evaluation["score"], best_score=evaluation["best_score"], **evaluation["metrics"])
        folder = published["checkpoint"]
        ray.train.report(metrics, checkpoint=Checkpoint(path=fs_path(folder), filesystem=ray_fs),
                         checkpoint_dir_name=folder.rstrip("/").rsplit("/", 1)[-1],
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    try:
        run_trial(cfg, ray_dist_context(cfg.device), on_checkpoint=report)
    except TrialFailed:
        pass    # recorded as failed in results.json; retrying would diverge again


def group_loop_per_worker(config: dict) -> None:
    cfgs = [RunConfig.from_dict(c) for c in config["group"]]
    # A member that diverged is recorded failed by the group, which goes on; nothing to retry.
    run_group(cfgs, ray_dist_context(cfgs[0].device))


def fs_path(url: str) -> str:
    """The path Ray's (pyarrow) filesystem knows ``url`` by."""
    return os.path.abspath(url) if storage.is_local(url) else storage.filesystem(url)[1]


def ray_storage(url: str):
    """(storage_path, storage_filesystem) for Ray: local paths as they are, other fsspec URLs
    wrapped for pyarrow."""
    if storage.is_local(url):
        return fs_path(url), None
    import pyarrow.fs

    return fs_path(url).rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.filesystem(url)[0]))


def build_trainer(cfg: RunConfig, placement: Placement | None = None, callbacks: list | None = None):
    """A TorchTrainer for one trial, whose Ray run folder is the trial's own ``cfg.out``."""
    return _torch_trainer(train_loop_per_worker, cfg.to_dict(), cfg, cfg.out, placement, callbacks)


def build_group_trainer(cfgs: list[RunConfig], run_folder: str, placement: Placement | None = None,
                        callbacks: list | None = None):
    """A TorchTrainer of one worker for a fused group; ``run_folder`` is Ray's own (see above)."""
    return _torch_trainer(group_loop_per_worker, {"group": [c.to_dict() for c in cfgs]}, cfgs[0], run_folder,
                          placement, callbacks)


def _torch_trainer(loop, loop_config: dict, cfg: RunConfig, run_folder: str, placement: Placement | None,
                   callbacks: list | None):
    """``cfg``: whose workers and device the run has (a group's first member's: one worker)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    placement = placement or Placement()
    out = os.path.abspath(run_folder) if storage.is_local(run_folder) else run_folder.rstrip("/")
    parent, name = out.rsplit("/", 1)
    ray_path, ray_fs = ray_storage(parent)
    gpus = placement.gpus(GPU_DEFAULT)
    resources = {"CPU": placement.cpus_per_worker}
    if gpus:
        resources["GPU"] = gpus
    # Ray picks nccl whenever workers hold GPUs; a trial pinned to the CPU needs gloo (a real GPU
    # it ignores, or a fake one from MTL_FAKE_GPUS in tests).
    torch_config = TorchConfig(backend="gloo") if cfg.device == "cpu" and gpus else None
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=torch_config,
        scaling_config=ScalingConfig(num_workers=cfg.parallel.workers, use_gpu=gpus > 0,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(name=name, storage_path=ray_path, storage_filesystem=ray_fs,
                                failure_config=FailureConfig(max_failures=placement.max_failures),
                                # mtl.train prunes its own checkpoints (--keep-checkpoints).
                                checkpoint_config=CheckpointConfig(num_to_keep=None),
                                callbacks=callbacks or []),
    )
