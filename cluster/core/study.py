"""The study, independent of where its trials run: grids expanded into trials with one naming
rule, the check that a storage holds this study's trials, and which trials a batch slot runs.
(Whether a trial has ended, and the results table: cluster.core.ending.)

Ray Tune, SLURM job arrays and submitit only place the trials this module lists; none of that
is imported here, so the SLURM path works on a machine where Ray is not even installed.

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

import hashlib
import itertools
import json
import math
import os
from collections import Counter

from mtl import results as trial_results, storage
from mtl.config import GRADIENT_METHODS, NON_IDENTITY, SEED_MAX, TASK_NAMES, CombinerConfig, RunConfig, set_dotted
from mtl.errors import ConfigError, kind
from mtl.stages import chain, links

SIZE_CONTROLS = ("study", "pairing", "none")
NAME_MAX = 255       # bytes in one file or folder name
SINGLES = list(TASK_NAMES)                                            # sst, para, sts
PAIRS = [",".join(pair) for pair in itertools.combinations(TASK_NAMES, 2)]   # sst,para  sst,sts  para,sts
ALPHAS = [round(0.1 * i, 1) for i in range(1, 10)]


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------
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
    """The study in miniature, minutes on a laptop CPU with --preset smoke: the three single-task
    baselines, PAR with SIM (the reference study's clearest help) and with SEN by addition, and
    PAR with SIM by PCGrad on 2 data-parallel workers of half the batch each (the same steps as one
    worker: DDP is exact)."""
    return [{"data.tasks": "sst", "combiner.combiner": "sum"},
            {"data.tasks": "para", "combiner.combiner": "sum"},
            {"data.tasks": "sts", "combiner.combiner": "sum"},
            {"data.tasks": "para,sts", "combiner.combiner": "sum"},
            {"data.tasks": "sst,para", "combiner.combiner": "sum"},
            {"data.tasks": "para,sts", "combiner.combiner": "pcgrad", "parallel.workers": 2, "optim.batch_size": 8}]


def methods_axes() -> list[dict]:
    """Which combiner?  The single-task baselines, then every method of the registry (with its
    default settings) on all three tasks together and on each pair.  Scalarize is left out:
    its weights are a sweep of their own (the pairings grid)."""
    # Lazy: the registry imports torch, which only this grid needs of it here.
    from mtl.combine import COMBINERS

    methods = sorted(m for m in COMBINERS if m != "scalarize")
    trials = [{"data.tasks": t, "combiner.combiner": "sum"} for t in SINGLES]
    for tasks in [",".join(TASK_NAMES)] + PAIRS:
        trials += [{"data.tasks": tasks, "combiner.combiner": m} for m in methods]
    return trials


NLI_SPEC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "mtl", "sample_data", "nli.yaml")


def pretraining_axes() -> list[dict]:
    """Does further pretraining help?  No further pretraining; MLM on the three tasks' own training
    sentences; MLM, then an NLI task (the shipped spec: nli-{train,dev}.csv under --data-dir; a
    small synthetic sample under the default): each with addition and PCGrad on the three tasks,
    and each with its own single-task baselines (a change compares runs of the same pretraining).
    MLM and MLM-then-NLI are upstream stages: each runs once per seed for all that start from it."""
    mlm = {"data.tasks": "mlm", "combiner.combiner": "sum"}
    nli = {"data.tasks": "nli", "data.task_specs": NLI_SPEC, "combiner.combiner": "sum"}
    trials = []
    for stage_list in ([], [mlm], [mlm, nli]):
        extra = {STAGES: stage_list} if stage_list else {}
        trials += [{"data.tasks": t, "combiner.combiner": "sum", **extra} for t in SINGLES]
        trials += [{"data.tasks": ",".join(TASK_NAMES), "combiner.combiner": c, **extra} for c in ("sum", "pcgrad")]
    return trials


def sequential_axes() -> list[dict]:
    """Joint or one task after another?  The single-task baselines; the three tasks trained
    jointly; sequentially (SST, then Quora, then STS: a chain of single-task stages); and jointly,
    then each task fine-tuned alone with its head carried over (one shared joint stage)."""
    joint = {"data.tasks": ",".join(TASK_NAMES), "combiner.combiner": "sum"}
    trials = [{"data.tasks": t, "combiner.combiner": "sum"} for t in SINGLES] + [joint]
    # Each stage also scores the tasks before it (their heads carried, frozen): forgetting shows.
    trials.append({"data.tasks": "sts", "data.eval_tasks": "sst,para", "combiner.combiner": "sum",
                   STAGES: [{"data.tasks": "sst"}, {"data.tasks": "para", "data.eval_tasks": "sst"}]})
    trials += [{"data.tasks": t, "combiner.combiner": "sum", "carry_heads": True, STAGES: [joint]} for t in SINGLES]
    return trials


def sampling_axes() -> list[dict]:
    """How to sample the tasks?  The three tasks by addition under every epoch mode: undersampling
    to the smallest (the reference), oversampling to the largest, a fixed n per task,
    proportional and temperature (T=2) task sampling; each mode with its own single-task
    baselines (a mode sets how much of a task an epoch sees, so a change compares like with like)."""
    modes = [{"data.epoch_mode": "min_size"}, {"data.epoch_mode": "max_size"},
             {"data.epoch_mode": "fixed_n", "data.examples_per_task": SAMPLING_FIXED_N},
             {"data.epoch_mode": "proportional"}, {"data.epoch_mode": "temperature", "data.temperature": 2.0}]
    return [{"data.tasks": t, "combiner.combiner": "sum", **mode} for mode in modes for t in [*SINGLES, ",".join(TASK_NAMES)]]


SAMPLING_FIXED_N = 2000      # the sampling grid's fixed n: about the smallest task of the full data sets


REGULARIZERS = [{}, {"regularize.regularizer": "smart"}, {"regularize.regularizer": "l1"},
                {"regularize.regularizer": "linf"}]


def regularization_axes() -> list[dict]:
    """Does a regulariser help?  No regulariser, SMART, an L1 and an L-infinity weight penalty (each
    with its defaults: see --help), each with its own single-task baselines and every pair under
    addition and PCGrad, so each pairing's change compares runs of the same regulariser."""
    trials = []
    for reg in REGULARIZERS:
        trials += [{"data.tasks": t, "combiner.combiner": "sum", **reg} for t in SINGLES]
        trials += [{"data.tasks": p, "combiner.combiner": c, **reg} for p in PAIRS for c in ("sum", "pcgrad")]
    return trials


# One change at a time from the reference model ([CLS], joint pairs, one hidden layer per head):
ARCHITECTURES = [{}, {"model.pooling": "mean"}, {"model.pooling": "mean_penultimate"},
                 {"model.pair_encoding": "siamese"},
                 {"model.pair_encoding": "siamese", "model.siamese_features": "prod,cos"},
                 {"model.head_depth": "0"}, {"model.head_depth": "2"}, {"model.shared_layer": 256}]


def architecture_axes() -> list[dict]:
    """Which model?  The reference model and one change at a time: mean or second-to-last-layer
    mean pooling, siamese pairs (alone, and with u*v and cos(u, v) features), a single
    linear or a deeper head, a shared layer before the heads; each with its own single-task
    baselines and every pair by addition.  (A variant that cannot change a task, siamese pairs for
    SEN, retrains that baseline under the variant's name: the report matches baselines by variant.)"""
    return [{"data.tasks": t, "combiner.combiner": "sum", **arch} for arch in ARCHITECTURES for t in SINGLES + PAIRS]


NAMED = {"pairings": pairings_axes, "weighting": weighting_axes, "methods": methods_axes, "smoke": smoke_axes,
         "pretraining": pretraining_axes, "sequential": sequential_axes, "sampling": sampling_axes,
         "regularization": regularization_axes, "architecture": architecture_axes}


def yaml_axes(path: str) -> tuple[list[dict], dict]:
    spec = storage.read_yaml(path) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a grid is a mapping with 'axes' and 'fixed'")
    unknown = set(map(str, spec)) - {"axes", "fixed"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r} (expected axes, fixed)")
    for part in ("axes", "fixed"):
        if not isinstance(spec.get(part) or {}, dict):
            raise ConfigError(f"{path}: {part} must be a mapping of setting: "
                              f"{'[values]' if part == 'axes' else 'value'}, not {kind(spec[part])}")
        for key in spec.get(part) or {}:
            if not isinstance(key, str):
                raise ConfigError(f"{path}: {part}.{key}: a setting's name is text, not {kind(key)}")
    axes = {dotted_key(k, f"{path}: axes."): v for k, v in (spec.get("axes") or {}).items()}
    fixed = {dotted_key(k, f"{path}: fixed."): v for k, v in (spec.get("fixed") or {}).items()}
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axes.{key} must be a non-empty list")
        if key in fixed:
            raise ConfigError(f"{path}: {key} is both an axis and fixed")
        if key in NON_IDENTITY:
            raise ConfigError(f"{path}: axes.{key}: not a setting of what a trial computes (where it is stored, how "
                              "it logs or runs), so an axis of it would repeat the same trials; set it on the "
                              "command line")
    if "out" in fixed:
        raise ConfigError(f"{path}: fixed.out: every trial's folder is <storage>/<trial name>; choose the storage "
                          "with --storage")
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))], fixed


