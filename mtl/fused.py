"""Fused trials: K trials that see the same batches, trained in one process as one stacked model.

    train_group([cfg_a, cfg_b, cfg_c])     # each trial's own results, as train(cfg) would give them

Of the reference grid's 36 trials per seed, 27 are alpha-scalarisation trials; with addition,
uncertainty weighting and DTP, 12 trials of each pair read exactly the same batches in the
same order (same model, tasks, data, seed, sampler).  On a GPU one such trial leaves the chip
idle between kernel launches; fused, one batch is read and moved once and one forward and one
backward run for all K models (``torch.func.functional_call`` under ``vmap`` over the stacked
parameters), as HFTA (Wang et al., MLSys 2021) fuses a sweep's repeated models.

Fusion is placement, never identity.  Every member stays a whole ``Trainer`` of its own trial:
its name, run folder, lease, checkpoints, combiner, optimizer and schedule (so learning rates,
weight decay and the loss weights may differ), dev evaluation, best weights, TensorBoard run
and results.  The stacked tensors *are* the members' weights: each member's parameters are
views into them (``rebind``), so the members' own optimizers step the stack in place, their
checkpoints and best weights are the trial's alone, and a group resumed unfused (or a trial
resumed in a group) continues the same trial from its own checkpoint.

Exactness: a member computes what its trial alone computes, to fp32 rounding (the batched
matmuls sum in another order).  Dropout is drawn once for the whole group (``vmap``'s
randomness 'same'): the members share the seed and the step, so alone each would draw exactly
these masks.  A member's combiner sees its own losses and records its combined loss instead of
back-propagating it; the group back-propagates the sum once (the members' parameters are
disjoint, so each gets its own gradient), then hands each member views of its rows.

Which trials may fuse (``fusion_key``): equal identities once the settings that change neither
shapes nor batches are left out (the combiner and its weights, learning rate, weight decay,
Adam's eps, schedule, warm-up, clipping, optimizer, early stopping, the selection metric).  Not
fused (``why_not``): methods on task gradients or on the step's losses (their T backwards or
extra forwards are per member), regularisers, DeepSpeed, several workers, fp16, --compile,
stages, mlm tasks.

Costs: the stack holds K copies of the weights (as K trials would), plus one stacked gradient;
a member's checkpoint and best weights copy its slice out of the stack (``clone``) so a file
holds that member's weights, not the stack's storage.  A member that fails (non-finite loss)
or stops early stays in the stack, its rows computed and thrown away, until the group ends.
On a CPU fusion is slower than running the trials one after another (a 4-model vmap of
MiniLM took 2.4x four sequential passes): it is opt-in (``--fuse``)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from typing import Callable

import torch
from torch.func import functional_call, vmap

from mtl import storage
from mtl.checkpoint import CheckpointManager
from mtl.checks import check_run, check_workers
from mtl.combine import COMBINERS
from mtl.config import RunConfig, flatten
from mtl.conflict import flat_gradient, gram_of_rows
from mtl.data import Step
from mtl.dist import DistContext
from mtl.errors import ConfigError, TrialFailed
from mtl.stop import StopSignal, TrialStopped
from mtl.tasks import TASKS
from mtl.train import finished_results, prepare, record_failed, take_run_folder
from mtl.trainer import Trainer

log = logging.getLogger("mtl.train")

# Settings members of one group may differ in: none of them changes a shape, a batch or the
# dropout masks.  Everything else of the identity must be equal.
FREE_SETTINGS = {
    "combiner": None,          # the whole section: method, alpha, weights, its own lr, ...
    "optim": ("lr", "weight_decay", "eps", "warmup_ratio", "schedule", "grad_clip", "optimizer", "momentum",
              "early_stop_patience", "early_stop_delta"),
    "": ("select_metric",),
}


def why_not(cfg: RunConfig) -> str | None:
    """Why this trial cannot train in a fused group (None: it can)."""
    method = COMBINERS.get(cfg.combiner.combiner)
    if method is not None and not method.fuses():
        return f"--combiner {cfg.combiner.combiner} ({method.cost}: its backward passes are its own)"
    reasons = [
        (cfg.regularize.regularizer != "none", f"--regularizer {cfg.regularize.regularizer} (extra forwards)"),
        (cfg.parallel.strategy != "ddp", f"--strategy {cfg.parallel.strategy}"),
        (cfg.parallel.workers > 1, f"--workers {cfg.parallel.workers}"),
        (cfg.precision == "fp16", "--precision fp16 (a loss scale per trial)"),
        (cfg.compile, "--compile"),
        (cfg.upstream is not None, "a stage of a chain"),
        (any(TASKS[t].mlm for t in cfg.data.tasks + cfg.data.eval_tasks if t in TASKS), "an mlm task"),
    ]
    return next((why for bad, why in reasons if bad), None)


def fusion_key(cfg: RunConfig) -> str | None:
    """Trials with equal keys may train as one fused group; None for a trial that cannot fuse."""
    if why_not(cfg) is not None:
        return None
    return hashlib.sha256(json.dumps(shared_identity(cfg), sort_keys=True).encode()).hexdigest()[:12]


def shared_identity(cfg: RunConfig) -> dict:
    """The trial's identity without the settings members of a group may differ in (flattened)."""
    return {k: v for k, v in flatten(cfg.identity()).items() if not _free(k)}


