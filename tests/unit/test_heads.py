"""Heads and pooling per task (mtl.model): head depth, width, dropout and activation per task,
mean_penultimate pooling, siamese features, per-task pair encoding, the shared layer, the
regression activation and the embedding tasks' headless output; trials with them train, and
their best weights reload to the dev scores they recorded."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mtl.config import ModelConfig
from mtl.data import encode_split, make_batch, read_split
from mtl.errors import ConfigError
from mtl.model import MultiTaskModel, build_model, load_tokenizer
from mtl.tasks import TASKS

H = 32     # the tiny encoder's width (tests/conftest.py)


def batches(cfg: ModelConfig, tasks, n=4):
    tok = load_tokenizer(cfg)
    out = {}
    for t in tasks:
        raw = read_split("embedded:sample", TASKS[t], "dev", max_rows=n)
        out[t] = make_batch(encode_split(raw, TASKS[t], tok, cfg.max_length, cfg.siamese(t), None), torch.arange(n))
    return out


def model_of(tiny_model_dir, tasks=("sst", "para", "sts"), seed=0, **settings) -> MultiTaskModel:
    torch.manual_seed(seed)
    settings = {"dropout": 0.0, **settings}
    cfg = ModelConfig(model=tiny_model_dir, max_length=32, encoder_dropout=0.0, **settings)
    return build_model(cfg, [TASKS[t] for t in tasks]).eval()


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def test_an_identity_shared_layer_changes_no_output(tiny_model_dir):
    plain = model_of(tiny_model_dir, pair_encoding="sts=siamese")
    shared = model_of(tiny_model_dir, pair_encoding="sts=siamese", shared_layer=H, shared_activation="none", seed=1)
    missing, unexpected = shared.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["shared.0.bias", "shared.0.weight"]
    with torch.no_grad():
        shared.shared[0].weight.copy_(torch.eye(H))
        shared.shared[0].bias.zero_()
    shared.shared.requires_grad_(False)
    data = batches(shared.cfg, ("sst", "para", "sts"))
    a, b = plain(data), shared(data)
    for t in ("sst", "para", "sts"):
        assert torch.allclose(a[t], b[t], atol=1e-6), t
    # A shared layer that is not the identity does change them (the heads read its output).
    with torch.no_grad():
        shared.shared[0].weight.mul_(2.0)
    assert not torch.allclose(plain(data)["sst"], shared(data)["sst"], atol=1e-4)


def test_the_shared_layer_is_shared_and_sits_before_every_head(tiny_model_dir):
    model = model_of(tiny_model_dir, pair_encoding="sts=siamese", shared_layer=16, shared_activation="gelu")
    kinds = [type(m).__name__ for m in model.shared]
    assert kinds == ["Linear", "GELU", "Dropout"] and model.shared[0].in_features == H
    shared_ids = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in model.shared.parameters()} <= shared_ids
    assert {id(p) for p in model.encoder.parameters()} <= shared_ids
    assert not shared_ids & {id(p) for p in model.heads.parameters()}
    # Heads read the 16-wide vectors; a siamese pair's [u; v; |u-v|] is 3 x 16; hidden width stays H.
    assert model.heads["sst"].net[1].in_features == 16 and model.heads["sst"].net[1].out_features == H
    assert model.heads["para"].net[1].in_features == 16 and model.heads["sts"].net[1].in_features == 48
    # Every task's loss reaches the shared layer.
    out = model(batches(model.cfg, ("sst", "para", "sts")))
    for t in ("sst", "para", "sts"):
        grad = torch.autograd.grad(out[t].sum(), model.shared[0].weight, retain_graph=True)[0]
        assert grad.abs().sum() > 0, t


def test_head_depth_zero_is_one_linear_layer(tiny_model_dir):
    model = model_of(tiny_model_dir, tasks=("sst",), head_depth="0")
    head = model.heads["sst"]
    (layer,) = linears(head)
    assert [type(m).__name__ for m in head.net] == ["Dropout", "Linear"]
    assert sum(p.numel() for p in head.parameters()) == H * 5 + 5
    x = torch.randn(3, H)
    assert torch.allclose(head(x), x @ layer.weight.T + layer.bias, atol=1e-6)


def test_per_task_depth_width_dropout_and_activation_reach_their_own_head(tiny_model_dir):
    model = model_of(tiny_model_dir, head_depth="sst=0,sts=2", head_widths="sts=7", head_dropout="para=0.2",
                     head_activation="sts=gelu,para=leaky_relu", head_hidden=12)
    sst, para, sts = (model.heads[t] for t in ("sst", "para", "sts"))
    assert len(linears(sst)) == 1
    assert [(m.in_features, m.out_features) for m in linears(para)] == [(H, 12), (12, 1)]
    assert [(m.in_features, m.out_features) for m in linears(sts)] == [(H, 7), (7, 7), (7, 1)]
    assert [type(m).__name__ for m in sts.net] == ["Dropout", "Linear", "GELU"] * 2 + ["Dropout", "Linear"]
    assert [type(m).__name__ for m in para.net] == ["Dropout", "Linear", "LeakyReLU", "Dropout", "Linear"]
    assert {m.p for m in para.net if isinstance(m, nn.Dropout)} == {0.2}
    assert {m.p for m in sts.net if isinstance(m, nn.Dropout)} == {0.0}
    out = model(batches(model.cfg, ("sst", "para", "sts")))
    assert out["sst"].shape == (4, 5) and out["para"].shape == (4, 1) and out["sts"].shape == (4, 1)


def test_mean_penultimate_is_the_masked_mean_of_the_second_to_last_layer(tiny_model_dir):
    model = model_of(tiny_model_dir, tasks=("sst",), pooling="mean_penultimate")
    inputs = batches(model.cfg, ("sst",))["sst"].inputs[0]
    assert (inputs["attention_mask"] == 0).any()          # padding to leave out
    with torch.no_grad():
        states = model.encoder(**inputs, output_hidden_states=True).hidden_states
        pooled = model.pool(inputs, "sst")
    assert len(states) == 3                                # embeddings + 2 layers
    expected = torch.stack([states[-2][i, : int(m.sum())].mean(0) for i, m in enumerate(inputs["attention_mask"])])
    assert torch.allclose(pooled, expected, atol=1e-6)
    assert not torch.allclose(pooled, model_of(tiny_model_dir, tasks=("sst",), pooling="mean").pool(inputs), atol=1e-4)


def test_an_encoder_layer_no_loss_reaches_is_frozen(tiny_model_dir):
    every = model_of(tiny_model_dir, tasks=("sst", "sts"), pooling="mean_penultimate")
    last = every.encoder.encoder.layer[-1]
    assert not any(p.requires_grad for p in last.parameters())
    assert not {id(p) for p in last.parameters()} & {id(p) for p in every.shared_parameters()}
    out = every(batches(every.cfg, ("sst",)))["sst"]
    out.sum().backward()
    assert all(p.grad is not None for p in every.shared_parameters())     # the rest of the encoder learns
    one = model_of(tiny_model_dir, tasks=("sst", "sts"), pooling="sts=mean_penultimate")
    assert all(p.requires_grad for p in one.encoder.encoder.layer[-1].parameters())


def test_siamese_prod_and_cos_features(tiny_model_dir):
    model = model_of(tiny_model_dir, tasks=("sts",), pair_encoding="siamese", siamese_features="cos,prod")
    assert model.cfg.siamese_features == "prod,cos"
    first = model.heads["sts"].net[1]
    assert first.in_features == 4 * H + 1
    seen = {}
    model.heads["sts"].register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        model(batches(model.cfg, ("sts",)))
    u, v = model.last_pooled["sts"].chunk(2)
    x = seen["x"]
    assert torch.equal(x[:, :3 * H], torch.cat([u, v, (u - v).abs()], -1))
    assert torch.allclose(x[:, 3 * H: 4 * H], u * v)
    assert torch.allclose(x[:, -1], F.cosine_similarity(u, v, dim=-1), atol=1e-6)


@pytest.mark.parametrize("how,expected", [("sigmoid", lambda r: 5 * torch.sigmoid(r)),
                                          ("relu", lambda r: torch.clamp(r, min=0)), ("none", lambda r: r)])
def test_regression_activation_maps_a_known_raw_output(tiny_model_dir, how, expected):
    model = model_of(tiny_model_dir, tasks=("sst", "sts"), regression_activation=how)
    last = model.heads["sts"].net[-1]
    data = batches(model.cfg, ("sst", "sts"))
    for raw in (-2.0, 3.0):
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(raw)
            out = model(data)
        assert torch.allclose(out["sts"], expected(torch.full((4, 1), raw)), atol=1e-6)
    assert model.activate("sst", torch.tensor([[-3.0, 2.0]])).tolist() == [[-3.0, 2.0]]   # logits as they are


def test_an_embedding_task_has_no_head_and_outputs_cos_minus_threshold_then_u_and_v(make_config):
    cfg = make_config(**{"data.tasks": "sst,para", "model.pair_encoding": "para=siamese",
                         "loss.task_loss": "para=cosine_embedding", "loss.pair_threshold": 0.3,
                         "model.shared_layer": 16})
    assert cfg.embedding_tasks() == {"para"}
    model = build_model(cfg.model, [TASKS["sst"], TASKS["para"]], cfg.embedding_tasks(), cfg.loss.pair_threshold)
    assert "para" not in model.heads and "sst" in model.heads
    out = model(batches(cfg.model, ("sst", "para")))["para"]
    w = 16                                                     # the sentence vectors behind the shared layer
    assert out.dtype == torch.float32 and out.shape == (4, 1 + 2 * w)
    u, v = out[:, 1:1 + w], out[:, 1 + w:]
    pu, pv = model.last_pooled["para"].chunk(2)
    assert torch.equal(u, pu) and torch.equal(v, pv)
    assert torch.allclose(out[:, 0], F.cosine_similarity(u, v, dim=-1) - 0.3, atol=1e-6)
    with pytest.raises(ConfigError, match="^loss.task_loss: para: an embedding loss needs a siamese pair"):
        build_model(ModelConfig(model=cfg.model.model), [TASKS["para"]], frozenset({"para"}))


def test_per_task_pair_encoding_in_one_trial(make_config, monkeypatch):
    from mtl.train import train

    segments = {}
    original = MultiTaskModel.task_output

    def spy(self, task, batch):
        segments.setdefault(task, set()).add(len(batch.inputs))
        return original(self, task, batch)
    monkeypatch.setattr(MultiTaskModel, "task_output", spy)
    res = train(make_config(**{"data.tasks": "para,sts", "model.pair_encoding": "sts=siamese",
                               "data.max_train_rows": 8, "data.max_dev_rows": 8}))
    assert res["status"] == "done" and res["steps"] > 0
    assert segments == {"para": {1}, "sts": {2}}


# A trial with the variants together: it trains, and its best weights reload to its dev scores.
VARIANTS = {"data.tasks": "sst,para,sts", "model.pair_encoding": "sts=siamese", "model.shared_layer": 16,
            "model.shared_activation": "relu", "model.head_depth": "sst=0,para=2", "model.head_widths": "para=8",
            "model.siamese_features": "prod,cos", "model.pooling": "para=mean_penultimate,sst=mean",
            "model.regression_activation": "relu", "model.head_activation": "gelu", "model.dropout": 0.1}


def test_a_trial_with_the_variants_reloads_to_its_recorded_dev_scores(make_config, tmp_path, capsys):
    from mtl.evaluate import main as evaluate_cli
    from mtl.export import load_best
    from mtl.train import train

    cfg = make_config(**VARIANTS, **{"data.max_train_rows": 16, "data.max_dev_rows": 12})
    res = train(cfg)
    assert res["status"] == "done"
    model, saved, _, _ = load_best(cfg.out)
    assert model.cfg.shared_layer == 16 and len(linears(model.heads["para"])) == 3
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg.model, [TASKS[t] for t in cfg.data.tasks])
    assert not torch.equal(model.shared[0].weight, fresh.shared[0].weight)     # trained, and saved with the heads
    assert evaluate_cli([cfg.out, "--split", "dev", "--out", str(tmp_path / "pred")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"] == pytest.approx(res["best"]["metrics"])


@pytest.mark.parametrize("pcgrad_on", ["params", "representation"])
def test_pcgrad_with_a_shared_layer_trains_it(make_config, pcgrad_on):
    from mtl.export import load_best
    from mtl.train import train

    cfg = make_config(**{"data.tasks": "sst,sts", "model.pair_encoding": "siamese", "model.shared_layer": 16,
                         "combiner.combiner": "pcgrad", "combiner.pcgrad_on": pcgrad_on,
                         "data.max_train_rows": 8, "data.max_dev_rows": 4})
    res = train(cfg)
    assert res["status"] == "done" and res["steps"] > 0
    model, _, _, _ = load_best(cfg.out)
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg.model, [TASKS[t] for t in cfg.data.tasks])
    assert not torch.equal(model.shared[0].weight, fresh.shared[0].weight)


def test_the_memory_estimate_follows_the_heads_and_the_shared_layer(make_config):
    from cluster.core.memory import estimate_worker

    base = {"data.tasks": "para,sts", "device": "cuda"}
    states = lambda **o: estimate_worker(make_config(**base, **o)).parts["weights, gradients, optimizer"]  # noqa: E731
    acts = lambda **o: estimate_worker(make_config(**base, **o)).parts["activations"]  # noqa: E731
    per_param = 16 + (2 if make_config().precision in ("bf16", "fp16") else 0)   # one worker, DDP: module docstring
    plain = states()
    # The shared layer (H x 16 + 16) in, and each joint head's first layer reads 16 wide, not H.
    assert states(**{"model.shared_layer": 16}) == plain + per_param * ((H * 16 + 16) - 2 * (H - 16) * H)
    # Depth 0 heads: one linear each; 2 hidden layers: one H x H layer more per head.
    assert states(**{"model.head_depth": "0"}) == plain - per_param * 2 * (H * H + H)
    assert states(**{"model.head_depth": "2"}) == plain + per_param * 2 * (H * H + H)
    # Siamese sts alone: between all joint and all siamese.
    assert acts() < acts(**{"model.pair_encoding": "sts=siamese"}) < acts(**{"model.pair_encoding": "siamese"})
    pcgrad = {"combiner.combiner": "pcgrad"}
    grads = lambda **o: estimate_worker(make_config(**base, **pcgrad, **o)).parts["pcgrad task gradients"]  # noqa: E731
    assert grads(**{"model.shared_layer": 16}) - grads() == 2 * (H * 16 + 16) * 4
