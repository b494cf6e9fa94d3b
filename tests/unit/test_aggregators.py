"""The field's methods on the task-gradient buffer (mtl.combine.aggregators, gradnorm, rlw):
each against its paper's definition on small cases computed independently, then all of
them exact under accumulation, two gloo workers, bf16 and a resume, on a tiny model."""
import io
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mtl.combine import COMBINERS, build_combiner
from mtl.combine import aggregators
from mtl.combine.gradients import TaskGradients
from mtl.combine.pcgrad import surgery_coefficients
from mtl.config import GRADIENT_METHODS, CombinerConfig
from mtl.dist import DistContext
from mtl.errors import ConfigError

TASKS = ("sst", "para", "sts")
LOSS_ONLY = ["rlw", "dwa", "imtl_l", "geomean", "stch", "famo"]
NEW = sorted(set(GRADIENT_METHODS) - {"pcgrad"}) + ["gradnorm"] + LOSS_ONLY


def weights_on(rows: torch.Tensor, name: str, tasks=TASKS, **settings):
    """(weights reported, combined gradient) of one step of ``name`` on explicit task gradients."""
    c = COMBINERS[name](tasks, CombinerConfig(combiner=name, **settings))
    p = torch.nn.Parameter(torch.zeros(rows.shape[1], dtype=rows.dtype))
    grads = TaskGradients(c.task_names, [p])
    grads.rows.copy_(rows)
    grads._seen.update(tasks)
    grads.reached = [True]
    grads.scale(list(tasks), [c.factors[t] for t in tasks])
    gram = (grads.rows.double() @ grads.rows.double().T)
    with c.seeded(torch.device("cpu")):
        c.apply(grads, list(tasks), gram, 1.0)
    return torch.tensor([c.task_weights()[t] for t in tasks], dtype=torch.float64), p.grad.detach().double().clone()


CONFLICT = torch.tensor([[1.0, 0.0, 0.5], [-0.8, 1.0, 0.0], [0.2, -0.9, 1.0]], dtype=torch.float64)
AGREE = torch.tensor([[1.0, 0.2, 0.1], [0.8, 1.0, 0.0], [0.5, 0.1, 1.0]], dtype=torch.float64)


# --- each method, from its definition ---------------------------------------------------------
def test_mgda_on_two_tasks_is_the_closed_form_min_norm_point():
    g1, g2 = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 1.5], dtype=torch.float64)
    gamma = ((g2 - g1) @ g2 / (g1 - g2).norm() ** 2).clamp(0, 1)        # argmin ||gamma g1 + (1-gamma) g2||
    _, d = weights_on(torch.stack([g1, g2]), "mgda", tasks=("sst", "para"), mgda_epsilon=1e-9)
    assert torch.allclose(d, gamma * g1 + (1 - gamma) * g2, atol=1e-4)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_conflict_with_no_task_and_are_the_mean_where_none_conflict(name):
    _, d = weights_on(CONFLICT, name)
    assert (CONFLICT @ d >= -1e-3 * d.norm()).all(), CONFLICT @ d      # the QP is regularised by 1e-4
    w, d = weights_on(AGREE, name)
    assert torch.allclose(d, AGREE.mean(0), atol=1e-6)


def test_imtl_g_projections_on_every_unit_gradient_are_equal():
    _, d = weights_on(CONFLICT, "imtl_g")
    units = CONFLICT / CONFLICT.norm(dim=1, keepdim=True)
    proj = units @ d
    assert torch.allclose(proj, proj[0].expand(3), atol=1e-8) and proj[0] > 0


def test_cagrad_with_c_zero_is_the_mean():
    _, d = weights_on(CONFLICT, "cagrad", cagrad_c=0.0)
    assert torch.allclose(d, CONFLICT.mean(0), atol=1e-5)


def test_cagrad_improves_the_worst_task_more_than_the_mean():
    _, d = weights_on(CONFLICT, "cagrad", cagrad_c=0.5)
    mean = CONFLICT.mean(0)
    assert (CONFLICT @ d).min() > (CONFLICT @ mean).min()


def test_gradvac_first_step_projects_like_pcgrad_on_a_conflicting_pair():
    # Its targets start at 0: a negative cosine is raised to exactly 0, which is PCGrad's projection.
    rows = CONFLICT[:2]
    w, _ = weights_on(rows, "gradvac", tasks=("sst", "para"))
    coef, _ = surgery_coefficients(rows @ rows.T, torch.Generator().manual_seed(0))
    assert torch.allclose(w, coef.sum(0), atol=1e-7)


