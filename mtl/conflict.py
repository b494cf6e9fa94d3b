"""Gradient conflict between tasks: the signal for deciding which tasks to train together.

Everything is read off the Gram matrix of the tasks' gradients of the shared parameters
(G_ij = g_i . g_j): each task's gradient norm sqrt(G_ii), the cosine of every pair, and
whether any pair conflicts (negative cosine)."""
from __future__ import annotations

import itertools

import torch

from mtl.dist import DistContext

TaskGrads = dict[str, list]     # task -> per shared parameter: its gradient, or None where unreached


def gram_matrix(task_grads: TaskGrads, tasks: list[str]) -> torch.Tensor:
    """G_ij summed over parameters, float64; a None gradient counts as zero."""
    n = len(next(iter(task_grads.values())))
    gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    for k in range(n):
        for a, ta in enumerate(tasks):
            ga = task_grads[ta][k]
            if ga is None:
                continue
            for b in range(a, len(tasks)):
                gb = task_grads[tasks[b]][k]
                if gb is not None:
                    gram[a, b] += float(torch.dot(ga.reshape(-1).float(), gb.reshape(-1).float()))
    return gram + gram.triu(1).T


def average_over_workers(grads: list, params: list[torch.nn.Parameter], dist: DistContext) -> list[torch.Tensor]:
    """One coalesced all-reduce of a task's per-parameter gradients (None as zeros)."""
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    dist.all_reduce_mean(flat)
    return [g.view_as(p) for g, p in zip(torch.split(flat, [p.numel() for p in params]), params)]


def probe_gram(losses: dict[str, torch.Tensor], params: list[torch.nn.Parameter],
               dist: DistContext) -> tuple[list[str], torch.Tensor]:
    """The Gram matrix of the tasks' gradients of ``params`` (averaged over workers), leaving
    the graph for the real backward."""
    grads = {}
    for task, loss in losses.items():
        grads[task] = list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
        if dist.distributed:
            grads[task] = average_over_workers(grads[task], params, dist)
    tasks = list(losses)
    return tasks, gram_matrix(grads, tasks)


def conflict_stats(tasks: list[str], gram: torch.Tensor) -> tuple[dict[str, float], bool]:
    norms = gram.diagonal().clamp(min=0).sqrt()
    stats = {f"grad_norm/{t}": float(norms[i]) for i, t in enumerate(tasks)}
    conflict = False
    for a, b in itertools.combinations(range(len(tasks)), 2):
        denom = float(norms[a] * norms[b])
        cos = float(gram[a, b]) / denom if denom > 0 else 0.0
        stats[f"grad_cos/{tasks[a]}-{tasks[b]}"] = cos
        conflict |= cos < 0
    return stats, conflict
