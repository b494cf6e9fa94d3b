"""One multi-task fine-tuning trial: ``train(config) -> results``.

    python -m mtl.train --preset smoke --out runs/smoke
    python -m mtl.train --tasks sst,para --combiner scalarize --alpha 0.4 --seed 0 --out runs/x

Reads like the algorithm: check the inputs, build data/model/optimizer, resume if a
checkpoint exists, then per epoch: optimizer steps (one batch of every task each, with
gradient accumulation), dev evaluation, best-weights and full-state checkpoints.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mtl import checkpoint, export, results as trial_results, storage
from mtl.combine import Combiner, build_combiner
from mtl.config import RunConfig
from mtl.errors import ConfigError, MtlError, TrialFailed
from mtl.lease import Lease, LeaseHeld
from mtl.conflict import conflict_stats, probe_gram
from mtl.data import (MultiTaskSampler, Step, data_changes, data_record, encode_split, file_digests, make_batch,
                      read_split)
from mtl.evaluation import metric_names, predict, score
from mtl.dist import DistContext
from mtl.model import MultiTaskModel, build_model, load_tokenizer
from mtl.monitor import NullSink, TensorBoardSink, progress_bar
from mtl.stop import StopSignal, TrialStopped
from mtl.strategy import TorchStrategy, build_strategy
from mtl.tasks import TASKS, TaskSpec

log = logging.getLogger("mtl.train")


@dataclass
class TrainState:
    """Where the run stands; saved in every checkpoint."""
    step: int = 0
    epoch: int = 0                # epochs completed
    step_in_epoch: int = 0        # optimizer steps done in the current epoch
    best_score: float = -math.inf
    best: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    examples: int = 0
    examples_by_task: dict = field(default_factory=dict)   # training examples seen, per task
    resumed_from: list = field(default_factory=list)   # steps this run was resumed at
    skipped_steps: int = 0        # fp16 steps the loss scaler skipped (overflowing gradients)
    conflict_steps: int = 0       # steps whose task gradients conflicted, of those measured
    measured_steps: int = 0
    cos_sums: dict = field(default_factory=dict)   # task pair -> sum of its gradients' cosines, measured steps


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def read_data(cfg: RunConfig, tasks: list[TaskSpec]):
    d = cfg.data
    train = {t.name: read_split(d.data_dir, t, "train", d.on_bad_row, d.max_train_rows) for t in tasks}
    dev = {t.name: read_split(d.data_dir, t, "dev", d.on_bad_row, d.max_dev_rows) for t in tasks}
    return train, dev


def tokenize_all(cfg: RunConfig, tasks: list[TaskSpec], raw: dict, dist: DistContext, tokenizer) -> dict:
    cache = cfg.data.cache_dir or storage.join(cfg.out, "token_cache")
    siamese = cfg.model.pair_encoding == "siamese"
    encode = lambda t: encode_split(raw[t.name], t, tokenizer, cfg.model.max_length, siamese, cache)  # noqa: E731
    # Rank 0 fills the cache first so the other ranks load it rather than all tokenizing.
    if dist.is_main:
        encoded = {t.name: encode(t) for t in tasks}
    dist.barrier()
    if not dist.is_main:
        encoded = {t.name: encode(t) for t in tasks}
    return encoded


def build_optimizer(cfg: RunConfig, model: torch.nn.Module, combiner: Combiner) -> torch.optim.Optimizer:
    o = cfg.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)   # biases and LayerNorm: no decay
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = [p for p in combiner.parameters() if p.requires_grad]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0, "lr": cfg.combiner.combiner_lr or o.lr})
    # Fused: one kernel set for all parameters instead of a few per parameter tensor (on a GPU
    # each is a launch).  On a CPU it matters as much: torch's default there loops over the
    # parameters (its foreach kernels are CUDA-only), 81 ms a step against 10 ms for MiniLM on
    # 2 cores, which made a CPU trial ~18% slower than Hugging Face's Trainer (whose default
    # is adamw_torch_fused; benchmarks/bench_trainer.py).  So: every device, one process too.
    # Same update within rounding.  DeepSpeed wraps the optimizer in its own mixed-precision
    # machinery: it gets the default implementation.
    fused = cfg.parallel.strategy == "ddp"
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def build_scheduler(cfg: RunConfig, optimizer, total_steps: int):
    warmup = int(cfg.optim.warmup_ratio * total_steps)
    linear = cfg.optim.schedule == "linear"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if linear:
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_run(cfg: RunConfig) -> Combiner:
    """Checks that span sections or look at this machine (device, model folder, storage kind);
    raises ConfigError before anything is read or written."""
    check_device(cfg.device)
    check_model_path(cfg.model.model)
    check_select_metric(cfg)
    check_path_names(cfg.out, "out")
    if not cfg.allow_ephemeral_out and storage.is_ephemeral(cfg.out):
        raise ConfigError(f"out: {cfg.out} lives only in this process and is gone when it ends "
                          "(pass --allow-ephemeral-out true if that is what you want)")
    combiner = build_combiner(cfg.combiner, cfg.data.tasks, cfg.data.one_task_per_step)
    stage = cfg.parallel.zero_stage if cfg.parallel.strategy == "deepspeed" else 0
    if stage > combiner.max_zero_stage:
        raise ConfigError(f"parallel.zero_stage: {cfg.combiner.combiner} {combiner.zero_stage_limit}, which ZeRO "
                          f"stage {stage} partitions (use --zero-stage {combiner.max_zero_stage} or lower)")
    return combiner


def check_select_metric(cfg: RunConfig) -> None:
    if cfg.select_metric == "mean":
        return
    task, _, metric = cfg.select_metric.partition("/")
    names = TASKS[task].metric_names
    if metric not in names:
        raise ConfigError(f"select_metric: {cfg.select_metric!r} is not a metric of {task} (its metrics: "
                          f"{', '.join(f'{task}/{m}' for m in names)}; or 'mean')")


NAME_MAX = 255      # bytes in one file or folder name, on every common filesystem and object store key part


def check_path_names(url: str, what: str) -> None:
    """A path part longer than filesystems take fails at the first write, deep in a library."""
    for part in url.split("://", 1)[-1].split("/"):
        if len(part.encode()) > NAME_MAX:
            raise ConfigError(f"{what}: the name {part[:40]}... is {len(part.encode())} bytes, over the {NAME_MAX} "
                              f"a file name may have")


def check_workers(cfg: RunConfig, dist: DistContext) -> None:
    """The workers a trial records are the processes that train it: one process asked for two
    would train alone and be recorded (and named, and resumed) as a two-worker trial."""
    if cfg.parallel.workers != dist.world_size:
        n = cfg.parallel.workers
        how = (f"run it as torchrun --nproc-per-node {n} -m mtl.train ... --workers {n}, or through a launcher "
               f"(launch/submit.py)" if dist.world_size == 1 else f"pass --workers {dist.world_size}")
        raise ConfigError(f"parallel.workers: {n} asked for, but {dist.world_size} process(es) train this trial: "
                          f"{how}")


def check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"device: {device} asked for, but this torch ({torch.__version__}, {build}) sees no "
                          "CUDA device (use --device cpu or auto)")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device: {device} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")


def check_model_path(model: str) -> None:
    """A name that can only be a local path (absolute, ./, ../, ~) must be a folder; anything
    else may be a Hugging Face Hub name."""
    if model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model)):
        what = "is a file, not a model folder" if os.path.exists(os.path.expanduser(model)) else "no such folder"
        raise ConfigError(f"model.model: {model}: {what}")


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------
def train_step(number: int, step: Step, model: MultiTaskModel, strategy: TorchStrategy, combiner: Combiner,
               encoded: dict, dist: DistContext, probe_conflict: bool = False,
               pad_multiple: int = 1) -> tuple[dict, dict | None]:
    """Optimizer step ``number``.  Returns the step's scalars, and the Gram matrix of the tasks'
    gradients of the shared parameters when it was computed (by the combiner, or the probe).
    A non-finite loss or gradient norm raises TrialFailed before the weights take it (fp16's
    scaler skipping an overflowing step is allowed: ``stats["skipped"]`` counts it)."""
    # Losses stay on the device until the step's one host sync below: a float() per
    # micro-batch would stall the host until the GPU caught up, every micro-batch.
    task_loss: dict[str, torch.Tensor] = {}
    total = None
    probed = None
    for i, micro in enumerate(step.micro):
        last = i == len(step.micro) - 1
        batches = {t: make_batch(encoded[t], idx, pad_multiple).to(dist.device) for t, idx in micro.items()}
        with strategy.accumulating(last, combiner):
            with strategy.autocast():
                outputs = strategy.forward(batches)
            # Each worker's share of the global mean: summed here, averaged across workers by
            # DDP, so uneven final batches and any accumulation give the exact global mean.
            losses = {t: TASKS[t].loss(outputs[t], batches[t].labels).sum() * (dist.world_size / step.global_count[t])
                      for t in batches}
            combiner.observe(outputs, batches)
            if probe_conflict and i == 0 and len(losses) > 1:
                probed = probe_gram(losses, model.shared_parameters(), dist)
            combined = combiner.backward(losses, strategy.backward, share=1.0 / len(step.micro)).float()
            total = combined if total is None else total + combined
        for t, loss in losses.items():
            task_loss[t] = task_loss[t] + loss.detach().float() if t in task_loss else loss.detach().float()
    # The global losses (one small collective) and the step's one host sync: every rank
    # decides alike below, and the divergence guard needs the numbers.
    names = list(task_loss)
    values = dist.all_reduce_mean(torch.stack([task_loss[t] for t in names] + [total])).tolist()
    task_loss, total = dict(zip(names, values[:-1])), values[-1]
    for t, value in task_loss.items():
        if not math.isfinite(value):
            raise TrialFailed(f"step {number}: the loss of task {t} is {value} (training diverged; a lower --lr "
                              f"may help)", number)
    combiner.before_optimizer_step(strategy.loss_scale())
    grad_norm, stepped = strategy.step()
    if grad_norm is not None and not math.isfinite(grad_norm) and not strategy.skips_overflow:
        raise TrialFailed(f"step {number}: the gradient norm is {grad_norm} with finite losses "
                          f"({', '.join(f'{t} {v:.4g}' for t, v in task_loss.items())}; training diverged)", number)
    stats = {f"loss/{t}": v for t, v in task_loss.items()}
    stats["loss/combined"] = total
    stats["skipped"] = 0.0 if stepped else 1.0
    if grad_norm is not None:
        stats["grad_norm"] = grad_norm
    return stats, combiner.task_gram() or probed


# --------------------------------------------------------------------------------------------
# The trial
# --------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """What a trial starts from, read and checked before anything is written."""
    combiner: Combiner
    tasks: list[TaskSpec]
    raw_train: dict
    raw_dev: dict
    tokenizer: object
    prior: str | None            # the newest checkpoint's folder, when resuming
    resumed: dict | None         # its contents
    started: float               # perf_counter and wall clock when the trial began
    started_at: float
    data: dict                   # file name -> sha256 of the data files read (mtl.data.data_record)


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
    inputs = prepare(cfg, combiner)
    with take_run_folder(cfg.out, dist, lease_wait_s) as lease:
        if dist.is_main:
            checkpoint.clean(cfg.out)
        try:
            return run(cfg, dist, inputs, lease, on_checkpoint, stop)
        except TrialFailed as exc:
            if dist.is_main:
                storage.write_text(results_url(cfg), json.dumps({
                    "status": "failed", "error": str(exc), "steps": exc.step, "config": cfg.to_dict(),
                    "tasks": list(cfg.data.tasks), "failed_at": time.time()}, indent=2))
            raise


def prepare(cfg: RunConfig, combiner: Combiner) -> Inputs:
    """Everything read and checked before the first write: data, tokenizer, the checkpoint to
    resume from and whether it belongs to this very trial."""
    started, started_at = time.perf_counter(), time.time()
    tasks = [TASKS[t] for t in cfg.data.tasks]
    raw_train, raw_dev = read_data(cfg, tasks)
    MultiTaskSampler({t: len(r) for t, r in raw_train.items()}, cfg.data, cfg.optim, cfg.seed).check_sizes()
    data = data_record([*raw_train.values(), *raw_dev.values()])
    tokenizer = load_tokenizer(cfg.model)
    prior = checkpoint.latest(cfg.out)
    resumed = checkpoint.load(prior) if prior else None
    if resumed:
        check_same_trial(resumed["config"], cfg, resumed.get("data"), data)
    return Inputs(combiner, tasks, raw_train, raw_dev, tokenizer, prior, resumed, started, started_at, data)


def results_url(cfg: RunConfig) -> str:
    return trial_results.url(cfg.out)


def finished_results(cfg: RunConfig) -> dict | None:
    """The results of this trial when it is done (a failed one is tried again, an unreadable
    results.json is said and not counted)."""
    results = trial_results.done(cfg.out)
    if results is None:
        return None
    saved = results.get("data")
    check_same_trial(results["config"], cfg, saved,
                     file_digests(cfg.data.data_dir, [TASKS[t] for t in cfg.data.tasks]) if saved else None)
    return results


def check_same_trial(saved: dict, cfg: RunConfig, saved_data: dict | None = None, data: dict | None = None) -> None:
    """Refuse to continue a run folder started with settings that change the numbers, or on data
    files whose contents changed since (same path, other rows: one trial on two datasets)."""
    changed = RunConfig.from_dict(saved).identity_changes(cfg)
    if changed:
        raise ConfigError(f"{cfg.out} holds a trial started with other settings ({changed}): resume it with its "
                          "own settings, or use another --out")
    changed = data_changes(saved_data or {}, data or {}, cfg.data.data_dir)
    if changed:
        raise ConfigError(f"{cfg.out} holds a trial started on other data: {changed}; restore the files, or use "
                          "another --out")


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


def run(cfg: RunConfig, dist: DistContext, inputs: Inputs, lease: Lease | None,
        on_checkpoint: Callable[[dict], None] | None, stop: StopSignal | None) -> dict:
    started, started_at = inputs.started, inputs.started_at
    tasks, combiner, prior, resumed = inputs.tasks, inputs.combiner, inputs.prior, inputs.resumed
    raw_train, raw_dev, tokenizer = inputs.raw_train, inputs.raw_dev, inputs.tokenizer

    # 2. Data, model, optimizer.
    train_sets = tokenize_all(cfg, tasks, raw_train, dist, tokenizer)
    dev_sets = tokenize_all(cfg, tasks, raw_dev, dist, tokenizer)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tasks).to(dist.device)
    if cfg.compile:
        # In place, so the weights keep their names (checkpoints work with and without it).
        # Dynamic shapes: batch widths vary; one graph serves them rather than one per width.
        model.encoder.compile(dynamic=True)
    combiner.to(dist.device)
    combiner.bind(model, dist, cfg.seed)
    sampler = MultiTaskSampler({t: len(e) for t, e in train_sets.items()}, cfg.data, cfg.optim, cfg.seed,
                               dist.rank, dist.world_size)
    steps_per_epoch = sampler.steps_per_epoch()
    examples_per_epoch = sampler.examples_per_epoch()
    total_steps = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps:
        total_steps = min(total_steps, cfg.optim.max_steps)
    optimizer = build_optimizer(cfg, model, combiner)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    strategy = build_strategy(cfg, dist)
    strategy.setup(model, optimizer, scheduler, combiner)

    # 3. Resume.
    state = TrainState()
    if resumed:
        strategy.load_weights(resumed["model"])
        combiner.load_state_dict(resumed["combiner"])
        strategy.load_state_dict(resumed["strategy"])
        strategy.load_shards(checkpoint.shards_url(prior))
        state = TrainState(**resumed["state"])
        state.resumed_from.append(state.step)
        log.info("resumed %s at step %d (epoch %d)", cfg.out, state.step, state.epoch)

    sink = TensorBoardSink(cfg.out, state.step) if dist.is_main else NullSink()
    sink.start_session(cfg.identity(), metric_names(cfg.data.tasks))
    bar = progress_bar(total_steps, state.step, cfg.progress, dist.is_main, f"{'+'.join(cfg.data.tasks)}")
    wall_before = state.wall_time_s

    def save_full(evaluation: dict | None = None) -> str:
        state.wall_time_s = wall_before + time.perf_counter() - started
        folder = checkpoint.folder_url(cfg.out, state.step)
        weights = strategy.full_state_dict()
        if dist.is_main:
            storage.save_torch(checkpoint.state_url(folder), {
                "model": weights, "strategy": strategy.state_dict(), "combiner": combiner.state_dict(),
                "state": vars(state).copy(), "config": cfg.to_dict(), "step": state.step, "data": inputs.data})
        strategy.save_shards(checkpoint.shards_url(folder))
        dist.barrier()     # every rank's part is written before the checkpoint is published
        if dist.is_main:
            checkpoint.publish(cfg.out, state.step, cfg.keep_checkpoints)
        if on_checkpoint:
            on_checkpoint({"checkpoint": folder, "step": state.step, "epoch": state.epoch, "evaluation": evaluation})
        return folder

    # 4. Epochs.
    model.train()
    while state.epoch < cfg.optim.epochs and not _done(state, cfg):
        plan = sampler.epoch(state.epoch)
        for step in plan[state.step_in_epoch:]:
            # Dropout masks are a function of (seed, rank, step): resuming needs no RNG state.
            torch.manual_seed((cfg.seed * 1_000_003 + state.step) * 1009 + dist.rank)
            tick = time.perf_counter()
            every = cfg.combiner.conflict_every
            probe = bool(every) and strategy.whole_parameters and (state.step + 1) % every == 0
            try:
                stats, gram = train_step(state.step + 1, step, model, strategy, combiner, train_sets, dist,
                                         probe_conflict=probe, pad_multiple=cfg.pad_multiple)
            except TrialFailed:
                sink.end_session(ok=False)
                sink.close()
                raise
            if gram is not None and len(gram[0]) > 1 and every:
                conflict, conflicted = conflict_stats(*gram)
                state.measured_steps += 1
                state.conflict_steps += conflicted
                for name, value in conflict.items():
                    if name.startswith("grad_cos/"):
                        pair = name.removeprefix("grad_cos/")
                        state.cos_sums[pair] = state.cos_sums.get(pair, 0.0) + value
                conflict["grad_conflict/fraction"] = state.conflict_steps / state.measured_steps
                sink.scalars(state.step + 1, conflict)
            state.examples += sum(step.global_count.values())
            for t, n in step.global_count.items():
                state.examples_by_task[t] = state.examples_by_task.get(t, 0) + n
            state.skipped_steps += int(stats["skipped"])
            state.step += 1
            state.step_in_epoch += 1
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss/combined']:.3f}", epoch=state.epoch + 1)
            if state.step % cfg.log_every_steps == 0:
                speed = state.examples / max(state.train_time_s + time.perf_counter() - tick, 1e-9)
                sink.scalars(state.step, {**stats, "lr": scheduler.get_last_lr()[0],
                                          **{f"weight/{t}": w for t, w in combiner.task_weights().items()},
                                          **combiner.extra_scalars(), "examples_per_s": speed})
                if not bar and dist.is_main:
                    log.info("step %d/%d epoch %d loss %.4f %.1f examples/s", state.step, total_steps,
                             state.epoch + 1, stats["loss/combined"], speed)
            # Throughput counts the whole step loop but checkpoint writes (storage, not training).
            state.train_time_s += time.perf_counter() - tick
            saved = cfg.save_every_steps and state.step % cfg.save_every_steps == 0
            if saved:
                folder = save_full()
            if _done(state, cfg):
                break
            if lease:
                lease.check()      # another writer took the folder over: never write beside it
            if stop is not None and stop.requested(dist):
                # A scheduler wants the resources back: keep every finished step, then leave.
                folder = folder if saved else save_full()
                if bar:
                    bar.close()
                sink.close()
                log.warning("stopping %s at step %d on %s", cfg.out, state.step, stop.name)
                raise TrialStopped(state.step, stop.name, folder)
        if state.step_in_epoch >= len(plan):
            state.epoch += 1
            state.step_in_epoch = 0
        last = state.epoch >= cfg.optim.epochs or _done(state, cfg)
        record = None
        if state.epoch % cfg.eval_every_epochs == 0 or last:
            record = _evaluate_and_keep_best(cfg, model, dev_sets, raw_dev, tokenizer, strategy, dist, state, sink)
            combiner.after_evaluation(record["metrics"])
        save_full(record)
        sink.flush()
    if bar:
        bar.close()

    # 5. Results.
    state.wall_time_s = wall_before + time.perf_counter() - started
    results = {
        "status": "done", "config": cfg.to_dict(), "tasks": list(cfg.data.tasks), "steps": state.step,
        "epochs": state.history, "skipped_steps": state.skipped_steps, "examples": state.examples_by_task,
        "best": state.best, "started_at": started_at, "finished_at": time.time(),
        "resumed_from_steps": state.resumed_from, "wall_time_s": state.wall_time_s, "train_time_s": state.train_time_s,
        "examples_per_s": state.examples / max(state.train_time_s, 1e-9), "world_size": dist.world_size,
        "skipped_rows": {t: raw_train[t].skipped + raw_dev[t].skipped for t in raw_train},
        "train_rows": {t: len(raw_train[t]) for t in raw_train}, "examples_per_epoch": examples_per_epoch,
        "data": inputs.data,
        "grad_conflict_fraction": state.conflict_steps / state.measured_steps if state.measured_steps else None,
        "grad_cos_mean": {pair: total / state.measured_steps for pair, total in state.cos_sums.items()},
        "weights_digest": weights_digest(strategy.full_state_dict()),
    }
    if dist.is_main:
        sink.end_session(ok=True)
        storage.write_text(results_url(cfg), json.dumps(results, indent=2))
        if not cfg.keep_final_state:
            # Done: the best weights, results and logs stay; optimizer state is dead weight.
            checkpoint.remove_all(cfg.out)
    sink.close()
    return results


def weights_digest(weights: dict) -> str:
    """A hash of the weights' bytes: replicas on every rank must agree on it."""
    h = hashlib.sha256()
    for name, tensor in weights.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _done(state: TrainState, cfg: RunConfig) -> bool:
    return bool(cfg.optim.max_steps) and state.step >= cfg.optim.max_steps


