"""Regularisers (mtl/regularize): SMART's epsilon ball and proximal copy, the weight penalties'
values and gradients, their composition with PCGrad, mse_lasso, and exactness of the trainer's
wiring across resume, workers, accumulation and bf16."""
import json

import pytest
import torch
import torch.multiprocessing as mp

from mtl import checkpoint
from mtl.combine import build_combiner
from mtl.combine.pcgrad import surgery
from mtl.data import encode_split, make_batch, read_data
from mtl.errors import ConfigError
from mtl.model import build_model, load_tokenizer
from mtl.regularize import MicroBatch, build_regularizer, check
from mtl.regularize.norms import weight_matrices
from mtl.regularize.smart import Smart, embedding_rows
from mtl.tasks import TASKS
from mtl.train import train
from tests.unit.test_dist import _worker, free_port
from tests.unit.test_stop import stop_at_first_checkpoint

SMART = {"regularize.regularizer": "smart"}


def setup(cfg, n=6):
    """The tiny model and one fixed batch of n examples of every task, with the clean outputs."""
    tasks = [TASKS[t] for t in cfg.data.tasks]
    raw, _ = read_data(cfg, tasks)
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tasks)
    siamese = cfg.model.pair_encoding == "siamese"
    index = torch.arange(n)
    batches = {t.name: make_batch(encode_split(raw[t.name], t, tokenizer, 32, siamese, None), index) for t in tasks}
    return model, batches, {t: index for t in batches}


def micro(model, batches, indices, share=1.0, step=1):
    outputs = model(batches)
    return MicroBatch(batches, outputs, indices, {t: len(i) for t, i in indices.items()}, 1, share, step)


@pytest.mark.parametrize("pairs", ["joint", "siamese"])
def test_smart_term_is_zero_at_epsilon_zero_grows_with_epsilon_and_stays_in_the_ball(make_config, pairs):
    values, model = {}, None
    for eps in (0.0, 1e-3, 1e-2, 1e-1):
        # A large step: the projection binds, so the final delta sits on the ball's surface.
        cfg = make_config(**SMART, **{"data.tasks": "sst,para,sts", "model.pair_encoding": pairs,
                                      "regularize.smart_mu": 0.0, "regularize.smart_epsilon": eps,
                                      "regularize.smart_sigma": 0.0 if eps == 0 else 1e-3,
                                      "regularize.smart_step": 1.0})
        model, batches, indices = setup(cfg)
        smart = Smart(model, cfg.regularize, cfg.seed)
        terms = {t: v.item() for t, v in smart.terms(micro(model, batches, indices)).items()}
        values[eps] = terms
        delta = smart.delta
        assert delta.abs().max().item() <= eps * (1 + 1e-6)
        mask, _ = embedding_rows(batches["sts"])        # the last task's delta: zero on padding
        assert delta[mask == 0].abs().max().item() == 0.0 if (mask == 0).any() else True
        if eps:
            assert delta.abs().max().item() == pytest.approx(eps)
    for t in ("sst", "para", "sts"):
        series = [values[e][t] for e in (0.0, 1e-3, 1e-2, 1e-1)]
        assert series[0] == 0.0, (t, series)
        assert series[1] < series[2] < series[3], (t, series)
        assert series[1] > 0


