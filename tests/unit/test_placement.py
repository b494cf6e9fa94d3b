"""Placement (where trials run) and the SLURM submit side's pure parts: resources per array,
SLURM's time formats, array specs as sacct prints them.  No cluster needed."""
import pytest

from cluster.backends.slurm_array import GPU_DEFAULT, _indices
from cluster.core.dependencies import slots
from cluster.core.placement import Placement, time_minutes
from cluster.core.study import expand
from mtl.config import RunConfig
from mtl.errors import ConfigError


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("4:00:00", 240), ("1-0", 1440),
                                           ("1-2:30", 1590), ("0-0:0:1", 1), ("8:00:00", 480)])
def test_slurm_time_formats(text, minutes):
    assert time_minutes(text) == minutes


def test_bad_placement_is_one_line():
    with pytest.raises(ConfigError, match=r"^--time: '4h' is not a SLURM time limit"):
        Placement(time="4h")
    with pytest.raises(ConfigError, match=r"^--gpus-per-worker: -1 must be >= 0$"):
        Placement(gpus_per_worker=-1)
    with pytest.raises(ConfigError, match=r"^--trials-per-task: 0 must be >= 1$"):
        Placement(trials_per_task=0)


def test_each_array_asks_for_what_its_trials_need():
    trials = expand("smoke", RunConfig(), "/s", seeds=[0])        # five 1-worker trials, one of 2 workers

    def shapes(placement, wanted):
        groups = slots(trials, placement.trials_per_task)
        return {s: placement.slurm_resources([trials[i] for i in groups[s]], GPU_DEFAULT) for s in wanted}
    # SLURM clusters are GPU clusters: one GPU per worker unless told otherwise.
    assert shapes(Placement(), range(6)) == {0: (1, 1), 1: (1, 1), 2: (1, 1), 3: (1, 1), 4: (1, 1), 5: (2, 2)}
    assert shapes(Placement(gpus_per_worker=0, cpus_per_worker=4), [0, 5]) == {0: (4, 0), 5: (8, 0)}
    # Two trials per task: the task holds what both need (fractional GPUs add up before rounding).
    assert shapes(Placement(gpus_per_worker=0.5, trials_per_task=2), [0, 2]) == {0: (2, 1), 2: (3, 2)}


def test_array_specs_as_sacct_prints_them():
    assert _indices("7") == [7]
    assert _indices("[0-3,5%2]") == [0, 1, 2, 3, 5]
    assert _indices("[10-11]") == [10, 11]


# --------------------------------------------------------------------------------------------
# Fractional GPUs and the GPU memory flag
# --------------------------------------------------------------------------------------------
def test_gpu_fractions_must_be_what_ray_counts_exactly():
    # Ray stores resources in units of 0.0001: 1/3 typed in full would be rounded there, and
    # whether the third worker still fits would depend on that rounding.
    with pytest.raises(ConfigError, match=r"^--gpus-per-worker: 0\.333333 is finer than Ray's resource precision "
                                          r"\(0\.0001\): use 0\.3333 \(3 workers per GPU\)$"):
        Placement(gpus_per_worker=1 / 3)
    with pytest.raises(ConfigError, match=r"^--gpus-per-worker: 1\.5: more than one GPU per worker must be a whole"):
        Placement(gpus_per_worker=1.5)
    assert [Placement(gpus_per_worker=g).workers_per_gpu() for g in (0.5, 0.125, 0.0625, 0.1, 0.3, 0.3333)] == \
        [2, 8, 16, 10, 3, 3]
    assert [Placement(gpus_per_worker=g).workers_per_gpu() for g in (0, 1, 2)] == [0, 1, 1]
    assert Placement().workers_per_gpu(gpu_default=1.0) == 1 and Placement().workers_per_gpu() == 0


def test_fractions_add_up_without_float_error():
    trials = expand("pairings", RunConfig(), "/s", seeds=[0])            # 36 one-worker trials
    # Thirty trials of 0.1 GPU need 3 GPUs (summed as floats, 3.0000000000000013 rounded up to 4).
    assert Placement(gpus_per_worker=0.1, trials_per_task=30).slurm_resources(trials[:30]) == (30, 3)
    assert Placement(gpus_per_worker=0.125).slurm_resources(trials[:8]) == (8, 1)
    assert Placement(gpus_per_worker=0.1).demand(trials[0].replace(**{"parallel.workers": 3})) == (3, 0.3)


