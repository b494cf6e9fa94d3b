"""Full training state through fsspec, published atomically.

Layout under the run folder::

    checkpoints/step-00000120.pt    full state (model, optimizer, scheduler, scaler, combiner,
                                    sampler position, RNG states, best score, config)
    checkpoints/latest.json         {"file": "step-00000120.pt", "step": 120} - written last
    best/model.pt                   the weights with the best dev score, and their metrics

A checkpoint exists once ``latest.json`` names it; ``latest.json`` itself is replaced in one
atomic write, so a reader sees the previous checkpoint or the new one, never half of one."""
from __future__ import annotations

import json
import pickle
import zipfile

from mtl import storage
from mtl.errors import CheckpointError, StorageError

POINTER = "latest.json"


def checkpoint_dir(out: str) -> str:
    return storage.join(out, "checkpoints")


def state_url(out: str, step: int) -> str:
    return storage.join(checkpoint_dir(out), f"step-{step:08d}.pt")


def shards_url(state: str) -> str:
    """Folder beside a checkpoint for per-rank state (DeepSpeed's optimizer partitions)."""
    return state[: -len(".pt")] + ".shards"


def publish(out: str, step: int, keep: int) -> None:
    """Make the checkpoint of ``step`` the latest (one atomic write), then drop old ones."""
    folder = checkpoint_dir(out)
    name = f"step-{step:08d}.pt"
    storage.write_text(storage.join(folder, POINTER), json.dumps({"file": name, "step": step}))
    steps = sorted({n[:13] for n in storage.listdir(folder) if n.startswith("step-")})
    for old in steps[:-keep]:
        if old != name[:13]:
            storage.remove(storage.join(folder, old + ".pt"))
            storage.remove(storage.join(folder, old + ".shards"), recursive=True)


def save(out: str, state: dict, step: int, keep: int) -> str:
    url = state_url(out, step)
    storage.save_torch(url, state)
    publish(out, step, keep)
    return url


def latest(out: str) -> str | None:
    """URL of the newest published checkpoint, or None for a fresh run."""
    pointer = storage.join(checkpoint_dir(out), POINTER)
    if not storage.exists(pointer):
        return None
    try:
        name = json.loads(storage.read_text(pointer))["file"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{pointer}: not a valid checkpoint pointer") from None
    return storage.join(checkpoint_dir(out), name)


def load(url: str) -> dict:
    try:
        state = storage.load_torch(url)
    except StorageError:
        raise CheckpointError(f"{url}: checkpoint named by {POINTER} is missing") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        raise CheckpointError(f"{url}: checkpoint is truncated or corrupt ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{url}: not a checkpoint of this library (no model state)")
    return state