def test_fairgrad_proportional_fairness_solves_g_w_equals_one_over_w():
    w, _ = weights_on(CONFLICT + 0.5, "fairgrad", fairgrad_alpha=1.0)
    gram = (CONFLICT + 0.5) @ (CONFLICT + 0.5).T
    assert torch.allclose(gram @ w, 1 / w, rtol=1e-3)


def test_nash_mtl_bargaining_solution_solves_alpha_times_g_alpha_equals_one():
    rows = CONFLICT + 0.5
    w, _ = weights_on(rows, "nash_mtl", nash_max_norm=0.0)
    gram = rows @ rows.T      # the solution of alpha_i (G alpha)_i = 1, by sequential convex steps
    assert torch.allclose(w * (gram @ w), torch.ones(3, dtype=torch.float64), atol=2e-2), w * (gram @ w)


def test_aligned_mtl_scales_orthogonal_gradients_to_the_smallest_singular_value():
    rows = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    _, d = weights_on(rows, "aligned_mtl")
    assert torch.allclose(d, torch.full((3,), 1.0 / 3, dtype=torch.float64), atol=1e-6)   # each unit, x sigma_min / T


def test_config_has_equal_cosines_with_every_gradient_and_conflicts_with_none():
    _, d = weights_on(CONFLICT, "config")
    cos = (CONFLICT @ d) / (CONFLICT.norm(dim=1) * d.norm())
    assert torch.allclose(cos, cos[0].expand(3), atol=1e-6) and cos[0] > 0


def test_graddrop_keeps_per_coordinate_the_gradients_of_one_sign():
    rows = CONFLICT.float()
    _, d = weights_on(rows, "graddrop")
    positive, negative = rows.clamp(min=0).sum(0).double(), rows.clamp(max=0).sum(0).double()
    assert all(torch.isclose(x, p) or torch.isclose(x, n) for x, p, n in zip(d, positive, negative))


def test_excess_mtl_first_step_weights_from_the_excess_risk_by_hand():
    rows = CONFLICT
    w, d = weights_on(rows, "excess_mtl", excess_step=0.5)
    excess = (rows ** 2 / torch.sqrt(rows ** 2 + 1e-7)).sum(1)      # g^T diag(H)^-1 g, H from one step of AdaGrad
    expected = torch.softmax(torch.log(torch.full((3,), 1 / 3, dtype=torch.float64)) + 0.5 * excess, 0)
    assert torch.allclose(w, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["rgw", "rlw"])
def test_random_weights_are_a_seeded_simplex_point_fresh_every_step(name):
    c = COMBINERS[name](TASKS, CombinerConfig(combiner=name))
    c.bind(_Tiny(), DistContext(), seed=3)
    draws = []
    for _ in range(2):
        draws.append(_step_weights(c))
    assert all(abs(sum(w) - 1) < 1e-9 and min(w) > 0 for w in draws) and draws[0] != draws[1]
    again = COMBINERS[name](TASKS, CombinerConfig(combiner=name))
    again.bind(_Tiny(), DistContext(), seed=3)
    assert _step_weights(again) == draws[0]


