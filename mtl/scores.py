"""Dev-set scores, written out so the library needs no scikit-learn or SciPy."""
from __future__ import annotations

import torch


def accuracy(pred: torch.Tensor, gold: torch.Tensor) -> float:
    return (pred == gold).double().mean().item()


def f1_binary(pred: torch.Tensor, gold: torch.Tensor) -> float:
    tp = ((pred == 1) & (gold == 1)).sum().item()
    fp = ((pred == 1) & (gold == 0)).sum().item()
    fn = ((pred == 0) & (gold == 1)).sum().item()
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1_macro(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> float:
    return sum(f1_binary((pred == c).long(), (gold == c).long()) for c in range(num_classes)) / num_classes


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    return 0.0 if denom == 0 else (x @ y / denom).item()


def ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank (as Spearman's rho requires)."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    r = torch.empty_like(x)
    i, n = 0, len(x)
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(ranks(x), ranks(y))
