"""Placement (where trials run) and the SLURM submit side's pure parts: resources per array,
SLURM's time formats, array specs as sacct prints them.  No cluster needed."""
import pytest

from cluster.placement import Placement, time_minutes
from cluster.slurm_array import _by_shape, _indices
from cluster.study import expand
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
    # SLURM clusters are GPU clusters: one GPU per worker unless told otherwise.
    assert _by_shape(trials, list(range(6)), Placement()) == {(1, 1): [0, 1, 2, 3, 4], (2, 2): [5]}
    assert _by_shape(trials, [0, 5], Placement(gpus_per_worker=0, cpus_per_worker=4)) == {(4, 0): [0], (8, 0): [5]}
    # Two trials per task: the task holds what both need (fractional GPUs add up before rounding).
    assert _by_shape(trials, [0, 2], Placement(gpus_per_worker=0.5, trials_per_task=2)) == {(2, 1): [0], (3, 2): [2]}


def test_array_specs_as_sacct_prints_them():
    assert _indices("7") == [7]
    assert _indices("[0-3,5%2]") == [0, 1, 2, 3, 5]
    assert _indices("[10-11]") == [10, 11]