def parse_seeds(text: str | None) -> list[int] | None:
    """The --seeds list, None when it was not given (a grid's own seed axis then decides)."""
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: {text!r} is not a comma-separated list of integers") from None
    if not seeds:
        raise ConfigError("--seeds: at least one seed is needed")
    for seed in seeds:
        if not 0 <= seed <= SEED_MAX:
            raise ConfigError(f"--seeds: {seed} is outside [0, {SEED_MAX}]")
    return seeds


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


def expand(grid: str, base: RunConfig, storage_root: str, seeds: list[int] | None,
           size_control: str = "study") -> list[RunConfig]:
    """RunConfigs for a grid, each with out=<storage_root>/<trial name>, in a stable order: the
    same arguments (and data) give the same list on every machine.  ``seeds`` None: seed 0,
    unless the grid has its own seed axis.  ``size_control`` pins how many examples of each task
    the min_size trials see per epoch (see ``control_sizes``)."""
    storage_root = absolute(storage_root)
    if size_control not in SIZE_CONTROLS:
        raise ConfigError(f"--size-control: {size_control!r} is not one of {', '.join(SIZE_CONTROLS)}")
    if not base.data.cache_dir:      # one token cache for the study (a file per split, safe to share)
        base = base.replace(**{"data.cache_dir": storage.join(storage_root, "token_cache")})
    base = with_absolute_paths(base)
    origin = grid
    if grid in NAMED:
        combos, fixed = NAMED[grid](), {}
    elif storage.exists(grid):
        combos, fixed = yaml_axes(grid)
    else:
        raise ConfigError(f"--grid: {grid!r} is neither a named grid ({', '.join(NAMED)}) nor a YAML file")
    own_seeds = "seed" in fixed or any("seed" in c for c in combos)
    if own_seeds and seeds is not None:
        raise ConfigError(f"--seeds: {origin} sets the seed itself ({'fixed' if 'seed' in fixed else 'an axis'}); "
                          "give the seeds in one place")
    if not own_seeds:
        combos = [{**c, "seed": s} for s in (seeds or [0]) for c in combos]
    entries, seen = [], set()
    for combo in combos:
        try:
            settings = {k: v for k, v in combo.items() if k != STAGES}
            seed = settings.get("seed", fixed.get("seed", base.seed))
            cfg = base.replace(**{**fixed, **settings, "upstream": _stage_chain(combo.get(STAGES), base, fixed, seed)})
        except ConfigError as exc:
            field, _, reason = str(exc).partition(": ")
            part = next((f"axes.{k}" for k in combo if k == field), next((f"fixed.{k}" for k in fixed if k == field),
                                                                        None))
            if part is None or grid in NAMED:
                raise
            raise ConfigError(f"{origin}: {part}: {reason}") from None
        # An axis of one method's setting (alpha, pcgrad_on, ...) does not repeat the other methods.
        cfg = _method_defaults(cfg)
        if cfg.fingerprint() not in seen:
            seen.add(cfg.fingerprint())
            entries.append((cfg, combo))
    entries = [(_pin_stages(cfg), combo) for cfg, combo in control_sizes(entries, size_control)]
    named = [(cfg, combo, _chain_label(cfg.upstream, "-then-") + _compose_name(cfg, combo)) for cfg, combo in entries]
    # Trials the naming rule cannot tell apart all get a suffix from what varies for them (never
    # from where the study runs), whatever their order: a name always means the same trial.
    taken = Counter(name for _, _, name in named)
    trials = [cfg.replace(out=storage.join(storage_root, name if taken[name] == 1 else f"{name}-{_digest(combo)}"))
              for cfg, combo, name in named]
    trials = place_upstreams(trials, storage_root)
    for t in trials:
        name = trial_name(t)
        if len(name.encode()) > NAME_MAX:
            raise ConfigError(f"{origin}: trial name {name[:48]}... is {len(name.encode())} bytes, over the "
                              f"{NAME_MAX} a folder name may have: shorten the grid's values")
    return trials


