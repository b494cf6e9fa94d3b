import json
import math
import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest
import torch

from mtl import checkpoint
from tests.helpers import first_step_gradients
from mtl.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def final_weights(out):
    return checkpoint.load(checkpoint.latest(out))["model"]


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"largest difference {worst}"


def test_adamw_is_fused_on_a_cpu_too(make_config):
    # torch's default AdamW on a CPU loops over the parameters: a trial ~18% slower than the
    # Trainer's (benchmarks/bench_trainer.py).
    from mtl.combine import build_combiner
    from mtl.model import build_model
    from mtl.tasks import TASKS
    from mtl.optim import build_optimizer

    cfg = make_config(device="cpu")
    model = build_model(cfg.model, [TASKS[t] for t in cfg.data.tasks])
    optimizer = build_optimizer(cfg, model, build_combiner(cfg.combiner, cfg.data.tasks, cfg.data.one_task_per_step))
    assert all(group["fused"] for group in optimizer.param_groups)


@pytest.mark.parametrize("method", ["sum", "scalarize", "pcgrad", "uncertainty", "dtp"])
def test_grad_accumulation_equals_a_larger_batch(make_config, tmp_path, method):
    # 36 rows, global batch 8: four full steps and an uneven last one of 4 examples.
    common = {"data.tasks": "sst,para", "data.max_train_rows": 36, "optim.epochs": 1,
              "combiner.combiner": method, **({"combiner.alpha": 0.3} if method == "scalarize" else {})}
    big = train(make_config(out=str(tmp_path / "big"), **common, **{"optim.batch_size": 8}))
    acc = train(make_config(out=str(tmp_path / "acc"), **common, **{"optim.batch_size": 4, "optim.grad_accum": 2}))
    assert big["steps"] == acc["steps"] == 5
    assert_same_weights(final_weights(str(tmp_path / "big")), final_weights(str(tmp_path / "acc")), atol=2e-6)
    # and it is not trivially equal: a different batch gives different weights
    other = train(make_config(out=str(tmp_path / "other"), **common, **{"optim.batch_size": 4}))
    assert other["steps"] == 9
    with pytest.raises(AssertionError):
        assert_same_weights(final_weights(str(tmp_path / "big")), final_weights(str(tmp_path / "other")), atol=1e-4)


def cli_args(cfg):
    return [sys.executable, "-m", "mtl.train", "--model", cfg.model.model, "--max-length", "32",
            "--tasks", "sst,sts", "--epochs", "3", "--batch-size", "4", "--lr", "1e-3", "--dropout", "0.3",
            "--max-train-rows", "400", "--max-dev-rows", "32", "--save-every-steps", "5", "--progress", "off",
            "--keep-final-state", "true", "--out", cfg.out]


def test_a_killed_trial_resumes_to_the_results_of_an_uninterrupted_one(make_config, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    whole = make_config(out=str(tmp_path / "whole"))
    subprocess.run(cli_args(whole), check=True, env=env, capture_output=True, cwd=ROOT)

    cut = make_config(out=str(tmp_path / "cut"))
    proc = subprocess.Popen(cli_args(cut), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "cut" / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline and not pointer.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "results.json").exists(), "the run finished before it could be killed"
    killed_at = json.loads(pointer.read_text())["step"]
    subprocess.run(cli_args(cut), check=True, env=env, capture_output=True, cwd=ROOT)

    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert killed_at < b["steps"] == a["steps"] == 300
    assert [e["metrics"] for e in a["epochs"]] == [e["metrics"] for e in b["epochs"]]
    assert a["best"] == b["best"]
    assert_same_weights(final_weights(whole.out), final_weights(cut.out), atol=0.0)


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.01), ("fp16", 0.002)])   # measured 0.0029, 0.0005
def test_mixed_precision_gradients_match_fp32_within_tolerance(make_config, precision, tolerance):
    """Relative error of the whole gradient against fp32 on the tiny model: bf16 keeps 8 bits
    of mantissa (~0.4% per op), fp16 10 (~0.1%); a different seed (other head weights) is ~100%."""
    common = {"data.tasks": "para,sts", "data.max_train_rows": 8}
    reference = first_step_gradients(make_config(**common))
    got = first_step_gradients(make_config(precision=precision, **common))
    other = first_step_gradients(make_config(seed=1, **common))
    error = float((got - reference).norm() / reference.norm())
    assert error < tolerance, error
    assert float((other - reference).norm() / reference.norm()) > 20 * tolerance


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_counts_skipped_steps(make_config, precision):
    res = train(make_config(precision=precision, **{"data.tasks": "para,sts", "optim.max_steps": 4}))
    assert res["steps"] == 4 and all(math.isfinite(v) for v in res["best"]["metrics"].values())
    # The tiny model's first fp16 gradients overflow the scaler's 2^16 start: those steps are skipped, counted.
    assert res["skipped_steps"] == (2 if precision == "fp16" else 0)


@pytest.mark.parametrize("mode, extra, steps, examples", [
    # 32 rows per task, batch 4 per task: what each mode feeds the model in one epoch.
    ("min_size", {}, 8, {"sst": 32, "para": 32, "sts": 32}),
    ("fixed_n", {"data.examples_per_task": 12}, 3, {"sst": 12, "para": 12, "sts": 12}),
    ("proportional", {}, 24, None),         # one task per step: 96 examples over the three
    ("temperature", {"data.temperature": 4.0}, 24, None),
])
def test_every_sampling_mode_feeds_the_examples_it_promises(make_config, tmp_path, mode, extra, steps, examples):
    res = train(make_config(out=str(tmp_path / mode), **{"data.tasks": "sst,para,sts", "data.epoch_mode": mode,
                                                         "data.max_train_rows": 32, **extra}))
    assert res["steps"] == steps
    if examples:
        assert res["examples"] == examples
    else:   # every step one task's batch of 4; all three tasks drawn
        assert sum(res["examples"].values()) == 96 and all(n % 4 == 0 for n in res["examples"].values())
        assert set(res["examples"]) == {"sst", "para", "sts"}
    assert set(res["best"]["metrics"]) >= {"sst/acc", "para/f1", "sts/spearman", "mean"}


