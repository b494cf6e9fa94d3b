"""Full training state through fsspec, published atomically.

Layout under the run folder::

    checkpoints/step-00000120/state.pt   full state (model, optimizer, scheduler, scaler, combiner,
                                         sampler position, best score, config)
    checkpoints/step-00000120/shards/    per-rank state (DeepSpeed's optimizer partitions)
    checkpoints/latest.json              {"checkpoint": "step-00000120", "step": 120} - written last
    best/model.pt                        the weights with the best dev score, and their metrics

A checkpoint is one folder, so a cluster framework can register that very folder as its own
checkpoint (Ray Train does; see cluster/ray_trial.py) rather than keep a copy.  A checkpoint
exists once ``latest.json`` names it; ``latest.json`` is replaced in one atomic write, so a
reader sees the previous checkpoint or the new one, never half of one."""
from __future__ import annotations

import json
import pickle
import zipfile

from mtl import storage
from mtl.errors import CheckpointError, StorageError

POINTER = "latest.json"
STATE = "state.pt"
PREFIX = "step-"


def checkpoint_dir(out: str) -> str:
    return storage.join(out, "checkpoints")


def folder_url(out: str, step: int) -> str:
    return storage.join(checkpoint_dir(out), f"{PREFIX}{step:08d}")


def state_url(folder: str) -> str:
    return storage.join(folder, STATE)


def shards_url(folder: str) -> str:
    return storage.join(folder, "shards")


def publish(out: str, step: int, keep: int) -> str:
    """Make the checkpoint of ``step`` the latest (one atomic write), then drop old ones."""
    folder, target = checkpoint_dir(out), folder_url(out, step)
    name = target.rsplit("/", 1)[-1]
    storage.write_text(storage.join(folder, POINTER), json.dumps({"checkpoint": name, "step": step}))
    steps = sorted(n for n in storage.listdir(folder) if n.startswith(PREFIX))
    for old in steps[:-keep]:
        if old != name:
            storage.remove(storage.join(folder, old), recursive=True)
    return target


def save(out: str, state: dict, step: int, keep: int) -> str:
    storage.save_torch(state_url(folder_url(out, step)), state)
    return publish(out, step, keep)


def latest(out: str) -> str | None:
    """Folder of the newest published checkpoint, or None for a fresh run.  When the folder
    latest.json names was deleted (to get past a damaged one), the newest folder before it."""
    pointer = storage.join(checkpoint_dir(out), POINTER)
    if not storage.exists(pointer):
        return None
    try:
        name = json.loads(storage.read_text(pointer))["checkpoint"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{pointer}: not a valid checkpoint pointer") from None
    present = [n for n in storage.listdir(checkpoint_dir(out)) if n.startswith(PREFIX)]
    if name not in present:
        older = sorted(n for n in present if n < name)
        if older:
            return storage.join(checkpoint_dir(out), older[-1])
    return storage.join(checkpoint_dir(out), name)


def load(folder: str) -> dict:
    try:
        return _load(folder)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {_fallback(folder)}") from None


def _load(folder: str) -> dict:
    url = state_url(folder)
    try:
        state = storage.load_torch(url)
    except StorageError:
        raise CheckpointError(f"{url}: checkpoint named by {POINTER} is missing") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        raise CheckpointError(f"{url}: checkpoint is truncated or corrupt ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{url}: not a checkpoint of this library (no model state)")
    return state


def _fallback(folder: str) -> str:
    """What a user can do about a damaged checkpoint: resume from the newest intact one before
    it (kept with --keep-checkpoints 2 or more), or start over."""
    parent, name = folder.rstrip("/").rsplit("/", 1)
    for older in sorted((n for n in storage.listdir(parent) if n.startswith(PREFIX) and n < name), reverse=True):
        try:
            _load(storage.join(parent, older))
        except CheckpointError:
            continue
        return f"{older} before it is intact: delete {folder} to resume from {older}"
    return f"no intact checkpoint before it: delete {parent} to start over"


def clean(out: str) -> None:
    """Leftovers of a writer that was killed: checkpoint folders never published (newer than
    the one latest.json names) and half-written temporary files.  Called by the run folder's
    only writer before it writes."""
    folder = checkpoint_dir(out)
    current = latest(out)
    newest = current.rstrip("/").rsplit("/", 1)[-1] if current else ""
    for name in storage.listdir(folder):
        if name.startswith(PREFIX) and name > newest:
            storage.remove(storage.join(folder, name), recursive=True)
    # Only where this library writes (the run folder, best/, checkpoints/ and the published
    # checkpoint, the token cache): a user's own files below --out are never touched.
    steps = [storage.join("checkpoints", n) for n in storage.listdir(folder) if n.startswith(PREFIX)]
    storage.remove_partial_writes(out, ["", "best", storage.join("best", "encoder"), "checkpoints", "token_cache",
                                        *steps, *(storage.join(s, "shards") for s in steps)])


def remove_all(out: str) -> None:
    storage.remove(checkpoint_dir(out), recursive=True)