def test_gradnorm_moves_weight_to_the_task_with_the_smaller_gradient():
    c = COMBINERS["gradnorm"](("sst", "para"), CombinerConfig(combiner="gradnorm"))
    c.bind(_Tiny(), DistContext())
    c._losses = torch.tensor([1.0, 1.0])
    c.initial_losses.copy_(torch.tensor([2.0, 2.0]))          # equal training rates: target = the mean norm
    rows = torch.tensor([[1.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    grads = TaskGradients(c.task_names, [torch.nn.Parameter(torch.zeros(2))])
    grads.rows.copy_(rows), grads._seen.update(c.task_names)
    c.apply(grads, list(c.task_names), rows @ rows.T, 1.0)
    assert c.weights.grad[0] < 0 < c.weights.grad[1]          # descent raises w_sst, lowers w_para
    assert torch.allclose(c.weights.grad.double(), torch.tensor([-1.0, 10.0], dtype=torch.float64))


def test_weighted_surgery_scales_each_task_gradient_before_pcgrad():
    rows = CONFLICT[:2]
    _, d = weights_on(rows, "pcgrad", tasks=("sst", "para"), alpha=0.3)
    scaled = rows * torch.tensor([[0.6], [1.4]], dtype=torch.float64)
    coef, _ = surgery_coefficients(scaled @ scaled.T, torch.Generator().manual_seed(0))
    assert torch.allclose(d, coef.sum(0) @ scaled, atol=1e-7)
    _, plain = weights_on(rows, "pcgrad", tasks=("sst", "para"))
    assert not torch.allclose(d, plain, atol=1e-3)


@pytest.mark.parametrize("name", sorted(set(GRADIENT_METHODS) - {"pcgrad"}))
def test_every_gradient_method_gives_finite_weights_and_alpha_one_half_is_the_plain_method(name):
    w, d = weights_on(CONFLICT, name)
    assert torch.isfinite(w).all() and torch.isfinite(d).all()
    if name not in ("rgw", "graddrop"):       # both random: their draws differ with the scaled inputs' values
        _, same = weights_on(CONFLICT[:2], name, tasks=("sst", "para"), alpha=0.5)
        _, plain = weights_on(CONFLICT[:2], name, tasks=("sst", "para"))
        assert torch.equal(same, plain)


# --- the loss-only methods, from their definitions ---------------------------------------------
STEP = {"sst": torch.tensor(0.5), "para": torch.tensor(2.0), "sts": torch.tensor(4.0)}


def _weights_from_step_losses(name, **settings):
    c = COMBINERS[name](TASKS, CombinerConfig(combiner=name, **settings))
    c.see_step_losses(STEP)
    return torch.tensor([c.task_weights()[t] for t in TASKS], dtype=torch.float64), c


def test_geometric_mean_weighs_each_loss_by_the_mean_over_t_times_itself():
    w, _ = _weights_from_step_losses("geomean")
    values = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    assert torch.allclose(w, values.prod() ** (1 / 3) / (3 * values))


def test_stch_weights_are_a_softmax_focused_on_the_worst_task():
    w, _ = _weights_from_step_losses("stch", stch_mu=0.5)
    values = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    assert torch.allclose(w, torch.softmax(values / (3 * 0.5), 0) / 3)
    assert w.argmax() == 2


def test_famo_starts_at_the_inverse_loss_weights_and_favours_the_task_that_fell_least():
    w, c = _weights_from_step_losses("famo")
    inverse = 1 / torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    assert torch.allclose(w, inverse / inverse.sum())          # c * z / l with z uniform
    c.after_optimizer_step(lambda: {"sst": torch.tensor(0.25), "para": torch.tensor(1.9), "sts": torch.tensor(3.9)})
    z = torch.softmax(c.method._w.detach(), 0)
    assert z[0] < 1 / 3 < z[1] and z[0] < z[2]                  # sst halved: it gets less


def test_dwa_weights_from_the_last_two_epoch_means_by_hand():
    c = COMBINERS["dwa"](TASKS, CombinerConfig(combiner="dwa", dwa_temperature=2.0))
    means = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.0, 3.3])]
    for epoch, m in enumerate(means):
        assert c.task_weights() == {t: 1.0 for t in TASKS}      # equal for the first two epochs
        for _ in range(2):                                     # two steps an epoch, the same losses
            c.combine(dict(zip(TASKS, m)))
            c.before_optimizer_step()
        c.end_epoch()
    rates = means[1].double() / means[0].double()
    expected = 3 * torch.softmax(rates / 2.0, 0)
    assert torch.allclose(torch.tensor([c.task_weights()[t] for t in TASKS], dtype=torch.float64), expected)


def test_imtl_l_drives_each_scaled_loss_towards_one():
    c = COMBINERS["imtl_l"](TASKS, CombinerConfig(combiner="imtl_l"))
    c.combine(dict(STEP), share=1.0).backward()
    assert torch.allclose(c.log_scale.grad, torch.tensor([0.5 - 1, 2.0 - 1, 4.0 - 1]))   # d/ds (e^s L - s) at s = 0


# --- refusals ------------------------------------------------------------------------------
def test_a_method_whose_solver_is_missing_is_refused_naming_the_extra(monkeypatch):
    real = aggregators.find_spec
    monkeypatch.setattr(aggregators, "find_spec", lambda name: None if name == "cvxpy" else real(name))
    with pytest.raises(ConfigError, match=r"^combiner.combiner: cagrad needs cvxpy \(its solver\): "
                                          r"pip install -e '\.\[methods\]'$"):
        build_combiner(CombinerConfig(combiner="cagrad"), TASKS, False)
    build_combiner(CombinerConfig(combiner="upgrad"), TASKS, False)