def test_smart_random_start_does_not_depend_on_the_split(make_config):
    cfg = make_config(**SMART, **{"data.tasks": "para", "model.pair_encoding": "siamese",
                                  "regularize.smart_sigma": 0.1})
    model, _, _ = setup(cfg)
    smart = Smart(model, cfg.regularize, cfg.seed)
    raw, _ = read_data(cfg, [TASKS["para"]])
    enc = encode_split(raw["para"], TASKS["para"], load_tokenizer(cfg.model), 32, True, None)

    def start(index, step=3):
        mask, parts = embedding_rows(make_batch(enc, index))
        d = smart.random_start("para", index, mask, parts, step)
        b = len(index)
        return [(d[r][mask[r] == 1], d[b + r][mask[b + r] == 1]) for r in range(b)], mask, d

    whole, mask, d = start(torch.tensor([5, 1, 7, 2]))
    halves = start(torch.tensor([5, 1]))[0] + start(torch.tensor([7, 2]))[0]
    for (a1, b1), (a2, b2) in zip(whole, halves):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(whole[0][0][:2], whole[0][1][:2])       # the pair's second sentence: its own noise
    assert d[mask == 0].abs().max() == 0 and d.std().item() == pytest.approx(0.1, rel=0.2)
    assert not torch.equal(start(torch.tensor([5, 1, 7, 2]), step=4)[0][0][0], whole[0][0])   # a new step, new noise


def test_proximal_term_is_zero_at_the_start_positive_after_a_step_and_the_copy_moves_by_beta(make_config):
    cfg = make_config(**SMART, **{"data.tasks": "sst,sts", "regularize.reg_weight": 0.0,
                                  "regularize.smart_mu": 2.0, "regularize.smart_beta": 0.9})
    model, batches, indices = setup(cfg)
    smart = Smart(model, cfg.regularize, cfg.seed)
    assert smart.stateful and smart.active
    first = smart.terms(micro(model, batches, indices))
    assert all(v.item() == 0.0 for v in first.values())
    name, param = "heads.sst.net.1.weight", dict(model.named_parameters())["heads.sst.net.1.weight"]
    before = dict(smart.copy.named_parameters())[name].clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sum(TASKS[t].loss(o, batches[t].labels).mean() for t, o in model(batches).items()).backward()
    opt.step()
    smart.after_optimizer_step()
    after = dict(smart.copy.named_parameters())[name]
    assert torch.allclose(after, 0.9 * before + 0.1 * param.detach(), atol=1e-7)
    assert not torch.equal(after, param) and not torch.equal(after, before)
    second = smart.terms(micro(model, batches, indices))
    assert all(v.item() > 0 for v in second.values())
    state = smart.state_dict()["copy"]
    assert torch.equal(state[name], after)


@pytest.mark.parametrize("norm", ["l1", "linf"])
def test_weight_penalty_equals_the_hand_computed_value_and_its_gradient(make_config, norm):
    cfg = make_config(**{"data.tasks": "sst,sts", "regularize.regularizer": norm, "regularize.reg_weight": 0.3})
    model, batches, indices = setup(cfg)
    reg = build_regularizer(cfg, model)
    mats = [p for n, p in model.named_parameters() if p.dim() >= 2]
    assert all("LayerNorm" not in n and not n.endswith("bias")
               for n, p in model.named_parameters() if any(p is m for m in mats))
    if norm == "l1":
        expected = 0.3 * sum(p.detach().abs().sum().item() for p in mats) / sum(p.numel() for p in mats)
    else:
        expected = 0.3 * sum(p.detach().abs().max().item() for p in mats) / len(mats)
    terms = reg.terms(micro(model, batches, indices, share=0.5))
    assert set(terms) == {"sst", "sts"}
    for v in terms.values():          # each of the two tasks: R x share / T
        assert v.item() == pytest.approx(expected * 0.5 / 2, rel=1e-5)
    model.zero_grad()
    sum(reg.terms(micro(model, batches, indices)).values()).backward()
    w = dict(model.named_parameters())["heads.sts.net.1.weight"]
    if norm == "l1":
        n = sum(p.numel() for p in mats)
        assert torch.allclose(w.grad, 0.3 * torch.sign(w.detach()) / n, atol=1e-12)
    else:                             # only the matrix's largest |w| gets a gradient
        assert (w.grad != 0).sum().item() == 1
        assert w.grad.abs().max().item() == pytest.approx(0.3 / len(mats))