# --------------------------------------------------------------------------------------------
# Stages: trials that start from an upstream trial, run once for all that share it
# --------------------------------------------------------------------------------------------
STAGES = "stages"    # a combo's key: the stages before its trial, each a mapping of settings over the base


def _method_defaults(cfg: RunConfig) -> RunConfig:
    """An axis of one method's setting (alpha, pcgrad_on, ...) does not repeat the other methods."""
    defaults = CombinerConfig()
    return cfg.replace(**{f"combiner.{k}": getattr(defaults, k) for k in cfg.combiner.unused()})


def _stage_chain(stage_list: list[dict] | None, base: RunConfig, fixed: dict, seed: int) -> dict | None:
    """The upstream chain of ``stage_list`` (each stage: the grid's base and fixed settings, the
    trial's seed, then the stage's own settings), as a config's ``upstream``; its folders are
    placed later (``place_upstreams``)."""
    if not stage_list:
        return None
    return chain(base.replace(**{**fixed, "seed": seed}), stage_list, "stages", each=_method_defaults).to_dict()["upstream"]


def _pin_stages(cfg: RunConfig) -> RunConfig:
    """A trial's undersampling stages see per epoch as many examples of each task as the trial
    itself was pinned to (size control reaches the whole chain), so a stage equal to a trial of
    the study is that trial, run once."""
    n = cfg.data.examples_per_task
    if cfg.upstream is None or not n or cfg.data.epoch_mode != "min_size":
        return cfg
    chain = None
    for stage in links(cfg)[:-1]:
        if stage.data.epoch_mode == "min_size" and not stage.data.examples_per_task and \
                _TrainRows.source(stage) == _TrainRows.source(cfg):
            stage = stage.replace(**{"data.examples_per_task": n})
        chain = stage.replace(upstream=chain).to_dict()
    return cfg.replace(upstream=chain)


