"""A fused group on CUDA (mtl.fused): each member ends as its trial alone on the same device,
within the precision's rounding, with dropout on (one mask for the group, as each alone draws)."""
import pytest

from mtl import checkpoint
from mtl.fused import train_group
from mtl.train import train

MEMBERS = [{"combiner.combiner": "scalarize", "combiner.alpha": 0.2},
           {"combiner.combiner": "scalarize", "combiner.alpha": 0.8, "optim.lr": 3e-4},
           {"combiner.combiner": "uncertainty"}, {"combiner.combiner": "dtp"}]


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_a_fused_group_on_cuda_equals_its_trials_alone(make_config, tmp_path, device, precision, tolerance):
    common = {"device": device, "precision": precision, "data.tasks": "sst,sts", "optim.max_steps": 6,
              "model.dropout": 0.3}
    alone = [make_config(out=str(tmp_path / f"a{i}"), **common, **m) for i, m in enumerate(MEMBERS)]
    fused = [make_config(out=str(tmp_path / f"f{i}"), **common, **m) for i, m in enumerate(MEMBERS)]
    for a in alone:
        train(a)
    results = train_group(fused)
    assert all(r["status"] == "done" and r["steps"] == 6 for r in results)
    for a, f in zip(alone, fused):
        wa = checkpoint.load(checkpoint.latest(a.out))["model"]
        wf = checkpoint.load(checkpoint.latest(f.out))["model"]
        assert max((wa[k].float() - wf[k].float()).abs().max().item() for k in wa) < tolerance
