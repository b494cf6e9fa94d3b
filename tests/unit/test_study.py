"""The launcher-independent study: grid expansion, trial names, done-ness, the results table,
array slots, and the submit command's dry run (no Ray, no SLURM)."""
import json

import pytest

from cluster.backends.ray_sweep import concurrent_slots, driver_resources
from cluster.core.ending import is_finished, results_table, write_table
from cluster.core.placement import Placement
from cluster.core.study import expand, index_ranges, parse_seeds, slot_count, slot_trials, trial_name
from cluster.submit import main as submit
from mtl.config import RunConfig
from mtl.errors import ConfigError


def test_pairings_grid_is_the_reference_study():
    trials = expand("pairings", RunConfig(), "/store", seeds=[0, 1])
    assert len(trials) == 2 * (3 + 3 * (1 + 9 + 1))
    names = [t.out.rsplit("/", 1)[-1] for t in trials]
    assert len(set(names)) == len(names)
    assert trials[0].out == "/store/sst-sum-s0"
    assert names[:5] == ["sst-sum-s0", "para-sum-s0", "sts-sum-s0", "sst+para-sum-s0", "sst+para-scalarize-a0.1-s0"]
    scalarized = [t for t in trials if t.combiner.combiner == "scalarize" and t.seed == 0]
    assert sorted({t.combiner.alpha for t in scalarized}) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert all(t.out.startswith("/store/") for t in trials)
    assert expand("pairings", RunConfig(), "/store", seeds=[0, 1]) == trials     # deterministic


