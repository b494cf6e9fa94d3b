"""PCGrad gradient surgery (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning").

For each task i, in a random order of the other tasks j: where g_i (as projected so far)
conflicts with g_j (negative dot product), g_i loses its component along g_j.  The projected
gradients are summed (or averaged) into the shared parameters' gradient.  Task heads keep
their own task's plain gradient.

``pcgrad_on=params`` (exact): every task's loss is back-propagated alone, the shared
gradients of each task are accumulated over micro-batches in a flat buffer, averaged over
workers, unscaled, and projected once per optimizer step, identically on every rank.

``pcgrad_on=representation`` (approximation, cheaper): the projection directions are the
tasks' mean gradients with respect to their pooled sentence vectors (one H-vector per task,
averaged over workers); each example's representation gradient is projected with the same
sequence of projections, and the encoder is back-propagated once for all tasks.  It needs
no per-task parameter buffers, but decides conflicts per micro-batch and in representation
space, so it is not PCGrad on the encoder's parameters.
"""
from __future__ import annotations

import torch

from mtl.combine.base import Combiner, register
from mtl.config import CombinerConfig


def surgery(grads: list[torch.Tensor], generator: torch.Generator) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Project each gradient off the others it conflicts with.  Returns the projected
    gradients and, per task, the tasks it was projected against, in the order applied."""
    projected, plans = [], []
    for i, g in enumerate(grads):
        g = g.clone()
        plan = []
        for j in torch.randperm(len(grads), generator=generator).tolist():
            if j == i:
                continue
            norm_sq = grads[j].double().pow(2).sum()
            dot = torch.dot(g.double(), grads[j].double())
            if dot < 0 and norm_sq > 0:
                g -= (dot / norm_sq).to(g.dtype) * grads[j]
                plan.append(j)
        projected.append(g)
        plans.append(plan)
    return projected, plans


@register("pcgrad")
class PCGrad(Combiner):
    needs_all_tasks_per_step = True
    # Needs every task's full gradient of the shared parameters on each rank: ZeRO 2 and 3
    # partition gradients, so only stages 0 and 1 keep what the surgery needs.
    max_zero_stage = 1

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        self.on_params = cfg.pcgrad_on == "params"
        self.syncs_gradients_itself = self.on_params
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))   # checkpointed: the shuffle's seed
        self._task_grads: dict[str, torch.Tensor] = {}
        self._last: dict[str, torch.Tensor] | None = None

    def bind(self, model, dist, seed: int = 0) -> None:
        super().bind(model, dist, seed)
        # A plain reference: as a module attribute the model would become part of the combiner.
        self.__dict__["model"] = model
        self.shared = model.shared_parameters()
        shared_ids = {id(p) for p in self.shared}
        self.task_params = [p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids]

    def _generator(self) -> torch.Generator:
        """The shuffle of each step: from the run's seed and the step, so the same on every rank."""
        return torch.Generator().manual_seed(self.seed * 7919 + int(self.steps))

    def combine(self, losses: dict[str, torch.Tensor], share: float = 1.0) -> torch.Tensor:
        return sum(losses.values())

    def task_weights(self) -> dict[str, float]:
        w = 1.0 if self.cfg.pcgrad_reduction == "sum" else 1.0 / len(self.task_names)
        return {t: w for t in self.task_names}

    # --- params mode -------------------------------------------------------------------------
    def backward(self, losses, backward, share=1.0):
        if not self.on_params:
            return self._representation_backward(losses, backward)
        for task, loss in losses.items():
            backward(loss)
            self._harvest(task)
        return sum(l.detach() for l in losses.values())

    def _harvest(self, task: str) -> None:
        """Move the shared parameters' gradient into the task's flat buffer."""
        buf = self._task_grads.get(task)
        if buf is None:
            n = sum(p.numel() for p in self.shared)
            buf = self._task_grads[task] = torch.zeros(n, device=self.shared[0].device, dtype=torch.float32)
        offset = 0
        for p in self.shared:
            if p.grad is not None:    # a parameter the task does not reach counts as zero
                buf[offset:offset + p.numel()].add_(p.grad.reshape(-1))
                p.grad = None
            offset += p.numel()

    def before_optimizer_step(self, loss_scale: float = 1.0) -> None:
        super().before_optimizer_step(loss_scale)
        if not self.on_params:
            self.steps += 1
            return
        tasks = [t for t in self.task_names if t in self._task_grads]
        if self.dist.distributed:
            for t in tasks:
                self.dist.all_reduce_mean(self._task_grads[t])
            for p in self.task_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.dist.all_reduce_mean(p.grad)
        grads = [self._task_grads[t] / loss_scale for t in tasks]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            projected, _ = surgery(grads, self._generator())
            total = torch.stack(projected).sum(0)
            if self.cfg.pcgrad_reduction == "mean":
                total /= len(projected)
            self._last = dict(zip(tasks, grads))
        else:
            # An fp16 overflow: hand the non-finite sum on, and the scaler skips the step.
            total, self._last = torch.stack(grads).sum(0), None
        total *= loss_scale    # the trainer unscales .grad next, like every other gradient
        offset = 0
        for p in self.shared:
            p.grad = total[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        for buf in self._task_grads.values():
            buf.zero_()
        self.steps += 1

    def task_gradients(self):
        last, self._last = self._last, None
        return last

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
