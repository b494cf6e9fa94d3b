"""One multi-task fine-tuning trial: ``train(config) -> results``, and its command line.

    python -m mtl.train --preset smoke --out runs/smoke
    python -m mtl.train --tasks sst,para --combiner scalarize --alpha 0.4 --seed 0 --out runs/x
    python -m mtl.train --stages chain.yaml --tasks sts --out runs/seq     # a chain of stages (mtl.stages)

The trial's lifecycle: check the inputs before anything is written, return the results of a
trial already done, take the run folder, clean a killed writer's leftovers, then train
(mtl.trainer: resuming from the run folder's latest checkpoint) or record the trial failed."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Callable

from mtl import checkpoint, results as trial_results, stages, storage
from mtl.checkpoint import CheckpointManager
from mtl.checks import check_run, check_same_trial, check_workers
from mtl.cli import config_from_args, guarded, print_summary, trial_parser
from mtl.combine import Combiner
from mtl.config import RunConfig
from mtl.data import MultiTaskSampler, data_record, file_digests, read_data
from mtl.dist import DistContext
from mtl.errors import MtlError, TrialFailed
from mtl.lease import Lease, LeaseHeld
from mtl.model import load_tokenizer
from mtl.stop import StopSignal
from mtl.tasks import TASKS
from mtl.trainer import Inputs, Trainer

log = logging.getLogger("mtl.train")


def train(cfg: RunConfig, dist: DistContext | None = None, on_checkpoint: Callable[[dict], None] | None = None,
          stop: StopSignal | None = None, lease_wait_s: float = 0.0) -> dict:
    """Runs the trial to the end (resuming from the run folder's latest checkpoint) and returns
    its results; a trial that is already done returns its results as they are.
    ``on_checkpoint`` is called on every rank once a checkpoint is published, with its folder,
    step, epoch and the evaluation made just before it (None between evaluations).  When
    ``stop`` is raised (a scheduler's warning signal), the trial checkpoints after the step under
    way and raises ``TrialStopped``; running it again resumes there.  Another process writing
    the same run folder is refused (``LeaseHeld``), after waiting up to ``lease_wait_s`` for it
    to finish or die.  A diverged trial raises ``TrialFailed`` and is recorded as failed."""
    combiner = check_run(cfg)
    dist = dist or DistContext.from_env(cfg.device)
    check_workers(cfg, dist)
    done = finished_results(cfg)
    if done is not None:
        log.info("%s is done: its results stand", cfg.out)
        return done
    stages.upstream_results(cfg)        # the stage it starts from has finished (else: why not)
    inputs = prepare(cfg, combiner)
    with take_run_folder(cfg.out, dist, lease_wait_s) as lease:
        checkpoints = CheckpointManager(cfg.out, dist, cfg.keep_checkpoints, cfg.to_dict(), inputs.data)
        checkpoints.clean()
        try:
            return Trainer(cfg, dist, inputs, checkpoints, on_checkpoint).fit(lease, stop)
        except TrialFailed as exc:
            record_failed(cfg, dist, exc)
            raise


def record_failed(cfg: RunConfig, dist: DistContext, exc: TrialFailed) -> dict:
    """A diverged trial's results (rank 0 writes them): failed, never counted as a result."""
    failed = {"status": "failed", "error": str(exc), "steps": exc.step, "config": cfg.to_dict(),
              "tasks": list(cfg.data.tasks), "failed_at": time.time()}
    if dist.is_main:
        storage.write_text(trial_results.url(cfg.out), json.dumps(failed, indent=2))
    return failed


def prepare(cfg: RunConfig, combiner: Combiner) -> Inputs:
    """Everything read and checked before the first write: data, tokenizer, the checkpoint to
    resume from and whether it belongs to this very trial."""
    started, started_at = time.perf_counter(), time.time()
    tasks = [TASKS[t] for t in cfg.data.tasks]
    raw_train, raw_dev = read_data(cfg, tasks)
    raw_dev.update(read_data(cfg, [TASKS[t] for t in cfg.data.eval_tasks], splits=("dev",))[1])
    MultiTaskSampler({t: len(r) for t, r in raw_train.items()}, cfg.data, cfg.optim, cfg.seed).check_sizes()
    data = data_record([*raw_train.values(), *raw_dev.values()])
    tokenizer = load_tokenizer(cfg.model)
    prior, resumed = checkpoint.newest(cfg.out) or (None, None)
    if resumed:
        check_same_trial(resumed["config"], cfg, resumed.get("data"), data)
    return Inputs(combiner, tasks, raw_train, raw_dev, tokenizer, prior, resumed, started, started_at, data)


def finished_results(cfg: RunConfig) -> dict | None:
    """The results of this trial when it is done (a failed one is tried again, an unreadable
    results.json is said and not counted)."""
    results = trial_results.done(cfg.out)
    if results is None:
        return None
    saved = results.get("data")
    check_same_trial(results["config"], cfg, saved,
                     file_digests(cfg.data.data_dir, [TASKS[t] for t in cfg.data.tasks + cfg.data.eval_tasks])
                     if saved else None)
    return results


@contextlib.contextmanager
def take_run_folder(out: str, dist: DistContext, wait_s: float):
    """The run folder's lease, held by rank 0 while the trial writes; every rank learns at once
    whether rank 0 got it."""
    lease, error = None, None
    if dist.is_main:
        try:
            storage.ensure_writable(out)
            lease = Lease(out, "trial").acquire(wait_s)
        except MtlError as exc:
            error = exc
    if not dist.all_true(error is None):
        raise error or LeaseHeld(f"{out}: rank 0 could not take the run folder (see its error)")
    try:
        yield lease
    finally:
        if lease:
            lease.release()


def main(argv: list[str] | None = None) -> int:
    """``python -m mtl.train`` and the ``mtl-train`` console script."""
    args = trial_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def work() -> int:
        cfg = config_from_args(args)
        if args.stages:
            cfg = stages.chain(cfg, stages.load_chain_file(args.stages), args.stages)
        chain = stages.links(cfg)
        for stage in chain:
            check_run(stage)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        signal = StopSignal().install()
        for stage in chain:            # each stage a trial of its own: a finished one returns its results
            results = train(stage, stop=signal)
        if os.environ.get("RANK", "0") == "0":      # under torchrun, one summary, not one per rank
            print_summary(cfg, results)
        return 0
    return guarded(work)


if __name__ == "__main__":
    raise SystemExit(main())
