"""A study's upstream stages (cluster/core/study.py): each distinct stage once, before the
trials that start from it, named by its chain; a stage equal to a trial is that trial."""
from cluster.core.study import expand, trial_name, upstream_of
from mtl.config import RunConfig
from mtl.stages import links


def test_the_sequential_grid_runs_each_shared_stage_once_before_its_dependents(tmp_path):
    trials = expand("sequential", RunConfig(), str(tmp_path), seeds=[0, 1])
    names = [trial_name(t) for t in trials]
    assert len(names) == len(set(names)) == 18
    position = {t.out: i for i, t in enumerate(trials)}
    for t in trials:
        up = upstream_of(t)
        if up is not None:
            assert up in position and position[up] < position[t.out]   # listed before, and in the study
            assert t.upstream.identity() == trials[position[up]].identity()
    # The joint stage of joint-then-single is the joint trial itself: three dependents on one run.
    joint = str(tmp_path / "sst+para+sts-sum-s0")
    dependents = [trial_name(t) for t in trials if upstream_of(t) == joint]
    assert dependents == ["sst+para+sts-then-sst-sum-carry-s0", "sst+para+sts-then-para-sum-carry-s0",
                          "sst+para+sts-then-sts-sum-carry-s0"]
    assert all(t.carry_heads for t in trials if upstream_of(t) == joint)
    # Sequential: SST (the baseline itself), then Quora after it, then STS after both.
    seq = next(t for t in trials if trial_name(t) == "sst-then-para-then-sts-sum-s0")
    assert [trial_name(s) for s in links(seq)] == [
        "sst-sum-s0", "sst-then-para-s0", "sst-then-para-then-sts-sum-s0"]
    # Size control reaches the stages: every undersampling trial and stage sees as many examples.
    assert len({t.data.examples_per_task for t in trials}) == 1


def test_upstream_stages_are_named_by_identity_not_by_where_the_study_runs(tmp_path):
    a = expand("sequential", RunConfig(), str(tmp_path / "a"), seeds=[0])
    b = expand("sequential", RunConfig(), str(tmp_path / "b"), seeds=[0])
    assert [trial_name(t) for t in a] == [trial_name(t) for t in b]
    assert [t.fingerprint() for t in a] == [t.fingerprint() for t in b]


def test_the_sampling_grid_lists_every_epoch_mode(tmp_path):
    trials = expand("sampling", RunConfig(), str(tmp_path), seeds=[0])
    modes = sorted(t.data.epoch_mode for t in trials if len(t.data.tasks) == 3)
    assert modes == ["fixed_n", "max_size", "min_size", "proportional", "temperature"]
    assert len({trial_name(t) for t in trials}) == len(trials) == 20       # each mode with its own baselines
    assert sorted(t.data.epoch_mode for t in trials if t.data.tasks == ("sst",)) == modes


def test_the_pretraining_grid_dry_run_lists_upstream_stages_and_their_dependents(tmp_path, capsys):
    from cluster.submit import main

    assert main(["--backend", "submitit", "--grid", "pretraining", "--dry-run", "--storage", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{tmp_path}/mlm-s0\t") and "after=" not in lines[0]
    assert lines[1].startswith(f"{tmp_path}/mlm-then-nli-s0\t") and lines[1].endswith("after=mlm-s0")
    after = [line.rsplit("after=", 1)[-1] for line in lines[:-1] if "after=" in line]
    assert after.count("mlm-s0") == 6 and after.count("mlm-then-nli-s0") == 5
    assert lines[-1] == "17 trials (2 upstream stages, each run once before the 11 trials that start from them)"


def test_the_report_names_an_upstream_chain_as_one_variant(tmp_path):
    from cluster.report.reading import report_identity

    trials = {trial_name(t): t for t in expand("pretraining", RunConfig(), str(tmp_path), seeds=[0])}
    after_nli = report_identity(trials["mlm-then-nli-then-sst-sum-s0"])
    assert after_nli["after"] == "mlm > nli" and not any(k.startswith("upstream.") for k in after_nli)
    assert report_identity(trials["mlm-then-sst-sum-s0"])["after"] == "mlm"
    assert "after" not in report_identity(trials["sst-sum-s0"])