def test_l1_under_pcgrad_is_pcgrad_of_each_task_gradient_of_its_loss_plus_r_over_t(make_config):
    cfg = make_config(**{"data.tasks": "sst,para,sts", "regularize.regularizer": "l1", "regularize.reg_weight": 5.0,
                         "combiner.combiner": "pcgrad"})
    model, batches, indices = setup(cfg)
    pcgrad = build_combiner(cfg.combiner, cfg.data.tasks, False)
    pcgrad.bind(model, pcgrad.dist, cfg.seed)
    reg = build_regularizer(cfg, model, pcgrad)
    shared = model.shared_parameters()

    def regularised_losses():
        view = micro(model, batches, indices)
        terms = reg.terms(view)
        return {t: TASKS[t].loss(o, batches[t].labels).mean() + terms[t] for t, o in view.outputs.items()}

    losses = regularised_losses()
    by_hand = [torch.cat([g.flatten() for g in torch.autograd.grad(losses[t], shared)]).double()
               for t in cfg.data.tasks]
    projected, plans = surgery(by_hand, torch.Generator().manual_seed(pcgrad.step_seed()))
    assert any(plans), "no conflict: the test would not test the surgery"
    model.zero_grad()
    pcgrad.backward(regularised_losses(), lambda loss: loss.backward())
    pcgrad.before_optimizer_step()
    got = torch.cat([p.grad.flatten() for p in shared]).double()
    expected = sum(projected)
    # The combiner's Gram matrix is float32 (measured 8e-7 of the norm here, 4e-8 against a
    # float32 Gram by hand); the reference is float64.
    assert ((got - expected).norm() / expected.norm()).item() < 2e-6
    # and the penalty is in there: without it the surgery's result differs
    plain = [torch.cat([g.flatten() for g in torch.autograd.grad(TASKS[t].loss(o, batches[t].labels).mean(), shared)])
             .double() for t, o in model(batches).items()]
    without = sum(surgery(plain, torch.Generator().manual_seed(pcgrad.step_seed() - 1))[0])
    assert ((got - without).norm() / expected.norm()).item() > 50 * 2e-6      # measured 3e-4


def test_mse_lasso_adds_the_sts_head_l1_to_sts_only(make_config):
    cfg = make_config(**{"data.tasks": "sst,sts", "loss.task_loss": "sts=mse_lasso", "loss.lasso_weight": 0.2})
    model, batches, indices = setup(cfg)
    reg = build_regularizer(cfg, model)
    terms = reg.terms(micro(model, batches, indices, share=0.5))
    head = [p for p in model.heads["sts"].parameters() if p.dim() >= 2]
    expected = 0.2 * sum(p.detach().abs().sum().item() for p in head) / sum(p.numel() for p in head) * 0.5
    assert list(terms) == ["sts"] and terms["sts"].item() == pytest.approx(expected, rel=1e-6)
    assert not build_regularizer(make_config(**{"data.tasks": "sst,sts"}), model).active


def test_settings_the_model_or_strategy_cannot_serve_are_refused(make_config):
    cosine = make_config(**{"data.tasks": "sts", "loss.task_loss": "sts=mse_lasso",
                            "model.pair_encoding": "siamese", "model.sim_head": "cosine"})
    model, _, _ = setup(cosine)
    with pytest.raises(ConfigError, match="loss.task_loss: sts=mse_lasso needs a head with weights"):
        build_regularizer(cosine, model)
    for extra in (SMART, {"regularize.regularizer": "l1"}):
        zero3 = make_config(**extra, **{"parallel.strategy": "deepspeed", "parallel.zero_stage": 3})
        with pytest.raises(ConfigError, match="regularize.regularizer: .* ZeRO stage 3"):
            check(zero3)


