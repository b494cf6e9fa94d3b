"""IMTL-L (Liu et al. 2021, "Towards Impartial Multi-task Learning"), the loss part: a learnable
log-scale s_t per task, L = sum_t exp(s_t) L_t - s_t, so each task's scaled loss is driven to
the same value (at the optimum exp(s_t) L_t = 1).

Written here rather than through TorchJD's IMTLL because exactness needs the -s_t term split
over micro-batches by their share of the step (as uncertainty weighting's log sigma); the
scales are parameters of the combiner, stepped by the trainer's optimizer at --combiner-lr.
"""
from __future__ import annotations

import torch

from mtl.combine.base import Combiner, register
from mtl.config import CombinerConfig


@register("imtl_l")
class IMTLL(Combiner):
    """IMTL-L (Liu et al. 2021): learnable loss scales exp(s) L - s that equalise the scaled losses."""
    needs_all_tasks_per_step = False
    max_zero_stage = 2
    zero_stage_limit = "reads its learnable loss scales outside the model's forward"

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        self.log_scale = torch.nn.Parameter(torch.zeros(len(tasks)))

    def combine(self, losses: dict[str, torch.Tensor], share: float = 1.0) -> torch.Tensor:
        total = 0.0
        for t, loss in losses.items():
            s = self.log_scale[self.task_names.index(t)]
            total = total + torch.exp(s) * loss - s * share
        return total

    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, torch.exp(self.log_scale.detach()).tolist()))
