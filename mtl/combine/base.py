"""The interface every loss-combination method implements.

A combiner receives the step's per-task losses (each already the mean over the step's
examples of that task, as this worker's share) and turns them into gradients: by default
it builds one combined loss and back-propagates it; gradient-surgery methods override
``backward`` to work on per-task gradients instead.  Learnable weights are parameters of
the combiner (an ``nn.Module``): the trainer optimises and checkpoints them with the model.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn as nn

from mtl.config import CombinerConfig


class Combiner(nn.Module):
    # A method that compares or weighs tasks within a step cannot run when a step holds one task.
    needs_all_tasks_per_step: ClassVar[bool] = False

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__()
        self.task_names = tuple(tasks)
        self.cfg = cfg

    def combine(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, losses: dict[str, torch.Tensor], scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Accumulate this micro-batch's gradients; ``scale`` applies the fp16 loss scale.
        Returns the combined loss (detached) for logging."""
        total = self.combine(losses)
        scale(total).backward()
        return total.detach()

    def before_optimizer_step(self) -> None:
        """Called once per optimizer step, after all micro-batches and before clipping."""

    def task_weights(self) -> dict[str, float]:
        """The weight each task's loss currently gets, for logging."""
        raise NotImplementedError


COMBINERS: dict[str, type[Combiner]] = {}


def register(name: str):
    def wrap(cls: type[Combiner]) -> type[Combiner]:
        cls.name = name
        COMBINERS[name] = cls
        return cls
    return wrap
