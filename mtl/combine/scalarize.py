"""Unitary scalarization: alpha*L1 + (1-alpha)*L2 for a pair, or a weight vector summing
to 1 for any number of tasks (weights follow the canonical task order sst, para, sts)."""
from __future__ import annotations

import torch

from mtl.combine.base import Combiner, register
from mtl.combine.gradients import check_one_per_task
from mtl.config import CombinerConfig
from mtl.errors import ConfigError


@register("scalarize")
class Scalarize(Combiner):
    """Unitary scalarization: alpha*L1 + (1-alpha)*L2, or fixed weights summing to 1."""
    needs_all_tasks_per_step = True

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        if cfg.weights:
            check_one_per_task(cfg.weights, tasks, "combiner.weights")
            weights = cfg.weights
        elif len(tasks) == 1:
            weights = (1.0,)
        elif len(tasks) == 2:
            weights = (cfg.alpha, 1.0 - cfg.alpha)
        else:
            raise ConfigError(f"combiner.weights: scalarize over {len(tasks)} tasks needs --weights "
                              "(one per task, summing to 1); --alpha covers pairs only")
        self.weights = dict(zip(tasks, weights))

    def combine(self, losses: dict[str, torch.Tensor], share: float = 1.0) -> torch.Tensor:
        return sum(self.weights[t] * loss for t, loss in losses.items())

    def task_weights(self) -> dict[str, float]:
        return dict(self.weights)
