"""Full training state through fsspec, published atomically.

Layout under the run folder::

    checkpoints/step-00000120/state.pt   rank 0's full state: one entry per stateful part
                                         ("model": the whole weights, "strategy": optimizer,
                                         scheduler and loss scaler, "combiner", "state": the
                                         TrainState: position, best score, history), then
                                         "config", "step" and "data" (the data files' sha256)
    checkpoints/step-00000120/shards/    per-rank state (DeepSpeed's optimizer partitions)
    checkpoints/latest.json              {"checkpoint": "step-00000120", "step": 120} - written last
    best/                                the weights with the best dev score, in Hugging Face's
                                         format (encoder/, heads.safetensors, dev_predictions.json,
                                         meta.json written last): mtl/export.py

A checkpoint is one folder, so a cluster framework can register that very folder as its own
checkpoint (Ray Train does; see cluster/backends/ray_trial.py) rather than keep a copy.  A checkpoint
exists once ``latest.json`` names it; ``latest.json`` is replaced in one atomic write, so a
reader sees the previous checkpoint or the new one, never half of one.

``CheckpointManager`` writes and restores a trial's checkpoints over its named stateful parts
(anything with ``state_dict()`` / ``load_state_dict()``); the functions below it are the
layout, which launchers and tests read without a trial."""
from __future__ import annotations

import json
import pickle
import zipfile
from typing import TYPE_CHECKING, Protocol

from mtl import storage
from mtl.errors import CheckpointError, StorageError

if TYPE_CHECKING:
    from mtl.dist import DistContext

POINTER = "latest.json"
STATE = "state.pt"
PREFIX = "step-"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Sharded(Protocol):
    """A part with per-rank state that rank 0 cannot save (the strategy)."""
    def save_shards(self, url: str) -> None: ...

    def load_shards(self, url: str) -> None: ...


class CheckpointManager:
    """A trial's checkpoints: rank 0 saves every tracked part's ``state_dict()`` under its name
    in state.pt (with the trial's config, step and data record), every rank its shards, and
    the checkpoint is published (latest.json, written last) and old ones pruned to ``keep``.
    Resuming is two halves: ``newest`` reads the latest checkpoint before the trial writes
    anything (so the trial can refuse one that is not its own), ``restore`` loads it into the
    parts once they are built.  A new stateful part is one ``track`` call."""

    def __init__(self, out: str, dist: "DistContext", keep: int, config: dict, data: dict):
        self.out, self.dist, self.keep = out, dist, keep
        self.config, self.data = config, data
        self.parts: dict[str, Stateful] = {}
        self.sharded: list[Sharded] = []

    def track(self, name: str, part: Stateful, sharded: bool = False) -> None:
        """Save and restore ``part`` as state.pt's entry ``name``; ``sharded``: its per-rank
        shards too (restored after every part's state)."""
        self.parts[name] = part
        if sharded:
            self.sharded.append(part)

    def save(self, step: int) -> str:
        """Write and publish the checkpoint of ``step``; returns its folder.  Called on every rank."""
        folder = folder_url(self.out, step)
        # Every rank asks every part: a part may gather across ranks (the weights under ZeRO 3).
        contents = {name: part.state_dict() for name, part in self.parts.items()}
        if self.dist.is_main:
            storage.save_torch(state_url(folder), {**contents, "config": self.config, "step": step,
                                                   "data": self.data})
        for part in self.sharded:
            part.save_shards(shards_url(folder))
        self.dist.barrier()     # every rank's part is written before the checkpoint is published
        if self.dist.is_main:
            publish(self.out, step, self.keep)
        return folder

    def restore(self, folder: str, contents: dict) -> None:
        """Load a checkpoint ``newest`` read into every part, then every rank's shards."""
        for name, part in self.parts.items():
            part.load_state_dict(contents[name])
        for part in self.sharded:
            part.load_shards(shards_url(folder))

    def clean(self) -> None:
        """Rank 0, the run folder's writer, before it writes: a killed writer's leftovers."""
        if self.dist.is_main:
            clean(self.out)

    def remove_all(self) -> None:
        remove_all(self.out)


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
    """One process's checkpoint of a state already assembled (no shards), published."""
    storage.save_torch(state_url(folder_url(out, step)), state)
    return publish(out, step, keep)


def newest(out: str) -> tuple[str, dict] | None:
    """(folder, contents) of the newest published checkpoint, or None for a fresh run."""
    folder = latest(out)
    return (folder, load(folder)) if folder else None


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
    published = current.rstrip("/").rsplit("/", 1)[-1] if current else ""
    for name in storage.listdir(folder):
        if name.startswith(PREFIX) and name > published:
            storage.remove(storage.join(folder, name), recursive=True)
    # Only where this library writes (the run folder, best/, checkpoints/ and the published
    # checkpoint, the token cache): a user's own files below --out are never touched.
    steps = [storage.join("checkpoints", n) for n in storage.listdir(folder) if n.startswith(PREFIX)]
    storage.remove_partial_writes(out, ["", "best", storage.join("best", "encoder"), "checkpoints", "token_cache",
                                        *steps, *(storage.join(s, "shards") for s in steps)])


def remove_all(out: str) -> None:
    storage.remove(checkpoint_dir(out), recursive=True)
