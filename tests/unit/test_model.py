import pytest
import torch

from mtl.config import ModelConfig
from mtl.data import encode_split, make_batch, read_split
from mtl.model import build_model, load_tokenizer
from mtl.tasks import TASKS


def batches(cfg, tasks, n=4):
    tok = load_tokenizer(cfg)
    out = {}
    for t in tasks:
        raw = read_split("embedded:sample", TASKS[t], "dev", max_rows=n)
        enc = encode_split(raw, TASKS[t], tok, cfg.max_length, cfg.siamese(t), None)
        out[t] = make_batch(enc, torch.arange(n))
    return out


@pytest.mark.parametrize("pooling,pairs,sim_head", [("cls", "joint", "mlp"), ("mean", "joint", "mlp"),
                                                    ("cls", "siamese", "mlp"), ("mean", "siamese", "cosine")])
def test_every_head_variant_gives_task_shaped_outputs(tiny_model_dir, pooling, pairs, sim_head):
    cfg = ModelConfig(model=tiny_model_dir, pooling=pooling, pair_encoding=pairs, sim_head=sim_head, max_length=32)
    model = build_model(cfg, [TASKS[t] for t in ("sst", "para", "sts")])
    out = model(batches(cfg, ("sst", "para", "sts")))
    assert out["sst"].shape == (4, 5) and out["para"].shape == (4, 1) and out["sts"].shape == (4, 1)
    assert ((out["sts"] >= -5) & (out["sts"] <= 5)).all()
    if sim_head == "mlp":
        assert ((out["sts"] >= 0) & (out["sts"] <= 5)).all()
    else:
        assert "sts" not in model.heads
    if pairs == "siamese":
        assert model.heads["para"].net[1].in_features == 3 * 32


def test_head_is_dropout_linear_relu_dropout_linear(tiny_model_dir):
    model = build_model(ModelConfig(model=tiny_model_dir, dropout=0.5), [TASKS["sst"]])
    kinds = [type(m).__name__ for m in model.heads["sst"].net]
    assert kinds == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert model.heads["sst"].net[0].p == 0.5
    assert getattr(model.encoder, "pooler", None) is None


def test_mean_pooling_ignores_padding(tiny_model_dir):
    cfg = ModelConfig(model=tiny_model_dir, pooling="mean", dropout=0.0, max_length=32)
    model = build_model(cfg, [TASKS["sst"]]).eval()
    b = batches(cfg, ("sst",), n=4)["sst"]
    pooled = model.pool(b.inputs[0])
    n = int(b.inputs[0]["attention_mask"][0].sum())
    alone = model.pool({k: v[:1, :n] for k, v in b.inputs[0].items()})
    assert torch.allclose(pooled[:1], alone, atol=1e-5)


def test_unknown_model_is_a_clear_error(tmp_path):
    from mtl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^model: cannot load an encoder from"):
        build_model(ModelConfig(model=str(tmp_path / "nope")), [TASKS["sst"]])
