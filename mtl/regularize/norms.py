"""Weight penalties: l1 (mean |w|), linf (the mean of each weight matrix's max |w|), and
mse_lasso's task-scoped L1 of one head.

"Weight matrices" are the trainable parameters with two or more dimensions (linear layers and
embedding tables): biases and LayerNorm scales (1-D) are left out.  A parameter shared by two
modules (an mlm head tied to the word embeddings) counts once.

Cost: one pass over the weights per micro-batch (an abs and a reduction per matrix, and their
backward: a sign per weight), whatever the batch size; T passes under a gradient method, which
back-propagates each of the T tasks' losses alone.  The penalty does not depend on the
examples, so every worker computes the same value (see base.py for how it is shared out)."""
from __future__ import annotations

import torch
import torch.nn as nn

from mtl.regularize.base import MicroBatch, Regularizer


def weight_matrices(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]


def mean_abs(params: list[nn.Parameter]) -> torch.Tensor:
    """mean |w| over every entry of ``params`` together (sum |w| / n, n all their entries)."""
    n = sum(p.numel() for p in params)
    return torch.stack([p.abs().float().sum() for p in params]).sum() / n


def mean_max_abs(params: list[nn.Parameter]) -> torch.Tensor:
    """The mean over the matrices of each one's max |w|."""
    return torch.stack([p.abs().float().amax() for p in params]).mean()


class WeightPenalty(Regularizer):
    """reg_weight x R(weights), shared out over the step's tasks: R x share / T per task and
    micro-batch (base.py), so the step's objective holds lambda x R exactly once."""

    def __init__(self, model: nn.Module, weight: float, norm: str, separate: bool = False):
        self.params = weight_matrices(model)
        self.weight = weight
        self.norm = mean_abs if norm == "l1" else mean_max_abs
        self.name = norm
        # A combiner that back-propagates each task's loss alone (the gradient methods) frees the
        # graph after each task: each task then needs its own penalty graph (T passes over the
        # weights per micro-batch, forward and backward, instead of one).
        self.separate = separate

    @property
    def active(self) -> bool:
        return self.weight > 0 and bool(self.params)

    def value(self) -> torch.Tensor:
        return self.weight * self.norm(self.params)

    def terms(self, micro: MicroBatch) -> dict[str, torch.Tensor]:
        # One value for all tasks: computed once per micro-batch, each task gets its part of it
        # (one shared graph; one backward sums the parts back to lambda x R x share).
        factor = micro.share / len(micro.global_count)
        if self.separate:
            return {t: self.value() * factor for t in micro.batches}
        part = self.value() * factor
        return {t: part for t in micro.batches}


class HeadLasso(Regularizer):
    """mse_lasso: lasso_weight x mean |w| over the weight matrices of ``model.heads[task]``,
    added to that task's loss only (share of the step per micro-batch, not divided by T)."""
    name = "lasso"

    def __init__(self, model: nn.Module, tasks: list[str], weight: float):
        self.params = {t: weight_matrices(model.heads[t]) for t in tasks}
        self.weight = weight

    @property
    def active(self) -> bool:
        return self.weight > 0 and any(self.params.values())

    def value(self, task: str) -> torch.Tensor:
        return self.weight * mean_abs(self.params[task])

    def terms(self, micro: MicroBatch) -> dict[str, torch.Tensor]:
        return {t: self.value(t) * micro.share for t in micro.batches if self.params.get(t)}
