"""The one entry point through which every launcher runs a trial.

    python -m cluster.trial CONFIG.json        # one worker process (rank from RANK/WORLD_SIZE/...)

A finished trial (its ``results.json`` exists) is never trained again: a requeued or
duplicated job returns its results at once.  Anything else trains, resuming from the trial's
newest checkpoint.  As a process it stops cleanly on SIGUSR1/SIGTERM (exit 75 after a
checkpoint), exits 2 with one line on bad input, and 0 when the trial is done."""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Callable

from mtl import storage
from mtl.config import RunConfig
from mtl.dist import DistContext
from mtl.stop import StopSignal

from cluster.study import is_finished, read_results


def run_trial(cfg: RunConfig, dist: DistContext | None = None, on_checkpoint: Callable[[dict], None] | None = None,
              stop: StopSignal | None = None) -> dict:
    if is_finished(cfg):
        return read_results(cfg)
    from mtl.train import train

    return train(cfg, dist, on_checkpoint=on_checkpoint, stop=stop)


def main(argv: list[str] | None = None) -> int:
    from mtl.cli import guarded, print_summary

    p = argparse.ArgumentParser(prog="python -m cluster.trial", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the trial's RunConfig as JSON (a file or fsspec URL)")
    args = p.parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"     # the other ranks say only what goes wrong
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def work() -> int:
        from mtl.train import check_run

        cfg = RunConfig.from_dict(json.loads(storage.read_text(args.config)))
        check_run(cfg)
        results = run_trial(cfg, stop=StopSignal().install())
        if main_rank:
            print_summary(cfg, results)
        return 0
    return guarded(work)


if __name__ == "__main__":
    raise SystemExit(main())
