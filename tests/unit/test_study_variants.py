"""The seed studies' ablation grids: regularisers under addition and PCGrad, and the model's
architecture one change at a time, each variant with its own single-task baselines."""
from cluster.core.study import expand, trial_name
from cluster.report.reading import report_identity
from mtl.config import RunConfig


def test_the_regularization_grid_crosses_every_regulariser_with_addition_and_pcgrad(tmp_path):
    trials = expand("regularization", RunConfig(), str(tmp_path), seeds=[0])
    assert len({trial_name(t) for t in trials}) == len(trials) == 36
    for reg in ("none", "smart", "l1", "linf"):
        mine = [t for t in trials if t.regularize.regularizer == reg]
        assert sorted("+".join(t.data.tasks) for t in mine if len(t.data.tasks) == 1) == ["para", "sst", "sts"]
        assert sorted(t.combiner.combiner for t in mine if len(t.data.tasks) == 2) == ["pcgrad"] * 3 + ["sum"] * 3
    # the report labels the variant, the plain one included (its settings are left out of the identity)
    assert {report_identity(t)["regularize.regularizer"] for t in trials} == {"none", "smart", "l1", "linf"}
    assert "regularize" not in trials[0].identity()


def test_the_architecture_grid_changes_one_thing_at_a_time(tmp_path):
    trials = expand("architecture", RunConfig(), str(tmp_path), seeds=[0])
    assert len({trial_name(t) for t in trials}) == len(trials) == 48
    reference = RunConfig().model
    changed = {}
    for t in trials:
        diff = tuple(sorted(k for k in vars(reference) if getattr(t.model, k) != getattr(reference, k)))
        changed.setdefault(diff, set()).add("+".join(t.data.tasks))
    assert set(changed) == {(), ("pooling",), ("pair_encoding",), ("pair_encoding", "siamese_features"),
                            ("head_depth",), ("shared_layer",)}
    assert all(len(groupings) == 6 for groupings in changed.values())      # 3 baselines + 3 pairs each


def test_both_grids_dry_run(tmp_path, capsys):
    from cluster.submit import main

    for grid, count in (("regularization", 36), ("architecture", 48)):
        assert main(["--backend", "submitit", "--grid", grid, "--dry-run", "--storage", str(tmp_path / grid)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[-1] == f"{count} trials" and len(lines) == count + 1
        assert any("regularizersmart" in line for line in lines) == (grid == "regularization")
