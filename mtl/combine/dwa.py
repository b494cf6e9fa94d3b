"""Dynamic weight average (DWA; Liu, Johns and Davison 2019, "End-to-End Multi-Task Learning
with Attention"): w_t = T softmax_t(r_t / temperature), r_t = L_t(e-1) / L_t(e-2), the ratio of
each task's mean training loss over the last two epochs; w = 1 for the first two epochs.

The epoch means are global (every worker's summed losses, one collective per epoch) and the
weights are fixed within an epoch, so the combination is linear in each step's losses: exact
under DDP and accumulation, one backward.  The running sums are buffers, so a trial resumed
part-way through an epoch continues the same means.
"""
from __future__ import annotations

import torch

from mtl.combine.base import Combiner, register
from mtl.config import CombinerConfig


@register("dwa")
class DWA(Combiner):
    """Dynamic weight average (Liu et al. 2019): weights from the ratio of each task's last two epoch losses."""
    needs_all_tasks_per_step = True

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        t = len(tasks)
        self.register_buffer("sums", torch.zeros(t, dtype=torch.float64))      # this epoch, this worker
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))        # this epoch
        self.register_buffer("history", torch.zeros(2, t, dtype=torch.float64))   # epoch means: e-2, e-1
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))
        self.register_buffer("weights", torch.ones(t, dtype=torch.float64))

    def combine(self, losses: dict[str, torch.Tensor], share: float = 1.0) -> torch.Tensor:
        for t, loss in losses.items():
            self.sums[self.task_names.index(t)] += loss.detach().double().squeeze()
        return sum(float(self.weights[self.task_names.index(t)]) * loss for t, loss in losses.items())

    def before_optimizer_step(self, loss_scale: float = 1.0) -> None:
        super().before_optimizer_step(loss_scale)
        self.steps += 1

    def end_epoch(self) -> None:
        mean = self.dist.all_reduce_mean(self.sums.to(self.dist.device)).cpu() / max(int(self.steps), 1)
        self.history.copy_(torch.stack([self.history[1], mean]))
        self.epochs += 1
        self.sums.zero_()
        self.steps.zero_()
        if int(self.epochs) >= 2:
            rates = self.history[1] / self.history[0].clamp(min=1e-12)
            self.weights.copy_(len(self.task_names) * torch.softmax(rates / self.cfg.dwa_temperature, 0))

    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.weights.tolist()))
