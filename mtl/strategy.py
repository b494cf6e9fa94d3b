"""How one worker computes, synchronises and applies gradients: plain PyTorch (DDP when there
are peers) or a DeepSpeed engine.  The training loop calls the same few methods on either:

    with strategy.accumulating(last, combiner):      # no gradient sync before the last micro-batch
        with strategy.autocast():
            outputs = strategy.forward(batches)
        combiner.backward(losses, strategy.backward)  # backward applies the fp16 loss scale
    combiner.before_optimizer_step(strategy.loss_scale())
    strategy.step()                                  # unscale, clip, step, zero, schedule

Checkpoints: ``state_dict()`` is what rank 0 saves for the strategy; ``save_shards`` /
``load_shards`` move any per-rank state (DeepSpeed's partitioned optimizer) through fsspec.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from mtl import storage
from mtl.config import RunConfig
from mtl.dist import DistContext
from mtl.rendezvous import free_port
from mtl.errors import CheckpointError


log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, dtype: torch.dtype | None):
    """Mixed precision's autocast for one forward, or nothing for fp32."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


class TorchStrategy:
    """Plain PyTorch: autocast and a gradient scaler for mixed precision, DDP across workers."""

    def __init__(self, cfg: RunConfig, dist: DistContext):
        self.cfg, self.dist = cfg, dist
        self.dtype = AUTOCAST_DTYPES[cfg.precision]
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.precision == "fp16")
        # In a fused group (mtl.fused) the weights are views into the group's stacked tensors.
        self.weights_are_views = False

    def setup(self, model, optimizer, scheduler, combiner: torch.nn.Module | None = None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.module = model
        if self.dist.distributed:
            # One-task-per-step sampling leaves the other heads unused in a step.
            self.module = DistributedDataParallel(
                model, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
                find_unused_parameters=self.cfg.data.one_task_per_step)

    def forward(self, batches):
        return self.module(batches)

    def autocast(self):
        return autocast(self.dist.device.type, self.dtype)

    def accumulating(self, last: bool, combiner):
        if self.module is self.model or (last and not combiner.syncs_gradients_itself):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def loss_scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    @property
    def skips_overflow(self) -> bool:
        """Whether a step with non-finite gradients is skipped by design (fp16's loss scaling)."""
        return self.scaler.is_enabled()

    def step(self) -> tuple[float | None, bool]:
        """Unscale, measure, clip and apply the gradients: (their global norm, whether the step
        was taken).  Non-finite gradients never reach the weights: fp16's scaler skips such a
        step (and lowers its scale); in fp32/bf16 the step is not taken and the trainer stops."""
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        grad_norm = float(norm)        # a host sync: the guard needs the number
        if not math.isfinite(grad_norm) and not self.skips_overflow:
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm, False
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.cfg.optim.grad_clip, norm)
        return grad_norm, self.apply_step()

    def apply_step(self) -> bool:
        """The optimizer and lr steps on gradients already unscaled and checked; whether the step
        was taken."""
        scale_before = self.loss_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # An fp16 step whose gradients overflowed was skipped (the scale dropped): so is its lr step.
        stepped = self.loss_scale() >= scale_before
        if stepped:
            self.scheduler.step()
        return stepped

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    # Every worker holds the whole weights (ZeRO stage 3 does not): gradient probes may read them.
    whole_parameters = True

    def full_state_dict(self) -> dict:
        """The whole model's weights; a collective call (every rank) where weights are partitioned.
        Views into a fused group's stack are copied out (a copy of the weights per call): saved
        as they are, torch.save would write the whole stack's storage, K trials' weights."""
        weights = self.model.state_dict()
        return {k: v.clone() for k, v in weights.items()} if self.weights_are_views else weights

    def load_weights(self, weights: dict) -> None:
        """Load whole weights into the (possibly partitioned) model; called on every rank."""
        self.model.load_state_dict(weights)

    def save_shards(self, url: str) -> None:
        """Per-rank state that rank 0 cannot save: none for plain PyTorch."""

    def load_shards(self, url: str) -> None:
        pass


