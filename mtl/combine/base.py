"""The interface every loss-combination method implements.

Per optimizer step the trainer calls, for each micro-batch (gradient accumulation):

    combiner.observe(outputs, batches)                   # e.g. DTP's training KPIs
    combiner.backward(losses, backward, share)           # accumulate this micro-batch's gradients

and then once, after the last micro-batch and before the optimizer step:

    combiner.before_optimizer_step(loss_scale)           # e.g. PCGrad's surgery

A method whose combination is not linear in the step's losses (a geometric mean, a
log-sum-exp) declares ``uses_step_losses``: before the first backward the trainer hands it the
step's global per-task losses (``see_step_losses``), so it weighs every micro-batch on every
worker by the same numbers; after the optimizer step, ``after_optimizer_step`` may ask for the
losses again on the same batches (FAMO; an extra forward).  ``end_epoch`` follows each
complete epoch (DWA's loss history).

``losses`` holds each task's loss as this worker's share of the step's global mean (they
add up, over micro-batches and averaged over workers, to the mean over the whole step),
so a combiner that is linear in the losses is exact under accumulation and DDP.  ``share``
is the micro-batch's fraction of the step, for terms that are not per-example (such as
uncertainty weighting's log-sigma).  Learnable weights are parameters of the combiner (an
``nn.Module``): the trainer optimises and checkpoints them with the model.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn as nn

from mtl.config import CombinerConfig
from mtl.dist import DistContext


class Combiner(nn.Module):
    # A method that compares or weighs tasks within a step cannot run when a step holds one task.
    needs_all_tasks_per_step: ClassVar[bool] = False
    # The highest DeepSpeed ZeRO stage whose partitioning the method can work with, and why.
    max_zero_stage: ClassVar[int] = 3
    zero_stage_limit: ClassVar[str] = ""
    # What a step costs beside loss addition: "one backward" (per micro-batch, like addition),
    # "T backwards" (one per task: the methods on task gradients) or "extra forward".
    cost: ClassVar[str] = "one backward"
    # The combination depends on the whole step's losses (not linear in them): see_step_losses.
    uses_step_losses: ClassVar[bool] = False

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__()
        self.task_names = tuple(tasks)
        self.cfg = cfg
        self.dist, self.seed = DistContext(), 0
        # True when the method averages gradients across workers itself (DDP must not).
        self.syncs_gradients_itself = False

    def bind(self, model: nn.Module, dist: DistContext, seed: int = 0) -> None:
        """Called once the model exists: what the method needs of it, of the workers and the seed."""
        self.dist, self.seed = dist, seed

    @classmethod
    def fuses(cls) -> bool:
        """Whether trials of this method can train in a fused group (mtl.fused): its step is
        one backward of ``combine``'s loss, which the group records and back-propagates for all
        members at once.  A method with its own backward passes (on task gradients) or that
        needs the step's losses first (an extra forward) runs alone."""
        return cls.backward is Combiner.backward and not cls.uses_step_losses and cls.cost == "one backward"

    def combine(self, losses: dict[str, torch.Tensor], share: float) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, outputs: dict[str, torch.Tensor], batches: dict) -> None:
        """Sees each micro-batch's outputs and labels (before backward)."""

    def backward(self, losses: dict[str, torch.Tensor], backward: Callable[[torch.Tensor], None],
                 share: float = 1.0) -> torch.Tensor:
        """Accumulate this micro-batch's gradients.  ``backward(loss)`` is the strategy's: it
        applies the fp16 loss scale (and is DeepSpeed's engine.backward under DeepSpeed).
        Returns the combined loss (detached) for logging."""
        total = self.combine(losses, share)
        backward(total)
        return total.detach()

    def before_optimizer_step(self, loss_scale: float = 1.0) -> None:
        """Once per optimizer step, after all micro-batches, before unscaling and clipping.
        The combiner's own parameters are outside DDP: average their gradients here."""
        for p in self.parameters():
            if p.grad is not None:
                self.dist.all_reduce_mean(p.grad)

    def after_evaluation(self, metrics: dict[str, float]) -> None:
        """Sees the dev metrics after each evaluation (identical on every worker)."""

    def see_step_losses(self, losses: dict[str, torch.Tensor]) -> None:
        """With ``uses_step_losses``: the step's global per-task losses, before any backward."""

    def after_optimizer_step(self, recompute: Callable[[], dict[str, torch.Tensor]]) -> None:
        """After the optimizer step; ``recompute()`` gives the step's global losses on the same
        batches with the updated weights (an extra forward without gradients, only if called)."""

    def end_epoch(self) -> None:
        """After each complete epoch."""

    def task_gram(self) -> tuple[list[str], torch.Tensor] | None:
        """(tasks, Gram matrix of their gradients of the shared parameters) from the last step,
        if the method computed it anyway (then conflict monitoring costs nothing extra)."""
        return None

    def task_weights(self) -> dict[str, float]:
        """The weight each task's loss currently gets, for logging."""
        raise NotImplementedError

    def extra_scalars(self) -> dict[str, float]:
        """Method-specific values for TensorBoard (sigmas, KPIs, ...)."""
        return {}


COMBINERS: dict[str, type[Combiner]] = {}


def register(name: str):
    def wrap(cls: type[Combiner]) -> type[Combiner]:
        cls.name = name
        COMBINERS[name] = cls
        return cls
    return wrap