def _free(flat_key: str) -> bool:
    section, _, name = flat_key.partition(".")
    if not name:                         # a top-level setting
        return flat_key in FREE_SETTINGS[""]
    names = FREE_SETTINGS.get(section, ())
    return names is None or name in names


# --------------------------------------------------------------------------------------------
# A group's lifecycle: each member's own (mtl.train), then one fused loop
# --------------------------------------------------------------------------------------------
def train_group(cfgs: list[RunConfig], dist: DistContext | None = None, stop: StopSignal | None = None,
                lease_wait_s: float = 0.0, on_checkpoint: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Trains the trials ``cfgs`` as one fused group and returns each one's results, in order,
    as ``mtl.train.train`` would: a member already done returns its results, a member that
    diverges is recorded failed (its failed results returned) while the others go on.  When
    ``stop`` is raised every member checkpoints and ``TrialStopped`` follows; running the
    group again (or any member alone) resumes each from its own checkpoint.
    ``on_checkpoint(i, info)``: member i published a checkpoint (as train's on_checkpoint)."""
    combiners = [check_run(cfg) for cfg in cfgs]
    check_group(cfgs)
    dist = dist or DistContext.from_env(cfgs[0].device)
    if dist.world_size > 1:
        raise ConfigError(f"fuse: a fused group runs in one process, not {dist.world_size} workers")
    for cfg in cfgs:
        check_workers(cfg, dist)
    results: list[dict | None] = [finished_results(cfg) for cfg in cfgs]
    todo = [i for i, r in enumerate(results) if r is None]
    inputs = {i: prepare(cfgs[i], combiners[i]) for i in todo}    # every member checked before any write
    with contextlib.ExitStack() as held:
        members: dict[int, tuple[Trainer, object]] = {}
        for i in todo:
            lease = held.enter_context(take_run_folder(cfgs[i].out, dist, lease_wait_s))
            checkpoints = CheckpointManager(cfgs[i].out, dist, cfgs[i].keep_checkpoints, cfgs[i].to_dict(),
                                            inputs[i].data)
            checkpoints.clean()
            told = (lambda info, i=i: on_checkpoint(i, info)) if on_checkpoint else None
            members[i] = Trainer(cfgs[i], dist, inputs[i], checkpoints, told), lease
        # Members resumed at different steps (one finished alone, another killed later) cannot
        # share batches: each progress point trains as a group of its own, one after another.
        by_progress: dict[tuple, list[int]] = {}
        for i, (trainer, _) in members.items():
            by_progress.setdefault((trainer.state.epoch, trainer.state.step_in_epoch, trainer.state.step), []).append(i)
        for part in by_progress.values():
            names = [storage.basename(cfgs[i].out) for i in part]
            group = FusedGroup([members[i][0] for i in part], [members[i][1] for i in part], dist)
            log.info("fused group of %d: %s", len(part), ", ".join(names))
            for i, res in zip(part, group.fit(stop)):
                results[i] = res
    return results


def check_group(cfgs: list[RunConfig]) -> None:
    """The group's trials may fuse: each can, all with one key, none twice."""
    if not cfgs:
        raise ConfigError("fuse: a group needs at least one trial")
    for cfg in cfgs:
        why = why_not(cfg)
        if why:
            raise ConfigError(f"fuse: {cfg.out} cannot train in a fused group: {why}")
    first = cfgs[0]
    for cfg in cfgs[1:]:
        if fusion_key(cfg) != fusion_key(first):
            theirs, ours = shared_identity(cfg), shared_identity(first)
            diff = "; ".join(f"{k} {ours.get(k)!r} -> {theirs.get(k)!r}" for k in sorted(ours.keys() | theirs.keys())
                             if ours.get(k) != theirs.get(k))
            raise ConfigError(f"fuse: {cfg.out} does not see the batches of {first.out} ({diff})")
    outs = [cfg.out for cfg in cfgs]
    twice = sorted({o for o in outs if outs.count(o) > 1})
    if twice:
        raise ConfigError(f"fuse: {twice[0]} is in the group twice")


class FusedGroup:
    """K built Trainers (same progress, same batches) trained in lockstep on one stack of their
    weights.  The loop is each Trainer's own (Trainer.fit/run_epoch) with the step's forward and
    backward done once for all; every other part (the step's guard and optimizer, evaluation,
    checkpoints, results) is the member's."""

    def __init__(self, members: list[Trainer], leases: list, dist: DistContext):
        self.members, self.leases, self.dist = members, leases, dist
        self.base = members[0].model        # its forward, with each member's weights swapped in
        self.stack = rebind([m.model for m in members])
        for m in members:
            m.strategy.weights_are_views = True
            m.placed = {"fused_with": [storage.basename(o.cfg.out) for o in members if o is not m]}
        shared = {id(p) for p in self.base.shared_parameters()}
        self.shared_names = [n for n, p in self.base.named_parameters() if id(p) in shared]
        self.params = [dict(m.model.named_parameters()) for m in members]
        self.failed: dict[int, dict] = {}
        self.results: dict[int, dict] = {}

    def live(self) -> list[int]:
        """Members still training: not failed, not finished (early stopping)."""
        return [k for k in range(len(self.members)) if k not in self.failed and k not in self.results]

    def fit(self, stop: StopSignal | None) -> list[dict]:
        for m in self.members:
            m.model.train()
            m.costs.start()
        while self.live():
            head = self.members[self.live()[0]]      # every live member stands where it stands
            if head.state.epoch >= head.cfg.optim.epochs or head.reached_max_steps():
                break
            plan = head.sampler.epoch(head.state.epoch)
            for planned in plan[head.state.step_in_epoch:]:
                saved = self.advance(planned)
                if not self.live() or head.reached_max_steps():
                    break
                self.check_leave(stop, saved)
            for k in self.live():
                m = self.members[k]
                m.close_epoch(len(plan))
                m.end_epoch()
                if m.state.stopped_early:
                    self.results[k] = self.finish(k)
        for k in self.live():
            self.results[k] = self.finish(k)
        return [self.failed.get(k) or self.results[k] for k in range(len(self.members))]

    def finish(self, k: int) -> dict:
        m = self.members[k]
        if m.bar:
            m.bar.close()
        return m.finish()

    def check_leave(self, stop: StopSignal | None, saved: dict[int, str | None]) -> None:
        """As Trainer.check_leave, for every live member: each checkpoints before the group stops."""
        stopped = None
        for k in self.live():
            try:
                self.members[k].check_leave(self.leases[k], stop, saved.get(k))
            except TrialStopped as exc:
                stopped = stopped or exc
        if stopped is not None:
            raise stopped

    def advance(self, planned: Step) -> dict[int, str | None]:
        """One optimizer step of every live member; the checkpoints written, by member."""
        live = self.live()
        for k in live:
            self.members[k].seed_step()     # the same seed for all (same seed, step and rank)
        tick = time.perf_counter()
        probing = [k for k in live if self.members[k].probes_conflict()]
        computed = self.forward_backward(planned, live, probing)
        saved = {}
        for k in live:
            m = self.members[k]
            try:
                stats, gram = m.step(planned, computed=computed[k])
            except TrialFailed as exc:
                m.close_failed()
                log.warning("%s failed in its fused group (the others go on): %s", m.cfg.out, exc)
                self.failed[k] = record_failed(m.cfg, self.dist, exc)
                continue
            saved[k] = m.after_step(planned, stats, gram, tick, probe=k in probing and len(planned.micro[0]) > 1)
        for tensor in self.stack.values():
            tensor.grad = None
        return saved

    def forward(self, batches: dict) -> dict[str, torch.Tensor]:
        """Every member's outputs, stacked (K x ...), from one vmapped forward.  Dropout: one
        mask for all (randomness 'same'), the mask each member alone would draw."""
        def one(params):
            return functional_call(self.base, params, (batches,))
        try:
            return vmap(one, randomness="same")(self.stack)
        finally:
            self.base.last_pooled.clear()      # batched tensors of the vmap: no use outside it

    def forward_backward(self, planned: Step, live: list[int], probing: list[int]) -> dict[int, tuple]:
        """As Trainer.forward_backward for every live member: the batches read and moved once,
        one forward; each member's combiner combines its own losses and the group back-propagates
        the sum of the combined losses once per micro-batch.  Then each member's parameters get
        views of their rows of the stacked gradients."""
        head = self.members[live[0]]
        task_loss = {k: {} for k in live}
        total: dict[int, torch.Tensor] = {}
        probed: dict[int, object] = {}
        for i, micro in enumerate(planned.micro):
            batches = head.batches(micro, i)
            with head.strategy.autocast():
                outputs = self.forward(batches)
            own = {k: {t: o[k] for t, o in outputs.items()} for k in live}
            losses = {k: self.members[k].shares(own[k], batches, planned) for k in live}
            for k in live:
                self.members[k].combiner.observe(own[k], batches)
            if probing and i == 0 and len(batches) > 1:
                probed.update(self.probe_grams(losses, probing))
            recorded: list[torch.Tensor] = []
            for k in live:
                combined = self.members[k].combiner.backward(losses[k], recorded.append,
                                                             share=1.0 / len(planned.micro)).float()
                total[k] = combined if k not in total else total[k] + combined
                for t, loss in losses[k].items():
                    value = loss.detach().float()
                    task_loss[k][t] = task_loss[k][t] + value if t in task_loss[k] else value
            torch.autograd.backward(sum(recorded))     # the members' parameters are disjoint rows
        for k in live:
            for name, p in self.params[k].items():
                grad = self.stack[name].grad
                p.grad = None if grad is None else grad[k]      # a view: no copy
        return {k: (task_loss[k], total[k], probed.get(k)) for k in live}

    def probe_grams(self, losses: dict[int, dict], probing: list[int]) -> dict[int, tuple]:
        """mtl.conflict.probe_gram for every probing member at once: one extra backward per task
        for the whole group (each member's task gradient is its row of the stacked gradient)."""
        tasks = list(losses[probing[0]])
        shared = [self.stack[n] for n in self.shared_names]
        rows = {k: [] for k in probing}
        for t in tasks:
            grads = torch.autograd.grad(sum(losses[k][t] for k in probing), shared, retain_graph=True,
                                        allow_unused=True)
            for k in probing:
                rows[k].append(flat_gradient([None if g is None else g[k] for g in grads], [s[k] for s in shared]))
        return {k: (tasks, gram_of_rows(torch.stack(rows[k]))) for k in probing}


def rebind(models: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The models' parameters stacked (name -> K x shape, requiring grad as the parameter does),
    and each model's parameters made views of its row: the stack is their storage from now on,
    so an optimizer stepping a model's parameters steps the stack in place (and the memory the
    models held before is freed: K copies of the weights stay, not 2K)."""
    stack = {}
    for name, first in models[0].named_parameters():
        own = [m.get_parameter(name) for m in models]
        tensor = torch.stack([p.detach() for p in own]).requires_grad_(first.requires_grad)
        for k, p in enumerate(own):
            p.data = tensor.detach()[k]
        stack[name] = tensor
    return stack
