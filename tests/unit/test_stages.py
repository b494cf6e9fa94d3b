"""Chains of stages (mtl/stages.py): the upstream's encoder carried on, heads carried over,
a frozen encoder, and a killed chain resuming where it stopped."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mtl import checkpoint, stages
from mtl.config import RunConfig
from mtl.errors import ConfigError
from mtl.stages import UpstreamNotReady
from mtl.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_an_upstream_is_part_of_the_identity_and_its_folder_is_not():
    up = RunConfig(out="/a/up", seed=3)
    down = RunConfig(out="/a/down").replace(upstream=up.to_dict())
    moved = down.replace(**{"upstream.out": "/b/up"})
    assert moved.fingerprint() == down.fingerprint()                  # where it ran is not what it is
    assert down.replace(**{"upstream.seed": 4}).fingerprint() != down.fingerprint()
    assert RunConfig(out="/a/down").fingerprint() != down.fingerprint()
    assert RunConfig.from_dict(json.loads(json.dumps(down.to_dict()))).upstream.out == "/a/up"
    with pytest.raises(ConfigError, match="carry_heads: needs an upstream stage"):
        RunConfig(carry_heads=True).check_stage()
    with pytest.raises(ConfigError, match="upstream.model.model: the upstream stage trains 'x'"):
        down.replace(**{"upstream.model.model": "x"})


def test_a_chain_file_gives_linked_stages_in_the_trials_folder(make_config, tmp_path):
    base = make_config(**{"data.tasks": "sts"})
    cfg = stages.chain(base, [{"tasks": "sst"}, {"tasks": "para", "optim.lr": 2e-3}])
    first, second, last = stages.links(cfg)
    assert (first.data.tasks, second.data.tasks, last.data.tasks) == (("sst",), ("para",), ("sts",))
    assert first.out == os.path.join(base.out, "stages", "0-sst") and second.optim.lr == 2e-3
    assert second.upstream.out == first.out and last.out == base.out
    with pytest.raises(ConfigError, match=r"stages\[1\]: data.tasks: unknown task 'nope'"):
        stages.chain(base, [{"tasks": "sst"}, {"tasks": "nope"}])
    bad = tmp_path / "chain.yaml"
    bad.write_text("- {tasks: sst}\n")
    with pytest.raises(ConfigError, match="chain.yaml: a chain file is 'stages:'"):
        stages.load_chain_file(str(bad))


def test_a_stage_starts_from_its_upstreams_best_encoder_and_carries_heads(make_config, tmp_path):
    from safetensors.torch import load

    up = make_config(out=str(tmp_path / "up"), **{"data.tasks": "sst,sts"})
    down = make_config(out=str(tmp_path / "down"), **{"data.tasks": "sst", "optim.lr": 1e-12, "optim.warmup_ratio": 0.0,
                                                      "upstream": up.to_dict(), "carry_heads": True})
    with pytest.raises(UpstreamNotReady, match=f"upstream: {up.out} has not finished"):
        train(down)
    assert not os.path.exists(down.out)                      # refused before anything was written
    train(up)
    results = train(down)
    best = load((tmp_path / "up" / "best" / "encoder" / "model.safetensors").read_bytes())
    heads = load((tmp_path / "up" / "best" / "heads.safetensors").read_bytes())
    final = checkpoint.load(checkpoint.latest(down.out))["model"]
    # lr 1e-12: the dependent's weights are what it started from, to ~1e-12 a step.
    close = lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-9)  # noqa: E731
    assert all(close(final[f"encoder.{k}"], v) for k, v in best.items())
    assert all(close(final[k], v) for k, v in heads.items() if k.startswith("heads.sst."))
    fresh = make_config(out=str(tmp_path / "fresh"), **{"data.tasks": "sst"})
    assert not torch.allclose(final["heads.sst.net.1.weight"], train_and_load(fresh)["heads.sst.net.1.weight"])
    assert results["stages"][0]["out"] == up.out and "sst/acc" in results["stages"][0]["best_metrics"]


def train_and_load(cfg):
    train(cfg)
    return checkpoint.load(checkpoint.latest(cfg.out))["model"]


def test_a_failed_upstream_is_named_with_its_reason(make_config, tmp_path):
    up = make_config(out=str(tmp_path / "up"))
    os.makedirs(up.out)
    (tmp_path / "up" / "results.json").write_text(json.dumps({"status": "failed", "error": "loss is NaN at step 3",
                                                              "config": up.to_dict()}))
    down = make_config(out=str(tmp_path / "down")).replace(upstream=up.to_dict())
    with pytest.raises(UpstreamNotReady, match="upstream: .*up failed: loss is NaN at step 3"):
        train(down)


def test_a_frozen_encoder_trains_the_heads_only(make_config):
    cfg = make_config(**{"data.tasks": "sst,sts", "model.freeze_encoder": True, "combiner.conflict_every": 1})
    start = checkpoint_weights_after(cfg, steps=0)
    end = checkpoint.load(checkpoint.latest(cfg.out))["model"]
    assert all(torch.equal(end[k], v) for k, v in start.items() if k.startswith("encoder."))
    assert any(not torch.equal(end[k], v) for k, v in start.items() if k.startswith("heads."))
    with pytest.raises(ConfigError, match="model.freeze_encoder: pcgrad acts on the tasks' gradients"):
        from mtl.checks import check_run
        check_run(cfg.replace(**{"combiner.combiner": "pcgrad"}))


def checkpoint_weights_after(cfg, steps):
    """The model's weights as built (steps=0), then the trial trained to its end."""
    from mtl.model import build_model
    from mtl.tasks import TASKS

    torch.manual_seed(cfg.seed)
    start = {f"{k}": v.clone() for k, v in build_model(cfg.model, [TASKS[t] for t in cfg.data.tasks]).state_dict().items()}
    train(cfg)
    return start


