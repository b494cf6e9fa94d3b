"""Cost accounting: each trial's results.json records its mean step time, peak memory and the
backward passes it ran per step (counted); the results table carries them; the method benchmark
prints one row per method with addition's ratio 1.00."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtl.combine import COMBINERS
from mtl.cost import DEFAULT_COST, cost_class, expected_backwards
from mtl.train import train

ROOT = Path(__file__).resolve().parents[2]
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
    if hasattr(COMBINERS[method], "cost"):       # a declared (or inherited) class must agree with the count
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


def test_the_method_benchmark_prints_a_row_per_method(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "benchmarks/bench_methods.py", "--model", tiny_model_dir, "--steps", "2",
                           "--warmup-steps", "0", "--methods", "sum,pcgrad", "--max-length", "32", "--markdown",
                           "--cache", str(tmp_path / "cache")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in done.stdout.splitlines()
             if line.startswith("| ")]
    head, rows = lines[0], {cells[0]: dict(zip(lines[0], cells)) for cells in lines[1:]}
    assert head[0] == "method" and list(rows) == ["sum", "pcgrad"], done.stdout
    assert rows["sum"]["step time vs sum"] == "1.00" and rows["sum"]["peak memory vs sum"] == "1.00"
    # Counted, not assumed: one backward per step for addition, one per task (3) for PCGrad.
    assert rows["sum"]["backwards/step"] == "1" and rows["pcgrad"]["backwards/step"] == "3"
    assert float(rows["pcgrad"]["step time vs sum"]) > 0 and float(rows["pcgrad"]["step ms"]) > 0
