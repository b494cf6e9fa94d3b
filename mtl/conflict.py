"""Gradient conflict between tasks: the signal for deciding which tasks to train together.

For the shared parameters' per-task gradients: each task's gradient norm, the cosine
similarity of every pair, and whether any pair conflicts (negative cosine)."""
from __future__ import annotations

import itertools

import torch

from mtl.dist import DistContext


def task_gradients(losses: dict[str, torch.Tensor], params: list[torch.nn.Parameter],
                   dist: DistContext) -> dict[str, torch.Tensor]:
    """Each task's gradient of ``params`` (flat; zero where a task does not reach), averaged
    over workers, leaving the graph for the real backward."""
    out = {}
    for task, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                          for g, p in zip(grads, params)])
        out[task] = dist.all_reduce_mean(flat)
    return out


def conflict_stats(grads: dict[str, torch.Tensor]) -> tuple[dict[str, float], bool]:
    norms = {t: float(g.double().norm()) for t, g in grads.items()}
    stats = {f"grad_norm/{t}": n for t, n in norms.items()}
    conflict = False
    for a, b in itertools.combinations(grads, 2):
        denom = norms[a] * norms[b]
        cos = float(torch.dot(grads[a].double(), grads[b].double())) / denom if denom > 0 else 0.0
        stats[f"grad_cos/{a}-{b}"] = cos
        conflict |= cos < 0
    return stats, conflict