def chain_args(model, out, chain):
    return [sys.executable, "-m", "mtl.train", "--model", model, "--max-length", "32", "--stages", chain,
            "--tasks", "sts", "--eval-tasks", "sst,para", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--dropout", "0.3",
            "--max-train-rows", "160", "--max-dev-rows", "16", "--save-every-steps", "5", "--progress", "off",
            "--keep-final-state", "true", "--out", out]


def test_a_chain_killed_in_its_second_stage_resumes_there_and_ends_as_an_uninterrupted_one(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    chain = tmp_path / "chain.yaml"
    chain.write_text("stages:\n  - {tasks: sst}\n  - {tasks: para, eval_tasks: sst}\n")
    whole = str(tmp_path / "whole")
    subprocess.run(chain_args(tiny_model_dir, whole, str(chain)), check=True, env=env, capture_output=True, cwd=ROOT)

    cut = str(tmp_path / "cut")
    proc = subprocess.Popen(chain_args(tiny_model_dir, cut, str(chain)), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = tmp_path / "cut" / "stages" / "1-para" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not pointer.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "cut" / "stages" / "0-sst" / "results.json").exists()
    assert not (tmp_path / "cut" / "stages" / "1-para" / "results.json").exists(), "stage 2 ended before the kill"
    killed_at = json.loads(pointer.read_text())["step"]
    again = subprocess.run(chain_args(tiny_model_dir, cut, str(chain)), check=True, env=env, capture_output=True,
                           cwd=ROOT, text=True)
    assert f"resumed {cut}/stages/1-para at step {killed_at}" in again.stderr
    assert again.stderr.count("is done: its results stand") == 1           # stage 1 is not run again

    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert a["weights_digest"] == b["weights_digest"] and a["best"] == b["best"]
    assert [s["best_metrics"] for s in a["stages"]] == [s["best_metrics"] for s in b["stages"]]
    assert [s["tasks"] for s in b["stages"]] == [["sst"], ["para"]]
    assert {"sst/acc", "para/acc", "sts/pearson"} <= set(b["best"]["metrics"])     # --eval-tasks scored them


def test_a_sequential_chain_scores_its_earlier_tasks_with_their_carried_frozen_heads(make_config, tmp_path):
    from safetensors.torch import load

    base = make_config(out=str(tmp_path / "seq"), **{"data.tasks": "sts"})
    with pytest.raises(ConfigError, match="data.eval_tasks: needs an upstream stage"):
        base.replace(**{"data.eval_tasks": "sst"}).check_stage()
    cfg = stages.chain(base, [{"tasks": "sst"}, {"tasks": "para", "eval_tasks": "sst"}])
    cfg = cfg.replace(**{"data.eval_tasks": "sst,para"})
    with pytest.raises(ConfigError, match=r"data.eval_tasks: the upstream stage has no head of sst \(it has para\)"):
        cfg.replace(**{"upstream.data.eval_tasks": "", "upstream.upstream": None}).check_stage()
    for stage in stages.links(cfg):
        results = train(stage)
    metrics = results["best"]["metrics"]
    assert {"sst/acc", "para/acc", "sts/pearson"} <= set(metrics) and metrics["mean"] == metrics["sts/pearson"]
    first = load((tmp_path / "seq" / "stages" / "0-sst" / "best" / "heads.safetensors").read_bytes())
    final = checkpoint.load(checkpoint.latest(cfg.out))["model"]
    assert all(torch.equal(final[k], v) for k, v in first.items() if k.startswith("heads.sst."))   # frozen twice
