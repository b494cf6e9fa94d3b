"""cluster.core.dependencies: waves of stages, array slots packed within a wave, and the
dependents of a failed upstream failed with a reason that names it."""
from __future__ import annotations

import json
import os

import pytest

from cluster.core.dependencies import fail_dependents, slot, slots, waves
from cluster.core.ending import results_table, summary
from cluster.core.study import expand, slot_trials, trial_name
from mtl.errors import ConfigError


def chain(make_config, tmp_path):
    """a -> b -> c, a baseline x, and d from a: listed dependents first, to show the order is theirs."""
    a = make_config(out=str(tmp_path / "a"))
    b = make_config(out=str(tmp_path / "b"), **{"data.tasks": "para"}).replace(upstream=a.to_dict())
    c = make_config(out=str(tmp_path / "c"), **{"data.tasks": "sts"}).replace(upstream=b.to_dict())
    d = make_config(out=str(tmp_path / "d"), **{"data.tasks": "sts"}).replace(upstream=a.to_dict())
    x = make_config(out=str(tmp_path / "x"), **{"data.tasks": "sts", "seed": 1})
    return a, b, c, d, x


def names(groups):
    return [[trial_name(t) for t in g] for g in groups]


def write_results(cfg, **fields):
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump({"config": cfg.to_dict(), **fields}, f)


def done(cfg):
    write_results(cfg, status="done", best={"metrics": {}}, steps=1, wall_time_s=1.0, train_time_s=1.0,
                  examples_per_s=1.0, world_size=1)


def test_waves_put_every_upstream_before_its_dependents_in_list_order(make_config, tmp_path):
    a, b, c, d, x = chain(make_config, tmp_path)
    assert names(waves([c, d, b, x, a])) == [["x", "a"], ["d", "b"], ["c"]]
    # An upstream outside the list (finished elsewhere, or failed by the caller) is satisfied.
    assert names(waves([c, d])) == [["c", "d"]]
    assert waves([]) == []


def test_the_sequential_grid_runs_in_three_waves(make_config, tmp_path):
    trials = expand("sequential", make_config(), str(tmp_path / "study"), seeds=[0])
    levels = names(waves(trials))
    assert len(levels) == 3
    assert "sst+para+sts-sum-s0" in levels[0] and "sst-sum-s0" in levels[0]       # the shared joint stage, SST
    assert levels[2] == ["sst-then-para-then-sts-sum-s0"]                           # SST, then Quora, then STS
    assert sorted(levels[1]) == sorted(["sst-then-para-s0"] + [f"sst+para+sts-then-{t}-sum-carry-s0"
                                                              for t in ("sst", "para", "sts")])


def test_slots_pack_within_a_wave_and_equal_the_plain_packing_without_stages(make_config, tmp_path):
    a, b, c, d, x = chain(make_config, tmp_path)
    trials = [a, b, d, x, c]
    assert slots(trials, 1) == [[0], [1], [2], [3], [4]]          # task i runs trial i
    assert slots(trials, 2) == [[0, 3], [1, 2], [4]]               # a+x | b+d | c: never an upstream beside its own
    assert slot(trials, 1, 2) == [1, 2]
    flat = [make_config(out=str(tmp_path / f"t{i}"), seed=i) for i in range(5)]
    assert slots(flat, 2) == [slot_trials(5, i, 2) for i in range(3)]
    with pytest.raises(ConfigError, match=r"^array index 3 is beyond the grid: 5 trials in 3 tasks of 2, so indices 0-2$"):
        slot(flat, 3, 2)


def test_a_failed_upstream_fails_its_dependents_transitively_with_the_reason(make_config, tmp_path):
    a, b, c, d, x = chain(make_config, tmp_path)
    trials = [a, b, c, d, x]
    assert fail_dependents(trials) == {}
    seen = fail_dependents(trials, {"a": "SLURM task 7_0 FAILED (log /l)"})
    assert seen == {"b": "upstream a failed: SLURM task 7_0 FAILED (log /l)",
                    "d": "upstream a failed: SLURM task 7_0 FAILED (log /l)",
                    "c": "upstream b failed: upstream a failed: SLURM task 7_0 FAILED (log /l)"}
    # A diverged upstream (its results.json says failed): its own error, on every later launch too.
    write_results(a, status="failed", error="step 2: the loss of task sst is nan")
    assert fail_dependents(trials, {"a": "SLURM task 7_0 FAILED"})["d"] == \
        "upstream a failed: step 2: the loss of task sst is nan"
    # The table and the summary show the reason; nothing is written into the dependents' folders.
    rows = results_table(trials, fail_dependents(trials))
    assert [r["status"] for r in rows] == ["failed", "failed", "failed", "failed", "missing"]
    assert rows[3]["error"] == "upstream a failed: step 2: the loss of task sst is nan"
    assert not os.path.exists(os.path.join(d.out, "results.json"))


def test_a_fixed_upstream_frees_its_dependents_and_an_outside_one_must_be_done(make_config, tmp_path, capsys):
    a, b, c, d, x = chain(make_config, tmp_path)
    write_results(a, status="failed", error="nan")
    assert set(fail_dependents([a, b, c, d])) == {"b", "c", "d"}
    os.remove(os.path.join(a.out, "results.json"))      # how a user retries a failed trial
    assert fail_dependents([a, b, c, d]) == {}
    # Dependents launched alone: an upstream finished elsewhere serves them, an unfinished one cannot.
    assert fail_dependents([d]) == {"d": f"upstream {a.out} has not finished and is not part of this launch"}
    done(a)
    assert fail_dependents([d]) == {} and names(waves([b, c, d])) == [["b", "d"], ["c"]]
    # A dependent that ended itself keeps its own results.
    write_results(b, status="failed", error="its own")
    write_results(a, status="failed", error="nan")
    assert "b" not in fail_dependents([a, b, c]) and fail_dependents([a, b, c])["c"] == "upstream b failed: its own"
    rows = results_table([a, b, c], fail_dependents([a, b, c]))
    assert summary(rows, str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "failed c: upstream b failed: its own\n" in out and "0/3 trials done, 3 failed (a, b, c)" in out
