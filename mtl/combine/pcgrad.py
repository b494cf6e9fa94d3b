"""PCGrad gradient surgery (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning").

For each task i, in a random order of the other tasks j: where g_i (as projected so far)
conflicts with g_j (negative dot product), g_i loses its component along g_j.  The projected
gradients are summed (or averaged) into the shared parameters' gradient.  Task heads keep
their own task's plain gradient.

Every projected gradient is a linear combination of the original task gradients, so the
surgery runs on the T x T Gram matrix of the task gradients (exact, in float64): the
parameter-sized vectors are read once to form the Gram matrix and once to write the
weighted sum, which keeps PCGrad's step close to plain loss addition's.

``pcgrad_on=params`` (exact): every task's loss is back-propagated alone; each task's
gradient of the shared parameters is kept (accumulated over micro-batches), averaged over
workers, and the surgery runs once per optimizer step, identically on every rank.  Under
fp16 the Gram matrix is unscaled before the surgery; an overflow is handed to the scaler.

``pcgrad_on=representation`` (approximation, cheaper): the projection directions are the
tasks' mean gradients with respect to their pooled sentence vectors (one H-vector per task,
averaged over workers); each example's representation gradient is projected with the same
sequence of projections, and the encoder is back-propagated once for all tasks.  It keeps
no per-task parameter gradients, but decides conflicts per micro-batch and in representation
space, so it is not PCGrad on the encoder's parameters.
"""
from __future__ import annotations

import torch

from mtl.combine.base import Combiner, register
from mtl.combine.gradients import GradientCombiner
from mtl.config import CombinerConfig
from mtl.errors import ConfigError


def surgery_coefficients(gram: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, list[list[int]]]:
    """PCGrad on a Gram matrix G_ij = g_i . g_j.  Returns C with projected g_i = sum_k C_ik g_k,
    and per task the tasks it was projected against, in the order applied."""
    gram = gram.detach().double().cpu()     # T x T: the loop branches on its values (a host sync)
    t = gram.shape[0]
    coef = torch.eye(t, dtype=torch.float64)
    plans = []
    for i in range(t):
        plan = []
        for j in torch.randperm(t, generator=generator).tolist():
            if j == i or gram[j, j] <= 0:
                continue
            dot = coef[i] @ gram[:, j]            # (projected g_i) . g_j
            if dot < 0:
                coef[i, j] -= dot / gram[j, j]
                plan.append(j)
        plans.append(plan)
    return coef, plans


def surgery(grads: list[torch.Tensor], generator: torch.Generator) -> tuple[list[torch.Tensor], list[list[int]]]:
    """PCGrad on explicit vectors (for small ones, and as the reference the tests check)."""
    stacked = torch.stack([g.double() for g in grads])
    coef, plans = surgery_coefficients(stacked @ stacked.T, generator)
    return [(c.to(stacked.device) @ stacked).to(grads[0].dtype) for c in coef], plans


@register("pcgrad")
class PCGrad(GradientCombiner):
    """PCGrad (Yu et al. 2020): each task gradient projected off the others where they conflict."""

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        self.on_params = cfg.pcgrad_on == "params"
        self.syncs_gradients_itself = self.on_params
        if not self.on_params and any(f != 1.0 for f in self.factors.values()):
            raise ConfigError("combiner.pcgrad_on: loss weights (--alpha/--weights) scale the task gradients of "
                              "the shared parameters; use pcgrad_on=params")

    def _generator(self) -> torch.Generator:
        """The shuffle of each step: from the run's seed and the step, so the same on every rank."""
        return torch.Generator().manual_seed(self.step_seed())

    def task_weights(self) -> dict[str, float]:
        w = 1.0 if self.cfg.pcgrad_reduction == "sum" else 1.0 / len(self.task_names)
        return {t: w * self.factors[t] for t in self.task_names}

    def backward(self, losses, backward, share=1.0):
        if not self.on_params:
            return self._representation_backward(losses, backward)
        return super().backward(losses, backward, share)

    def before_optimizer_step(self, loss_scale: float = 1.0) -> None:
        if self.on_params:
            return super().before_optimizer_step(loss_scale)
        Combiner.before_optimizer_step(self, loss_scale)
        self.steps += 1

    def weigh(self, gram, tasks, grads, loss_scale):
        coef, _ = surgery_coefficients(gram, self._generator())
        weights = coef.sum(0)
        return weights / len(tasks) if self.cfg.pcgrad_reduction == "mean" else weights

    def apply(self, grads, tasks, gram, loss_scale):
        # The surgery's coefficients are exact rationals of G, the same on every rank: no broadcast.
        grads.write_weighted_sum(tasks, self.weigh(gram, tasks, grads, loss_scale).tolist())

    # --- representation mode -----------------------------------------------------------------
    def _representation_backward(self, losses, backward):
        pooled = {t: self.model.last_pooled[t] for t in losses}
        tasks = list(losses)
        row_grads = torch.autograd.grad([losses[t] for t in tasks], [pooled[t] for t in tasks], retain_graph=True)
        directions = torch.stack([g.float().sum(0) for g in row_grads])
        self.dist.all_reduce_mean(directions)   # the same projections on every rank
        _, plans = surgery(list(directions), self._generator())
        factor = 1.0 if self.cfg.pcgrad_reduction == "sum" else 1.0 / len(tasks)
        for i, task in enumerate(tasks):
            units = [directions[j] / directions[j].norm() for j in plans[i]]
            pooled[task].register_hook(lambda g, units=units: _project_rows(g, units, factor))
        total = sum(losses.values())
        backward(total)
        return total.detach()


def _project_rows(grad: torch.Tensor, units: list[torch.Tensor], factor: float) -> torch.Tensor:
    g = grad.float()
    for u in units:
        g = g - (g @ u).unsqueeze(-1) * u
    return (g * factor).to(grad.dtype)