def _chain_label(upstream: RunConfig | None, tail: str = "") -> str:
    """mlm-then-nli for a chain MLM, then NLI ('' without one): the start of its dependents' names."""
    return "" if upstream is None else "-then-".join("+".join(s.data.tasks) for s in links(upstream)) + tail


def place_upstreams(trials: list[RunConfig], storage_root: str) -> list[RunConfig]:
    """Every upstream stage the trials start from, once per identity, in its own folder at the
    storage root (``<chain>-s<seed>``), listed before the trials that depend on it (shallowest
    first); each trial's upstream then names that folder.  Trials sharing a stage prefix share
    its one run."""
    unique: dict[str, RunConfig] = {}
    for t in trials:
        for stage in links(t)[:-1]:
            unique.setdefault(stage.fingerprint(), stage)
    listed = {t.fingerprint(): t for t in trials}       # a stage that is a trial of the study is that trial
    names = {fp: f"{_chain_label(s)}-s{s.seed}" for fp, s in unique.items()}
    taken = Counter(names.values())
    placed: dict[str, RunConfig] = {}
    for fp, stage in sorted(unique.items(), key=lambda kv: len(links(kv[1]))):   # an upstream before its own
        name = names[fp] if taken[names[fp]] == 1 else f"{names[fp]}-{fp[:6]}"
        up = placed[stage.upstream.fingerprint()].to_dict() if stage.upstream is not None else None
        out = listed[fp].out if fp in listed else storage.join(storage_root, name)
        placed[fp] = stage.replace(out=out, upstream=up)
    ordered = list(placed.values())
    for t in trials:
        if t.fingerprint() not in placed:
            ordered.append(t if t.upstream is None else t.replace(upstream=placed[t.upstream.fingerprint()].to_dict()))
    return ordered


def upstream_of(trial: RunConfig) -> str | None:
    """The folder of the trial this one starts from, or None: the one dependency a backend honours."""
    return trial.upstream.out if trial.upstream is not None else None


