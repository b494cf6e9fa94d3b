import math

import torch

from mtl import scores


def test_spearman_with_ties_matches_hand_computation():
    x = torch.tensor([1.0, 2.0, 2.0, 3.0])
    y = torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert scores.ranks(x).tolist() == [1.0, 2.5, 2.5, 4.0]
    # Pearson of ranks [1,2.5,2.5,4] and [1,3,2,4]
    rx, ry = [1, 2.5, 2.5, 4], [1, 3, 2, 4]
    mx, my = sum(rx) / 4, sum(ry) / 4
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert abs(scores.spearman(x, y) - num / den) < 1e-12


def test_pearson_and_f1():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert abs(scores.pearson(x, 2 * x + 1) - 1.0) < 1e-12
    assert abs(scores.pearson(x, -x) + 1.0) < 1e-12
    pred, gold = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])
    assert scores.f1_binary(pred, gold) == 0.5     # tp=1 fp=1 fn=1
    assert scores.f1_macro(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]), 3) == (1 + 2 / 3 + 0) / 3
