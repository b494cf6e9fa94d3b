"""``--compile`` (torch.compile of the encoder, in place, dynamic shapes) trains to the same
weights as eager within floating-point tolerance, and its checkpoints are eager's: the same
weight names, so a run can be resumed with or without it.  Slow on CPU (inductor compiles C++
for each graph): an integration test."""
import pytest

from mtl import checkpoint
from mtl.train import train


def test_compiled_training_matches_eager_and_shares_its_checkpoints(make_config, tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    common = {"data.tasks": "sst,para", "optim.max_steps": 4, "data.max_dev_rows": 8}
    eager = train(make_config(out=str(tmp_path / "eager"), **common))
    torch._dynamo.utils.counters.clear()
    compiled = train(make_config(out=str(tmp_path / "compiled"), compile=True, **common))
    a = checkpoint.load(checkpoint.latest(str(tmp_path / "eager")))["model"]
    b = checkpoint.load(checkpoint.latest(str(tmp_path / "compiled")))["model"]
    assert a.keys() == b.keys()          # no "_orig_mod." prefix: compiled in place
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst
    assert compiled["steps"] == eager["steps"] == 4
    for name, value in eager["best"]["metrics"].items():
        assert compiled["best"]["metrics"][name] == pytest.approx(value, abs=1e-6), name
    # Batches of many widths (padded to multiples of 16) and two modes (train, eval): dynamic
    # shapes keep the graphs few, instead of one per width.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 6, dict(torch._dynamo.utils.counters["stats"])
