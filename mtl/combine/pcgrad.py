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
from mtl.conflict import gram_of_rows
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


class TaskGradients:
    """Each task's gradient of the shared parameters, as the rows of one (tasks x parameters)
    buffer, so that averaging over workers is one collective, the Gram matrix one matmul and
    the weighted sum a few whole-buffer ops: a handful of kernel launches per step, where a
    loop over parameters launches hundreds (and a host sync per dot product).

    Allocated per step (the caching allocator hands the same block back on a GPU) and freed
    with the gradients once the optimizer has stepped, so it holds memory only while the
    per-task gradients exist, as they must for the surgery."""

    def __init__(self, tasks: tuple[str, ...], params: list[torch.nn.Parameter]):
        self.tasks, self.params = tasks, params
        sizes = [p.numel() for p in params]
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ConfigError(f"pcgrad: the shared parameters mix dtypes {sorted(map(str, dtypes))}")
        self.rows = torch.zeros(len(tasks), sum(sizes), dtype=dtypes.pop(), device=params[0].device)
        # Per task, the views of its row shaped like each parameter (no copies).
        self.views = [[v.view_as(p) for v, p in zip(row.split(sizes), params)] for row in self.rows]
        self.reached = [False] * len(params)     # by any task; None stays None for the optimizer
        self._seen: set[str] = set()

    def take(self, task: str) -> None:
        """Add the shared parameters' gradients (this task's alone) to its row and clear them.
        One fused add over all parameters; a parameter the task never reached adds nothing."""
        k = [i for i, p in enumerate(self.params) if p.grad is not None]
        if k:
            row = self.views[self.tasks.index(task)]
            torch._foreach_add_([row[i] for i in k], [self.params[i].grad for i in k])
        for i in k:
            self.params[i].grad = None
            self.reached[i] = True
        self._seen.add(task)

    def seen(self) -> list[str]:
        return [t for t in self.tasks if t in self._seen]

    def rows_of(self, tasks: list[str]) -> torch.Tensor:
        if len(tasks) == len(self.tasks):
            return self.rows
        return self.rows[[self.tasks.index(t) for t in tasks]]      # a copy; only when a task is missing

    def write_weighted_sum(self, tasks: list[str], weights: list[float]) -> None:
        """sum_t w_t g_t into the first task's row, in place (the same elementwise operations,
        in the same order, as a per-parameter loop), handed to the parameters as views."""
        index = [self.tasks.index(t) for t in tasks]
        total = self.rows[index[0]].mul_(weights[0])
        for i, w in zip(index[1:], weights[1:]):
            total.add_(self.rows[i], alpha=w)
        for p, v, reached in zip(self.params, self.views[index[0]], self.reached):
            p.grad = v if reached else None


@register("pcgrad")
class PCGrad(Combiner):
    needs_all_tasks_per_step = True
    # Needs every task's full gradient of the shared parameters on each rank: ZeRO 2 and 3
    # partition gradients, so only stages 0 and 1 keep what the surgery needs.
    max_zero_stage = 1
    zero_stage_limit = "needs every task's whole gradient of the shared parameters on each worker"

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        self.on_params = cfg.pcgrad_on == "params"
        self.syncs_gradients_itself = self.on_params
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))   # checkpointed: the shuffle's seed
        self._grads: TaskGradients | None = None
        self._gram: tuple[list[str], torch.Tensor] | None = None

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
        if self._grads is None:
            self._grads = TaskGradients(self.task_names, self.shared)
        for task, loss in losses.items():
            backward(loss)
            self._grads.take(task)
        return sum(l.detach() for l in losses.values())

    def before_optimizer_step(self, loss_scale: float = 1.0) -> None:
        super().before_optimizer_step(loss_scale)
        if not self.on_params:
            self.steps += 1
            return
        grads, self._grads = self._grads, None
        if self.dist.distributed:
            self.dist.all_reduce_mean(grads.rows)        # every task's gradients: one collective
            for p in self.task_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.dist.all_reduce_mean(p.grad)
        tasks = grads.seen()
        gram = gram_of_rows(grads.rows_of(tasks)) / (loss_scale * loss_scale)    # unscaled; a host sync
        if bool(torch.isfinite(gram).all()):
            coef, _ = surgery_coefficients(gram, self._generator())
            weights = coef.sum(0)
            if self.cfg.pcgrad_reduction == "mean":
                weights /= len(tasks)
            self._gram = (tasks, gram)
        else:
            # An fp16 overflow: the plain sum carries the inf/NaN on, and the scaler skips the step.
            weights, self._gram = torch.ones(len(tasks), dtype=torch.float64), None
        grads.write_weighted_sum(tasks, weights.tolist())   # still carries the loss scale, like every gradient
        self.steps += 1

    def task_gram(self):
        gram, self._gram = self._gram, None
        return gram

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
