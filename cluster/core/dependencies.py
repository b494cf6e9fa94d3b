"""The one dependency between a study's trials: a trial that starts from an upstream trial's best
weights (``study.upstream_of``) runs after it.  What every backend honours, decided here once:

- ``waves``: the trials in topological levels (upstreams first), each level in list order;
- ``slots``: which trials one SLURM array task runs, packed within a wave only, so a task never
  holds a dependent beside the upstream it waits for;
- ``fail_dependents``: the trials that cannot run because an upstream failed (or is not part
  of the launch and has not finished), each with the reason naming that upstream.

A dependent of a failed upstream is reported failed through the launchers' ``failures`` mapping
(the results table's row and the summary give the reason), never written into its own
``results.json``: it has not run, so it has not ended, and a rerun after the upstream is fixed
(its results.json deleted, its data repaired) runs the upstream and then the dependents.  An
upstream that ended failed (diverged) stays failed for the launchers, so its dependents are
reported failed again on every rerun without anything being submitted."""
from __future__ import annotations

from mtl import results as trial_results
from mtl.config import RunConfig
from mtl.errors import ConfigError

from cluster.core.study import trial_name, upstream_of


def _depths(trials: list[RunConfig]) -> list[int]:
    """Each trial's depth: 0 without an upstream in the list, else its upstream's depth + 1.  An
    upstream outside the list is satisfied (done on storage, or the caller failed its dependents)."""
    index = {t.out: i for i, t in enumerate(trials)}
    depth: dict[int, int] = {}

    def of(i: int) -> int:
        if i not in depth:
            up = upstream_of(trials[i])
            depth[i] = 0 if up not in index else of(index[up]) + 1    # identity includes the upstream: no cycle
        return depth[i]
    return [of(i) for i in range(len(trials))]


def waves(trials: list[RunConfig]) -> list[list[RunConfig]]:
    """The trials in levels: wave 0 those whose upstream (if any) is not in the list, wave n+1
    those whose upstream is in wave n; list order within a wave.  Running the waves one after
    the other runs every upstream before its dependents."""
    depths = _depths(trials)
    return [[t for t, d in zip(trials, depths) if d == level] for level in range(max(depths, default=-1) + 1)]


def slots(trials: list[RunConfig], per_slot: int = 1) -> list[list[int]]:
    """Trial indices per batch slot (SLURM array task): consecutive trials of one wave, at most
    ``per_slot`` to a slot, slots ordered by their first trial.  Without dependencies this is
    trials [i*k, i*k + k) for slot i (with k = 1: task i runs trial i); with them no slot mixes
    waves, so a task never runs a dependent beside the upstream it must wait for.  A function
    of the list alone (finished or not), so a rerun finds the same slot at the same index."""
    depths = _depths(trials)
    out = []
    for level in range(max(depths, default=-1) + 1):
        members = [i for i, d in enumerate(depths) if d == level]
        out += [members[j:j + per_slot] for j in range(0, len(members), per_slot)]
    return sorted(out)


def slot(trials: list[RunConfig], index: int, per_slot: int = 1) -> list[int]:
    """The trial indices that array task ``index`` runs (see ``slots``)."""
    groups = slots(trials, per_slot)
    if not 0 <= index < len(groups):
        what = "trials" if per_slot == 1 else f"trials in {len(groups)} tasks of {per_slot}"
        raise ConfigError(f"array index {index} is beyond the grid: {len(trials)} {what}, so indices "
                          f"0-{len(groups) - 1}")
    return groups[index]


def fail_dependents(trials: list[RunConfig], failed: dict[str, str] | None = None) -> dict[str, str]:
    """{trial name: why it cannot run} for every trial whose upstream failed, transitively:
    an upstream in ``failed`` (trial name -> what its launcher saw) or whose results.json says
    failed gives ``upstream <name> failed: <reason>``; an upstream that is not in ``trials`` and
    has not finished on storage cannot be run by this launch.  Trials that ended themselves are
    left out (their own results stand).  ``trials``: the whole study's list, finished or not."""
    failed = failed or {}
    listed = {t.out for t in trials}
    blocked: dict[str, str] = {}
    for wave in waves(trials):
        for t in wave:
            if t.upstream is None or trial_results.ended(t.out) is not None:
                continue
            up = trial_name(t.upstream)
            # The upstream's own words first (a diverged trial's error), then what its launcher saw.
            why = blocked.get(up) or _failed_on_storage(t.upstream.out) or failed.get(up)
            if why:
                blocked[trial_name(t)] = f"upstream {up} failed: {why}"
            elif t.upstream.out not in listed and trial_results.done(t.upstream.out) is None:
                blocked[trial_name(t)] = f"upstream {t.upstream.out} has not finished and is not part of this launch"
    return blocked


def _failed_on_storage(out: str) -> str | None:
    res = trial_results.ended(out)
    return res["error"] if res is not None and res.get("status") == "failed" else None

