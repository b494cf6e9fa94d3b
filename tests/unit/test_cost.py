"""Cost accounting: each trial's results.json records its mean step time, peak memory and the
backward passes it ran per step (counted); the results table carries them."""
import json
from pathlib import Path

import pytest

from mtl.combine import COMBINERS
from mtl.cost import DEFAULT_COST, cost_class, expected_backwards
from mtl.train import train

TASKS = "sst,para,sts"


@pytest.mark.parametrize("method, per_micro_batch", [("sum", 1), ("pcgrad", 3)])
def test_a_trial_records_its_cost(make_config, method, per_micro_batch):
    # Two micro-batches per step: addition back-propagates once per micro-batch, PCGrad once per
    # task and micro-batch.  32 rows, batch 4 x 2: whole steps only, so the mean is exact.
    cfg = make_config(**{"data.tasks": TASKS, "combiner.combiner": method, "optim.grad_accum": 2,
                         "optim.max_steps": 3})
    res = train(cfg)
    saved = json.loads(Path(cfg.out, "results.json").read_text())
    assert saved["steps"] == 3
    assert saved["backwards_per_step"] == per_micro_batch * 2
    assert saved["step_time_s"] > 0 and saved["peak_memory_mb"] > 0
    assert saved["peak_memory_kind"] == "cpu_rss"
    assert saved["cost_class"] == cost_class(COMBINERS[method]) and saved["cost_note"] is None
    # Time inside the steps only: evaluation, checkpoints and the model's loading are outside.
    assert saved["step_time_s"] * saved["steps"] < saved["wall_time_s"]
    assert res["backwards_per_step"] == saved["backwards_per_step"]
    if "cost" in vars(COMBINERS[method]):        # a declared class must agree with the count
        assert saved["backwards_per_step"] == expected_backwards(saved["cost_class"], 3, 2)


def test_cost_classes_imply_their_backward_passes():
    assert expected_backwards("T backwards", 3, 2) == 6
    assert expected_backwards("one backward", 3, 2) == expected_backwards("extra forward", 3, 2) == 2
    assert cost_class(object()) == DEFAULT_COST == "one backward"


def test_the_results_table_has_the_cost_and_old_results_leave_it_empty(make_config, tmp_path):
    from cluster.core.ending import results_table

    new = make_config(out=str(tmp_path / "new"), **{"optim.max_steps": 2})
    old = make_config(out=str(tmp_path / "old"), **{"optim.max_steps": 2, "optim.lr": 2e-3})
    train(new)
    train(old)
    written = json.loads(Path(old.out, "results.json").read_text())
    for key in ("step_time_s", "peak_memory_mb", "peak_memory_kind", "backwards_per_step", "cost_class"):
        del written[key]                                # as a trial written before cost accounting
    Path(old.out, "results.json").write_text(json.dumps(written))
    first, second = results_table([new, old])
    assert first["status"] == second["status"] == "done"
    assert first["step_time_s"] > 0 and first["backwards_per_step"] == 1 and first["peak_memory_kind"] == "cpu_rss"
    assert second["step_time_s"] is None and second["peak_memory_mb"] is None
