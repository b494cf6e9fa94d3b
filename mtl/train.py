"""One multi-task fine-tuning trial: ``train(config) -> results``.

    python -m mtl.train --preset smoke --out runs/smoke
    python -m mtl.train --tasks sst,para --combiner scalarize --alpha 0.4 --seed 0 --out runs/x

Reads like the algorithm: check the inputs, build data/model/optimizer, resume if a
checkpoint exists, then per epoch: optimizer steps (one batch of every task each, with
gradient accumulation), dev evaluation, best-weights and full-state checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mtl import checkpoint, storage
from mtl.combine import Combiner, build_combiner
from mtl.config import RunConfig
from mtl.errors import ConfigError
from mtl.conflict import conflict_stats, probe_gram
from mtl.data import MultiTaskSampler, Step, encode_split, eval_order, make_batch, read_split
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
    resumed_from: list = field(default_factory=list)   # steps this run was resumed at
    conflict_steps: int = 0       # steps whose task gradients conflicted, of those measured
    measured_steps: int = 0


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
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


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
    """Checks that span sections; raises ConfigError before anything is read or written."""
    combiner = build_combiner(cfg.combiner, cfg.data.tasks, cfg.data.one_task_per_step)
    stage = cfg.parallel.zero_stage if cfg.parallel.strategy == "deepspeed" else 0
    if stage > combiner.max_zero_stage:
        raise ConfigError(f"parallel.zero_stage: {cfg.combiner.combiner} {combiner.zero_stage_limit}, which ZeRO "
                          f"stage {stage} partitions (use --zero-stage {combiner.max_zero_stage} or lower)")
    return combiner


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------
def train_step(step: Step, model: MultiTaskModel, strategy: TorchStrategy, combiner: Combiner, encoded: dict,
               dist: DistContext, probe_conflict: bool = False) -> tuple[dict, dict | None]:
    """One optimizer step.  Returns the step's scalars, and the Gram matrix of the tasks'
    gradients of the shared parameters when it was computed (by the combiner, or the probe)."""
    task_loss = {t: 0.0 for t in step.global_count}
    total = 0.0
    probed = None
    for i, micro in enumerate(step.micro):
        last = i == len(step.micro) - 1
        batches = {t: make_batch(encoded[t], idx).to(dist.device) for t, idx in micro.items()}
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
            total += float(combiner.backward(losses, strategy.backward, share=1.0 / len(step.micro)))
        for t, loss in losses.items():
            task_loss[t] += float(loss.detach())
    combiner.before_optimizer_step(strategy.loss_scale())
    grad_norm = strategy.step()
    stats = {f"loss/{t}": v for t, v in task_loss.items()}
    stats["loss/combined"] = total
    if grad_norm is not None:
        stats["grad_norm"] = grad_norm
    return stats, combiner.task_gram() or probed


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: MultiTaskModel, dev: dict, batch_size: int, strategy: TorchStrategy, device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    for task, enc in dev.items():
        spec = TASKS[task]
        order = eval_order(enc)
        preds = []
        for chunk in order.split(batch_size):
            with strategy.autocast():
                out = model.task_output(task, make_batch(enc, chunk).to(device))
            preds.append(spec.output(out).cpu())
        pred = torch.empty(len(enc), dtype=preds[0].dtype)
        pred[order] = torch.cat(preds)
        for name, value in spec.metrics(pred, enc.labels).items():
            metrics[f"{task}/{name}"] = value
    metrics["mean"] = sum(metrics[f"{t}/{TASKS[t].primary_metric}"] for t in dev) / len(dev)
    model.train(was_training)
    return metrics


# --------------------------------------------------------------------------------------------
# The trial
# --------------------------------------------------------------------------------------------
def train(cfg: RunConfig, dist: DistContext | None = None,
          on_checkpoint: Callable[[dict], None] | None = None, stop: StopSignal | None = None) -> dict:
    """Runs the trial to the end (resuming from the run folder's latest checkpoint) and returns
    its results.  ``on_checkpoint`` is called on every rank once a checkpoint is published, with
    its folder, step, epoch and the evaluation made just before it (None between evaluations).
    When ``stop`` is raised (a scheduler's warning signal), the trial checkpoints after the
    step under way and raises ``TrialStopped``; running it again resumes there."""
    started = time.perf_counter()
    started_at = time.time()
    dist = dist or DistContext.from_env(cfg.device)

    # 1. Inputs: everything that can be wrong is checked before a file is written.
    combiner = check_run(cfg)
    tasks = [TASKS[t] for t in cfg.data.tasks]
    raw_train, raw_dev = read_data(cfg, tasks)
    if dist.is_main:
        storage.ensure_writable(cfg.out)
    prior = checkpoint.latest(cfg.out)
    resumed = checkpoint.load(prior) if prior else None
    changed = _differs(RunConfig.from_dict(resumed["config"]).identity(), cfg.identity()) if resumed else []
    if changed:
        log.warning("resuming %s with changed settings: %s", cfg.out, ", ".join(changed))

    # 2. Data, model, optimizer.
    tokenizer = load_tokenizer(cfg.model)
    train_sets = tokenize_all(cfg, tasks, raw_train, dist, tokenizer)
    dev_sets = tokenize_all(cfg, tasks, raw_dev, dist, tokenizer)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tasks).to(dist.device)
    combiner.to(dist.device)
    combiner.bind(model, dist, cfg.seed)
    sampler = MultiTaskSampler({t: len(e) for t, e in train_sets.items()}, cfg.data, cfg.optim, cfg.seed,
                               dist.rank, dist.world_size)
    steps_per_epoch = sampler.steps_per_epoch()
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
    bar = progress_bar(total_steps, state.step, cfg.progress, dist.is_main, f"{'+'.join(cfg.data.tasks)}")
    wall_before = state.wall_time_s

    def save_full(evaluation: dict | None = None) -> str:
        state.wall_time_s = wall_before + time.perf_counter() - started
        folder = checkpoint.folder_url(cfg.out, state.step)
        weights = strategy.full_state_dict()
        if dist.is_main:
            storage.save_torch(checkpoint.state_url(folder), {
                "model": weights, "strategy": strategy.state_dict(), "combiner": combiner.state_dict(),
                "state": vars(state).copy(), "config": cfg.to_dict(), "step": state.step})
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
            stats, gram = train_step(step, model, strategy, combiner, train_sets, dist, probe_conflict=probe)
            if gram is not None and len(gram[0]) > 1 and every:
                conflict, conflicted = conflict_stats(*gram)
                state.measured_steps += 1
                state.conflict_steps += conflicted
                conflict["grad_conflict/fraction"] = state.conflict_steps / state.measured_steps
                sink.scalars(state.step + 1, conflict)
            state.examples += sum(step.global_count.values())
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
            record = _evaluate_and_keep_best(cfg, model, dev_sets, strategy, dist, state, sink)
            combiner.after_evaluation(record["metrics"])
        save_full(record)
        sink.flush()
    if bar:
        bar.close()

    # 5. Results.
    state.wall_time_s = wall_before + time.perf_counter() - started
    results = {
        "config": cfg.to_dict(), "tasks": list(cfg.data.tasks), "steps": state.step, "epochs": state.history,
        "best": state.best, "started_at": started_at, "finished_at": time.time(),
        "resumed_from_steps": state.resumed_from, "wall_time_s": state.wall_time_s, "train_time_s": state.train_time_s,
        "examples_per_s": state.examples / max(state.train_time_s, 1e-9), "world_size": dist.world_size,
        "skipped_rows": {t: raw_train[t].skipped + raw_dev[t].skipped for t in raw_train},
        "grad_conflict_fraction": state.conflict_steps / state.measured_steps if state.measured_steps else None,
        "weights_digest": weights_digest(strategy.full_state_dict()),
    }
    if dist.is_main:
        sink.hparams(cfg.identity(), {k: v for k, v in state.best.get("metrics", {}).items()})
        storage.write_text(storage.join(cfg.out, "results.json"), json.dumps(results, indent=2))
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


def _differs(a: dict, b: dict) -> list[str]:
    from mtl.monitor import flatten

    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def _evaluate_and_keep_best(cfg, model, dev_sets, strategy, dist, state: TrainState, sink) -> dict:
    # Every rank scores the whole (small) dev set: identical metrics everywhere without a gather,
    # which the KPI-driven combiners (DTP on dev) and best-weights choice rely on.
    metrics = evaluate(model, dev_sets, cfg.optim.batch_size * 4, strategy, dist.device)
    score = metrics[cfg.select_metric]
    record = {"epoch": state.epoch, "step": state.step, "metrics": metrics, "score": score}
    state.history.append(record)
    sink.scalars(state.step, {f"dev/{k}": v for k, v in metrics.items()})
    if score > state.best_score:
        state.best_score = score
        state.best = record
        weights = strategy.full_state_dict()
        if dist.is_main:
            storage.save_torch(storage.join(cfg.out, "best", "model.pt"),
                               {"model": weights, "metrics": metrics, "epoch": state.epoch,
                                "step": state.step, "config": cfg.to_dict()})
    log.info("epoch %d step %d dev %s", state.epoch, state.step,
             " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return {**record, "best_score": state.best_score}


def main(argv: list[str] | None = None) -> int:
    from mtl.cli import run_cli

    return run_cli(argv)


if __name__ == "__main__":
    raise SystemExit(main())
