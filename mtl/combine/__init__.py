"""Loss-combination methods, one module each, chosen by name from the registry."""
from __future__ import annotations

from mtl.combine import (aggregators, dtp, dwa, gradnorm, imtl_l, pcgrad, rlw, scalarize, scalarizers, sum,  # noqa: F401
                         uncertainty)  # importing registers them
from mtl.combine.base import COMBINERS, Combiner, register
from mtl.config import CombinerConfig
from mtl.errors import ConfigError

__all__ = ["COMBINERS", "Combiner", "register", "build_combiner"]


def build_combiner(cfg: CombinerConfig, tasks: tuple[str, ...], one_task_per_step: bool) -> Combiner:
    if cfg.combiner not in COMBINERS:
        raise ConfigError(f"combiner.combiner: unknown method {cfg.combiner!r} (known: {', '.join(sorted(COMBINERS))})")
    for name, methods in cfg.unused().items():
        raise ConfigError(f"combiner.{name}: applies to --combiner {' or '.join(methods)}, not {cfg.combiner}")
    cls = COMBINERS[cfg.combiner]
    if one_task_per_step and cls.needs_all_tasks_per_step and len(tasks) > 1:
        raise ConfigError(f"combiner.combiner: {cfg.combiner!r} needs every task's loss in each step; "
                          "epoch_mode proportional/temperature gives one task per step (use min_size, "
                          "max_size or fixed_n)")
    return cls(tasks, cfg)