@pytest.mark.parametrize("settings, message", [
    ({"combiner": "upgrad", "pref_vector": "1,2"}, r"^combiner.pref_vector: 2 weights given for 3 task"),
    ({"combiner": "mgda", "alpha": 0.3}, r"^combiner.alpha: weighs a pair; mgda over 3 task"),
    ({"combiner": "sum", "cagrad_c": 0.1}, r"^combiner.cagrad_c: applies to --combiner cagrad, not sum"),
    ({"combiner": "pcgrad", "pcgrad_on": "representation", "weights": "0.2,0.3,0.5"}, r"^combiner.pcgrad_on: loss weights"),
])
def test_bad_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_combiner(CombinerConfig(**settings), TASKS, False)


# --- exactness on a tiny model: accumulation, two workers, bf16, resume ------------------------
class _Tiny(torch.nn.Module):
    """A shared linear encoder and one linear head per task."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.encoder = torch.nn.Linear(5, 6)
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(6, 1) for t in TASKS})
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def shared_parameters(self):
        return list(self.encoder.parameters())

    def losses(self, x, y, total, world=1):
        # One forward per task, as the trainer's (each task has its own batch); each task's loss
        # as this worker's share of the step's global mean.
        return {t: ((self.heads[t](torch.tanh(self.encoder(x + i))).squeeze(-1) - y[:, i]) ** 2).sum()
                * (world / total) for i, t in enumerate(TASKS)}


def _data(steps=3, batch=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(steps, batch, 5, generator=g), torch.randn(steps, batch, 3, generator=g) + 1.0


def _step_weights(c):
    """One step of a method on the tiny model: the weights it used."""
    model = _Tiny()
    x, y = _data(1)
    c.bind(model, DistContext(), c.seed)
    c.backward(model.losses(x[0], y[0], 8), lambda l: l.backward())
    c.before_optimizer_step()
    w = c.task_weights()          # the weights the step used
    return [w[t] for t in TASKS]


def _train(name, x, y, micro=1, dist=None, rank=0, precision="fp32", state=None, stop=None, start=0):
    """SGD steps of ``name`` on the tiny model; each step's batch split into ``micro`` micro-batches
    and, with ``dist``, into this rank's half.  Returns the model, the combiner and the parameters."""
    dist = dist or DistContext()
    torch.manual_seed(0)
    model = _Tiny()
    c = build_combiner(CombinerConfig(combiner=name, **({"combiner_lr": 0.05} if name == "gradnorm" else {})),
                       TASKS, False)
    c.bind(model, dist, seed=5)
    opt = torch.optim.SGD(list(model.parameters()) + list(c.parameters()), lr=0.1)
    if state:
        model.load_state_dict(state["model"]), c.load_state_dict(state["combiner"]), opt.load_state_dict(state["opt"])
    for s in range(start, stop or len(x)):
        xs, ys = x[s], y[s]
        if dist.distributed:
            half = len(xs) // dist.world_size
            xs, ys = xs[rank * half:(rank + 1) * half], ys[rank * half:(rank + 1) * half]
        if c.uses_step_losses:
            c.see_step_losses(_global_losses(model, xs, ys, len(x[s]), dist))
        for xm, ym in zip(xs.chunk(micro), ys.chunk(micro)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                losses = model.losses(xm, ym, len(x[s]), dist.world_size)
            c.backward({t: l.float() for t, l in losses.items()}, lambda l: l.backward(), share=1.0 / micro)
        if not c.syncs_gradients_itself:
            for p in model.parameters():
                dist.all_reduce_mean(p.grad)
        c.before_optimizer_step(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        c.after_optimizer_step(lambda: _global_losses(model, xs, ys, len(x[s]), dist))
        c.end_epoch()           # an epoch a step, so DWA's weights move within three
    return model, c, opt


def _global_losses(model, xs, ys, total, dist):
    """The step's global losses, as the trainer hands them (a forward without gradients)."""
    with torch.no_grad():
        losses = model.losses(xs, ys, total, dist.world_size)
    values = dist.all_reduce_mean(torch.stack([losses[t] for t in TASKS]))
    return dict(zip(TASKS, values))


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", NEW)
def test_accumulation_and_a_resume_equal_one_uninterrupted_large_batch(name):
    x, y = _data()
    whole, c, _ = _train(name, x, y)
    acc, _, _ = _train(name, x, y, micro=2)
    assert torch.allclose(_flat(whole), _flat(acc), atol=2e-6), (_flat(whole) - _flat(acc)).abs().max()
    # killed after step 2, resumed from its state (through torch.save / a weights-only load)
    model, cut, opt = _train(name, x, y, stop=2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "combiner": cut.state_dict(), "opt": opt.state_dict()}, buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed, _, _ = _train(name, x, y, state=state, start=2)
    assert torch.allclose(_flat(whole), _flat(resumed), atol=1e-6), name
    # and not trivially: one step fewer is elsewhere
    fewer, _, _ = _train(name, x, y, stop=2)
    assert not torch.allclose(_flat(whole), _flat(fewer), atol=1e-4)


@pytest.mark.parametrize("name", NEW)
def test_bf16_autocast_stays_within_the_cpu_tolerance_of_fp32(name):
    x, y = _data()
    a, _, _ = _train(name, x, y)
    b, _, _ = _train(name, x, y, precision="bf16")
    start = _flat(_Tiny())
    moved = (_flat(a) - start).abs().max()
    assert (_flat(a) - _flat(b)).abs().max() < 0.05 * moved + 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = DistContext.from_env("cpu")
    x, y = _data()
    result = {name: _flat(_train(name, x, y, dist=dist, rank=rank)[0]).tolist() for name in NEW}
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as fh:
        json.dump(result, fh)
    torch.distributed.destroy_process_group()


def test_two_gloo_workers_equal_one_worker_with_the_whole_batch_for_every_method(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    x, y = _data()
    for name in NEW:
        assert ranks[0][name] == ranks[1][name], f"{name}: the replicas drifted apart"
        one = _flat(_train(name, x, y)[0])
        worst = (torch.tensor(ranks[0][name]) - one).abs().max()
        assert worst < 5e-6, (name, worst)


def test_the_stateful_methods_train_and_checkpoint_their_state_through_the_trainer(make_config, tmp_path):
    # The whole trial path: bind, the strategy, the checkpoint written and read
    # back weights-only, the method's state restored into a fresh one.  (Exactness: the tests above.)
    from mtl import checkpoint
    from mtl.train import train

    for name in ("gradvac", "nash_mtl", "excess_mtl", "gradnorm", "rlw", "famo", "upgrad"):   # with state; one without
        cfg = make_config(out=str(tmp_path / name), **{"data.tasks": "sst,para,sts", "data.max_train_rows": 12,
                                                        "combiner.combiner": name, "optim.max_steps": 2})
        results = train(cfg)
        assert results["steps"] == 2 and results["status"] == "done", name
        state = checkpoint.load(checkpoint.latest(cfg.out))["combiner"]
        fresh = build_combiner(cfg.combiner, cfg.data.tasks, False)
        fresh.load_state_dict(state)
        assert int(state["steps"]) == 2 if name != "famo" else state["_extra_state"]["adam"]["state"][0]["step"] == 2
        for key, value in fresh.state_dict().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, state[key]), (name, key)


def test_the_step_losses_a_method_sees_are_the_ones_the_step_trains_on_dropout_and_accumulation_included(
        make_config, tmp_path, monkeypatch):
    # Under --grad-accum the trainer finds the step's losses by a forward without gradients
    # first: with the step's dropout masks replayed they equal the training forward's own.
    from mtl.combine.scalarizers import GeometricMean
    from mtl.train import train
    from mtl.trainer import Trainer

    seen, trained = [], []
    see = GeometricMean.see_step_losses
    monkeypatch.setattr(GeometricMean, "see_step_losses", lambda self, losses: (
        seen.append({t: float(v) for t, v in losses.items()}), see(self, losses))[1])
    record = Trainer.record_step
    monkeypatch.setattr(Trainer, "record_step", lambda self, planned, stats, tick: (
        trained.append({t: stats[f"loss/{t}"] for t in self.cfg.data.tasks}), record(self, planned, stats, tick))[1])
    cfg = make_config(**{"data.tasks": "sst,para,sts", "data.max_train_rows": 24, "combiner.combiner": "geomean",
                         "optim.grad_accum": 2, "optim.batch_size": 4, "model.dropout": 0.3,
                         "model.encoder_dropout": 0.3, "optim.max_steps": 3})
    train(cfg)
    assert len(seen) == len(trained) == 3
    for a, b in zip(seen, trained):
        assert all(abs(a[t] - b[t]) < 1e-6 * max(1.0, abs(b[t])) for t in a), (a, b)
    assert seen[0] != seen[1]