def test_storage_can_be_any_fsspec_url(make_config):
    out = "memory://mtl-test-run"
    res = train(make_config(out=out, allow_ephemeral_out=True, **{"data.tasks": "sst", "model.pair_encoding": "siamese"}))
    fs = fsspec.filesystem("memory")
    saved = json.loads(fs.cat("/mtl-test-run/results.json"))
    assert saved["steps"] == res["steps"] and saved["config"]["out"] == out
    assert checkpoint.latest(out).endswith(f"step-{res['steps']:08d}")
    assert any("tfevents" in p for p in fs.find("/mtl-test-run/tb"))
    assert fs.exists("/mtl-test-run/best/encoder/model.safetensors") and fs.exists("/mtl-test-run/best/meta.json")


def test_results_and_tensorboard_record_the_run(make_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(**{"data.tasks": "sst,para", "combiner.combiner": "scalarize", "combiner.alpha": 0.3,
                         "optim.epochs": 2})
    res = train(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"] == cfg.to_dict()
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
    assert saved["best"]["score"] == max(e["metrics"]["mean"] for e in saved["epochs"])
    assert saved["examples_per_s"] > 0 and saved["wall_time_s"] >= saved["train_time_s"] > 0
    best = json.loads((tmp_path / "run" / "best" / "meta.json").read_text())
    assert best["epoch"] == saved["best"]["epoch"] and best["metrics"] == saved["best"]["metrics"]
    # The best model in Hugging Face's format: the encoder loads with AutoModel as any other.
    from transformers import AutoModel
    from mtl.export import load_best, read_predictions

    encoder = AutoModel.from_pretrained(str(tmp_path / "run" / "best" / "encoder"))
    model, loaded_cfg, meta, _ = load_best(str(tmp_path / "run"))
    assert loaded_cfg == cfg and all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(),
                                                                         model.encoder.state_dict().values()))
    # Its dev predictions recompute its dev metrics.
    predictions = read_predictions(str(tmp_path / "run"))
    sst = predictions["sst"]
    assert sum(p == g for p, g in zip(sst["pred"], sst["gold"])) / len(sst["gold"]) == best["metrics"]["sst/acc"]

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/sst", "loss/para", "loss/combined", "weight/sst", "lr", "examples_per_s", "dev/mean"} <= tags
    assert [e.value for e in acc.Scalars("weight/sst")][0] == pytest.approx(0.3)
    assert len(acc.Scalars("dev/sst/acc")) == 2
    assert {"_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(acc.PluginTagToContent("hparams"))
    assert "hparam/mean" in tags
    assert res["world_size"] == 1


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("pcgrad_on", ["params", "representation"])
def test_pcgrad_under_mixed_precision(make_config, precision, pcgrad_on):
    res = train(make_config(precision=precision, **{"data.tasks": "sst,sts", "optim.max_steps": 5,
                                                    "combiner.combiner": "pcgrad", "combiner.pcgrad_on": pcgrad_on}))
    assert res["steps"] == 5 and all(v == v for v in res["best"]["metrics"].values())


@pytest.mark.parametrize("method", ["excess_mtl", "famo"])
def test_methods_that_read_gradients_or_losses_whole_under_fp16(make_config, method):
    # ExcessMTL reads the T x P gradients themselves (unscaled first), FAMO the step's losses twice.
    res = train(make_config(precision="fp16", **{"data.tasks": "sst,sts", "optim.max_steps": 4,
                                                 "combiner.combiner": method}))
    assert res["steps"] == 4 and all(v == v for v in res["best"]["metrics"].values())


def test_gradient_conflict_is_logged_every_step_for_pcgrad_and_every_k_otherwise(make_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(out, tag):
        acc = EventAccumulator(str(out / "tb"))
        acc.Reload()
        return acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []

    common = {"data.tasks": "sst,para,sts", "optim.max_steps": 6, "combiner.conflict_every": 3}
    pc = train(make_config(out=str(tmp_path / "pc"), **common, **{"combiner.combiner": "pcgrad"}))
    assert [e.step for e in scalars(tmp_path / "pc", "grad_cos/sst-para")] == [1, 2, 3, 4, 5, 6]
    assert len(scalars(tmp_path / "pc", "grad_norm/sts")) == 6
    fractions = [e.value for e in scalars(tmp_path / "pc", "grad_conflict/fraction")]
    assert all(0.0 <= f <= 1.0 for f in fractions) and pc["grad_conflict_fraction"] == pytest.approx(fractions[-1])
    sm = train(make_config(out=str(tmp_path / "sum"), **common))
    cos = scalars(tmp_path / "sum", "grad_cos/para-sts")
    assert [e.step for e in cos] == [3, 6] and all(-1.0 <= e.value <= 1.0 for e in cos)
    assert sm["grad_conflict_fraction"] is not None


def test_learnable_and_adaptive_weights_are_logged_and_resumed(make_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(**{"data.tasks": "sst,sts", "combiner.combiner": "uncertainty", "combiner.combiner_lr": 0.1,
                         "optim.max_steps": 4})
    train(cfg)
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    sigmas = [e.value for e in acc.Scalars("sigma/sts")]
    assert sigmas and sigmas[-1] != 1.0
    saved = checkpoint.load(checkpoint.latest(cfg.out))["combiner"]["log_var"]
    assert saved.abs().sum() > 0
