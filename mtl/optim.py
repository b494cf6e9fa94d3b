"""The optimizer (AdamW, the reference; Adam or SGD where a seed study used them) and its
learning-rate schedule."""
from __future__ import annotations

import torch

from mtl.combine import Combiner
from mtl.config import RunConfig


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
    if o.optimizer == "sgd":
        # Weight decay as SGD applies it (an L2 term in the gradient); the betas and eps are Adam's.
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, fused=fused or None)
    # Adam: the seeds' alternative, weight decay coupled into the gradient (so Adam's scaling
    # divides it), where AdamW decays the weights directly (Loshchilov & Hutter 2019).
    kind = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


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
