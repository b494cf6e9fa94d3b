"""Who this process is in a data-parallel job, and the few collective operations the loop needs.

The trainer never asks where it runs: plain ``python`` gives a world of one, ``torchrun``
and Ray Train set RANK/WORLD_SIZE/LOCAL_RANK (and MASTER_ADDR/PORT) or pass a context in."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> "DistContext":
        """Read the torchrun-style environment; start the process group if there are peers."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = pick_device(device, local)
        if world > 1 and not tdist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        return cls(rank, world, local, dev)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s tensor on every rank, in place (a collective; a no-op alone).  gloo
        and NCCL both take CPU tensors only on their own devices: the caller keeps it there."""
        if self.distributed:
            tdist.broadcast(tensor, src)
        return tensor

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a collective): for decisions one rank makes
        alone (rank 0 takes the run folder's lease) that every rank must act on."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)
