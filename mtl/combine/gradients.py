"""The substrate of every method that acts on the tasks' gradients of the shared encoder
(PCGrad, UPGrad, MGDA, CAGrad, Nash-MTL, GradNorm, ...), and why each is exact.

Per micro-batch every task's loss is back-propagated alone and its gradient of the shared
parameters added to its row of one (tasks x parameters) buffer; the heads' gradients add up
as usual.  Once per optimizer step (``before_optimizer_step``):

1. the buffer is averaged over workers (one collective for all tasks) and so are the heads'
   gradients: every rank now holds the step's exact global per-task gradients, whatever the
   workers, micro-batches and their uneven sizes (the losses are shares of the global mean);
2. with loss weights given (``--alpha``/``--weights``), row t is scaled by T*w_t (equal
   weights are the plain method) -- the weighted surgery of the seed studies;
3. the T x T Gram matrix, unscaled by the fp16 loss scale, goes to the method, which returns
   one weight per task (or, for the few that are not a combination of the rows, a vector);
   a weight computed by a solver is broadcast from rank 0, so every rank steps alike;
4. sum_t w_t g_t is written in place into the buffer and handed to the parameters as views.

A non-finite Gram matrix (an fp16 overflow) skips the method: the plain sum carries the
inf/NaN on and the scaler skips the step.  Random choices (shuffles, random weights, masks)
come from the run's seed and the step, the same on every rank and after a resume.

Cost: T backward passes per micro-batch (the cost class "T backwards"), the T x P buffer
while the step's gradients exist, one all-reduce of it, and a T x T matmul.
"""
from __future__ import annotations

import contextlib
from typing import ClassVar

import torch

from mtl.combine.base import Combiner
from mtl.config import CombinerConfig
from mtl.conflict import gram_of_rows
from mtl.errors import ConfigError


class TaskGradients:
    """Each task's gradient of the shared parameters, as the rows of one (tasks x parameters)
    buffer, so that averaging over workers is one collective, the Gram matrix one matmul and
    the weighted sum a few whole-buffer ops: a handful of kernel launches per step, where a
    loop over parameters launches hundreds (and a host sync per dot product).

    Allocated per step (the caching allocator hands the same block back on a GPU) and freed
    with the gradients once the optimizer has stepped, so it holds memory only while the
    per-task gradients exist, as they must for the method."""

    def __init__(self, tasks: tuple[str, ...], params: list[torch.nn.Parameter]):
        self.tasks, self.params = tasks, params
        sizes = [p.numel() for p in params]
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ConfigError(f"combiner: the shared parameters mix dtypes {sorted(map(str, dtypes))}")
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

    def scale(self, tasks: list[str], factors: list[float]) -> None:
        """Row t *= factors[t], in place (one pass over the rows that change)."""
        for t, f in zip(tasks, factors):
            if f != 1.0:
                self.rows[self.tasks.index(t)].mul_(f)

    def write_weighted_sum(self, tasks: list[str], weights: list[float]) -> None:
        """sum_t w_t g_t into the first task's row, in place (the same elementwise operations,
        in the same order, as a per-parameter loop), handed to the parameters as views."""
        index = [self.tasks.index(t) for t in tasks]
        total = self.rows[index[0]].mul_(weights[0])
        for i, w in zip(index[1:], weights[1:]):
            total.add_(self.rows[i], alpha=w)
        self._hand_over(index[0])

    def write_vector(self, tasks: list[str], vector: torch.Tensor) -> None:
        """A method's own combined gradient (not a combination of the rows) into the first row."""
        index = self.tasks.index(tasks[0])
        self.rows[index].copy_(vector)
        self._hand_over(index)

    def _hand_over(self, index: int) -> None:
        for p, v, reached in zip(self.params, self.views[index], self.reached):
            p.grad = v if reached else None


def check_one_per_task(values: tuple[float, ...], tasks: tuple[str, ...], name: str) -> None:
    """A per-task vector setting (--weights, --pref-vector) must have one value per task."""
    if len(values) != len(tasks):
        raise ConfigError(f"{name}: {len(values)} weights given for {len(tasks)} task(s) ({','.join(tasks)})")


def loss_weights(cfg: CombinerConfig, tasks: tuple[str, ...]) -> tuple[float, ...]:
    """Each task's gradient factor T*w_t from --weights (any number of tasks) or --alpha (a
    pair: alpha, 1-alpha); all 1 when neither is given, so equal weights are the plain method."""
    if cfg.weights:
        check_one_per_task(cfg.weights, tasks, "combiner.weights")
        return tuple(len(tasks) * w for w in cfg.weights)
    if cfg.alpha != 0.5:
        if len(tasks) != 2:
            raise ConfigError(f"combiner.alpha: weighs a pair; {cfg.combiner} over {len(tasks)} task(s) "
                              "takes --weights (one per task, summing to 1)")
        return (2 * cfg.alpha, 2 * (1.0 - cfg.alpha))
    return (1.0,) * len(tasks)


