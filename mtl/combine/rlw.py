"""Random loss weighting (RLW; Lin et al. 2022, "Reasonable Effectiveness of Random Weighting"):
each step the losses are weighted by softmax(z), z ~ N(0, I) drawn afresh.

A baseline every weighting method should beat.  The draw comes from the run's seed and the
step (the same on every rank and after a resume) and is fixed for the whole step, so the
combination is linear in the losses: exact under DDP and accumulation, one backward.
"""
from __future__ import annotations

import torch

from mtl.combine.base import Combiner, register
from mtl.config import CombinerConfig


@register("rlw")
class RLW(Combiner):
    """Random loss weighting (Lin et al. 2022): softmax of normal draws as loss weights, fresh every step."""
    needs_all_tasks_per_step = True

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))   # checkpointed: seeds the draw

    def draw(self) -> dict[str, float]:
        generator = torch.Generator().manual_seed(self.seed * 7919 + int(self.steps))
        weights = torch.softmax(torch.randn(len(self.task_names), generator=generator, dtype=torch.float64), 0)
        return dict(zip(self.task_names, weights.tolist()))

    def combine(self, losses: dict[str, torch.Tensor], share: float = 1.0) -> torch.Tensor:
        weights = self._last = self.draw()
        return sum(weights[t] * loss for t, loss in losses.items())

    def before_optimizer_step(self, loss_scale: float = 1.0) -> None:
        super().before_optimizer_step(loss_scale)
        self.steps += 1

    def task_weights(self) -> dict[str, float]:
        return getattr(self, "_last", None) or self.draw()      # the weights the last step used
