"""Study grids: named ones (pairings, weighting) and user grids from YAML, expanded into a
list of RunConfigs with deterministic trial names under one storage root.

YAML grid (every axis is crossed with every other; any RunConfig field may be an axis or a
fixed override, by dotted path or bare field name)::

    axes:
      seed: [0, 1, 2]
      tasks: [sst, "sst,para", "para,sts"]
      combiner: [sum, scalarize, pcgrad]
      alpha: [0.2, 0.5, 0.8]        # only varies scalarize trials; others are not repeated
      optim.lr: [1e-5, 2e-5]
    fixed:
      optim.epochs: 3
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl import storage  # noqa: E402
from mtl.config import RunConfig  # noqa: E402
from mtl.errors import ConfigError  # noqa: E402

SINGLES = ["sst", "para", "sts"]
PAIRS = ["sst,para", "sst,sts", "para,sts"]
ALPHAS = [round(0.1 * i, 1) for i in range(1, 10)]


def pairings_axes() -> list[dict]:
    """The reference study: single-task baselines, and every pair x {addition, alpha 0.1..0.9, PCGrad}."""
    trials = [{"data.tasks": t, "combiner.combiner": "sum"} for t in SINGLES]
    for pair in PAIRS:
        trials.append({"data.tasks": pair, "combiner.combiner": "sum"})
        trials += [{"data.tasks": pair, "combiner.combiner": "scalarize", "combiner.alpha": a} for a in ALPHAS]
        trials.append({"data.tasks": pair, "combiner.combiner": "pcgrad"})
    return trials


def weighting_axes() -> list[dict]:
    """All three tasks under every combination method."""
    return [{"data.tasks": "sst,para,sts", "combiner.combiner": c, **extra} for c, extra in (
        ("sum", {}), ("scalarize", {"combiner.weights": "0.3333333333,0.3333333333,0.3333333334"}),
        ("pcgrad", {}), ("uncertainty", {}), ("dtp", {}))]


def smoke_axes() -> list[dict]:
    """A few short trials for a laptop: two single tasks, a pair by addition, and the pair by
    PCGrad on 2 data-parallel workers."""
    return [{"data.tasks": "sst", "combiner.combiner": "sum"},
            {"data.tasks": "para", "combiner.combiner": "sum"},
            {"data.tasks": "sst,para", "combiner.combiner": "sum"},
            {"data.tasks": "sst,para", "combiner.combiner": "pcgrad", "parallel.workers": 2}]


NAMED = {"pairings": pairings_axes, "weighting": weighting_axes, "smoke": smoke_axes}


def yaml_axes(path: str) -> tuple[list[dict], dict]:
    import yaml

    try:
        spec = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    unknown = set(spec) - {"axes", "fixed"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r} (expected axes, fixed)")
    axes = spec.get("axes") or {}
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axes.{key} must be a non-empty list")
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))], spec.get("fixed") or {}


def absolute(path: str) -> str:
    """Local relative paths made absolute: trials run in other processes, on other nodes, in
    other working directories.  URLs and the embedded defaults are left as they are."""
    if not path or ":" in path.split("/", 1)[0] or not storage.is_local(path):
        return path
    return os.path.abspath(path)


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    model = cfg.model.model
    if os.path.exists(model):      # a hub name stays a hub name
        model = os.path.abspath(model)
    return cfg.replace(**{"out": absolute(cfg.out), "data.data_dir": absolute(cfg.data.data_dir),
                          "data.cache_dir": absolute(cfg.data.cache_dir), "model.model": model})


def expand(grid: str, base: RunConfig, storage_root: str, seeds: list[int]) -> list[RunConfig]:
    """RunConfigs for a grid, each with out=<storage_root>/<trial name>, in a stable order."""
    base = with_absolute_paths(base)
    storage_root = absolute(storage_root)
    if grid in NAMED:
        combos, fixed = NAMED[grid](), {}
        combos = [{**c, "seed": s} for s in seeds for c in combos]
    else:
        combos, fixed = yaml_axes(grid)
        if not any("seed" in c for c in combos):
            combos = [{**c, "seed": s} for s in seeds for c in combos]
    trials, seen = [], {}
    for combo in combos:
        cfg = base.replace(**fixed, **combo)
        if cfg.combiner.combiner != "scalarize":      # alpha means nothing to other methods
            cfg = cfg.replace(**{"combiner.alpha": 0.5, "combiner.weights": ""})
        key = cfg.fingerprint()
        if key in seen:
            continue
        name = trial_name(cfg, combo)
        if name in seen.values():
            name = f"{name}-{key[:6]}"
        seen[key] = name
        trials.append(cfg.replace(out=storage.join(storage_root, name)))
    return trials


# Axes the name already shows (tasks, method, alpha, seed) or leaves out (workers).
SHORT = {"parallel.workers", "data.tasks", "tasks", "combiner.combiner", "combiner", "seed",
         "combiner.alpha", "alpha", "combiner.weights", "weights"}


def trial_name(cfg: RunConfig, varied: dict) -> str:
    """<tasks>-<method>[-a<alpha>][-<other varied axes>]-s<seed>, e.g. sst+para-scalarize-a0.3-s0."""
    parts = ["+".join(cfg.data.tasks), cfg.combiner.combiner]
    if cfg.combiner.combiner == "scalarize" and len(cfg.data.tasks) == 2 and not cfg.combiner.weights:
        parts.append(f"a{cfg.combiner.alpha:g}")
    for key, value in sorted(varied.items()):
        if key not in SHORT:
            parts.append(f"{key.rsplit('.', 1)[-1]}{value}")
    parts.append(f"s{cfg.seed}")
    return "-".join(str(p).replace("/", "_").replace(" ", "") for p in parts)
