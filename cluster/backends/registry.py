"""Every backend by name: the one list the submit command chooses from (``--backend``).

A backend is a ``cluster.core.backend.Backend`` declared in its own module (its name, command,
GPU default, the placement flags it reads, its own flags and ``run``); listing it here makes
``--backend NAME`` run it and ``launch/submit.py --help`` show its flags.  Importing the backends
is cheap: each imports ray or submitit only where it runs trials."""
from __future__ import annotations

import argparse

from cluster.backends.ray_sweep import RAY
from cluster.backends.slurm_array import SLURM
from cluster.backends.submitit_sweep import SUBMITIT
from cluster.core.backend import Backend, Flag
from cluster.core.placement import add_flags

BACKENDS: dict[str, Backend] = {b.name: b for b in (RAY, SLURM, SUBMITIT)}     # --help lists them in this order


def chosen(name: str | None) -> list[Backend]:
    """The backend called ``name``, or every backend for None (the generic command)."""
    return list(BACKENDS.values()) if name is None else [BACKENDS[name]]


def backend_flags(name: str | None) -> list[Flag]:
    """The flags of the chosen backends, each once (--wait is SLURM's and submitit's), in order."""
    return list({f.names: f for b in chosen(name) for f in b.flags}.values())


def add_placement_flags(parser: argparse.ArgumentParser, name: str | None = None) -> None:
    """The placement flags that backend ``name`` reads (every backend's for None)."""
    add_flags(parser, frozenset().union(*(b.placement_flags for b in chosen(name))))