def test_smart_with_a_proximal_copy_resumes_exactly(make_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from mtl.stop import StopSignal, TrialStopped

    common = {**SMART, "data.tasks": "sst,sts", "data.max_train_rows": 16, "optim.epochs": 2,
              "regularize.smart_epsilon": 1e-2, "regularize.smart_sigma": 1e-3, "regularize.smart_beta": 0.5}
    whole = train(make_config(out=str(tmp_path / "whole"), **common))
    saved = checkpoint.load(checkpoint.latest(str(tmp_path / "whole")))
    assert "copy" in saved["regularizer"]["smart"]
    stop = StopSignal()
    cfg = make_config(out=str(tmp_path / "cut"), **common)
    with pytest.raises(TrialStopped):           # the flag rises at epoch 1's checkpoint: stops after step 5
        train(cfg, on_checkpoint=stop_at_first_checkpoint(stop), stop=stop)
    resumed = train(cfg)
    assert resumed["resumed_from_steps"] == [5] and resumed["steps"] == whole["steps"] == 8
    assert resumed["weights_digest"] == whole["weights_digest"]
    acc = EventAccumulator(str(tmp_path / "whole" / "tb"))
    acc.Reload()
    assert all(e.value > 0 for e in acc.Scalars("reg/sts")) and len(acc.Scalars("reg/sst")) == 8


CASES = {
    "smart": {**SMART, "regularize.smart_epsilon": 1e-2, "regularize.smart_sigma": 1e-3, "regularize.smart_beta": 0.5},
    "l1": {"regularize.regularizer": "l1", "regularize.reg_weight": 5.0},
}


def weights(out):
    return checkpoint.load(checkpoint.latest(out))["model"]


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_workers_and_accumulation_match_one_worker_with_the_whole_batch(make_config, tmp_path, case):
    common = {"data.tasks": "sst,sts", "data.max_train_rows": 20, "optim.epochs": 1, **CASES[case]}
    torch.set_num_threads(1)
    train(make_config(out=str(tmp_path / "one"), **common, **{"optim.batch_size": 8}))
    train(make_config(out=str(tmp_path / "acc"), **common, **{"optim.batch_size": 4, "optim.grad_accum": 2}))
    two = make_config(out=str(tmp_path / "two"), **common, **{"optim.batch_size": 4, "parallel.workers": 2})
    mp.spawn(_worker, args=(2, free_port(), two.to_dict()), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["steps"] == 3   # 8 + 8 + an uneven 4
    one = weights(str(tmp_path / "one"))
    assert max_diff(one, weights(str(tmp_path / "two"))) < 5e-6
    assert max_diff(one, weights(str(tmp_path / "acc"))) < 5e-6
    # and the regulariser changed the training: without it the weights differ
    plain = {k: v for k, v in common.items() if not k.startswith("regularize.")}
    train(make_config(out=str(tmp_path / "plain"), **plain, **{"optim.batch_size": 8}))
    assert max_diff(one, weights(str(tmp_path / "plain"))) > 1e-4


def test_smart_in_bf16_stays_near_fp32(make_config, tmp_path):
    common = {**CASES["smart"], "data.tasks": "sst,sts", "optim.max_steps": 3}
    fp32 = train(make_config(out=str(tmp_path / "fp32"), **common))
    bf16 = train(make_config(out=str(tmp_path / "bf16"), precision="bf16", **common))
    assert bf16["steps"] == fp32["steps"] == 3
    a, b = weights(str(tmp_path / "fp32")), weights(str(tmp_path / "bf16"))
    start = weights_at_start(make_config(out=str(tmp_path / "s"), **common))
    # Adam moves every weight by ~lr whatever its gradient's size: compare the whole updates.
    update = torch.cat([(a[k] - start[k]).flatten() for k in a])
    apart = torch.cat([(a[k] - b[k].float()).flatten() for k in a])
    assert 0 < (apart.norm() / update.norm()).item() < 0.1     # measured 0.027


def weights_at_start(cfg):
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, [TASKS[t] for t in cfg.data.tasks]).state_dict()
