"""The training loop of one trial: a ``Trainer`` owns the model, strategy, combiner, sampler,
optimizer, schedule, TensorBoard sink, progress bar and the ``TrainState``, and reads as

    fit()        per epoch: optimizer steps, then evaluate() and a checkpoint
    step()       one optimizer step: one batch of every task, with gradient accumulation
    evaluate()   dev scores, and the best weights kept
    results()    what the trial reports

Its checkpoints go through a ``CheckpointManager`` that the trial's lifecycle (mtl.train) hands
it; the Trainer tracks its stateful parts there and restores them when resuming."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mtl import export, results as trial_results, storage
from mtl.checkpoint import CheckpointManager
from mtl.combine import Combiner
from mtl.config import RunConfig
from mtl.conflict import conflict_stats, probe_gram
from mtl.cost import NOTES, StepCosts, cost_class
from mtl.data import MultiTaskSampler, Step, make_batch, tokenize_all
from mtl.dist import DistContext
from mtl.errors import TrialFailed
from mtl.evaluation import metric_names, predict, score
from mtl.lease import Lease
from mtl.losses import build_losses
from mtl.model import build_model
from mtl.stages import history as stages_history, load_upstream
from mtl.monitor import NullSink, TensorBoardSink, progress_bar
from mtl.optim import build_optimizer, build_scheduler
from mtl.regularize import MicroBatch, build_regularizer, check as check_regularizer
from mtl.stop import StopSignal, TrialStopped
from mtl.strategy import WholeWeights, build_strategy
from mtl.tasks import TASKS, TaskSpec

# The trial's log lines keep the name users and launchers grep for ("INFO mtl.train: resumed").
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
    # What the steps cost (mtl.cost), summed over every session of a resumed trial:
    step_time_sum_s: float = 0.0  # wall time inside step(), over the steps that did not probe conflict
    timed_steps: int = 0
    probed_time_sum_s: float = 0.0   # and over those that did
    probed_steps: int = 0
    backwards: int = 0            # the strategy's backward passes, counted
    counted_steps: int = 0        # steps whose backward passes were counted
    peak_memory_mb: float = 0.0   # the highest peak of the sessions checkpointed so far
    evals_without_gain: int = 0   # early stopping: evaluations since the last gain of > early_stop_delta
    gain_score: float = -math.inf  # ... and the score that gain reached
    stopped_early: dict = field(default_factory=dict)   # why the trial ended before its last epoch

    def state_dict(self) -> dict:
        return vars(self).copy()

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(vars(TrainState(**state)))   # as TrainState(**state): an unknown field fails


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


class Trainer:
    def __init__(self, cfg: RunConfig, dist: DistContext, inputs: Inputs, checkpoints: CheckpointManager,
                 on_checkpoint: Callable[[dict], None] | None = None):
        self.cfg, self.dist, self.inputs = cfg, dist, inputs
        self.checkpoints, self.on_checkpoint = checkpoints, on_checkpoint
        self.train_sets = tokenize_all(cfg, inputs.tasks, inputs.raw_train, dist, inputs.tokenizer)
        self.eval_only = [TASKS[t] for t in cfg.data.eval_tasks]     # scored, not trained: heads carried
        self.dev_sets = tokenize_all(cfg, inputs.tasks + self.eval_only, inputs.raw_dev, dist, inputs.tokenizer)
        self.losses = build_losses(cfg, inputs.tasks, inputs.raw_train)   # per task: --task-loss, --class-weights
        self.build()
        self.reg_sums: dict[str, torch.Tensor] = {}     # the regularisers' terms of the last step
        self.placed: dict = {}      # where it ran, when that is worth a line in the results (a fused group)
        self.state = TrainState()
        checkpoints.track("model", WholeWeights(self.strategy))
        checkpoints.track("strategy", self.strategy, sharded=True)
        checkpoints.track("combiner", self.combiner)
        if self.regularizer.stateful:
            # SMART's momentum copy (mu > 0): a second copy of the weights in every full checkpoint.
            checkpoints.track("regularizer", self.regularizer)
        checkpoints.track("state", self.state)
        if inputs.resumed:
            self.resume()
        self.sink = TensorBoardSink(cfg.out, self.state.step) if dist.is_main else NullSink()
        self.sink.start_session(cfg.identity(), metric_names(cfg.data.tasks + cfg.data.eval_tasks))
        self.bar = progress_bar(self.total_steps, self.state.step, cfg.progress, dist.is_main,
                                f"{'+'.join(cfg.data.tasks)}")
        self.wall_before = self.state.wall_time_s
        self.costs = StepCosts(dist.device)

    def build(self) -> None:
        """Model, combiner, sampler, optimizer, schedule and strategy, in the order that fixes
        the random numbers each consumes (the seed, then the model's heads, then the combiner)."""
        cfg, dist = self.cfg, self.dist
        check_regularizer(cfg)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, self.inputs.tasks + self.eval_only, cfg.embedding_tasks(),
                                 cfg.loss.pair_threshold)
        if cfg.upstream is not None and self.inputs.prior is None:    # a resume loads its own checkpoint
            load_upstream(self.model, cfg)
        for task in cfg.data.eval_tasks:      # no loss reaches them: frozen (DDP wants no unused parameter)
            self.model.heads[task].requires_grad_(False)
        if cfg.model.freeze_encoder:
            self.model.encoder.requires_grad_(False)
        self.model = self.model.to(dist.device)
        if cfg.compile:
            # In place, so the weights keep their names (checkpoints work with and without it).
            # Dynamic shapes: batch widths vary; one graph serves them rather than one per width.
            self.model.encoder.compile(dynamic=True)
        self.combiner = self.inputs.combiner
        self.combiner.to(dist.device)
        self.combiner.bind(self.model, dist, cfg.seed)
        self.sampler = MultiTaskSampler({t: len(e) for t, e in self.train_sets.items()}, cfg.data, cfg.optim,
                                        cfg.seed, dist.rank, dist.world_size)
        self.total_steps = self.sampler.steps_per_epoch() * cfg.optim.epochs
        self.examples_per_epoch = self.sampler.examples_per_epoch()
        if cfg.optim.max_steps:
            self.total_steps = min(self.total_steps, cfg.optim.max_steps)
        self.optimizer = build_optimizer(cfg, self.model, self.combiner)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
        self.strategy = build_strategy(cfg, dist)
        self.strategy.setup(self.model, self.optimizer, self.scheduler, self.combiner)
        # After the strategy (DeepSpeed casts the weights; SMART's copy must match them); draws
        # no random numbers, so 'none' leaves every default trial as it was.
        self.regularizer = build_regularizer(cfg, self.model, self.combiner)

    def resume(self) -> None:
        self.checkpoints.restore(self.inputs.prior, self.inputs.resumed)
        self.state.resumed_from.append(self.state.step)
        log.info("resumed %s at step %d (epoch %d)", self.cfg.out, self.state.step, self.state.epoch)

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------
    def fit(self, lease: Lease | None = None, stop: StopSignal | None = None) -> dict:
        """Train to the end, checkpointing as configured; returns the results, written to the
        run folder.  Between steps, a lost lease or a stop request ends it (``check_leave``)."""
        self.model.train()
        self.costs.start()
        while self.state.epoch < self.cfg.optim.epochs and not self.reached_max_steps() and not self.state.stopped_early:
            self.run_epoch(lease, stop)
            self.end_epoch()
        if self.bar:
            self.bar.close()
        return self.finish()

    def run_epoch(self, lease: Lease | None, stop: StopSignal | None) -> None:
        """The current epoch's remaining steps (all of them, unless it resumed part-way)."""
        plan = self.sampler.epoch(self.state.epoch)
        for planned in plan[self.state.step_in_epoch:]:
            saved = self.advance(planned)
            if self.reached_max_steps():
                break
            self.check_leave(lease, stop, saved)
        self.close_epoch(len(plan))

    def close_epoch(self, planned_steps: int) -> None:
        """The epoch is complete once all its planned steps ran (not when max_steps cut it)."""
        if self.state.step_in_epoch >= planned_steps:
            self.combiner.end_epoch()
            self.state.epoch += 1
            self.state.step_in_epoch = 0

    def advance(self, planned: Step) -> str | None:
        """One optimizer step and its bookkeeping; the checkpoint's folder when one was due."""
        self.seed_step()
        tick = time.perf_counter()
        probe = self.probes_conflict()
        try:
            stats, gram = self.step(planned, probe_conflict=probe)
        except TrialFailed:
            self.close_failed()
            raise
        return self.after_step(planned, stats, gram, tick, probe=probe and len(planned.micro[0]) > 1)

    def probes_conflict(self) -> bool:
        """Whether the next step measures gradient conflict (every --conflict-every steps).
        A frozen encoder has no task gradients to compare: no probe."""
        every = self.cfg.combiner.conflict_every
        return (bool(every) and self.strategy.whole_parameters and not self.cfg.model.freeze_encoder
                and (self.state.step + 1) % every == 0)

    def seed_step(self) -> None:
        """Dropout masks are a function of (seed, rank, step): resuming needs no RNG state."""
        self.step_seed = (self.cfg.seed * 1_000_003 + self.state.step) * 1009 + self.dist.rank
        torch.manual_seed(self.step_seed)

    def close_failed(self) -> None:
        self.sink.end_session(ok=False)
        self.sink.close()

    def after_step(self, planned: Step, stats: dict, gram, tick: float, probe: bool) -> str | None:
        """The step's costs, conflict, counters and scalars; the checkpoint when one is due.
        ``probe``: the step probed conflict (timed apart), as forward_backward decided."""
        state = self.state
        self.record_cost(tick, probed=probe)
        self.record_conflict(gram)
        self.record_step(planned, stats, tick)
        # Throughput counts the whole step loop but checkpoint writes (storage, not training).
        state.train_time_s += time.perf_counter() - tick
        if self.cfg.save_every_steps and state.step % self.cfg.save_every_steps == 0:
            return self.save_checkpoint()
        return None

    def check_leave(self, lease: Lease | None, stop: StopSignal | None, saved: str | None) -> None:
        """Leave between steps: another writer took the run folder over (``LeaseLost``), or a
        scheduler wants the resources back (a checkpoint of every finished step, then
        ``TrialStopped``)."""
        if lease:
            lease.check()      # another writer took the folder over: never write beside it
        if stop is not None and stop.requested(self.dist):
            folder = saved or self.save_checkpoint()
            if self.bar:
                self.bar.close()
            self.sink.close()
            log.warning("stopping %s at step %d on %s", self.cfg.out, self.state.step, stop.name)
            raise TrialStopped(self.state.step, stop.name, folder)

    def end_epoch(self) -> None:
        """Evaluate when due (and on the last epoch), then checkpoint with the evaluation."""
        state = self.state
        last = state.epoch >= self.cfg.optim.epochs or self.reached_max_steps()
        record = None
        if state.epoch % self.cfg.eval_every_epochs == 0 or last:
            record = self.evaluate()
            self.combiner.after_evaluation(record["metrics"])
            self.check_patience(record["score"], last)
        self.save_checkpoint(record)
        self.sink.flush()

    def check_patience(self, value: float, last: bool) -> None:
        """Early stopping: after --early-stop-patience evaluations in a row without a gain of more
        than --early-stop-delta on the selection metric, the trial ends here (its best weights
        are those kept so far); the results say why.  Every rank scores the same dev set, so
        every rank decides alike."""
        state, optim = self.state, self.cfg.optim
        if value > state.gain_score + optim.early_stop_delta:
            state.gain_score, state.evals_without_gain = value, 0
            return
        state.evals_without_gain += 1
        if optim.early_stop_patience and state.evals_without_gain >= optim.early_stop_patience and not last:
            state.stopped_early = {
                "reason": f"no gain above {state.gain_score:.4f} (+{optim.early_stop_delta:g}) in {self.cfg.select_metric} "
                          f"for {state.evals_without_gain} evaluation(s) (--early-stop-patience "
                          f"{optim.early_stop_patience})",
                "epoch": state.epoch, "step": state.step, "of_epochs": optim.epochs}
            log.info("early stop at epoch %d: %s", state.epoch, state.stopped_early["reason"])

    def reached_max_steps(self) -> bool:
        return bool(self.cfg.optim.max_steps) and self.state.step >= self.cfg.optim.max_steps

    # ----------------------------------------------------------------------------------------
    # One optimizer step
    # ----------------------------------------------------------------------------------------
    def step(self, planned: Step, probe_conflict: bool = False,
             computed: tuple | None = None) -> tuple[dict, object | None]:
        """Optimizer step ``state.step + 1``.  Returns the step's scalars, and the Gram matrix of
        the tasks' gradients of the shared parameters when it was computed (by the combiner, or
        the probe).  A non-finite loss or gradient norm raises TrialFailed before the weights
        take it (fp16's scaler skipping an overflowing step is allowed: ``stats["skipped"]``
        counts it).  ``computed``: forward_backward's result, when a fused group (mtl.fused)
        computed it and left this trial's gradients on its parameters."""
        number = self.state.step + 1
        task_loss, total, probed = computed or self.forward_backward(planned, probe_conflict)
        # The global losses (one small collective) and the step's one host sync: every rank
        # decides alike below, and the divergence guard needs the numbers.
        names, reg = list(task_loss), list(self.reg_sums)
        # The regularisers' terms (none by default) join the same collective and host sync.
        values = self.dist.all_reduce_mean(torch.stack([task_loss[t] for t in names] + [total] +
                                                       [self.reg_sums[t] for t in reg])).tolist()
        task_loss, total = dict(zip(names, values[:len(names)])), values[len(names)]
        reg_terms = dict(zip(reg, values[len(names) + 1:]))
        for t, value in task_loss.items():
            if not math.isfinite(value):
                raise TrialFailed(f"step {number}: the loss of task {t} is {value} (training diverged; a lower --lr "
                                  f"may help)", number)
        self.combiner.before_optimizer_step(self.strategy.loss_scale())
        grad_norm, stepped = self.strategy.step()
        if stepped:
            self.regularizer.after_optimizer_step()     # SMART's momentum copy follows the weights
        self.combiner.after_optimizer_step(lambda: self.step_losses(planned))
        if grad_norm is not None and not math.isfinite(grad_norm) and not self.strategy.skips_overflow:
            raise TrialFailed(f"step {number}: the gradient norm is {grad_norm} with finite losses "
                              f"({', '.join(f'{t} {v:.4g}' for t, v in task_loss.items())}; training diverged)", number)
        stats = {f"loss/{t}": v for t, v in task_loss.items()}
        stats["loss/combined"] = total
        stats.update({f"reg/{t}": v for t, v in reg_terms.items()})
        stats["skipped"] = 0.0 if stepped else 1.0
        if grad_norm is not None:
            stats["grad_norm"] = grad_norm
        return stats, self.combiner.task_gram() or probed

    def forward_backward(self, planned: Step, probe_conflict: bool) -> tuple[dict, torch.Tensor, object | None]:
        """The step's micro-batches through forward and the combiner's backward: each task's
        loss summed over them (on the device), the combined loss, and the probe's Gram matrix.
        The regularisers' terms join each task's loss before the combiner (mtl/regularize);
        their sums over the micro-batches are left in ``self.reg_sums`` for the step's log."""
        strategy, combiner, dist = self.strategy, self.combiner, self.dist
        # Losses stay on the device until the step's one host sync: a float() per micro-batch
        # would stall the host until the GPU caught up, every micro-batch.
        task_loss: dict[str, torch.Tensor] = {}
        total = None
        probed = None
        self.reg_sums: dict[str, torch.Tensor] = {}
        backward = self.costs.counted(strategy.backward)
        if combiner.uses_step_losses and len(planned.micro) > 1:
            combiner.see_step_losses(self.step_losses(planned))     # accumulation: an extra forward
        for i, micro in enumerate(planned.micro):
            last = i == len(planned.micro) - 1
            batches = self.batches(micro, i)
            with strategy.accumulating(last, combiner):
                with strategy.autocast():
                    outputs = strategy.forward(batches)
                losses = self.shares(outputs, batches, planned)
                if combiner.uses_step_losses and len(planned.micro) == 1:     # the step's losses: one small collective
                    combiner.see_step_losses(self.global_losses(losses))
                plain = losses       # the task losses as logged and as see_step_losses had them
                if self.regularizer.active:
                    losses = self.regularized(losses, outputs, batches, planned, micro)
                combiner.observe(outputs, batches)
                if probe_conflict and i == 0 and len(losses) > 1:
                    probed = probe_gram(losses, self.model.shared_parameters(), dist)
                combined = combiner.backward(losses, backward, share=1.0 / len(planned.micro)).float()
                total = combined if total is None else total + combined
            for t, loss in plain.items():
                task_loss[t] = task_loss[t] + loss.detach().float() if t in task_loss else loss.detach().float()
        return task_loss, total, probed

    def regularized(self, losses: dict, outputs: dict, batches: dict, planned: Step, micro: dict) -> dict:
        """Each task's loss plus its regularisers' terms (their extra forwards in the strategy's
        autocast); the terms' values, detached, summed into ``self.reg_sums``."""
        view = MicroBatch(batches, outputs, micro, planned.global_count, self.dist.world_size,
                          1.0 / len(planned.micro), self.state.step + 1)
        with self.strategy.autocast():
            terms = self.regularizer.terms(view)
        for t, term in terms.items():
            value = term.detach().float()
            self.reg_sums[t] = self.reg_sums[t] + value if t in self.reg_sums else value
        return {t: loss + terms[t] if t in terms else loss for t, loss in losses.items()}

    def batches(self, micro: dict, index: int = 0) -> dict:
        """One micro-batch of every task in it, padded and on the device.  An mlm task's masks
        are seeded by the step's seed (which has the rank in it) and the micro-batch: like
        dropout, drawn afresh each step, and the same again when a step is replayed or resumed."""
        return {t: make_batch(self.train_sets[t], idx, self.cfg.pad_multiple,
                              mask_seed=(self.step_seed * 31 + index) % 2 ** 63).to(self.dist.device)
                for t, idx in micro.items()}

    def shares(self, outputs: dict, batches: dict, planned: Step) -> dict[str, torch.Tensor]:
        """Each task's loss as this worker's share of the step's global mean: summed here and
        averaged across workers by DDP, so uneven final batches and any accumulation give the
        exact global mean."""
        return {t: self.losses[t](outputs[t], batches[t].labels).sum() * (self.dist.world_size / planned.global_count[t])
                for t in batches}

    def global_losses(self, shares: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step's global per-task losses from every worker's summed shares (one collective)."""
        names = list(shares)
        values = self.dist.all_reduce_mean(torch.stack([shares[t].detach().float() for t in names]))
        return dict(zip(names, values))

    def step_losses(self, planned: Step) -> dict[str, torch.Tensor]:
        """The step's global per-task losses from a forward without gradients over its
        micro-batches (an extra forward), with the step's own dropout masks (its seed replayed
        and torch's generators put back after), so they are the losses the step trains on."""
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        sums: dict[str, torch.Tensor] = {}
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(self.step_seed)
            for i, micro in enumerate(planned.micro):
                batches = self.batches(micro, i)
                with self.strategy.autocast():
                    outputs = self.strategy.forward(batches)
                for t, loss in self.shares(outputs, batches, planned).items():
                    sums[t] = sums[t] + loss.float() if t in sums else loss.float()
        return self.global_losses(sums)

    def record_cost(self, tick: float, probed: bool) -> None:
        """The step's wall time and backward passes.  The step's own host syncs (the losses, the
        gradient norm) make its wall time the device's time too, without a sync of its own; the
        optimizer's kernels, launched after the last one, finish inside the next step's time, so
        the mean over steps counts them all but the last step's.  A step that probed gradient
        conflict is timed apart: the probe's T extra gradients are the monitoring's cost (every
        --conflict-every steps, whatever the method), not the method's."""
        state = self.state
        if probed:
            state.probed_time_sum_s += time.perf_counter() - tick
            state.probed_steps += 1
        else:
            state.step_time_sum_s += time.perf_counter() - tick
            state.timed_steps += 1
        state.backwards += self.costs.take_backwards()
        state.counted_steps += 1

    def record_conflict(self, gram) -> None:
        """Gradient conflict of a step whose task gradients were measured: counted for the
        results, logged to TensorBoard."""
        if gram is None or len(gram[0]) <= 1 or not self.cfg.combiner.conflict_every:
            return
        state = self.state
        conflict, conflicted = conflict_stats(*gram)
        state.measured_steps += 1
        state.conflict_steps += conflicted
        for name, value in conflict.items():
            if name.startswith("grad_cos/"):
                pair = name.removeprefix("grad_cos/")
                state.cos_sums[pair] = state.cos_sums.get(pair, 0.0) + value
        conflict["grad_conflict/fraction"] = state.conflict_steps / state.measured_steps
        self.sink.scalars(state.step + 1, conflict)

    def record_step(self, planned: Step, stats: dict, tick: float) -> None:
        """Count the step done; the progress bar, and the step's scalars every log_every_steps."""
        state = self.state
        state.examples += sum(planned.global_count.values())
        for t, n in planned.global_count.items():
            state.examples_by_task[t] = state.examples_by_task.get(t, 0) + n
        state.skipped_steps += int(stats["skipped"])
        state.step += 1
        state.step_in_epoch += 1
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{stats['loss/combined']:.3f}", epoch=state.epoch + 1)
        if state.step % self.cfg.log_every_steps != 0:
            return
        speed = state.examples / max(state.train_time_s + time.perf_counter() - tick, 1e-9)
        self.sink.scalars(state.step, {**stats, "lr": self.scheduler.get_last_lr()[0],
                                       **{f"weight/{t}": w for t, w in self.combiner.task_weights().items()},
                                       **self.combiner.extra_scalars(), "examples_per_s": speed})
        if not self.bar and self.dist.is_main:
            log.info("step %d/%d epoch %d loss %.4f %.1f examples/s", state.step, self.total_steps,
                     state.epoch + 1, stats["loss/combined"], speed)

    # ----------------------------------------------------------------------------------------
    # Evaluation, checkpoints, results
    # ----------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Dev scores of the current weights, recorded in the history; the best so far are kept."""
        cfg, state = self.cfg, self.state
        # Every rank scores the whole (small) dev set: identical metrics everywhere without a gather,
        # which the KPI-driven combiners (DTP on dev) and best-weights choice rely on.
        predictions = predict(self.model, self.dev_sets, cfg.optim.batch_size * 4, self.strategy.autocast,
                              self.dist.device, cfg.pad_multiple)
        metrics = score(predictions, self.dev_sets, mean_of=cfg.data.tasks)
        value = metrics[cfg.select_metric]
        record = {"epoch": state.epoch, "step": state.step, "metrics": metrics, "score": value}
        state.history.append(record)
        self.sink.scalars(state.step, {f"dev/{k}": v for k, v in metrics.items()})
        if value > state.best_score:
            self.keep_best(record, predictions)
        log.info("epoch %d step %d dev %s", state.epoch, state.step,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return {**record, "best_score": state.best_score}

    def keep_best(self, record: dict, predictions: dict) -> None:
        """The evaluation's weights are the best so far: best/ holds them (mtl.export)."""
        state, metrics, raw_dev = self.state, record["metrics"], self.inputs.raw_dev
        state.best_score = record["score"]
        state.best = record
        weights = self.strategy.full_state_dict()
        if self.dist.is_main:
            export.save_best(self.cfg.out, self.model, weights, self.inputs.tokenizer,
                             {"metrics": metrics, "epoch": state.epoch, "step": state.step,
                              "config": self.cfg.to_dict()},
                             {t: {"ids": raw_dev[t].ids, "pred": p.tolist(), "gold": raw_dev[t].labels}
                              for t, p in predictions.items()})
        self.sink.scalars(state.step, {f"hparam/{k}": v for k, v in metrics.items()})   # best so far, for HParams

    def save_checkpoint(self, evaluation: dict | None = None) -> str:
        """A checkpoint of every finished step; ``on_checkpoint`` hears of it on every rank."""
        state = self.state
        state.wall_time_s = self.wall_before + time.perf_counter() - self.inputs.started
        state.peak_memory_mb = max(state.peak_memory_mb, self.costs.peak_memory()[0])
        folder = self.checkpoints.save(state.step)
        if self.on_checkpoint:
            self.on_checkpoint({"checkpoint": folder, "step": state.step, "epoch": state.epoch,
                                "evaluation": evaluation})
        return folder

    def finish(self) -> dict:
        """The results, written last (they mark the trial done); the checkpoints go unless kept."""
        self.state.wall_time_s = self.wall_before + time.perf_counter() - self.inputs.started
        results = self.results()
        if self.dist.is_main:
            self.sink.end_session(ok=True)
            storage.write_text(trial_results.url(self.cfg.out), json.dumps(results, indent=2))
            if not self.cfg.keep_final_state:
                # Done: the best weights, results and logs stay; optimizer state is dead weight.
                self.checkpoints.remove_all()
        self.sink.close()
        return results

    def results(self) -> dict:
        cfg, state, raw_train, raw_dev = self.cfg, self.state, self.inputs.raw_train, self.inputs.raw_dev
        return {
            "status": "done", "config": cfg.to_dict(), "tasks": list(cfg.data.tasks), "steps": state.step,
            "epochs": state.history, "skipped_steps": state.skipped_steps, "examples": state.examples_by_task,
            "best": state.best, "started_at": self.inputs.started_at, "finished_at": time.time(),
            "resumed_from_steps": state.resumed_from, "wall_time_s": state.wall_time_s,
            "train_time_s": state.train_time_s, "examples_per_s": state.examples / max(state.train_time_s, 1e-9),
            "world_size": self.dist.world_size,
            "skipped_rows": {t: raw_train[t].skipped + raw_dev[t].skipped for t in raw_train},
            "train_rows": {t: len(raw_train[t]) for t in raw_train},
            "examples_per_epoch": self.examples_per_epoch, "data": self.inputs.data,
            "grad_conflict_fraction": state.conflict_steps / state.measured_steps if state.measured_steps else None,
            "grad_cos_mean": {pair: total / state.measured_steps for pair, total in state.cos_sums.items()},
            "weights_digest": weights_digest(self.strategy.full_state_dict()),
            "best_by_task": best_by_task(state.history, cfg.data.tasks + cfg.data.eval_tasks),
            **({"stopped_early": state.stopped_early} if state.stopped_early else {}),
            **self.cost_results(),
            **({"stages": stages_history(cfg)} if cfg.upstream is not None else {}),
            **self.placed,
        }

    def cost_results(self) -> dict:
        """What the trial's steps cost (mtl.cost), as rank 0 measured them: the mean step time,
        the peak memory (its kind says which peak), the backward passes per step, counted, and
        the cost class the method declares.  The step time leaves out the steps that probed
        gradient conflict, unless every step did (--conflict-every 1)."""
        state = self.state
        memory, kind = self.costs.peak_memory()
        cost = cost_class(self.combiner)
        step_time = (state.step_time_sum_s / state.timed_steps if state.timed_steps else
                     state.probed_time_sum_s / state.probed_steps if state.probed_steps else None)
        return {"step_time_s": step_time,
                "peak_memory_mb": max(memory, state.peak_memory_mb), "peak_memory_kind": kind,
                "backwards_per_step": state.backwards / state.counted_steps if state.counted_steps else None,
                "cost_class": cost, "cost_note": NOTES.get(cost)}


def weights_digest(weights: dict) -> str:
    """A hash of the weights' bytes: replicas on every rank must agree on it."""
    h = hashlib.sha256()
    for name, tensor in weights.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def best_by_task(history: list[dict], tasks) -> dict:
    """Per task, the evaluation with its best primary score (the report's per-task view: each
    task's best epoch, where the trial's best weights are chosen once for all tasks)."""
    out = {}
    for task in tasks:
        key = f"{task}/{TASKS[task].primary_metric}"
        scored = [r for r in history if key in r["metrics"]]
        if scored:
            best = max(scored, key=lambda r: r["metrics"][key])
            out[task] = {"epoch": best["epoch"], "step": best["step"], "metric": key, "value": best["metrics"][key]}
    return out
