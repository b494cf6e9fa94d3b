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


# Class-wise scores.  Every ratio whose denominator is 0 (a class never predicted, or absent
# from gold) counts 0: the score says nothing was got right, never NaN, which would poison a
# mean, a best-checkpoint comparison or TensorBoard's HParams columns.
def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def recall(pred: torch.Tensor, gold: torch.Tensor, c: int) -> float:
    """The share of class ``c``'s gold examples predicted as ``c`` (its per-class accuracy)."""
    return _ratio(((pred == c) & (gold == c)).sum().item(), (gold == c).sum().item())


def precision(pred: torch.Tensor, gold: torch.Tensor, c: int) -> float:
    """The share of the examples predicted as ``c`` that are ``c``."""
    return _ratio(((pred == c) & (gold == c)).sum().item(), (pred == c).sum().item())


def per_class_recall(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> list[float]:
    return [recall(pred, gold, c) for c in range(num_classes)]


def balanced_accuracy(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> float:
    """The mean of the per-class recalls over the classes present in gold (a class with no gold
    example has no recall to average; none present: 0)."""
    present = [c for c in range(num_classes) if (gold == c).any()]
    return _ratio(sum(recall(pred, gold, c) for c in present), len(present))


def precision_macro(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> float:
    return sum(precision(pred, gold, c) for c in range(num_classes)) / num_classes


def recall_macro(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> float:
    return sum(recall(pred, gold, c) for c in range(num_classes)) / num_classes
