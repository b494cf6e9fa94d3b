"""Which trials of a study train together as one fused group (``--fuse K|auto``): placement,
never identity.  A group is K trials that see the same batches (``mtl.fused.fusion_key``: same
model, tasks, data, seed, sampler; free to differ in loss weights, combiner, lr, weight decay...)
trained in one process as one stacked model (``mtl.fused.train_group``, through
``cluster.core.trial.run_group``).  Each member keeps its name, folder, fingerprint and results
row; the results table and the report are built per trial as without fusion.

Grouping (``fused_slots``) is a function of the trial list alone: trials with the same key are
taken in list order and cut into chunks of at most K; a trial that cannot fuse (key None: a
gradient method, several workers, a stage...) is a group of its own; groups are ordered by their
first trial.  Grouped trials never have an upstream (a stage cannot fuse), so every group of two
or more lies in the first wave of stages, and no group waits for another member's upstream.

Which list is grouped, per backend:

- SLURM arrays: the whole study, finished trials included, and the groups are pinned with the
  trial list (``_slurm/study-<hash>.json``).  Array task i runs group i of that pinned list, so an
  index means the same group in every resubmit, and a task still queued from an earlier submit
  (found by its ``--comment``) is never duplicated under another index.  A group some of whose
  members finished since runs the rest (``run_group`` skips ended members); one whose members all
  ended is not submitted.
- Ray and submitit: the unfinished trials of this launch (nothing indexes their groups; each
  launch plans anew, so a rerun regroups what is left into full groups).

``auto``: per key, the largest K <= 16 such that K x one worker's estimated peak memory
(``cluster.core.memory.estimate_worker``) fits one GPU's capacity (``--gpu-memory``, else
nvidia-smi where the backend can see the GPUs the trials get), times ``--gpus-per-worker`` when
that is a fraction (the group's share of the GPU).  No GPU (``--gpus-per-worker 0``, trials on
``--device cpu``) or no capacity known: 1, said in one log line.

``mtl.fused`` imports torch: it is imported inside the functions that need keys, so that the
launchers' ``--help`` stays light."""
from __future__ import annotations

import logging
from collections.abc import Mapping

from mtl.config import RunConfig
from mtl.errors import ConfigError

from cluster.core.dependencies import slots
from cluster.core.placement import Placement
from cluster.core.study import trial_name

log = logging.getLogger("cluster.core.fusion")
MAX_AUTO = 16         # --fuse auto never stacks more (the gain flattens long before on one GPU)
NAME_MAX = 200        # a group's name becomes a Ray trial folder: well under a file name's 255 bytes

# A fusion plan: one K for every key, or K per group key (what --fuse auto found for each).
Plan = int | Mapping[str, int]


def group_key(cfg: RunConfig) -> str | None:
    """The key trials are grouped by: mtl.fused.fusion_key, and the device (placement, so not in
    the key; one study runs on one, but a group must not mix them).  None: the trial runs alone."""
    from mtl.fused import fusion_key       # torch: only where a study is grouped, never for --help

    key = fusion_key(cfg)
    return None if key is None else f"{cfg.device}/{key}"


def cap(fuse: Plan, key: str | None) -> int:
    if key is None:
        return 1
    return int(fuse.get(key, 1)) if isinstance(fuse, Mapping) else int(fuse)


def fused_slots(trials: list[RunConfig], fuse: Plan) -> list[list[int]]:
    """Trial indices per group: same key, list order, at most K a group (see the module's
    docstring); groups ordered by their first trial.  ``fuse`` 1: every trial alone."""
    if fuse == 1:
        return [[i] for i in range(len(trials))]
    open_chunk: dict[str, list[int]] = {}
    groups: list[list[int]] = []
    for i, t in enumerate(trials):
        key = group_key(t)
        k = cap(fuse, key)
        if k <= 1:
            groups.append([i])
            continue
        chunk = open_chunk.get(key)
        if chunk is None or len(chunk) >= k:
            chunk = open_chunk[key] = []
            groups.append(chunk)         # appended at its first trial: groups stay in that order
        chunk.append(i)
    return groups


def fuse_groups(trials: list[RunConfig], fuse: Plan) -> list[list[RunConfig]]:
    """The trials in fused groups (``fused_slots``)."""
    return [[trials[i] for i in group] for group in fused_slots(trials, fuse)]