class GradientCombiner(Combiner):
    """A method on the step's per-task gradients of the shared parameters.  Subclasses give
    ``weigh`` (weights from the Gram matrix) or, if not a combination of the rows, ``apply``."""
    needs_all_tasks_per_step = True
    # Needs every task's full gradient of the shared parameters on each rank: ZeRO 2 and 3
    # partition gradients, so only stages 0 and 1 keep what the method needs.
    max_zero_stage = 1
    zero_stage_limit = "needs every task's whole gradient of the shared parameters on each worker"
    cost: ClassVar[str] = "T backwards"

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        self.syncs_gradients_itself = True
        self.factors = dict(zip(self.task_names, loss_weights(cfg, self.task_names)))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))   # checkpointed: seeds the step's randomness
        self._grads: TaskGradients | None = None
        self._gram: tuple[list[str], torch.Tensor] | None = None
        self._weights = {t: 1.0 for t in self.task_names}

    def bind(self, model, dist, seed: int = 0) -> None:
        super().bind(model, dist, seed)
        # A plain reference: as a module attribute the model would become part of the combiner.
        self.__dict__["model"] = model
        self.shared = model.shared_parameters()
        shared_ids = {id(p) for p in self.shared}
        self.task_params = [p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids]

    def combine(self, losses: dict[str, torch.Tensor], share: float = 1.0) -> torch.Tensor:
        return sum(losses.values())

    def task_weights(self) -> dict[str, float]:
        return dict(self._weights)

    def step_seed(self) -> int:
        """The seed of this step's random choices: the same on every rank and after a resume."""
        return self.seed * 7919 + int(self.steps)

    @contextlib.contextmanager
    def seeded(self, device: torch.device):
        """torch's global generators seeded for this step, then put back as they were, so a
        method's randomness neither differs across ranks nor shifts the training's (dropout)."""
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.step_seed())
            yield

    def backward(self, losses, backward, share=1.0):
        if self._grads is None:
            self._grads = TaskGradients(self.task_names, self.shared)
        for task, loss in losses.items():
            backward(loss)
            self._grads.take(task)
        return sum(l.detach() for l in losses.values())

    def before_optimizer_step(self, loss_scale: float = 1.0) -> None:
        super().before_optimizer_step(loss_scale)
        grads, self._grads = self._grads, None
        if self.dist.distributed:
            self.dist.all_reduce_mean(grads.rows)        # every task's gradients: one collective
            for p in self.task_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.dist.all_reduce_mean(p.grad)
        tasks = grads.seen()
        grads.scale(tasks, [self.factors[t] for t in tasks])
        gram = gram_of_rows(grads.rows_of(tasks)) / (loss_scale * loss_scale)    # unscaled; a host sync
        if bool(torch.isfinite(gram).all()):
            with self.seeded(grads.rows.device):
                self.apply(grads, tasks, gram, loss_scale)
            self._gram = (tasks, gram)
        else:
            # An fp16 overflow: the plain sum carries the inf/NaN on, and the scaler skips the step.
            grads.write_weighted_sum(tasks, [1.0] * len(tasks))
            self._gram = None
        self.steps += 1

    def apply(self, grads: TaskGradients, tasks: list[str], gram: torch.Tensor, loss_scale: float) -> None:
        """Write the combined gradient: by default sum_t w_t g_t with ``weigh``'s weights,
        rank 0's on every rank (T numbers; a solver's last digits could differ across ranks)."""
        weights = self.weigh(gram, tasks, grads, loss_scale).double().reshape(-1)
        if self.dist.distributed:
            weights = self.dist.broadcast(weights.to(self.dist.device)).cpu()
        weights = weights.tolist()
        self._weights.update({t: w * self.factors[t] for t, w in zip(tasks, weights)})
        grads.write_weighted_sum(tasks, weights)

    def weigh(self, gram: torch.Tensor, tasks: list[str], grads: TaskGradients, loss_scale: float) -> torch.Tensor:
        """The weight of each (scaled) task gradient, from the float64 Gram matrix on the CPU."""
        raise NotImplementedError

    def task_gram(self):
        gram, self._gram = self._gram, None
        return gram


def gram_factor(gram: torch.Tensor) -> torch.Tensor:
    """A T x T matrix L with L L^T = G: for a method written for the T x P matrix whose
    result depends on it only through inner products, so it runs on T x T numbers instead."""
    values, vectors = torch.linalg.eigh(gram)
    return vectors * values.clamp(min=0).sqrt()
