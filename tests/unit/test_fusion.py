"""--fuse K|auto, launcher side (cluster/core/fusion.py, the backends' planning, the trial entry):
which trials become one group, in which order, how auto sizes K, the one-line refusals, what an
array task runs, and run_group's bookkeeping around mtl.fused.train_group.  No cluster and no
training here (tests/integration/test_fuse.py trains fused groups on each backend)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from cluster.core import fusion
from cluster.core.fusion import fuse_groups, fused_slots, plan, task_slots
from cluster.core.placement import Placement
from cluster.core.study import expand, trial_name
from mtl.config import RunConfig
from mtl.errors import ConfigError

GiB = 1 << 30


def trial(name: str, tasks: str = "sst,para", **settings) -> RunConfig:
    return RunConfig().replace(out=f"/s/{name}", **{"data.tasks": tasks, **settings})


def names(groups) -> list[list[str]]:
    return [[trial_name(t) for t in g] for g in groups]


# --------------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------------
def test_trials_that_share_batches_group_in_order_of_first_appearance_in_chunks():
    # Keys: A = sst+para, B = para+sts; they differ only in free settings within a key.
    trials = [trial("a1", **{"combiner.combiner": "sum"}),
              trial("b1", "para,sts"),
              trial("a2", **{"combiner.combiner": "scalarize", "combiner.alpha": 0.2}),
              trial("a3", **{"optim.lr": 3e-5, "optim.weight_decay": 0.0}),
              trial("b2", "para,sts", **{"combiner.combiner": "uncertainty"}),
              trial("a4", **{"combiner.combiner": "scalarize", "combiner.alpha": 0.8})]
    assert fused_slots(trials, 2) == [[0, 2], [1, 4], [3, 5]]      # ordered by each group's first trial
    assert fused_slots(trials, 3) == [[0, 2, 3], [1, 4], [5]]
    assert fused_slots(trials, 16) == [[0, 2, 3, 5], [1, 4]]
    assert fused_slots(trials, 1) == [[i] for i in range(6)]        # no fusion: every trial alone
    assert names(fuse_groups(trials, 3)) == [["a1", "a2", "a3"], ["b1", "b2"], ["a4"]]
    # Deterministic: the same list groups the same way (SLURM tasks re-expand it).
    assert fused_slots(list(trials), 3) == fused_slots(trials, 3)
    # A per-key plan (what auto finds) caps each key on its own; a key it does not name stays alone.
    key_a = fusion.group_key(trials[0])
    assert fused_slots(trials, {key_a: 2}) == [[0, 2], [1], [3, 5], [4]]


def test_what_cannot_fuse_runs_alone_and_what_differs_in_batches_is_not_grouped():
    trials = [trial("sum"),
              trial("pcgrad", **{"combiner.combiner": "pcgrad"}),                 # its own backwards
              trial("two", **{"parallel.workers": 2}),                            # fusion needs one worker
              trial("seed1", seed=1),                                             # other batches
              trial("batch", **{"optim.batch_size": 4}),                          # other shapes
              trial("alpha", **{"combiner.combiner": "scalarize", "combiner.alpha": 0.3}),
              trial("cpu", device="cpu"),                                         # placement, but never mixed
              trial("cpu2", device="cpu", **{"optim.lr": 1e-4})]
    assert names(fuse_groups(trials, 8)) == [["sum", "alpha"], ["pcgrad"], ["two"], ["seed1"], ["batch"],
                                             ["cpu", "cpu2"]]


def test_the_smoke_grid_has_nothing_to_fuse_and_a_weighting_grid_fuses_per_pair():
    smoke = expand("smoke", RunConfig(), "/s", seeds=[0])
    assert fused_slots(smoke, 16) == [[i] for i in range(len(smoke))]   # every trial trains other tasks
    pairings = expand("pairings", RunConfig(), "/s", seeds=[0])
    groups = fuse_groups(pairings, 16)
    # Per pair: addition and the nine alphas fuse (10); PCGrad alone; baselines alone.
    assert sorted(len(g) for g in groups) == [1] * 3 + [1] * 3 + [10] * 3
    assert all(len({t.data.tasks for t in g}) == 1 for g in groups)
    assert task_slots(pairings, 1, 1) == [[i] for i in range(len(pairings))]
    assert task_slots(pairings, 1, 16) == fused_slots(pairings, 16)


def test_a_group_name_is_its_first_trial_s_and_a_lone_trial_keeps_its_own():
    a, b = trial("sst+para-sum-s0"), trial("sst+para-scalarize-a0.2-s0")
    assert fusion.group_name([a]) == "sst+para-sum-s0"
    assert fusion.group_name([a, b]) == "fused2-sst+para-sum-s0"
    assert len(fusion.group_name([trial("x" * 250), b])) == fusion.NAME_MAX


# --------------------------------------------------------------------------------------------
# --fuse auto
# --------------------------------------------------------------------------------------------
def test_auto_without_a_gpu_is_one_and_says_why_in_one_line(caplog):
    trials = [trial("a"), trial("b", **{"optim.lr": 1e-4})]
    caplog.set_level(logging.INFO, logger="cluster.core.fusion")
    assert plan(trials, Placement(fuse="auto"), gpu_default=0.0, detect=True) == 1          # Ray's default: CPU
    assert plan([t.replace(device="cpu") for t in trials], Placement(fuse="auto"), 1.0, detect=True) == 1
    assert plan(trials, Placement(fuse="auto"), 1.0, detect=False) == 1                     # capacity unknown
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["--fuse auto: no GPU per worker (--gpus-per-worker 0): every trial trains alone",
                     "--fuse auto: no trial that can fuse runs on a GPU: every trial trains alone",
                     "--fuse auto: GPU memory unknown here (no --gpu-memory; the GPUs the jobs get are not visible "
                     "from here): every trial trains alone"]
    assert plan(trials, Placement(fuse=3), 0.0, detect=True) == 3           # a number is taken as given


def test_auto_fits_k_estimates_into_one_gpu_per_key(monkeypatch):
    from cluster.core import memory

    sizes = {"sst,para": 9 * GiB, "para,sts": 3 * GiB, "sst,sts": 100 * GiB}
    monkeypatch.setattr(memory, "estimate_worker",
                        lambda cfg: memory.Estimate(sizes[",".join(cfg.data.tasks)], {}))
    trials = [trial(f"{tasks}-{i}", tasks, **{"optim.lr": 1e-5 * (i + 1)})
              for tasks in sizes for i in range(20)]
    found = plan(trials, Placement(fuse="auto", gpu_memory="80G"), 1.0, detect=False)
    by_tasks = {tasks: found[fusion.group_key(trial("x", tasks))] for tasks in sizes}
    assert by_tasks == {"sst,para": 8, "para,sts": 16, "sst,sts": 1}     # 80 // 9; capped at 16; one never refused
    assert [len(g) for g in fuse_groups(trials, found)][:4] == [8, 8, 4, 16]
    # A fraction of a GPU per worker: the group gets that share of it.
    half = plan(trials, Placement(fuse="auto", gpu_memory="80G", gpus_per_worker=0.5), 1.0, detect=False)
    assert half[fusion.group_key(trial("x", "sst,para"))] == 4


# --------------------------------------------------------------------------------------------
# The flag
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, "0", "-1", "x", "1.5", "", True])
def test_a_bad_fuse_is_one_line_naming_the_flag(value):
    with pytest.raises(ConfigError, match=r"^--fuse: .* is not a number of trials \(1 or more\) or auto$"):
        Placement(fuse=value)


def test_fuse_values_and_the_refused_combination():
    assert [Placement(fuse=v).fuse for v in (1, "1", "3", " AUTO ", "auto")] == [1, 1, 3, "auto", "auto"]
    with pytest.raises(ConfigError, match=r"^--fuse 2 with --trials-per-task 4: a fused group already runs its "
                                          r"trials in one task; use one of the two$"):
        Placement(fuse=2, trials_per_task=4)
    assert Placement(fuse=1, trials_per_task=4).trials_per_task == 4


def test_every_launcher_reads_fuse_and_refuses_a_bad_one_in_one_line(tmp_path):
    from cluster.backends.registry import BACKENDS

    assert all("fuse" in b.placement_flags for b in BACKENDS.values())
    for launcher in ("ray_submit.py", "slurm_submit.py", "submitit_sweep.py"):
        done = subprocess.run([sys.executable, f"launch/{launcher}", "--grid", "smoke", "--storage",
                               str(tmp_path / "s"), "--fuse", "none", "--dry-run"], capture_output=True, text=True,
                              cwd=fusion_root())
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [
            "error: --fuse: 'none' is not a number of trials (1 or more) or auto"], done.stderr


def fusion_root() -> str:
    import os

    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_count_is_the_number_of_fused_groups(tmp_path, capsys):
    from cluster.submit import main

    grid = tmp_path / "grid.yaml"
    grid.write_text('axes:\n  tasks: ["sst,para"]\n  combiner: [sum, scalarize, pcgrad]\n  alpha: [0.2, 0.8]\n')
    args = ["--grid", str(grid), "--storage", str(tmp_path / "s"), "--count"]
    for extra, count in (([], 5), (["--fuse", "2"], 4), (["--fuse", "3"], 3), (["--fuse", "auto"], 5),
                         (["--fuse", "auto", "--gpu-memory", "80G"], 3)):
        assert main([*args, *extra], backend="slurm") == 0
        assert capsys.readouterr().out.strip() == str(count), extra


def test_dry_run_shows_each_trial_s_group(tmp_path, capsys):
    from cluster.submit import main

    grid = tmp_path / "grid.yaml"
    grid.write_text('axes:\n  tasks: ["sst,para"]\n  combiner: [sum, scalarize, pcgrad]\n  alpha: [0.2, 0.8]\n')
    args = ["--grid", str(grid), "--storage", str(tmp_path / "s"), "--dry-run"]
    assert main(args, backend="ray") == 0
    plain = capsys.readouterr().out.splitlines()
    assert plain[-1] == "5 trials" and not any("group=" in line for line in plain)
    assert main([*args, "--fuse", "2"], backend="ray") == 0
    fused = capsys.readouterr().out.splitlines()
    groups = {line.split("\t")[0].rsplit("/", 1)[1]: line.rsplit("group=", 1)[1] for line in fused[:-1]}
    # The same lines with the group added; the sum and the alphas fuse two by two, pcgrad alone.
    assert [line.rsplit(" group=", 1)[0] for line in fused[:-1]] == plain[:-1]
    assert fused[-1] == "5 trials in 4 fused groups (1 of 2 or more)"
    assert sorted(groups.values()) == ["0", "0", "1", "2", "3"] and groups["sst+para-pcgrad-a0.2-s0"] != groups[
        "sst+para-sum-s0"], groups


# --------------------------------------------------------------------------------------------
# SLURM: pinned groups, what a task runs
# --------------------------------------------------------------------------------------------
def test_the_groups_are_pinned_with_the_trial_list_and_keep_unfused_lists_unchanged(tmp_path):
    from cluster.backends.slurm_array import load_study, pin_trials

    trials = expand("pairings", RunConfig(), str(tmp_path / "s"), seeds=[0])
    plain = pin_trials(trials, str(tmp_path / "s"), 1)
    assert "groups" not in json.loads(open(plain).read())          # a study without --fuse: as before
    groups = fused_slots(trials, 4)
    fused = pin_trials(trials, str(tmp_path / "s"), 1, groups=groups)
    assert fused != plain and load_study(fused)[3] == groups and load_study(plain)[3] is None
    assert pin_trials(trials, str(tmp_path / "s"), 1, groups=fused_slots(trials, 4)) == fused   # stable name


def test_an_array_task_finds_its_group_by_index_and_refuses_auto_by_hand():
    from cluster.backends.slurm_array import task_groups

    trials = expand("pairings", RunConfig(), "/s", seeds=[0])
    groups = task_groups(trials, "4")
    assert groups == fused_slots(trials, 4) and task_groups(trials, "1") is None
    assert fusion.pick(groups, 3, len(trials)) == groups[3]
    with pytest.raises(ConfigError, match=rf"^array index {len(groups)} is beyond the grid: 36 trials in "
                                          rf"{len(groups)} fused groups, so indices 0-{len(groups) - 1}$"):
        fusion.pick(groups, len(groups), len(trials))
    with pytest.raises(ConfigError, match=r"^--fuse auto: an array task cannot size groups by itself"):
        task_groups(trials, "auto")


def test_a_fused_task_runs_its_unfinished_trials_as_one_process(monkeypatch):
    import os

    from cluster.backends import slurm_array

    trials = [trial(n, **{"optim.lr": lr}) for n, lr in (("a", 1e-5), ("b", 2e-5), ("c", 3e-5))]
    done = trials[1].out
    monkeypatch.setattr(slurm_array, "unfinished", lambda ts: [t for t in ts if t.out != done])
    launched = []
    monkeypatch.setattr(slurm_array, "free_port", lambda: 12345)

    class Proc:
        def __init__(self, argv, env):
            launched.append((argv, env))

        def poll(self):
            return 0
    monkeypatch.setattr(slurm_array.subprocess, "Popen", Proc)
    assert slurm_array.run_task(trials, 0, [], fused=True) == 0
    (argv, env), = launched                   # one process for the group, the finished trial left out
    assert argv[1:3] == ["-m", "cluster.core.trial"] and [os.path.basename(a) for a in argv[3:]] == ["a.json", "c.json"]
    assert env["WORLD_SIZE"] == "1" and env["RANK"] == "0"
    launched.clear()
    assert slurm_array.run_task(trials, 0, [], fused=False) == 0     # --trials-per-task: one process each
    assert [[os.path.basename(x) for x in a[3:]] for a, _ in launched] == [["a.json"], ["c.json"]]


def test_a_fused_task_asks_for_one_trial_s_resources():
    from cluster.backends.slurm_array import GPU_DEFAULT

    trials = expand("pairings", RunConfig(), "/s", seeds=[0])
    p = Placement(fuse=16, cpus_per_worker=2)
    group = max(fuse_groups(trials, 16), key=len)
    assert len(group) == 10 and p.slurm_resources(group[:1], GPU_DEFAULT) == (2, 1)


# --------------------------------------------------------------------------------------------
# run_group: the entry's bookkeeping around train_group
# --------------------------------------------------------------------------------------------
def test_run_group_skips_ended_members_and_maps_checkpoints_to_the_whole_group(monkeypatch):
    import mtl.fused
    from cluster.core import trial as entry

    cfgs = [trial(n) for n in ("a", "b", "c", "d")]
    ended = {"/s/b": {"status": "failed", "error": "step 3: nan", "steps": 3}}
    monkeypatch.setattr(entry, "is_finished", lambda c: c.out in ended)
    monkeypatch.setattr(entry, "read_results", lambda c: ended.get(c.out))
    seen, told = [], []

    def fake_group(group, dist=None, stop=None, lease_wait_s=0.0, on_checkpoint=None):
        seen.append([c.out for c in group])
        on_checkpoint(1, {"step": 5})          # the group's second member: the whole group's third
        return [{"status": "done", "steps": 8, "out": c.out} for c in group]
    monkeypatch.setattr(mtl.fused, "train_group", fake_group)
    results = entry.run_group(cfgs, on_checkpoint=lambda i, info: told.append((i, info["step"])))
    assert seen == [["/s/a", "/s/c", "/s/d"]]                 # the failed member is not trained again
    assert [r["status"] for r in results] == ["done", "failed", "done", "done"] and told == [(2, 5)]
    error = entry.failed_members(cfgs, results)
    assert str(error) == "1 of 4 fused trials failed (b: step 3: nan)" and error.step == 3

    # One member left: it trains alone (placement: the same trial), and a divergence is returned.
    ended.update({"/s/a": {"status": "done"}, "/s/c": {"status": "done"}})

    def diverge(cfg, dist=None, on_checkpoint=None, stop=None):
        from mtl.errors import TrialFailed

        ended[cfg.out] = {"status": "failed", "error": "step 1: inf", "steps": 1}
        raise TrialFailed("step 1: inf", 1)
    monkeypatch.setattr(entry, "run_trial", diverge)
    assert [r["status"] for r in entry.run_group(cfgs)] == ["done", "failed", "done", "failed"]
    with pytest.raises(ConfigError, match=r"^fuse: a trial is in the group twice"):
        entry.run_group([cfgs[0], cfgs[0]])


def test_the_entry_refuses_trials_that_cannot_train_together_in_one_line(make_config, tmp_path, capsys):
    from cluster.core.trial import main

    paths = []
    for name, tasks in (("a", "sst"), ("b", "para")):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(make_config(out=str(tmp_path / name), **{"data.tasks": tasks}).to_dict()))
        paths.append(str(path))
    assert main(paths) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: fuse: {tmp_path / 'b'} does not see the batches of "), err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()     # nothing written
    assert main([paths[0], str(tmp_path / "missing.json")]) == 2