class DeepSpeedStrategy(TorchStrategy):
    """A DeepSpeed engine (ZeRO stage 0-3, optional optimizer offload to CPU) built from the run
    configuration.  Gradient accumulation is left to the loop (DeepSpeed's unmanaged mode:
    backward only accumulates, step() is the boundary), so every combiner sees the same
    micro-batch structure as under DDP."""

    def __init__(self, cfg: RunConfig, dist: DistContext):
        super().__init__(cfg, dist)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=False)
        self.dtype = None   # DeepSpeed casts the model itself for bf16/fp16

    @property
    def whole_parameters(self) -> bool:
        return self.cfg.parallel.zero_stage < 3

    def full_state_dict(self) -> dict:
        if self.whole_parameters:
            return self.model.state_dict()
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_weights(self, weights: dict) -> None:
        if self.whole_parameters:
            return self.model.load_state_dict(weights)
        import deepspeed

        # Rank 0 writes into the gathered weights; DeepSpeed re-partitions them to every rank.
        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0):
            if self.dist.is_main:
                self.model.load_state_dict(weights)

    def ds_config(self) -> dict:
        c, o = self.cfg, self.cfg.optim
        zero = {"stage": c.parallel.zero_stage}
        if c.parallel.zero_stage == 3:
            # Tensors this small stay whole on every rank: the learnable loss weights (read
            # outside any forward), biases and LayerNorms.  DeepSpeed's default, made explicit.
            zero["stage3_param_persistence_threshold"] = 100_000
        if c.parallel.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        conf = {
            "train_micro_batch_size_per_gpu": o.batch_size,
            "gradient_accumulation_steps": o.grad_accum,
            "managed_gradient_accumulation": False,
            "zero_optimization": zero,
            "bf16": {"enabled": c.precision == "bf16"},
            "fp16": {"enabled": c.precision == "fp16", "initial_scale_power": 16},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2 ** 31 - 1,
            # Always explicit: left out, DeepSpeed clips the global norm to 1.0.
            "gradient_clipping": o.grad_clip,
        }
        return conf

    def setup(self, model, optimizer, scheduler, combiner: torch.nn.Module | None = None) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.dist.device.type == "cuda" else "cpu")
        import deepspeed

        for name, value in (("RANK", self.dist.rank), ("LOCAL_RANK", self.dist.local_rank),
                            ("WORLD_SIZE", self.dist.world_size)):
            os.environ.setdefault(name, str(value))    # DeepSpeed reads these, whatever launched us
        if not tdist.is_initialized():
            # A world of one still needs a process group; DeepSpeed would look for MPI otherwise.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            tdist.init_process_group("nccl" if self.dist.device.type == "cuda" else "gloo", rank=0, world_size=1)
        self.model, self.scheduler = model, scheduler
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=_ModelAndWeights(model, combiner), optimizer=optimizer, lr_scheduler=scheduler,
            config=self.ds_config())
        self.module = self.engine

    def accumulating(self, last: bool, combiner):
        return contextlib.nullcontext()   # unmanaged accumulation: backward never reduces

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def loss_scale(self) -> float:
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        return float(getattr(self.engine.optimizer, "cur_scale", None) or getattr(scaler, "cur_scale", 1.0) or 1.0)

    @property
    def skips_overflow(self) -> bool:
        return self.cfg.precision == "fp16"

    def step(self) -> tuple[float | None, bool]:
        skipped_before = self.engine.skipped_steps
        self.engine.step()      # reduce, unscale, clip, step, zero, schedule (skipped on overflow)
        norm = self.engine.get_global_grad_norm()
        return (float(norm) if norm is not None else None), self.engine.skipped_steps == skipped_before

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    def save_shards(self, url: str) -> None:
        """Every rank writes DeepSpeed's checkpoint (weights and its optimizer partition) to a
        local folder, then copies its own files to ``url``."""
        local = tempfile.mkdtemp(prefix="mtl-ds-")
        try:
            self.engine.save_checkpoint(local, tag="ds", save_latest=False)
            # Each rank's folder holds only what that rank wrote: its optimizer partition (and,
            # on rank 0, the weights).
            storage.upload_files(os.path.join(local, "ds"), url)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def load_shards(self, url: str) -> None:
        local = tempfile.mkdtemp(prefix="mtl-ds-")
        try:
            storage.download_files(url, os.path.join(local, "ds"))
            path, _ = self.engine.load_checkpoint(local, tag="ds", load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"{url}: DeepSpeed could not load this checkpoint")
        finally:
            shutil.rmtree(local, ignore_errors=True)


class _ModelAndWeights(torch.nn.Module):
    """What DeepSpeed manages: ZeRO must own every optimised parameter, and learnable loss
    weights live in the combiner, not the model.  Forward is the model's."""

    def __init__(self, model: torch.nn.Module, combiner: torch.nn.Module | None):
        super().__init__()
        self.model = model
        self.combiner = combiner if combiner is not None and any(True for _ in combiner.parameters()) else None

    def forward(self, batches):
        return self.model(batches)


class WholeWeights:
    """The model's whole weights as a checkpoint part, through its strategy: gathered to save
    (on every rank: a collective under ZeRO 3), loaded into the possibly partitioned model."""

    def __init__(self, strategy: TorchStrategy):
        self.strategy = strategy

    def state_dict(self) -> dict:
        return self.strategy.full_state_dict()

    def load_state_dict(self, weights: dict) -> None:
        self.strategy.load_weights(weights)


STRATEGIES = {"ddp": TorchStrategy, "deepspeed": DeepSpeedStrategy}


def build_strategy(cfg: RunConfig, dist: DistContext) -> TorchStrategy:
    warn_if_emulated(cfg.precision, dist.device)
    return STRATEGIES[cfg.parallel.strategy](cfg, dist)


def warn_if_emulated(precision: str, device: torch.device) -> None:
    """16-bit autocast on a CPU without native 16-bit matrix units (AVX512-BF16, AMX, AVX512-FP16)
    runs emulated: on this project's AMD EPYC dev machine a bf16 matmul of MiniLM's sizes took 80x
    the fp32 time (1.9 s vs 22 ms), where a CPU with the units is ~1.6x faster than fp32.  The
    trial's numbers are right either way; its speed is not what the user chose bf16 for."""
    if device.type != "cpu" or precision == "fp32":
        return
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() if precision == "bf16" \
        else torch.cpu._is_amx_fp16_supported() if hasattr(torch.cpu, "_is_amx_fp16_supported") else False
    if not native:
        log.warning("--precision %s on a CPU without native %s matrix units (its capability: %s): autocast is "
                    "emulated and can be many times slower than fp32 (--precision fp32)", precision, precision,
                    torch.backends.cpu.get_cpu_capability())

