"""The interface every regulariser implements, and why its terms are exact.

Per micro-batch, after the forward and the task losses (``Trainer.shares``) and before the
combiner sees them, the trainer calls, inside the strategy's autocast::

    terms = regularizer.terms(micro)          # task -> a scalar tensor, with its graph
    losses[t] = losses[t] + terms[t]          # the term JOINS EACH TASK'S LOSS

so the combiner acts on regularised task losses: a gradient method (PCGrad, ...) back-propagates
each task's loss alone and its surgery sees each task's regularised gradient; uncertainty or DTP
weigh the term with its task.  After every optimizer step taken: ``after_optimizer_step()``
(SMART's momentum copy).  A regulariser with state (``stateful``) is checkpointed by the
trainer as "regularizer" (``state_dict``/``load_state_dict``), so a resume is exact.

Exactness (the same contract as the task losses): every term is this worker's share of the
step's global objective, so summed over micro-batches and averaged over workers (DDP's one
gradient reduction) it is exactly the term of the whole step, whatever the split:

- a per-example term (SMART) is ``weight x sum over this micro-batch's examples x world_size /
  global_count[task]``, like the task losses;
- a weight penalty R (l1, linf) is not per example: every worker computes the same value, so
  each micro-batch adds ``lambda x R x share / T`` to each of the step's T tasks (``share`` =
  1 / number of micro-batches): the step's objective gets exactly lambda x R once, and DDP's
  average of identical values leaves it so;
- a task-scoped penalty (mse_lasso's head L1) adds ``weight x R_task x share`` to that task
  only (not divided by T).

Random numbers (SMART's random start) come from generators seeded by the run's seed, the step,
the task and each example's index in the task's training set: never from torch's global
generator, and independent of how the step's examples are split over workers and micro-batches.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class MicroBatch:
    """What a regulariser sees of one micro-batch: the tasks' batches and the model's outputs
    of the step's forward (with their graph), each task's example indices in its training set,
    and how this micro-batch's share of the step is counted."""
    batches: dict              # task -> TaskBatch, on the device
    outputs: dict              # task -> the forward's output (the graph kept)
    indices: dict              # task -> example indices in the task's training set (Step.micro[i])
    global_count: dict         # task -> examples of the task in the whole step (all workers)
    world_size: int
    share: float               # this micro-batch's fraction of the step: 1 / len(Step.micro)
    step: int                  # the optimizer step being taken (1-based; the same after a resume)

    def example_weight(self, task: str) -> float:
        """Factor turning a sum over this micro-batch's examples into its share of the global mean."""
        return self.world_size / self.global_count[task]


class Regularizer:
    """A term of the training objective; see the module docstring for the contract."""
    name: ClassVar[str] = "none"
    stateful: ClassVar[bool] = False       # checkpointed as "regularizer" when True

    @property
    def active(self) -> bool:
        """False: no terms at all (the trainer's path is then exactly as without a regulariser)."""
        return True

    def terms(self, micro: MicroBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """After every optimizer step taken (a skipped fp16 step changed no weight)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoRegularizer(Regularizer):
    @property
    def active(self) -> bool:
        return False

    def terms(self, micro: MicroBatch) -> dict[str, torch.Tensor]:
        return {}


class Composite(Regularizer):
    """Several regularisers at once (the chosen one, and mse_lasso's task-scoped terms): their
    terms add up per task."""

    def __init__(self, parts: list[Regularizer]):
        self.parts = [p for p in parts if p.active]

    @property
    def active(self) -> bool:
        return bool(self.parts)

    @property
    def stateful(self) -> bool:      # type: ignore[override]
        return any(p.stateful for p in self.parts)

    def terms(self, micro: MicroBatch) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for part in self.parts:
            for t, term in part.terms(micro).items():
                out[t] = out[t] + term if t in out else term
        return out

    def after_optimizer_step(self) -> None:
        for part in self.parts:
            part.after_optimizer_step()

    def state_dict(self) -> dict:
        return {p.name: p.state_dict() for p in self.parts if p.stateful}

    def load_state_dict(self, state: dict) -> None:
        for p in self.parts:
            if p.stateful:
                p.load_state_dict(state[p.name])


def task_key(task: str) -> int:
    """A task name as a stable integer (Python's hash() of a str changes per process)."""
    return zlib.crc32(task.encode())
