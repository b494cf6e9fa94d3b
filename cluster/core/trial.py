"""The one entry point through which every launcher runs a trial.

    python -m cluster.core.trial CONFIG.json        # one worker process (rank from RANK/WORLD_SIZE/...)

A finished trial (its ``results.json`` exists: done, or failed because training diverged) is
never trained again: a requeued or duplicated job returns its results at once.  Anything else
trains, resuming from the trial's newest checkpoint; a launcher restarting a trial elsewhere
waits out the lease of a holder that died without releasing it.  As a process it stops cleanly
on SIGUSR1/SIGTERM (exit 75 after a checkpoint), exits 2 with one line on bad input, and 0 when
the trial is done."""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import TYPE_CHECKING, Callable

from mtl import storage
from mtl.cli import guarded, print_summary
from mtl.config import RunConfig
from mtl.lease import takeover_wait_s
from mtl.stop import StopSignal

from cluster.core.ending import is_finished, read_results

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


def main(argv: list[str] | None = None, stop: StopSignal | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.core.trial", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the trial's RunConfig as JSON (a file or fsspec URL)")
    args = p.parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"     # the other ranks say only what goes wrong
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def work() -> int:
        from mtl.checks import check_run   # torch: in the worker only, not where launchers import this module

        cfg = RunConfig.from_dict(json.loads(storage.read_text(args.config)))
        check_run(cfg)
        results = run_trial(cfg, stop=stop or StopSignal().install())
        if main_rank:
            print_summary(cfg, results)
        return 0
    return guarded(work)


if __name__ == "__main__":
    # First thing, before torch and the model load (seconds): a scheduler's signal that comes
    # while this worker starts is kept, not the default action that would end it.
    raise SystemExit(main(stop=StopSignal().install()))
