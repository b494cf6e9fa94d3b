"""PCGrad, uncertainty weighting and DTP on hand-computed values."""
import math

import pytest
import torch
import torch.nn as nn

from mtl.combine import build_combiner
from mtl.combine.pcgrad import surgery
from mtl.config import CombinerConfig
from mtl.data import TaskBatch


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_two_conflicting_gradients_are_projected_onto_each_others_normal_plane():
    (g1, g2), plans = surgery([t(1, 0), t(-1, 1)], gen())
    assert g1.tolist() == [0.5, 0.5]          # g1 - (g1.g2 / |g2|^2) g2 = [1,0] + 0.5 [-1,1]
    assert g2.tolist() == [0.0, 1.0]          # g2 - (g2.g1 / |g1|^2) g1 = [-1,1] + [1,0]
    assert plans == [[1], [0]]
    assert torch.dot(g1, t(-1, 1)) == 0 and torch.dot(g2, t(1, 0)) == 0


def test_agreeing_gradients_are_left_alone():
    (g1, g2), plans = surgery([t(1, 0), t(1, 1)], gen())
    assert g1.tolist() == [1, 0] and g2.tolist() == [1, 1] and plans == [[], []]


def test_three_tasks_project_only_the_conflicting_pair():
    out, plans = surgery([t(1, 0, 0), t(-1, 1, 0), t(0, 0, 1)], gen())
    assert [g.tolist() for g in out] == [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert plans == [[1], [0], []]


def test_three_mutually_conflicting_tasks_follow_the_seeded_order():
    grads = [t(1, 0), t(-1, 0.2), t(-0.3, -1)]
    results = {}
    for seed in range(20):
        out, plans = surgery(grads, gen(seed))
        # replay each task's projections by hand in the recorded order
        for i, plan in enumerate(plans):
            g = grads[i].double()
            for j in plan:
                gj = grads[j].double()
                g = g - (g @ gj) / (gj @ gj) * gj
            assert torch.allclose(out[i].double(), g, atol=1e-6)
        results[tuple(tuple(p) for p in plans)] = seed
    assert len(results) > 1, "the order of projections must come from the generator"
    a, _ = surgery(grads, gen(3))
    b, _ = surgery(grads, gen(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


class Toy(nn.Module):
    """Shared (a, b) and one head weight per task; task 2 never reaches b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(t(1, 2))
        self.b = nn.Parameter(t(3))
        self.heads = nn.ParameterDict({"sst": nn.Parameter(t(1)), "para": nn.Parameter(t(1))})

    def shared_parameters(self):
        return [self.a, self.b]

    def losses(self):
        # dL_sst/d(a,b) = [1, 0, 1];  dL_para/d(a,b) = [-1, 1, 0]
        return {"sst": self.heads["sst"][0] * self.a[0] + self.b[0] - 3.0,
                "para": self.heads["para"][0] * (self.a[1] - self.a[0])}


@pytest.mark.parametrize("reduction,expected", [("sum", [0.0, 1.5, 1.5]), ("mean", [0.0, 0.75, 0.75])])
def test_pcgrad_on_parameters_with_an_unreached_parameter(reduction, expected):
    model = Toy()
    c = build_combiner(CombinerConfig("pcgrad", pcgrad_reduction=reduction), ("sst", "para"), False)
    c.bind(model, c.dist, seed=0)
    c.backward(model.losses(), lambda loss: loss.backward())
    c.before_optimizer_step()
    # g1=[1,0,1], g2=[-1,1,0]: g1'=[.5,.5,1], g2'=[-.5,1,.5] (b counts as 0 for task 2)
    assert torch.cat([model.a.grad, model.b.grad]).tolist() == pytest.approx(expected)
    assert model.heads["sst"].grad.item() == 1.0 and model.heads["para"].grad.item() == 1.0   # plain
    tasks, gram = c.task_gram()
    assert tasks == ["sst", "para"] and gram.tolist() == [[2, -1], [-1, 2]]   # [1,0,1] and [-1,1,0]


def test_pcgrad_works_on_unscaled_gradients_and_hands_overflow_to_the_scaler():
    model = Toy()
    c = build_combiner(CombinerConfig("pcgrad"), ("sst", "para"), False)
    c.bind(model, c.dist)
    c.backward(model.losses(), lambda loss: (1024.0 * loss).backward())
    c.before_optimizer_step(loss_scale=1024.0)
    assert torch.cat([model.a.grad, model.b.grad]).tolist() == pytest.approx([0.0, 1536.0, 1536.0])
    assert c.task_gram()[1].tolist() == [[2, -1], [-1, 2]]       # recorded unscaled
    model.zero_grad(set_to_none=True)
    c.backward(model.losses(), lambda loss: (1e38 * loss * 1e10).backward())   # overflows to inf
    c.before_optimizer_step(loss_scale=1e48)
    assert not torch.isfinite(model.a.grad).all()
    assert c.task_gram() is None


def test_surgery_on_the_gram_matrix_equals_surgery_on_the_vectors():
    from mtl.combine.pcgrad import surgery_coefficients

    torch.manual_seed(1)
    grads = [torch.randn(50, dtype=torch.float64) for _ in range(3)]
    grads[1] = -grads[0] + 0.3 * torch.randn(50, dtype=torch.float64)      # make conflicts likely
    coef, plans = surgery_coefficients(torch.stack(grads) @ torch.stack(grads).T, gen(5))
    assert any(plans)
    for i, plan in enumerate(plans):
        g = grads[i].clone()
        for j in plan:
            g -= (g @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
        assert torch.allclose(coef[i] @ torch.stack(grads), g, atol=1e-10)


def test_pcgrad_accumulates_micro_batches_before_one_surgery():
    model = Toy()
    c = build_combiner(CombinerConfig("pcgrad"), ("sst", "para"), False)
    c.bind(model, c.dist)
    for _ in range(2):
        c.backward({k: v / 2 for k, v in model.losses().items()}, lambda loss: loss.backward(), share=0.5)
    c.before_optimizer_step()
    assert torch.cat([model.a.grad, model.b.grad]).tolist() == pytest.approx([0.0, 1.5, 1.5])


def test_uncertainty_weighting_formulas():
    c = build_combiner(CombinerConfig("uncertainty"), ("sst", "sts"), False)
    with torch.no_grad():
        c.log_var.copy_(t(0.4, -0.2))
    losses = {"sst": torch.tensor(2.0), "sts": torch.tensor(3.0)}
    expected = math.exp(-0.4) * 2 + 0.2 + 0.5 * math.exp(0.2) * 3 - 0.1     # 1/s2 L + log s ; 1/(2 s2) L + log s
    assert float(c.combine(losses).detach()) == pytest.approx(expected)
    assert float(c.combine(losses, share=0.5).detach()) == pytest.approx(expected - 0.5 * (0.2 - 0.1))
    c.combine(losses).backward()
    assert c.log_var.grad.tolist() == pytest.approx([-math.exp(-0.4) * 2 + 0.5, -0.5 * math.exp(0.2) * 3 + 0.5])
    assert c.task_weights() == pytest.approx({"sst": math.exp(-0.4), "sts": 0.5 * math.exp(0.2)})
    assert c.extra_scalars()["sigma/sst"] == pytest.approx(math.exp(0.2))


def batch(labels):
    return TaskBatch([], torch.tensor(labels, dtype=torch.float32))


def test_dtp_kpis_and_focal_weights_from_training_batches():
    c = build_combiner(CombinerConfig("dtp", dtp_alpha=0.1, dtp_gamma=2.0), ("sst", "sts"), False)
    assert c.task_weights() == {"sst": 1.0, "sts": 1.0}            # no KPI yet
    logits = torch.eye(5)[[0, 1, 2, 3]]                            # predicts 0,1,2,3
    c.observe({"sst": logits, "sts": t(1, 2, 3, 4).unsqueeze(-1)},
              {"sst": batch([0, 1, 2, 0]), "sts": batch([4, 3, 2, 1])})   # acc 0.75; r = -1 -> kpi 0
    c.before_optimizer_step()
    assert c.kpi.tolist() == pytest.approx([0.75, 0.0])
    w = c.task_weights()
    assert w["sst"] == pytest.approx(-(0.25 ** 2) * math.log(0.75))
    assert w["sts"] == pytest.approx(-((1 - 1e-3) ** 2) * math.log(1e-3))   # floored, not infinite
    c.observe({"sst": logits, "sts": t(1, 2, 3, 4).unsqueeze(-1)},
              {"sst": batch([0, 1, 4, 4]), "sts": batch([1, 2, 3, 4])})   # acc 0.5; r = 1 -> kpi 1
    c.before_optimizer_step()
    assert c.kpi.tolist() == pytest.approx([0.1 * 0.5 + 0.9 * 0.75, 0.1])
    loss = c.combine({"sst": torch.tensor(2.0), "sts": torch.tensor(1.0)})
    assert float(loss) == pytest.approx(2 * c.weight(0) + c.weight(1))


def test_dtp_kpis_from_dev_evaluation():
    c = build_combiner(CombinerConfig("dtp", dtp_kpi="dev", dtp_alpha=0.5), ("para", "sts"), False)
    c.observe({"para": t(1.0).unsqueeze(-1)}, {"para": batch([1])})   # ignored in dev mode
    c.before_optimizer_step()
    assert c.kpi.tolist() == [-1.0, -1.0]
    c.after_evaluation({"para/acc": 0.8, "sts/pearson": 0.6})
    c.after_evaluation({"para/acc": 0.6, "sts/pearson": 0.2})
    assert c.kpi.tolist() == pytest.approx([0.7, 0.7])                 # (0.8 + 0.6)/2 ; ((1.6 + 1.2)/2)/2


def test_every_method_handles_one_two_and_three_tasks():
    losses = {"sst": torch.tensor(1.0, requires_grad=True), "para": torch.tensor(2.0, requires_grad=True),
              "sts": torch.tensor(3.0, requires_grad=True)}
    for name in ("sum", "scalarize", "uncertainty", "dtp"):
        for tasks in (("sst",), ("sst", "para"), ("sst", "para", "sts")):
            weights = ",".join(["%.10f" % (1 / len(tasks))] * len(tasks)) if len(tasks) == 3 else ()
            c = build_combiner(CombinerConfig(name, weights=weights if name == "scalarize" else ()), tasks, False)
            assert math.isfinite(float(c.combine({k: losses[k] for k in tasks})))