# --------------------------------------------------------------------------------------------
# Size control
# --------------------------------------------------------------------------------------------
def control_sizes(entries: list[tuple[RunConfig, dict]], mode: str) -> list[tuple[RunConfig, dict]]:
    """Pin ``data.examples_per_task`` into the trials that undersample (epoch_mode min_size), so a
    task's change against its single-task baseline compares equal amounts of its data:

    - ``study`` (default): every trial sees, per epoch, as many examples of each of its tasks as
      the smallest training set among all the study's tasks has (per data source: trials of
      another data folder or row limit get their own number);
    - ``pairing``: a multi-task trial sees its own smallest task's size, and each single-task
      baseline is run once per size its task sees in the study's pairings (named ``-n<N>``);
    - ``none``: each trial undersamples to its own smallest task (a baseline then sees its whole
      training set, more than the same task inside any pairing).

    A size the user pinned (``--examples-per-task``) is kept under ``study``.  The counts come
    from reading the training files as the trials will (bad rows, row limits)."""
    if mode == "none":
        return entries
    under = [cfg for cfg, _ in entries if cfg.data.epoch_mode == "min_size"]
    if not under:
        return entries
    if mode == "pairing" and any(cfg.data.examples_per_task for cfg in under):
        raise ConfigError("--examples-per-task pins one size for every trial, --size-control pairing one per "
                          "pairing: give one of them (or --size-control none)")
    rows = _TrainRows()
    smallest: dict[tuple, int] = {}
    for cfg in under:
        key = rows.source(cfg)
        smallest[key] = min([smallest.get(key, math.inf)] + [rows(cfg, t) for t in cfg.data.tasks])
    out = []
    for cfg, combo in entries:
        if cfg.data.epoch_mode != "min_size":
            out.append((cfg, combo))
            continue
        if mode == "study":
            pinned = cfg.data.examples_per_task or smallest[rows.source(cfg)]
            for t in cfg.data.tasks:
                if rows(cfg, t) < pinned:
                    raise ConfigError(f"data.examples_per_task: {pinned} examples per epoch, but task {t} has "
                                      f"{rows(cfg, t)} training rows in {cfg.data.data_dir}; min_size cannot draw "
                                      "more")
            out.append((cfg.replace(**{"data.examples_per_task": pinned}), combo))
        elif len(cfg.data.tasks) > 1:
            out.append((cfg.replace(**{"data.examples_per_task": min(rows(cfg, t) for t in cfg.data.tasks)}), combo))
        else:
            task = cfg.data.tasks[0]
            sizes = sorted({min(rows(other, t) for t in other.data.tasks) for other in under
                            if len(other.data.tasks) > 1 and task in other.data.tasks
                            and rows.source(other) == rows.source(cfg)}) or [rows(cfg, task)]
            out += [(cfg.replace(**{"data.examples_per_task": n}), {**combo, "data.examples_per_task": n})
                    for n in sizes]
    return out


class _TrainRows:
    """Training rows per (data source, task), read once each."""

    def __init__(self):
        self.cache: dict[tuple, int] = {}

    @staticmethod
    def source(cfg: RunConfig) -> tuple:
        d = cfg.data
        return (d.data_dir, d.on_bad_row, d.max_train_rows)

    def __call__(self, cfg: RunConfig, task: str) -> int:
        key = (*self.source(cfg), task)
        if key not in self.cache:
            from mtl.data import read_split      # torch: only for studies that undersample
            from mtl.tasks import TASKS

            d = cfg.data
            self.cache[key] = len(read_split(d.data_dir, TASKS[task], "train", d.on_bad_row, d.max_train_rows))
        return self.cache[key]


def _digest(combo: dict) -> str:
    return hashlib.sha256(json.dumps(combo, sort_keys=True, default=str).encode()).hexdigest()[:6]


def dotted_key(key: str, where: str = "") -> str:
    """A setting's full dotted name ('lr' -> 'optim.lr'), or a one-line error."""
    d = RunConfig().to_dict()
    owners = [section for section, fields in d.items() if isinstance(fields, dict) and key in fields]
    top_level = "." in key or (key in d and not isinstance(d[key], dict))   # optim.lr, seed
    full = key if top_level or len(owners) != 1 else f"{owners[0]}.{key}"   # lr, combiner
    try:
        set_dotted(d, full, None)
    except ConfigError:
        raise ConfigError(f"{where}{key}: unknown setting") from None
    return full