def test_yaml_grid_crosses_axes_and_does_not_repeat_alpha_for_other_methods(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("axes:\n  tasks: ['sst,para']\n  combiner: [sum, scalarize]\n  alpha: [0.2, 0.8]\n"
                    "  optim.lr: [1.0e-5, 2.0e-5]\nfixed:\n  optim.epochs: 3\n")
    trials = expand(str(grid), RunConfig(), "runs/x", seeds=[0])
    assert len(trials) == 2 * (1 + 2)               # per lr: one sum, two scalarize
    assert all(t.optim.epochs == 3 for t in trials)
    names = sorted(t.out.rsplit("/", 1)[-1] for t in trials)
    assert "sst+para-scalarize-a0.2-lr1e-05-s0" in names and "sst+para-sum-lr2e-05-s0" in names


def test_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = RunConfig().replace(**{"data.data_dir": "data", "data.cache_dir": "s3://b/cache"})
    (t,) = expand("weighting", base, "runs/w", seeds=[0], size_control="none")[:1]
    assert t.out == str(tmp_path / "runs" / "w" / "sst+para+sts-sum-s0")
    assert t.data.data_dir == str(tmp_path / "data") and t.data.cache_dir == "s3://b/cache"
    # By default every trial of a study shares one token cache at its root.
    shared = {u.data.cache_dir for u in expand("weighting", RunConfig(), "runs/w", seeds=[0, 1])}
    assert shared == {str(tmp_path / "runs" / "w" / "token_cache")}
    assert t.model.model == "embedded:all-MiniLM-L6-v2"
    assert expand("weighting", base, "memory://w", seeds=[0], size_control="none")[0].out == \
        "memory://w/sst+para+sts-sum-s0"


def test_bad_grids_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes:\n  tasks: [sst, nli]\n")
    with pytest.raises(ConfigError, match="bad.yaml: axes.data.tasks: unknown task 'nli'"):
        expand(str(bad), RunConfig(), "runs/x", seeds=[0])
    bad.write_text("axis:\n  tasks: [sst]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'axis'"):
        expand(str(bad), RunConfig(), "runs/x", seeds=[0])


@pytest.mark.parametrize("backend", ["ray", "slurm", "submitit"])
def test_dry_run_lists_trials_and_bad_flags_exit_2(capsys, backend):
    assert submit(["--grid", "weighting", "--seeds", "0,1", "--dry-run", "--storage", "/s"], backend=backend) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "10 trials" and out[0].startswith("/s/sst+para+sts-sum-s0")
    assert submit(["--grid", "pairings", "--dry-run", "--alpha", "2"], backend=backend) == 2
    assert "combiner.alpha: 2.0 is outside [0, 1]" in capsys.readouterr().err
    assert submit(["--grid", "pairings", "--seeds", "0,x", "--dry-run"], backend=backend) == 2
    assert capsys.readouterr().err.strip() == "error: --seeds: '0,x' is not a comma-separated list of integers"


def test_the_methods_grid_runs_every_method_on_all_three_tasks_and_each_pair(capsys):
    from mtl.combine import COMBINERS

    assert submit(["--grid", "methods", "--seeds", "0,1,2", "--dry-run", "--storage", "/s"], backend="submitit") == 0
    names = [line.split("\t")[0].removeprefix("/s/") for line in capsys.readouterr().out.splitlines()[:-1]]
    methods = sorted(set(COMBINERS) - {"scalarize"})
    assert len(names) == 3 * (3 + 4 * len(methods)) == len(set(names))
    for tasks in ("sst+para+sts", "sst+para", "sst+sts", "para+sts"):
        assert {f"{tasks}-{m}-s2" for m in methods} <= set(names)
    assert {"sst-sum-s0", "para-sum-s1", "sts-sum-s2"} <= set(names)


def test_weighted_surgery_names_its_weights(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("axes:\n  tasks: ['sst,para']\n  combiner: [pcgrad, upgrad]\n  alpha: [0.3, 0.5]\n")
    names = sorted(c.out.rsplit("/", 1)[-1] for c in expand(str(grid), RunConfig(), "runs/x", seeds=[0]))
    assert names == ["sst+para-pcgrad-a0.3-s0", "sst+para-pcgrad-s0", "sst+para-upgrad-a0.3-s0", "sst+para-upgrad-s0"]


def test_count_sizes_the_array_and_flags_belong_to_their_backend(capsys):
    assert submit(["--backend", "slurm", "--grid", "pairings", "--seeds", "0,1,2", "--count"]) == 0
    assert capsys.readouterr().out.strip() == "108"
    assert submit(["--grid", "pairings", "--count", "--trials-per-task", "4"], backend="slurm") == 0
    assert capsys.readouterr().out.strip() == "9"
    with pytest.raises(SystemExit):      # a SLURM partition means nothing to Ray: argparse refuses it
        submit(["--grid", "pairings", "--dry-run", "--partition", "gpu"], backend="ray")
    assert "unrecognized arguments: --partition gpu" in capsys.readouterr().err


def test_results_table_has_one_row_per_trial_from_its_own_results(tmp_path):
    trials = expand("smoke", RunConfig(), str(tmp_path), seeds=[0])
    for t in trials[:3]:
        (tmp_path / t.out.rsplit("/", 1)[-1]).mkdir()
        (tmp_path / t.out.rsplit("/", 1)[-1] / "results.json").write_text(json.dumps({
            "best": {"epoch": 1, "metrics": {"mean": 0.5}}, "steps": 4, "wall_time_s": 2.0, "config": t.to_dict(),
            "train_time_s": 1.0, "examples_per_s": 3.0, "world_size": 1, "examples_per_epoch": {"sst": 400}}))
    assert [is_finished(t) for t in trials] == [True, True, True, False, False, False]
    rows = results_table(trials)
    assert [r["status"] for r in rows] == ["done", "done", "done", "missing", "missing", "missing"]
    assert rows[0]["data.tasks"] == "sst" and rows[5]["parallel.workers"] == 2 and rows[0]["dev/mean"] == 0.5
    assert rows[0]["examples_per_epoch/sst"] == 400
    assert "out" not in rows[0] and "progress" not in rows[0]        # where and how it logs: not what it computes
    write_table(str(tmp_path), rows)
    assert (tmp_path / "results.csv").read_text().splitlines()[0].startswith("trial,status,")
    assert json.loads((tmp_path / "results.json").read_text()) == rows


def test_concurrency_never_lets_drivers_starve_their_workers():
    trials = expand("smoke", RunConfig(), "runs/x", seeds=[0])      # five 1-worker trials, one of 2 workers
    two = next(t for t in trials if t.parallel.workers == 2)
    budgets, p = {"CPU": 2.0, "mtl_cpus": 2.0}, Placement()
    # With budgets (a local Ray): each driver reserves exactly its workers' CPUs and no CPU itself.
    assert driver_resources(two, p, budgets) == {"CPU": 0, "mtl_cpus": 2}
    assert driver_resources(trials[0], p, budgets) == {"CPU": 0, "mtl_cpus": 1}
    assert concurrent_slots(trials, p, budgets) == 2                   # two 1-worker trials at once
    assert concurrent_slots(trials, p, {"CPU": 8.0, "mtl_cpus": 8.0}) == 6          # all of them
    assert concurrent_slots(trials, Placement(cpus_per_worker=2), {"CPU": 8.0, "mtl_cpus": 8.0}) == 4
    assert driver_resources(two, Placement(gpus_per_worker=0.5), budgets) == {"CPU": 0, "mtl_cpus": 2, "mtl_gpus": 1}
    # Without (a cluster we did not start): only as many as the largest trial allows.
    assert driver_resources(two, p, {"CPU": 4.0}) == {"CPU": 0, "memory": 1 << 20}   # a bundle may not be empty
    assert concurrent_slots(trials, p, {"CPU": 2.0}) == 1
    assert concurrent_slots(trials, p, {"CPU": 4.0}) == 2
    with pytest.raises(RuntimeError, match=r"para\+sts-pcgrad-batch_size8-s0 does not fit the cluster: it needs 2 CPUs"):
        concurrent_slots(trials, p, {"CPU": 1.0, "mtl_cpus": 1.0})


def test_array_slots_cover_the_grid_once_and_an_index_beyond_it_is_one_line():
    assert [slot_trials(36, i) for i in (0, 35)] == [[0], [35]]
    assert slot_count(36, 4) == 9 and slot_trials(36, 8, 4) == [32, 33, 34, 35]
    assert slot_count(10, 4) == 3 and slot_trials(10, 2, 4) == [8, 9]
    covered = [i for s in range(slot_count(37, 5)) for i in slot_trials(37, s, 5)]
    assert covered == list(range(37))
    with pytest.raises(ConfigError, match=r"^array index 36 is beyond the grid: 36 trials, so indices 0-35$"):
        slot_trials(36, 36)
    with pytest.raises(ConfigError, match=r"beyond the grid: 10 trials in 3 tasks of 4, so indices 0-2$"):
        slot_trials(10, 3, 4)
    assert index_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8" and index_ranges([3]) == "3"
    assert parse_seeds("0, 1,2") == [0, 1, 2]


def test_placement_is_not_identity(tmp_path):
    """Where a trial runs never renames it, nor changes its fingerprint or table columns; what
    it computes (workers, strategy) does."""
    a = RunConfig().replace(out=str(tmp_path / "a"), progress="off", log_every_steps=3, save_every_steps=7,
                            keep_checkpoints=5, **{"data.cache_dir": "/c", "combiner.conflict_every": 0})
    b = RunConfig()
    assert a.fingerprint() == b.fingerprint() and a.identity() == b.identity()
    assert RunConfig().replace(**{"parallel.workers": 2}).fingerprint() != b.fingerprint()
    assert RunConfig().replace(**{"optim.lr": 2e-5}).fingerprint() != b.fingerprint()
    # Configs saved before placement left the RunConfig still load (checkpoints, results.json).
    old = b.to_dict()
    old["parallel"].update(cpus_per_worker=4.0, gpus_per_worker=1.0, max_failures=3)
    assert RunConfig.from_dict(old) == b
    # Grids name trials the same whatever the placement flags of the launch were.
    names = [trial_name(t) for t in expand("smoke", RunConfig(), "/s", seeds=[0])]
    assert names == ["sst-sum-s0", "para-sum-s0", "sts-sum-s0", "para+sts-sum-s0", "sst+para-sum-s0",
                     "para+sts-pcgrad-batch_size8-s0"]


def test_the_slurm_and_submitit_paths_never_import_ray():
    import subprocess
    import sys

    code = ("import sys, cluster.core.study, cluster.submit, cluster.backends.slurm_array, "
            "cluster.backends.submitit_sweep, cluster.backends.submitit_job, cluster.core.trial; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_names_that_the_rule_cannot_tell_apart_all_get_a_suffix_from_what_varies(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("axes:\n  tasks: ['sst,para']\n  combiner: [pcgrad]\n  parallel.workers: [1, 2]\n")
    names = sorted(trial_name(t) for t in expand(str(grid), RunConfig(), "/s", seeds=[0]))
    assert len(names) == 2 and all(n.startswith("sst+para-pcgrad-s0-") for n in names)
    again = sorted(trial_name(t) for t in expand(str(grid), RunConfig().replace(**{"data.data_dir": "/elsewhere"}),
                                                  "/other", seeds=[0], size_control="none"))
    assert again == names          # the suffix comes from the grid, not from where the study runs


def test_a_storage_holding_other_settings_is_refused(tmp_path):
    from cluster.core.study import check_storage

    trials = expand("smoke", RunConfig(), str(tmp_path), seeds=[0])
    old = trials[0].replace(**{"optim.lr": 3e-5})
    (tmp_path / "sst-sum-s0").mkdir()
    done = {"status": "done", "best": {}, "steps": 1, "wall_time_s": 1.0, "train_time_s": 1.0, "examples_per_s": 1.0,
            "world_size": 1}
    (tmp_path / "sst-sum-s0" / "results.json").write_text(json.dumps({**done, "config": old.to_dict()}))
    with pytest.raises(ConfigError, match=r"sst-sum-s0 holds a trial with other settings \(optim.lr 3e-05 -> 1e-05\)"):
        check_storage(trials)
    (tmp_path / "sst-sum-s0" / "results.json").write_text(json.dumps({**done, "config": trials[0].to_dict()}))
    check_storage(trials)


def test_a_second_launch_of_the_same_sweep_is_refused_at_once(tmp_path):
    """The Ray sweep holds its storage root: a second launch would run the same trials beside it."""
    from cluster.backends.ray_sweep import run_sweep
    from mtl.lease import Lease, LeaseHeld

    trials = expand("smoke", RunConfig(), str(tmp_path), seeds=[0])
    with Lease(str(tmp_path), "sweep").acquire():
        with pytest.raises(LeaseHeld, match=rf"^{tmp_path} is in use by sweep of "):
            run_sweep(trials, str(tmp_path), verbose=0)
