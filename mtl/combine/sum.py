"""Loss addition: L = sum of the task losses."""
from __future__ import annotations

import torch

from mtl.combine.base import Combiner, register


@register("sum")
class Sum(Combiner):
    """Loss addition: the task losses summed (the reference study's baseline)."""
    def combine(self, losses: dict[str, torch.Tensor], share: float = 1.0) -> torch.Tensor:
        return sum(losses.values())

    def task_weights(self) -> dict[str, float]:
        return {t: 1.0 for t in self.task_names}