def check_storage(trials: list[RunConfig]) -> None:
    """Refuse a storage whose trial folders hold other settings under the same names (a study
    rerun with another --lr, say), or results of data files that changed since: their results
    would be reported as this study's."""
    digests: dict[str, str] = {}          # each data file read once, however many trials read it
    for t in trials:
        res = trial_results.read_or_none(t.out)
        if res is None:
            continue
        changed = RunConfig.from_dict(res["config"]).identity_changes(t)
        if changed:
            raise ConfigError(f"{t.out} holds a trial with other settings ({changed}): rerun the study with "
                              f"its own settings, or use another --storage")
        if res.get("data"):
            from mtl.data import data_changes, file_digests     # torch: only where a trial has results
            from mtl.tasks import TASKS

            now = file_digests(t.data.data_dir, [TASKS[x] for x in t.data.tasks], cache=digests)
            changed = data_changes(res["data"], now, t.data.data_dir)
            if changed:
                raise ConfigError(f"{t.out} holds results of other data: {changed}; rerun the study on its own data, "
                                  "or use another --storage")


# Axes the name already shows (tasks, method, alpha, seed, a baseline's size) or leaves out (workers).
SHORT = {"parallel.workers", "data.tasks", "combiner.combiner", "seed", "combiner.alpha", "combiner.weights",
         "data.examples_per_task", STAGES, "carry_heads", "data.eval_tasks"}


def _compose_name(cfg: RunConfig, varied: dict) -> str:
    """<tasks>-<method>[-a<alpha>][-<other varied axes>]-s<seed>, e.g. sst+para-scalarize-a0.3-s0."""
    parts = ["+".join(cfg.data.tasks), cfg.combiner.combiner]
    if cfg.combiner.combiner == "scalarize" and len(cfg.data.tasks) == 2 and not cfg.combiner.weights:
        parts.append(f"a{cfg.combiner.alpha:g}")
    elif cfg.combiner.combiner in GRADIENT_METHODS:      # weighted surgery: the gradients' loss weights
        if cfg.combiner.alpha != 0.5:
            parts.append(f"a{cfg.combiner.alpha:g}")
        if cfg.combiner.weights:
            parts.append("w" + "_".join(f"{w:g}" for w in cfg.combiner.weights))
    for key, value in sorted(varied.items()):
        if key not in SHORT:
            parts.append(f"{key.rsplit('.', 1)[-1]}{value}")
    if "data.examples_per_task" in varied:
        parts.append(f"n{varied['data.examples_per_task']}")
    if cfg.carry_heads:
        parts.append("carry")
    parts.append(f"s{cfg.seed}")
    return "-".join(str(p).replace("/", "_").replace(" ", "") for p in parts)


def trial_name(cfg: RunConfig) -> str:
    """A trial's name: the last part of its run folder, given by ``expand``."""
    return storage.basename(cfg.out)


# --------------------------------------------------------------------------------------------
# Batch slots: which trials one array task runs
# --------------------------------------------------------------------------------------------
def slot_count(n_trials: int, per_slot: int = 1) -> int:
    return math.ceil(n_trials / per_slot)


def slot_trials(n_trials: int, index: int, per_slot: int = 1) -> list[int]:
    """Trial indices that batch slot ``index`` runs: trials [index*k, index*k + k).  With k = 1
    (the default) array task i runs trial i; k > 1 packs k consecutive trials into one task
    (for small trials that share a GPU)."""
    slots = slot_count(n_trials, per_slot)
    if not 0 <= index < slots:
        what = "trials" if per_slot == 1 else f"trials in {slots} tasks of {per_slot}"
        raise ConfigError(f"array index {index} is beyond the grid: {n_trials} {what}, so indices 0-{slots - 1}")
    return list(range(index * per_slot, min(n_trials, (index + 1) * per_slot)))


def index_ranges(indices: list[int]) -> str:
    """SLURM's array syntax for a set of indices: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts, run = [], []
    for i in sorted(set(indices)):
        if run and i != run[-1] + 1:
            parts.append(_range(run))
            run = []
        run.append(i)
    if run:
        parts.append(_range(run))
    return ",".join(parts)


def _range(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"
