"""The GPU memory estimate of one trial's worker (cluster/core/memory.py) and the check that refuses a
packing of workers on one GPU that cannot fit: on Ray (fractional --gpus-per-worker), at SLURM
submit time (--gpu-memory) and in the array task at its start.  No GPU needed: capacities come
from --gpu-memory, and nvidia-smi is stubbed where its absence matters."""
import json
import logging
import os
import subprocess
import sys

import pytest

from cluster.core import memory
from cluster.core.memory import estimate_worker
from cluster.core.placement import Placement
from cluster.core.study import expand
from mtl.config import RunConfig
from mtl.errors import ConfigError

GiB = 1 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def bert_base(tmp_path_factory) -> str:
    """BERT-base's config alone (no weights): the estimate reads nothing else."""
    from transformers import BertConfig

    path = tmp_path_factory.mktemp("bert-base-config")
    BertConfig().save_pretrained(path)     # the defaults are bert-base-uncased's shape
    return str(path)


@pytest.fixture
def reference(bert_base):
    """The reference protocol on BERT-base in bf16: batch 8, max length 128."""
    return RunConfig().replace(**{"model.model": bert_base, "precision": "bf16", "optim.batch_size": 8,
                                  "model.max_length": 128})


@pytest.fixture
def no_nvidia_smi(monkeypatch):
    monkeypatch.setattr(memory.shutil, "which", lambda name: None)


def total(cfg: RunConfig, **overrides) -> int:
    return estimate_worker(cfg.replace(**overrides)).total


def test_bert_base_is_counted_from_its_config_on_the_meta_device(bert_base):
    shape = memory.model_shape(bert_base)
    # 109.5M parameters less the pooler (768 x 768 + 768), which mtl.model removes.
    assert shape.encoder_params == 109_482_240 - 590_592
    assert (shape.hidden, shape.layers, shape.heads, shape.intermediate) == (768, 12, 12, 3072)


def test_the_estimate_grows_with_what_costs_memory(reference):
    base = total(reference, **{"data.tasks": "para,sts"})
    assert 3 * GiB < base < 5 * GiB                         # 1.8 GiB of states, 0.7 of activations, context
    assert total(reference, **{"data.tasks": "para,sts", "optim.batch_size": 16}) > base
    assert total(reference, **{"data.tasks": "para,sts", "model.max_length": 256}) > base
    # Activations are linear in batch and length (SDPA keeps no s x s scores).
    acts = lambda **o: estimate_worker(reference.replace(**{"data.tasks": "para,sts", **o})).parts["activations"]  # noqa: E731
    assert acts(**{"optim.batch_size": 16}) == 2 * acts() and acts(**{"model.max_length": 256}) == 2 * acts()
    assert total(reference, **{"data.tasks": "para"}) < base       # every task of a step adds its activations
    # PCGrad on the parameters keeps one encoder gradient per task: 2 x 108.9M x 4 bytes more.
    pcgrad = estimate_worker(reference.replace(**{"data.tasks": "para,sts", "combiner.combiner": "pcgrad"}))
    assert pcgrad.parts["pcgrad task gradients"] == 2 * 108_891_648 * 4
    assert total(reference, **{"data.tasks": "para,sts", "combiner.combiner": "pcgrad",
                               "combiner.pcgrad_on": "representation"}) == base
    # fp32 activations take twice the bytes; bf16 autocast keeps fp32 states plus 16-bit weight copies.
    fp32 = estimate_worker(reference.replace(**{"data.tasks": "para,sts", "precision": "fp32"}))
    bf16 = estimate_worker(reference.replace(**{"data.tasks": "para,sts"}))
    assert fp32.parts["activations"] > 1.5 * bf16.parts["activations"]
    assert fp32.parts["weights, gradients, optimizer"] < bf16.parts["weights, gradients, optimizer"]
    # Siamese pairs encode each sentence alone: twice the sequences.
    assert total(reference, **{"data.tasks": "para,sts", "pair_encoding": "siamese"}) > base
    # ZeRO partitions states over the workers; a CPU trial needs no GPU memory at all.
    ds = {"data.tasks": "para,sts", "parallel.strategy": "deepspeed", "parallel.workers": 4}
    stages = [total(reference, **ds, **{"parallel.zero_stage": z}) for z in (0, 1, 2, 3)]
    assert stages == sorted(stages, reverse=True) and len(set(stages)) == 4
    assert total(reference, device="cpu") == 0


def test_the_reference_packing_of_the_h200_measurement_fits(reference, no_nvidia_smi):
    # Measured on an H200 (141 GB): 8 reference trials at once, 690 examples/s against 104 alone.
    trials = expand("pairings", reference, "/s", seeds=[0])[:8]
    memory.check_ray_packing(trials, Placement(gpus_per_worker=0.125, gpu_memory="141G"), 0.0, detect=False)
    sizes = memory.estimates(trials)
    assert sum(sizes.values()) < 0.4 * 141 * GiB


