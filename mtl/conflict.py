"""Gradient conflict between tasks: the signal for deciding which tasks to train together.

Everything is read off the Gram matrix of the tasks' gradients of the shared parameters
(G_ij = g_i . g_j): each task's gradient norm sqrt(G_ii), the cosine of every pair, and
whether any pair conflicts (negative cosine)."""
from __future__ import annotations

import itertools

import torch

from mtl.dist import DistContext


def flat_gradient(grads: list, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """One task's per-parameter gradients as one vector (a copy; None counts as zeros)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def gram_of_rows(rows: torch.Tensor) -> torch.Tensor:
    """G = R R^T for the tasks' flat gradients as the rows of R: one matmul on R's device
    (fp32 accumulation, for a bf16 R on a float32 copy), then one host sync to bring the
    T x T result back as float64 (the surgery and the statistics branch on its values)."""
    rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    return (rows @ rows.T).double().cpu()


def probe_gram(losses: dict[str, torch.Tensor], params: list[torch.nn.Parameter],
               dist: DistContext) -> tuple[list[str], torch.Tensor]:
    """The Gram matrix of the tasks' gradients of ``params`` (averaged over workers, one
    collective for all tasks), leaving the graph for the real backward.  Costs one extra
    backward per task and a T x N copy."""
    tasks = list(losses)
    rows = torch.stack([flat_gradient(torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True),
                                      params) for t in tasks])
    dist.all_reduce_mean(rows)
    return tasks, gram_of_rows(rows)


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
