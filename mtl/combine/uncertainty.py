"""Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla 2018).

One learnable s_t = log sigma_t^2 per task, optimised with the model:
classification tasks (SEN, PAR) add exp(-s) L + s/2   (= L / sigma^2 + log sigma),
regression (SIM) adds        exp(-s) L / 2 + s/2      (= L / (2 sigma^2) + log sigma)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from mtl.combine.base import Combiner, register
from mtl.config import CombinerConfig
from mtl.tasks import TASKS


@register("uncertainty")
class Uncertainty(Combiner):
    """Uncertainty weighting (Kendall et al. 2018): learnable per-task log variances."""
    # ZeRO 3 partitions parameters and gathers them only inside a module's forward; the log
    # variances are read in combine(), after the model's forward.
    max_zero_stage = 2
    zero_stage_limit = "reads its learnable loss weights outside the model's forward"

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        self.log_var = nn.Parameter(torch.zeros(len(tasks)))
        self.factor = [0.5 if TASKS[t].regression else 1.0 for t in tasks]

    def combine(self, losses: dict[str, torch.Tensor], share: float = 1.0) -> torch.Tensor:
        total = 0.0
        for i, task in enumerate(self.task_names):
            if task in losses:
                s = self.log_var[i]
                # log sigma is a per-step term: each micro-batch adds its share of it
                total = total + self.factor[i] * torch.exp(-s) * losses[task] + share * 0.5 * s
        return total

    def task_weights(self) -> dict[str, float]:
        return {t: self.factor[i] * math.exp(-float(self.log_var[i].detach())) for i, t in enumerate(self.task_names)}

    def extra_scalars(self) -> dict[str, float]:
        return {f"sigma/{t}": math.exp(0.5 * float(self.log_var[i].detach())) for i, t in enumerate(self.task_names)}