def test_sixteen_large_trials_on_an_80_gb_gpu_are_refused(reference, no_nvidia_smi):
    big = reference.replace(**{"optim.batch_size": 128, "model.max_length": 512})
    trials = expand("pairings", big, "/s", seeds=[0])
    with pytest.raises(ConfigError) as refused:
        memory.check_ray_packing(trials, Placement(gpus_per_worker=0.0625, gpu_memory="80G"), 0.0, detect=False)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("GPU memory: --gpus-per-worker 0.0625 packs up to 16 workers on one GPU (trials ")
    assert "sst+para-sum-s0" in message and "more than the GPU's 80.0 GiB (--gpu-memory 80G)" in message
    assert "estimated" in message and message.endswith("or pass --gpu-memory off to skip this check")
    # The same trials one per GPU are never refused: nothing is packed.
    memory.check_ray_packing(trials, Placement(gpus_per_worker=1, gpu_memory="80G"), 0.0, detect=False)
    memory.check_ray_packing(trials, Placement(gpus_per_worker=0.0625, gpu_memory="off"), 0.0, detect=False)


def test_unknown_capacity_is_said_once_and_not_refused(reference, no_nvidia_smi, caplog):
    big = reference.replace(**{"optim.batch_size": 128, "model.max_length": 512})
    trials = expand("pairings", big, "/s", seeds=[0])
    with caplog.at_level(logging.INFO, logger="cluster.core.memory"):
        memory.check_ray_packing(trials, Placement(gpus_per_worker=0.0625), 0.0, detect=True)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "GPU memory unknown here" in said[0] and "not checked" in said[0]


def test_capacity_from_nvidia_smi(monkeypatch):
    monkeypatch.setattr(memory.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(memory.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "143771\n143771\n"))
    assert memory.gpu_capacity(Placement(), detect=True) == (143771 << 20, "nvidia-smi")
    assert memory.gpu_capacity(Placement(gpu_memory="80G"), detect=True) == (80 * GiB, "--gpu-memory 80G")
    assert memory.gpu_capacity(Placement(), detect=False) == (None, "")


def test_slurm_submit_refuses_a_task_that_cannot_fit(reference, tmp_path):
    from cluster.backends.slurm_array import packing_estimates, pin_trials

    big = reference.replace(**{"optim.batch_size": 128, "model.max_length": 512})
    trials = expand("pairings", big, str(tmp_path / "s"), seeds=[0])
    # 16 trials per task at 1/16 GPU each: one GPU per task runs all 16.
    with pytest.raises(ConfigError, match=r"^GPU memory: --trials-per-task puts 16 workers on one GPU \(trials "
                                          r"sst-sum-s0, para-sum-s0, .*more than the GPU's 80\.0 GiB"):
        packing_estimates(trials, Placement(gpus_per_worker=0.0625, trials_per_task=16, gpu_memory="80G"))
    # Without --gpu-memory the submitter cannot know the partition's GPUs: it pins the estimates
    # for the task to check at its start.
    small = expand("pairings", reference, str(tmp_path / "s"), seeds=[0])
    sizes = packing_estimates(small, Placement(gpus_per_worker=0.125, trials_per_task=8))
    assert set(sizes) == {t.out.rsplit("/", 1)[-1] for t in small} and all(3 * GiB < b < 6 * GiB for b in sizes.values())
    url = pin_trials(small, str(tmp_path / "s"), 8, sizes)
    assert json.loads(open(url).read())["worker_memory"] == sizes
    assert pin_trials(small, str(tmp_path / "s"), 8) == url          # the name does not depend on them
    assert packing_estimates(small, Placement(trials_per_task=8)) is None     # a GPU per worker: nothing shared


def test_the_array_task_refuses_before_starting_any_worker(reference, tmp_path, monkeypatch, capsys):
    from cluster.backends import slurm_array

    big = reference.replace(**{"optim.batch_size": 128, "model.max_length": 512})
    group = expand("pairings", big, str(tmp_path / "s"), seeds=[0])[:16]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(slurm_array.TrialProcesses, "start", lambda self: pytest.fail("workers were started"))
    assert slurm_array.run_task(group, 0, [], gpu_memory="80G") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: GPU memory: --trials-per-task puts 16 workers on one GPU")


def test_the_array_task_checks_pinned_estimates_without_importing_torch(tmp_path):
    """The array runner keeps its start free of torch: with the submitter's estimates pinned, the
    check is arithmetic and one nvidia-smi call (here --gpu-memory stands in for it)."""
    trials = expand("smoke", RunConfig(), str(tmp_path / "s"), seeds=[0])[:4]
    pinned = {t.out.rsplit("/", 1)[-1]: 30 * GiB for t in trials}
    code = f"""
import json, sys
sys.path.insert(0, {ROOT!r})
from cluster.backends.slurm_array import check_task_memory
from mtl.config import RunConfig
trials = [RunConfig.from_dict(d) for d in json.loads({json.dumps(json.dumps([t.to_dict() for t in trials]))})]
pinned = json.loads({json.dumps(json.dumps(pinned))})
check_task_memory(trials[:2], "80G", pinned)            # 60 GiB on one GPU: fits
try:
    check_task_memory(trials, "80G", pinned)            # 120 GiB: refused
except Exception as exc:
    print(type(exc).__name__, exc)
print("torch imported:", "torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"}, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("ConfigError GPU memory: --trials-per-task puts 4 workers on one GPU")
    assert "120.0 GiB (30.0 GiB each)" in lines[0]
    assert lines[-1] == "torch imported: False"
