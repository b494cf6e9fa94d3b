"""Loss-only methods that are not linear in the losses, from TorchJD's ``scalarization``:
the geometric mean, smooth Tchebycheff (STCH) and FAMO.  One backward per step.

A scalarizer f combines the step's task losses; its gradient is sum_t w_t grad L_t with
w_t = df/dL_t at the step's losses.  Applied per micro-batch or per worker, f would see a
part of the step and weigh it differently (not exact).  So the trainer hands the method the
step's global losses first (``see_step_losses``: from the forward itself without accumulation,
one small collective; under --grad-accum from a forward without gradients, an extra forward),
w is computed from them once by autograd through TorchJD's f, and every micro-batch on every
worker back-propagates sum_t w_t L_t: the same gradient as f of the whole step, exactly.

FAMO also updates its task logits from how much each loss fell across the step: the losses
recomputed on the same batches after the optimizer step (an extra forward, with the step's
own dropout masks), global, so the logits are the same on every rank.  Its logits and their
Adam state are checkpointed.
"""
from __future__ import annotations

import torch

from mtl.combine.base import Combiner, register
from mtl.config import CombinerConfig


class ScalarizerMethod(Combiner):
    """A TorchJD scalarizer applied to the step's global losses, back-propagated linearly."""
    needs_all_tasks_per_step = True
    uses_step_losses = True

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        # A plain attribute: its state is saved by this module (get_extra_state), not as parameters
        # the trainer's optimizer would step.
        self.__dict__["method"] = self.make(cfg, len(tasks))
        self._weights = {t: 1.0 for t in self.task_names}
        self._value = 0.0

    def make(self, cfg: CombinerConfig, n_tasks: int):
        raise NotImplementedError

    def see_step_losses(self, losses: dict[str, torch.Tensor]) -> None:
        values = torch.stack([losses[t] for t in self.task_names]).detach().double().cpu().requires_grad_()
        with torch.enable_grad():
            combined = self.method(values)
            weights, = torch.autograd.grad(combined, values)
        self._weights = dict(zip(self.task_names, weights.tolist()))
        self._value = float(combined)

    def combine(self, losses: dict[str, torch.Tensor], share: float = 1.0) -> torch.Tensor:
        return sum(self._weights[t] * loss for t, loss in losses.items())

    def task_weights(self) -> dict[str, float]:
        return dict(self._weights)

    def extra_scalars(self) -> dict[str, float]:
        return {f"{self.name}/objective": self._value}


@register("geomean")
class GeometricMean(ScalarizerMethod):
    """Geometric mean of the losses (Chennupati et al. 2019): weights GM/(T L_t), scale-free across tasks."""

    def make(self, cfg, n_tasks):
        from torchjd.scalarization import GeometricMean as Scalarizer
        return Scalarizer()


@register("stch")
class STCH(ScalarizerMethod):
    """Smooth Tchebycheff (Lin et al. 2024): mu*logsumexp(L/(T mu)), a soft focus on the worst task."""

    def make(self, cfg, n_tasks):
        from torchjd.scalarization import STCH as Scalarizer
        return Scalarizer(mu=cfg.stch_mu)


@register("famo")
class FAMO(ScalarizerMethod):
    """FAMO (Liu et al. 2023): O(1) balancing of the losses' log-decrease rates; learns from the losses after the step."""
    cost = "extra forward"

    def make(self, cfg, n_tasks):
        from torchjd.scalarization import FAMO as Scalarizer
        return Scalarizer(n_tasks, lr=cfg.famo_lr, weight_decay=cfg.famo_decay)

    def after_optimizer_step(self, recompute) -> None:
        after = recompute()         # the extra forward: the same batches, the updated weights
        self.method.update(torch.stack([after[t] for t in self.task_names]).detach().double().cpu())

    def get_extra_state(self) -> dict:
        optimizer = self.method._optimizer
        return {"logits": self.method._w.detach().clone(),
                "adam": optimizer.state_dict() if optimizer is not None else {}}

    def set_extra_state(self, state: dict) -> None:
        with torch.no_grad():
            self.method._w.copy_(state["logits"])
        if state["adam"]:
            self.method._optimizer = torch.optim.Adam([self.method._w], lr=self.cfg.famo_lr,
                                                      weight_decay=self.cfg.famo_decay)
            self.method._optimizer.load_state_dict(state["adam"])

    def extra_scalars(self) -> dict[str, float]:
        z = torch.softmax(self.method._w.detach(), 0).tolist()
        return {**super().extra_scalars(), **{f"famo_z/{t}": v for t, v in zip(self.task_names, z)}}
