"""The one entry point through which every launcher runs a trial, or a fused group of trials.

    python -m cluster.core.trial CONFIG.json        # one worker process (rank from RANK/WORLD_SIZE/...)
    python -m cluster.core.trial A.json B.json C.json   # one fused group in one process (--fuse)

A finished trial (its ``results.json`` exists: done, or failed because training diverged) is
never trained again: a requeued or duplicated job returns its results at once.  Anything else
trains, resuming from the trial's newest checkpoint; a launcher restarting a trial elsewhere
waits out the lease of a holder that died without releasing it.  As a process it stops cleanly
on SIGUSR1/SIGTERM (exit 75 after a checkpoint), exits 2 with one line on bad input or when the
trial failed (diverged), and 0 when the trial is done.

A group (``run_group``, cluster/core/fusion.py) is placement only: each member ends exactly as it
would alone (its own folder, results and row).  Members that already ended are not trained
again; the rest train fused (``mtl.fused.train_group``), or alone when one is left.  A member that
diverges is recorded failed and the others go on; the process then exits like a failed trial
(2, one line naming the failed members) once every other member has finished."""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import TYPE_CHECKING, Callable

from mtl import storage
from mtl.cli import guarded, print_summary
from mtl.config import RunConfig
from mtl.errors import ConfigError, TrialFailed
from mtl.lease import takeover_wait_s
from mtl.stop import StopSignal

from cluster.core.ending import is_finished, read_results
from cluster.core.study import trial_name

if TYPE_CHECKING:
    from mtl.dist import DistContext


def run_trial(cfg: RunConfig, dist: "DistContext | None" = None,
              on_checkpoint: Callable[[dict], None] | None = None, stop: StopSignal | None = None) -> dict:
    # torch and the model (seconds): not at import, so that a worker process installs its signal
    # handler first (see the end), and the launchers that import this module stay light.
    from mtl.train import train

    if is_finished(cfg):
        return read_results(cfg)

    return train(cfg, dist, on_checkpoint=on_checkpoint, stop=stop, lease_wait_s=takeover_wait_s())


def run_group(cfgs: list[RunConfig], dist: "DistContext | None" = None,
              on_checkpoint: Callable[[int, dict], None] | None = None, stop: StopSignal | None = None) -> list[dict]:
    """Each trial's results, in order, the trials trained as one fused group (see the module's
    docstring).  ``on_checkpoint(i, info)``: trial ``cfgs[i]`` published a checkpoint.  A member
    that diverged returns its failed results; ``TrialStopped`` once every member checkpointed."""
    if len({c.out for c in cfgs}) != len(cfgs):
        raise ConfigError(f"fuse: a trial is in the group twice ({', '.join(c.out for c in cfgs)})")
    # Ended members (done, or failed by diverging) keep their results, as run_trial does for one
    # trial: train_group would train a failed one again.
    todo = [i for i, c in enumerate(cfgs) if not is_finished(c)]
    results: list[dict | None] = [None if i in todo else read_results(c) for i, c in enumerate(cfgs)]
    if len(todo) == 1:
        (i,) = todo
        told = (lambda info: on_checkpoint(i, info)) if on_checkpoint else None
        try:
            results[i] = run_trial(cfgs[i], dist, on_checkpoint=told, stop=stop)
        except TrialFailed:
            results[i] = read_results(cfgs[i])       # recorded failed; the group's contract returns it
    elif todo:
        # torch and the model (seconds): as in run_trial, only once a group trains.
        from mtl.fused import train_group

        told = (lambda j, info: on_checkpoint(todo[j], info)) if on_checkpoint else None
        trained = train_group([cfgs[i] for i in todo], dist, stop=stop, lease_wait_s=takeover_wait_s(),
                              on_checkpoint=told)
        for i, res in zip(todo, trained):
            results[i] = res
    return results


def failed_members(cfgs: list[RunConfig], results: list[dict | None]) -> TrialFailed | None:
    """The error a group ends with when members failed (None when none did): one line naming them."""
    failed = [(c, r) for c, r in zip(cfgs, results) if r is None or r.get("status") == "failed"]
    if not failed:
        return None
    what = "; ".join(f"{trial_name(c)}: {(r or {}).get('error', 'no results')}" for c, r in failed)
    return TrialFailed(f"{len(failed)} of {len(cfgs)} fused trials failed ({what})",
                       max(int((r or {}).get("steps") or 0) for _, r in failed))


def main(argv: list[str] | None = None, stop: StopSignal | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.core.trial", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="+", help="the trial's RunConfig as JSON (a file or fsspec URL); several: "
                                             "the trials of one fused group, trained in this one process")
    args = p.parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"     # the other ranks say only what goes wrong
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def work() -> int:
        from mtl.checks import check_run   # torch: in the worker only, not where launchers import this module

        cfgs = [RunConfig.from_dict(json.loads(storage.read_text(path))) for path in args.config]
        for cfg in cfgs:
            check_run(cfg)
        if len(cfgs) > 1:
            from mtl.fused import check_group    # torch, as check_run: one key, none twice, each can fuse

            check_group(cfgs)
        signal = stop or StopSignal().install()
        results = [run_trial(cfgs[0], stop=signal)] if len(cfgs) == 1 else run_group(cfgs, stop=signal)
        if main_rank:
            for cfg, res in zip(cfgs, results):
                if res is not None and res.get("status", "done") != "failed":
                    print_summary(cfg, res)
        error = failed_members(cfgs, results)
        if error is not None:
            # One trial that ended failed earlier (run_trial returns its results) exits as it did
            # when it diverged; a group names every failed member after the others finished.
            raise error if len(cfgs) > 1 else TrialFailed((results[0] or {}).get("error", "no results"), error.step)
        return 0
    return guarded(work)


if __name__ == "__main__":
    # First thing, before torch and the model load (seconds): a scheduler's signal that comes
    # while this worker starts is kept, not the default action that would end it.
    raise SystemExit(main(stop=StopSignal().install()))
