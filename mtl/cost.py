"""What a trial's optimizer steps cost: its loss method's cost class, the backward passes it ran,
the mean wall time of a step and the process's peak memory, as ``results.json`` records them.

A loss method declares its cost class as a class attribute ``cost`` (absent: "one backward"):

    "one backward"    the combined loss back-propagated once per micro-batch (addition, weights)
    "T backwards"     every task's loss back-propagated alone: T passes per micro-batch
    "extra forward"   one backward per micro-batch, and one more forward pass besides

The backward passes a trial records are counted (``StepCosts.counted`` wraps the strategy's
backward), not derived from the class: a method's mode can change its cost (PCGrad on the
representation runs one backward), and a count that disagrees with the class shows it."""
from __future__ import annotations

import resource
import sys
from typing import Callable

import torch

COST_CLASSES = ("one backward", "T backwards", "extra forward")
DEFAULT_COST = "one backward"
NOTES = {"extra forward": "plus one extra forward pass per micro-batch"}


def cost_class(method) -> str:
    """The cost class a loss method (class or instance) declares, else the default."""
    return getattr(method, "cost", DEFAULT_COST)


def expected_backwards(cost: str, tasks: int, micro_batches: int) -> int:
    """The backward passes per optimizer step the cost class implies."""
    return tasks * micro_batches if cost == "T backwards" else micro_batches


def peak_rss_mb() -> float:
    """The process's peak resident set since it started.  Linux gives KiB, macOS bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class StepCosts:
    """Counts a trial's backward passes and reads its peak memory.  Nothing here syncs the host:
    the count is a Python integer, and the CUDA peak is the allocator's own counter."""

    def __init__(self, device: torch.device):
        self.device = device
        self.backwards = 0

    def start(self) -> None:
        """Training starts: on CUDA the allocator's peak restarts here (the weights, already on
        the device, stay counted); a CPU process's peak resident set cannot be restarted."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def counted(self, backward: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
        def count(loss: torch.Tensor) -> None:
            self.backwards += 1
            backward(loss)
        return count

    def take_backwards(self) -> int:
        """The passes counted since the last call (one step's), and the count restarted."""
        taken, self.backwards = self.backwards, 0
        return taken

    def peak_memory(self) -> tuple[float, str]:
        """(MiB, kind).  ``cuda_allocated``: the peak of tensors allocated since ``start`` (the
        caching allocator's reserve above it and the CUDA context, ~0.5 GB, are not counted).
        ``cpu_rss``: the process's peak resident set since it started, so it also holds the
        interpreter, the libraries, the data and the model's loading, and any earlier trial run
        in the same process (submitit's debug mode); it compares methods only run alike."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_allocated"
        return peak_rss_mb(), "cpu_rss"
