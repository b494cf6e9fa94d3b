"""The checks a trial makes before it reads or writes anything: settings that span config
sections or look at this machine (device, model folder, storage kind, worker count), and
whether a run folder's earlier trial is this very trial.  Each raises ConfigError with what
to do about it."""
from __future__ import annotations

import os

import torch

from mtl import storage
from mtl.combine import Combiner, build_combiner
from mtl.config import RunConfig
from mtl.data import data_changes
from mtl.dist import DistContext
from mtl.errors import ConfigError
from mtl.tasks import TASKS

NAME_MAX = 255      # bytes in one file or folder name, on every common filesystem and object store key part


def check_run(cfg: RunConfig) -> Combiner:
    """Checks that span sections or look at this machine (device, model folder, storage kind);
    raises ConfigError before anything is read or written."""
    check_device(cfg.device)
    cfg.check_stage()
    check_model_path(cfg.model.model)
    check_select_metric(cfg)
    check_path_names(cfg.out, "out")
    if not cfg.allow_ephemeral_out and storage.is_ephemeral(cfg.out):
        raise ConfigError(f"out: {cfg.out} lives only in this process and is gone when it ends "
                          "(pass --allow-ephemeral-out true if that is what you want)")
    combiner = build_combiner(cfg.combiner, cfg.data.tasks, cfg.data.one_task_per_step)
    if cfg.model.freeze_encoder and combiner.cost == "T backwards":
        raise ConfigError(f"model.freeze_encoder: {cfg.combiner.combiner} acts on the tasks' gradients of the "
                          "encoder, which a frozen encoder does not have (use a loss-weighting method)")
    stage = cfg.parallel.zero_stage if cfg.parallel.strategy == "deepspeed" else 0
    if stage > combiner.max_zero_stage:
        raise ConfigError(f"parallel.zero_stage: {cfg.combiner.combiner} {combiner.zero_stage_limit}, which ZeRO "
                          f"stage {stage} partitions (use --zero-stage {combiner.max_zero_stage} or lower)")
    return combiner


def check_select_metric(cfg: RunConfig) -> None:
    if cfg.select_metric in ("mean", "overall"):      # 'overall': RunConfig checked its three tasks
        return
    task, _, metric = cfg.select_metric.partition("/")
    names = TASKS[task].metric_names
    if metric not in names:
        raise ConfigError(f"select_metric: {cfg.select_metric!r} is not a metric of {task} (its metrics: "
                          f"{', '.join(f'{task}/{m}' for m in names)}; or 'mean')")


def check_path_names(url: str, what: str) -> None:
    """A path part longer than filesystems take fails at the first write, deep in a library."""
    for part in url.split("://", 1)[-1].split("/"):
        if len(part.encode()) > NAME_MAX:
            raise ConfigError(f"{what}: the name {part[:40]}... is {len(part.encode())} bytes, over the {NAME_MAX} "
                              f"a file name may have")


def check_workers(cfg: RunConfig, dist: DistContext) -> None:
    """The workers a trial records are the processes that train it: one process asked for two
    would train alone and be recorded (and named, and resumed) as a two-worker trial."""
    if cfg.parallel.workers != dist.world_size:
        n = cfg.parallel.workers
        how = (f"run it as torchrun --nproc-per-node {n} -m mtl.train ... --workers {n}, or through a launcher "
               f"(launch/submit.py)" if dist.world_size == 1 else f"pass --workers {dist.world_size}")
        raise ConfigError(f"parallel.workers: {n} asked for, but {dist.world_size} process(es) train this trial: "
                          f"{how}")


def check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"device: {device} asked for, but this torch ({torch.__version__}, {build}) sees no "
                          "CUDA device (use --device cpu or auto)")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device: {device} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")


def check_model_path(model: str) -> None:
    """A name that can only be a local path (absolute, ./, ../, ~) must be a folder; anything
    else may be a Hugging Face Hub name."""
    if model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model)):
        what = "is a file, not a model folder" if os.path.exists(os.path.expanduser(model)) else "no such folder"
        raise ConfigError(f"model.model: {model}: {what}")


def check_same_trial(saved: dict, cfg: RunConfig, saved_data: dict | None = None, data: dict | None = None) -> None:
    """Refuse to continue a run folder started with settings that change the numbers, or on data
    files whose contents changed since (same path, other rows: one trial on two datasets)."""
    changed = RunConfig.from_dict(saved).identity_changes(cfg)
    if changed:
        raise ConfigError(f"{cfg.out} holds a trial started with other settings ({changed}): resume it with its "
                          "own settings, or use another --out")
    changed = data_changes(saved_data or {}, data or {}, cfg.data.data_dir)
    if changed:
        raise ConfigError(f"{cfg.out} holds a trial started on other data: {changed}; restore the files, or use "
                          "another --out")
