"""Dynamic task prioritization (Guo et al. 2018).

Each task has a KPI kappa in [0, 1], a moving average (weight dtp_alpha for the newest value)
of its accuracy (SIM: Pearson's r mapped to [0, 1]) on training batches or on the dev set.
The task's loss weight is the focal term -(1 - kappa)^gamma * log(kappa): tasks doing worse
get more weight.  KPIs are averaged over workers, so every rank uses the same weights."""
from __future__ import annotations

import math

import torch

from mtl.combine.base import Combiner, register
from mtl.config import CombinerConfig
from mtl.tasks import TASKS

KPI_FLOOR = 1e-3   # log(0) would give an infinite weight


@register("dtp")
class DTP(Combiner):
    """Dynamic task prioritization (Guo et al. 2018): focal weights on the tasks with the lowest KPIs."""
    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        self.register_buffer("kpi", torch.full((len(tasks),), -1.0, dtype=torch.float64))  # -1: none yet
        self._seen = torch.zeros(2, len(tasks), dtype=torch.float64)   # KPI x examples, examples

    def weight(self, i: int) -> float:
        k = float(self.kpi[i])
        if k < 0:
            return 1.0
        k = min(max(k, KPI_FLOOR), 1.0)
        return -((1.0 - k) ** self.cfg.dtp_gamma) * math.log(k)

    def combine(self, losses: dict[str, torch.Tensor], share: float = 1.0) -> torch.Tensor:
        return sum(self.weight(i) * losses[t] for i, t in enumerate(self.task_names) if t in losses)

    def observe(self, outputs, batches) -> None:
        if self.cfg.dtp_kpi != "train":
            return
        for i, task in enumerate(self.task_names):
            if task in outputs:
                n = len(batches[task])
                self._seen[0, i] += TASKS[task].kpi(outputs[task], batches[task].labels) * n
                self._seen[1, i] += n

    def before_optimizer_step(self, loss_scale: float = 1.0) -> None:
        super().before_optimizer_step(loss_scale)
        if self.cfg.dtp_kpi != "train":
            return
        seen = self.dist.all_reduce_mean(self._seen.to(self.kpi.device))
        for i in range(len(self.task_names)):
            if seen[1, i] > 0:
                self._update(i, float(seen[0, i] / seen[1, i]))
        self._seen.zero_()

    def after_evaluation(self, metrics: dict[str, float]) -> None:
        if self.cfg.dtp_kpi != "dev":
            return
        for i, task in enumerate(self.task_names):
            spec = TASKS[task]
            value = metrics[f"{task}/{spec.primary_metric}"]
            self._update(i, (value + 1.0) / 2.0 if spec.regression else value)

    def _update(self, i: int, value: float) -> None:
        old = float(self.kpi[i])
        a = self.cfg.dtp_alpha
        self.kpi[i] = value if old < 0 else a * value + (1.0 - a) * old

    def task_weights(self) -> dict[str, float]:
        return {t: self.weight(i) for i, t in enumerate(self.task_names)}

    def extra_scalars(self) -> dict[str, float]:
        return {f"kpi/{t}": float(self.kpi[i]) for i, t in enumerate(self.task_names) if self.kpi[i] >= 0}