def task_slots(trials: list[RunConfig], per_task: int, fuse: Plan) -> list[list[int]]:
    """SLURM array tasks: one fused group each, or without fusion ``per_task`` consecutive trials of
    one wave (cluster.core.dependencies.slots; Placement refuses both at once)."""
    return slots(trials, per_task) if fuse == 1 else fused_slots(trials, fuse)


def pick(groups: list[list[int]], index: int, n_trials: int) -> list[int]:
    """The trial indices of array task ``index``."""
    if not 0 <= index < len(groups):
        raise ConfigError(f"array index {index} is beyond the grid: {n_trials} trials in {len(groups)} fused groups, "
                          f"so indices 0-{len(groups) - 1}")
    return groups[index]


def group_name(group: list[RunConfig]) -> str:
    """A group's name where a process or a Ray trial needs one: a trial alone keeps its own."""
    first = trial_name(group[0])
    return first if len(group) == 1 else f"fused{len(group)}-{first}"[:NAME_MAX]


# --------------------------------------------------------------------------------------------
# --fuse auto, and the plan's one log line
# --------------------------------------------------------------------------------------------
def plan(trials: list[RunConfig], placement: Placement, gpu_default: float, detect: bool) -> Plan:
    """The K (or K per key, for auto) that ``placement.fuse`` asks for these trials.  ``detect``:
    whether nvidia-smi here sees the GPUs the trials will get (a local Ray; not a SLURM submit host)."""
    if placement.fuse != "auto":
        return placement.fuse
    from cluster.core.memory import format_size, gpu_capacity     # nvidia-smi; torch only for estimates

    share = placement.gpus(gpu_default)
    keyed = [t for t in trials if t.device != "cpu" and group_key(t) is not None]
    if share <= 0 or not keyed:
        why = "no GPU per worker (--gpus-per-worker 0)" if share <= 0 else "no trial that can fuse runs on a GPU"
        log.info("--fuse auto: %s: every trial trains alone", why)
        return 1
    capacity, source = gpu_capacity(placement, detect)
    if capacity is None:
        log.info("--fuse auto: GPU memory unknown here (no --gpu-memory%s): every trial trains alone",
                 ", no nvidia-smi" if detect else "; the GPUs the jobs get are not visible from here")
        return 1
    sizes = auto_sizes(keyed, int(capacity * min(share, 1.0)))
    log.info("--fuse auto: up to %d trials per group (%d keys) in %s of a %s GPU (%s)", max(sizes.values()),
             len(sizes), format_size(capacity * min(share, 1.0)), format_size(capacity), source)
    return sizes


def auto_sizes(trials: list[RunConfig], budget: int) -> dict[str, int]:
    """Per key: the largest K <= MAX_AUTO with K x the largest member's worker estimate <= budget
    (1 when even one does not fit: a trial alone is never refused, as in cluster.core.memory)."""
    from cluster.core.memory import MemoryUnknown, estimate_worker    # torch and transformers: auto only

    worst: dict[str, int] = {}
    unknown: set[str] = set()
    for t in trials:
        key = group_key(t)
        try:
            worst[key] = max(worst.get(key, 0), estimate_worker(t).total)
        except MemoryUnknown as exc:
            log.warning("--fuse auto: %s trains alone: %s", trial_name(t), exc)
            unknown.add(key)
    return {key: 1 if key in unknown or est <= 0 else max(1, min(MAX_AUTO, budget // est))
            for key, est in worst.items()}


def describe(trials: list[RunConfig], groups: list[list[RunConfig]], fuse: Plan) -> None:
    """One log line: how many processes the trials became, and why some could not fuse."""
    if fuse == 1:
        return
    from mtl.fused import why_not        # torch: as in group_key

    fused = [g for g in groups if len(g) > 1]
    alone = [(trial_name(t), why) for t in trials if (why := why_not(t))]
    shown = "; ".join(", ".join(map(trial_name, g)) for g in fused[:3]) + ("; ..." if len(fused) > 3 else "")
    log.info("--fuse %s: %d trials in %d processes (fused: %s)%s", "auto" if isinstance(fuse, Mapping) else fuse,
             len(trials), len(groups), shown or "none",
             f"; {len(alone)} cannot fuse ({alone[0][0]}: {alone[0][1]}{', ...' if len(alone) > 1 else ''})"
             if alone else "")
