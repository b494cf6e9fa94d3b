"""Fused groups (mtl.fused): each member ends as its trial alone would, within fp32 rounding;
one diverged member fails alone; a stopped group resumes (fused or not) to the same end."""
import json

import pytest

from mtl import checkpoint
from mtl.errors import ConfigError
from mtl.fused import fusion_key, train_group, why_not
from mtl.stop import StopSignal, TrialStopped
from mtl.train import train

COMMON = {"data.tasks": "sst,para", "optim.epochs": 2, "save_every_steps": 3, "combiner.conflict_every": 3,
          # dropout on: the group draws one mask for all, the mask each member alone draws
          "model.dropout": 0.3, "model.encoder_dropout": 0.1}
MEMBERS = [{"combiner.combiner": "scalarize", "combiner.alpha": 0.2},
           {"combiner.combiner": "scalarize", "combiner.alpha": 0.8, "optim.lr": 3e-4},
           {"combiner.combiner": "uncertainty"}]


def configs(make_config, tmp_path, prefix, members=MEMBERS, **extra):
    return [make_config(out=str(tmp_path / f"{prefix}{i}"), **{**COMMON, **m, **extra}) for i, m in enumerate(members)]


def weights(out):
    return checkpoint.load(checkpoint.latest(out))["model"]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_same_trial(fused: dict, alone: dict, fused_out, alone_out):
    assert fused["steps"] == alone["steps"]
    assert max_diff(weights(fused_out), weights(alone_out)) < 1e-5
    for record_f, record_a in zip(fused["epochs"], alone["epochs"]):
        assert record_f["metrics"] == pytest.approx(record_a["metrics"], abs=1e-6)
    assert fused["best"]["step"] == alone["best"]["step"]
    assert fused["grad_cos_mean"] == pytest.approx(alone["grad_cos_mean"], abs=1e-4)
    assert fused["config"] == alone["config"] | {"out": fused["config"]["out"]}


@pytest.fixture
def alone(make_config, tmp_path):
    cfgs = configs(make_config, tmp_path, "alone")
    return cfgs, [train(c) for c in cfgs]


def test_each_member_ends_as_its_trial_alone(make_config, tmp_path, alone):
    cfgs = configs(make_config, tmp_path, "fused")
    fused = train_group(cfgs)
    for f, a, cf, ca in zip(fused, alone[1], cfgs, alone[0]):
        assert_same_trial(f, a, cf.out, ca.out)
        assert f["fused_with"] == [n for n in ("fused0", "fused1", "fused2") if not cf.out.endswith(n)]
    assert fused[0]["weights_digest"] != fused[1]["weights_digest"]      # different trials, really
    # Each member's checkpoint holds its own weights, not the group's stacked storage.
    state = checkpoint.load(checkpoint.latest(cfgs[0].out))["model"]
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in state.values())
    # A trial finished in a group is done: run unfused, it returns its results as they stand.
    again = train(cfgs[1])
    assert again["finished_at"] == fused[1]["finished_at"]


def test_a_diverged_member_fails_alone_and_the_others_go_on(make_config, tmp_path, alone):
    members = [MEMBERS[0], {**MEMBERS[1], "optim.lr": 1e6}, MEMBERS[2]]
    cfgs = configs(make_config, tmp_path, "nan", members)
    fused = train_group(cfgs)
    assert fused[1]["status"] == "failed" and "nan" in fused[1]["error"]
    saved = json.loads((tmp_path / "nan1" / "results.json").read_text())
    assert saved["status"] == "failed" and saved["steps"] == fused[1]["steps"] > 0
    assert not (tmp_path / "nan1" / "best").exists()          # no evaluation ran on its NaN weights
    for k in (0, 2):
        assert fused[k]["status"] == "done"
        assert_same_trial(fused[k], alone[1][k], cfgs[k].out, alone[0][k].out)


def test_a_stopped_group_resumes_fused_or_alone_to_the_same_end(make_config, tmp_path, alone):
    cfgs = configs(make_config, tmp_path, "cut")
    stop = StopSignal()

    def at_step_3(i, info):      # mid-epoch 1 (8 steps per epoch)
        if info["step"] == 3:
            stop.request()
    with pytest.raises(TrialStopped):
        train_group(cfgs, stop=stop, on_checkpoint=at_step_3)
    assert all(checkpoint.latest(c.out) for c in cfgs)        # every member checkpointed before leaving
    first = train(cfgs[0])                                    # one member goes on alone ...
    rest = train_group(cfgs[1:])                              # ... the others as a group
    for f, a, cf, ca in zip([first, *rest], alone[1], cfgs, alone[0]):
        assert f["resumed_from_steps"] == [3]
        assert_same_trial(f, a, cf.out, ca.out)


def test_only_trials_that_share_batches_fuse(make_config, tmp_path):
    a, b = configs(make_config, tmp_path, "k", MEMBERS[:2])
    assert fusion_key(a) == fusion_key(b)
    other_seed = a.replace(seed=1, out=str(tmp_path / "s1"))
    assert fusion_key(other_seed) != fusion_key(a)
    with pytest.raises(ConfigError, match=r"fuse: .*s1 does not see the batches of .*k0 \(seed 0 -> 1\)"):
        train_group([a, other_seed])
    pcgrad = a.replace(out=str(tmp_path / "pc"), **{"combiner.combiner": "pcgrad", "combiner.alpha": 0.5})
    assert fusion_key(pcgrad) is None and "T backwards" in why_not(pcgrad)
    with pytest.raises(ConfigError, match="cannot train in a fused group: --combiner pcgrad"):
        train_group([a, pcgrad])
    with pytest.raises(ConfigError, match="twice"):
        train_group([a, a])
    assert not any((tmp_path / n).exists() for n in ("k0", "k1", "s1", "pc"))    # refused before any write
