"""Regularisers of the training objective (base.py states the contract), chosen by
``--regularizer`` (none, smart, l1, linf), plus the task-scoped Lasso term of
``--task-loss task=mse_lasso``.  ``build_regularizer`` gives one object for the trainer, whose
terms join each task's loss before the combiner acts."""
from __future__ import annotations

import torch.nn as nn

from mtl.combine import Combiner
from mtl.combine.gradients import GradientCombiner
from mtl.config import RunConfig, per_task
from mtl.errors import ConfigError
from mtl.regularize.base import Composite, MicroBatch, NoRegularizer, Regularizer
from mtl.regularize.norms import HeadLasso, WeightPenalty
from mtl.regularize.smart import Smart

__all__ = ["REGULARIZERS", "MicroBatch", "Regularizer", "build_regularizer", "check", "lasso_tasks"]

# name -> (model, run config, whether the combiner back-propagates each task alone) -> Regularizer
REGULARIZERS = {
    "none": lambda model, cfg, separate: NoRegularizer(),
    "l1": lambda model, cfg, separate: WeightPenalty(model, cfg.regularize.reg_weight, "l1", separate),
    "linf": lambda model, cfg, separate: WeightPenalty(model, cfg.regularize.reg_weight, "linf", separate),
    "smart": lambda model, cfg, separate: Smart(model, cfg.regularize, cfg.seed),
}


def lasso_tasks(cfg: RunConfig) -> list[str]:
    return [t for t in cfg.data.tasks if per_task(cfg.loss.task_loss, t, "") == "mse_lasso"]


def check(cfg: RunConfig) -> None:
    """What the configuration asks of the regularisers that the model and strategy must allow;
    called by the trainer before it builds anything."""
    stage = cfg.parallel.zero_stage if cfg.parallel.strategy == "deepspeed" else 0
    if stage == 3 and cfg.regularize.regularizer != "none":
        raise ConfigError(f"regularize.regularizer: {cfg.regularize.regularizer} reads the whole weights (the "
                          "penalty, or SMART's extra forwards and momentum copy), which ZeRO stage 3 "
                          "partitions (use --zero-stage 2 or lower)")
    if stage == 3 and lasso_tasks(cfg):
        raise ConfigError("loss.task_loss: mse_lasso reads the head's whole weights, which ZeRO stage 3 "
                          "partitions (use --zero-stage 2 or lower)")


def build_regularizer(cfg: RunConfig, model: nn.Module, combiner: Combiner | None = None) -> Regularizer:
    """The run's regulariser on the (unwrapped) model; consumes no random numbers.  'none' without
    mse_lasso is inactive: the trainer then runs exactly as it did before regularisers existed."""
    check(cfg)
    lasso = lasso_tasks(cfg)
    for t in lasso:
        if t not in model.heads or not any(p.dim() >= 2 for p in model.heads[t].parameters()):
            raise ConfigError(f"loss.task_loss: {t}=mse_lasso needs a head with weights, and {t}'s has none "
                              "(--sim-head cosine); use mse")
    separate = isinstance(combiner, GradientCombiner)     # each task's loss back-propagated alone
    parts = [REGULARIZERS[cfg.regularize.regularizer](model, cfg, separate)]
    if lasso:
        parts.append(HeadLasso(model, lasso, cfg.loss.lasso_weight))
    return Composite(parts)
