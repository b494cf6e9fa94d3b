"""GradNorm (Chen et al. 2018, "GradNorm: Gradient Normalization for Adaptive Loss Balancing").

Learnable task weights w (summing to T) fitted so that each task's weighted gradient norm
G_i = ||w_i g_i|| tracks the mean norm scaled by the task's relative training rate:
target_i = mean_j(G_j) * r_i^alpha, with r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0)).  The
weights descend L_grad = sum_i |G_i - target_i| with the target held constant, so
dL_grad/dw_i = sign(G_i - target_i) * ||g_i||; the model descends sum_i w_i L_i.

The paper measures G_i on the last shared layer to save backward passes; here every task's
gradient of all the shared parameters is already in the buffer (the cost class "T
backwards"), so G_i is read off the Gram matrix's diagonal, exactly, for free.  The losses
are the step's global ones (one small collective), so the weights are the same on every
rank; they are a parameter of the combiner, stepped by the trainer's optimizer at
--combiner-lr and checkpointed with it, as is L(0).
"""
from __future__ import annotations

import torch

from mtl.combine.base import register
from mtl.combine.gradients import GradientCombiner
from mtl.config import CombinerConfig


@register("gradnorm")
class GradNorm(GradientCombiner):
    """GradNorm (Chen et al. 2018): learnable weights that balance the tasks' gradient norms by training rate."""

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        self.weights = torch.nn.Parameter(torch.ones(len(tasks)))
        self.register_buffer("initial_losses", torch.zeros(len(tasks)))     # L(0); zeros: not yet seen
        self._loss_sums: dict[str, torch.Tensor] = {}

    def step_weights(self) -> dict[str, torch.Tensor]:
        """The weights of this step, renormalised to sum to T after the optimizer moved them."""
        if not self._loss_sums:
            with torch.no_grad():
                self.weights.clamp_(min=1e-4).mul_(len(self.task_names) / self.weights.sum())
        return {t: self.weights[i].detach() for i, t in enumerate(self.task_names)}

    def backward(self, losses, backward, share=1.0):
        w = self.step_weights()
        for t, loss in losses.items():
            self._loss_sums[t] = self._loss_sums.get(t, 0.0) + loss.detach().float()
        return super().backward({t: w[t] * loss for t, loss in losses.items()}, backward, share)

    def before_optimizer_step(self, loss_scale: float = 1.0) -> None:
        sums, self._loss_sums = self._loss_sums, {}
        device = self.initial_losses.device
        self._losses = self.dist.all_reduce_mean(torch.stack(
            [torch.as_tensor(sums.get(t, 0.0), device=device, dtype=torch.float32) for t in self.task_names]))
        if not bool(self.initial_losses.any()):                          # a host sync, the first step only
            self.initial_losses.copy_(self._losses)
        super().before_optimizer_step(loss_scale)

    def apply(self, grads, tasks, gram, loss_scale):
        index = [self.task_names.index(t) for t in tasks]
        w = self.weights.detach().double().cpu()[index]
        norms = gram.diagonal().clamp(min=0).sqrt()                      # G_i = ||w_i g_i||
        rate = (self._losses.double().cpu() / self.initial_losses.double().cpu().clamp(min=1e-12))[index]
        target = norms.mean() * (rate / rate.mean()) ** self.cfg.gradnorm_alpha
        grad = torch.zeros(len(self.task_names), dtype=torch.float64)
        grad[index] = torch.sign(norms - target) * norms / w            # sign(G_i - target_i) * ||g_i||
        self.weights.grad = grad.to(self.weights)
        self._weights.update({t: float(w[k]) for k, t in enumerate(tasks)})
        grads.write_weighted_sum(tasks, [1.0] * len(tasks))              # the rows already carry w_i

    def extra_scalars(self) -> dict[str, float]:
        return {f"gradnorm_weight/{t}": float(self.weights[i].detach()) for i, t in enumerate(self.task_names)}