def test_ray_admits_exactly_what_fits_a_fractional_gpu():
    from cluster.backends.ray_sweep import concurrent_slots, driver_resources

    trials = expand("pairings", RunConfig(), "/s", seeds=[0])
    cluster = {"CPU": 64.0, "GPU": 1.0, "mtl_cpus": 64.0, "mtl_gpus": 1.0}
    assert driver_resources(trials[0], Placement(gpus_per_worker=0.5), cluster) == {
        "CPU": 0, "mtl_cpus": 1, "mtl_gpus": 0.5}
    assert concurrent_slots(trials, Placement(gpus_per_worker=0.5), cluster) == 2
    assert concurrent_slots(trials, Placement(gpus_per_worker=0.75), cluster) == 1
    # 1 // 0.1 is 9.0 in floats: counted in Ray's units, ten 0.1-GPU trials share the GPU.
    assert concurrent_slots(trials, Placement(gpus_per_worker=0.1), cluster) == 10
    assert concurrent_slots(trials, Placement(gpus_per_worker=0.0625), {**cluster, "GPU": 2.0}) == 32


def test_multi_worker_trials_need_whole_gpus():
    trials = expand("smoke", RunConfig(), "/s", seeds=[0])               # one trial of 2 workers
    with pytest.raises(ConfigError, match=r"^--gpus-per-worker 0\.5: trial para\+sts-pcgrad-batch_size8-s0 has 2 "
                                          r"workers, whose ranks could share one GPU \(NCCL refuses that\)"):
        Placement(gpus_per_worker=0.5).check_trials(trials)
    Placement(gpus_per_worker=1).check_trials(trials)
    Placement(gpus_per_worker=0.5).check_trials([t.replace(device="cpu") for t in trials])   # gloo, no GPU


def test_gpu_memory_sizes():
    from cluster.core.placement import parse_size

    gib = 1 << 30
    assert parse_size("80G") == parse_size("80GB") == parse_size("80 GiB") == parse_size("81920M") == 80 * gib
    assert parse_size("143771MiB") == 143771 << 20 and parse_size("1.5T") == int(1.5 * (1 << 40))
    assert parse_size("1000") == 1000
    assert Placement(gpu_memory="141GB").gpu_memory_bytes == 141 * gib
    assert Placement().gpu_memory_bytes is None and Placement().memory_check
    assert Placement(gpu_memory="off").gpu_memory_bytes is None and not Placement(gpu_memory="off").memory_check
    with pytest.raises(ConfigError, match=r"^--gpu-memory: '80 furlongs' is not a memory size \(e\.g\. 80G, "):
        Placement(gpu_memory="80 furlongs")
    with pytest.raises(ConfigError, match=r"^--gpu-memory: '0G' must be more than 0 bytes$"):
        Placement(gpu_memory="0G")


def test_placement_flags_reach_the_backends_that_read_them():
    import argparse

    from cluster.backends.registry import add_placement_flags
    from cluster.core.placement import placement_from_args

    for backend, has in (("ray", True), ("slurm", True), ("submitit", False), (None, True)):
        p = argparse.ArgumentParser()
        add_placement_flags(p, backend)
        argv = ["--gpus-per-worker", "0.125"] + (["--gpu-memory", "80G"] if has else [])
        placement = placement_from_args(p.parse_args(argv))
        assert placement.gpus_per_worker == 0.125 and placement.gpu_memory == ("80G" if has else "")
    with pytest.raises(ConfigError, match=r"^--gpus-per-worker: 0\.12345 is finer"):
        placement_from_args(p.parse_args(["--gpus-per-worker", "0.12345"]))


def test_an_array_task_spreads_workers_over_its_gpus_in_turn():
    from cluster.backends.slurm_array import place_workers, shared_gpus

    trials = expand("smoke", RunConfig(), "/s", seeds=[0])[:4]        # four 1-worker trials
    assert [g for _, _, g in place_workers(trials, ["0", "1"])] == ["0", "1", "0", "1"]
    assert [g for _, _, g in place_workers(trials, [])] == [None] * 4
    assert {g: len(ts) for g, ts in shared_gpus(trials, ["0"]).items()} == {"0": 4}
    assert {g: len(ts) for g, ts in shared_gpus(trials, ["0", "1"]).items()} == {"0": 2, "1": 2}
    assert shared_gpus(trials, ["0", "1", "2", "3"]) == {}                # one worker per GPU: no packing
    assert shared_gpus([t.replace(device="cpu") for t in trials], ["0"]) == {}