def _evaluate_and_keep_best(cfg, model, dev_sets, raw_dev, tokenizer, strategy, dist, state: TrainState,
                            sink) -> dict:
    # Every rank scores the whole (small) dev set: identical metrics everywhere without a gather,
    # which the KPI-driven combiners (DTP on dev) and best-weights choice rely on.
    predictions = predict(model, dev_sets, cfg.optim.batch_size * 4, strategy.autocast, dist.device, cfg.pad_multiple)
    metrics = score(predictions, dev_sets)
    value = metrics[cfg.select_metric]
    record = {"epoch": state.epoch, "step": state.step, "metrics": metrics, "score": value}
    state.history.append(record)
    sink.scalars(state.step, {f"dev/{k}": v for k, v in metrics.items()})
    if value > state.best_score:
        state.best_score = value
        state.best = record
        weights = strategy.full_state_dict()
        if dist.is_main:
            export.save_best(cfg.out, model, weights, tokenizer,
                             {"metrics": metrics, "epoch": state.epoch, "step": state.step, "config": cfg.to_dict()},
                             {t: {"ids": raw_dev[t].ids, "pred": p.tolist(), "gold": raw_dev[t].labels}
                              for t, p in predictions.items()})
        sink.scalars(state.step, {f"hparam/{k}": v for k, v in metrics.items()})   # best so far, for HParams
    log.info("epoch %d step %d dev %s", state.epoch, state.step,
             " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return {**record, "best_score": state.best_score}


def main(argv: list[str] | None = None) -> int:
    from mtl.cli import run_cli

    return run_cli(argv)


if __name__ == "__main__":
    raise SystemExit(main())
