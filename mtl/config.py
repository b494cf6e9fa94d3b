"""The one run configuration that flows from the CLI through sweeps, checkpoints and results.

Each section owns its settings and checks them in ``__post_init__``, so an invalid
configuration fails when it is built, with the offending field named, before any
file is written.  ``RunConfig.to_dict``/``from_dict`` give the JSON form stored in
every checkpoint, TensorBoard's hparams and ``results.json``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from mtl import task_specs
from mtl.errors import ConfigError
from mtl.monitor import flatten

TASK_NAMES = ("sst", "para", "sts")
EPOCH_MODES = ("min_size", "max_size", "fixed_n", "proportional", "temperature")
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_MODEL = "embedded:all-MiniLM-L6-v2"
DEFAULT_DATA = "embedded:sample"


def _help(text: str, identity: bool = True, methods: tuple[str, ...] = (), new: bool = False, **kw) -> Any:
    """A documented field.  ``identity=False`` marks a setting that does not change what the trial
    computes (where it is stored, how it logs and checkpoints): it is left out of the trial's
    fingerprint, resume checks, TensorBoard's hparams and the sweep table's varied columns.
    ``methods`` names the loss-combination methods that read a combiner setting.  ``new`` marks a
    setting added after trials were first fingerprinted: at its default it is left out of the
    identity, so every trial that does not use it keeps the fingerprint it had before."""
    return field(metadata={"help": text, "identity": identity, "methods": methods, "new": new}, **kw)


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def _floats(value, name: str) -> tuple[float, ...]:
    """A comma-separated string (the command line) or a sequence, as a tuple of floats."""
    if isinstance(value, str):
        try:
            return tuple(float(w) for w in value.split(",") if w.strip())
        except ValueError:
            raise ConfigError(f"{name}: {value!r} is not a comma-separated list of numbers") from None
    return tuple(float(w) for w in value)


# The methods on the tasks' gradients of the shared parameters (mtl.combine.gradients): their
# settings may scale those gradients first (--alpha/--weights).
GRADIENT_METHODS = ("pcgrad", "upgrad", "mgda", "cagrad", "nash_mtl", "imtl_g", "aligned_mtl", "dualproj",
                    "gradvac", "graddrop", "fairgrad", "excess_mtl", "config", "rgw")


def _require_finite(section, prefix: str) -> None:
    """Every float setting of a section is a finite number: an infinite eps, weight decay or
    learning rate passes a '> 0' check and then trains nothing (or NaNs) without a word."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.type in ("float", float) and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name}: {value} is not a finite number")


SEED_MAX = 2 ** 32 - 1       # seeds are mixed with steps and ranks into 64-bit generator seeds
HEAD_HIDDEN_MAX = 65536      # a head wider than this is a typo (1e8 would ask for ~150 GB)


def parse_tasks(value: str | list[str] | tuple[str, ...], user: tuple[str, ...] = (),
                field: str = "data.tasks") -> tuple[str, ...]:
    """Task names in canonical order: the built-in sst, para, sts, then ``user``'s (the names of
    the run's task specs, in the order given)."""
    names = [t.strip() for t in value.split(",")] if isinstance(value, str) else list(value)
    names = [t for t in names if t]
    known = (*task_specs.BUILTIN, *user)
    _require(bool(names), field, "at least one task is needed")
    for name in names:
        _require(name in known, field, f"unknown task {name!r} (known: {', '.join(known)}; "
                                              "a task of your own needs its spec: --task-specs FILE)")
    _require(len(set(names)) == len(names), field, f"a task is listed twice in {','.join(names)}")
    # Canonical order keeps run names and head order independent of how the user typed them.
    return tuple(t for t in known if t in names)


def parse_task_specs(value) -> tuple[dict, ...]:
    """--task-specs: comma-separated spec files (read and checked now), or the specs themselves
    as a saved configuration holds them (checked again: a hand-edited one gets the same errors)."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    specs = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            spec = task_specs.load(item)
        else:
            spec = task_specs.normalise(item, f"data.task_specs[{i}]")
            _require(spec["name"] not in task_specs.BUILTIN and spec["name"] not in task_specs.RESERVED,
                     f"data.task_specs[{i}].name", f"{spec['name']!r} is taken")
        _require(spec["name"] not in [s["name"] for s in specs], "data.task_specs",
                 f"two specs name the task {spec['name']!r}")
        specs.append(spec)
    return tuple(specs)


def per_task(value: str, task: str, default: str = "") -> str:
    """One task's value of a per-task setting: 'v' (every task) or 'task=v,task=v' (a task not
    named gets ``default``)."""
    if "=" not in value:
        return value or default
    return dict(item.split("=", 1) for item in value.split(",")).get(task, default)


def _per_task_setting(value: str, name: str, check) -> str:
    """A per-task setting checked and written canonically ('v', or 'task=v,...' sorted by task);
    ``check(v)`` returns an error text or ''.  Which tasks it names is checked by RunConfig."""
    value = value.strip()
    if not value:
        return ""
    if "=" not in value:
        problem = check(value)
        _require(not problem, name, problem)
        return value
    pairs = {}
    for item in value.split(","):
        task, sep, v = (w.strip() for w in item.partition("="))
        _require(bool(sep and task and v), name, f"{item.strip()!r} is not task=value")
        _require(task not in pairs, name, f"task {task!r} is given twice")
        problem = check(v)
        _require(not problem, name, f"{task}: {problem}")
        pairs[task] = v
    return ",".join(f"{t}={pairs[t]}" for t in sorted(pairs))


def per_task_tasks(value: str) -> tuple[str, ...]:
    """The tasks a per-task setting names ('' when it holds one value for all)."""
    return tuple(item.split("=", 1)[0] for item in value.split(",")) if "=" in value else ()


def _one_of(options: tuple[str, ...]):
    return lambda v: "" if v in options else f"{v!r} is not one of {', '.join(options)}"


def _number_in(kind, low: float, high: float):
    def check(v: str) -> str:
        try:
            x = kind(v)
        except ValueError:
            return f"{v!r} is not a{'n integer' if kind is int else ' number'}"
        return "" if low <= x <= high else f"{v} is outside [{low:g}, {high:g}]"
    return check


POOLINGS = ("cls", "mean", "mean_penultimate")
HEAD_ACTIVATIONS = ("relu", "leaky_relu", "gelu")
SIAMESE_EXTRAS = ("prod", "cos")
REGRESSION_ACTIVATIONS = ("sigmoid", "relu", "none")
OPTIMIZERS = ("adamw", "adam", "sgd")
REGULARIZERS = ("none", "smart", "l1", "linf")
# Loss names per task kind: the spec's own (its 'loss:') or one of these by --task-loss.
TASK_LOSSES = {"classification": ("cross_entropy",), "binary": ("bce", "cosine_embedding", "triplet"),
               "regression": ("mse", "l1", "smooth_l1", "mse_lasso")}


@dataclass
class ModelConfig:
    model: str = _help(f"Hugging Face encoder name or local path; {DEFAULT_MODEL} is the packaged MiniLM",
                       default=DEFAULT_MODEL)
    pooling: str = _help("sentence vector: 'cls' ([CLS] token), 'mean' (mean over tokens) or 'mean_penultimate' "
                         "(mean over tokens of the second-to-last layer); per task as task=value,...", default="cls")
    pair_encoding: str = _help("sentence pairs as one sequence [CLS] a [SEP] b [SEP] ('joint') "
                               "or each sentence encoded alone ('siamese'); per task as task=value,... "
                               "(joint PAR and siamese SIM in one trial: para=joint,sts=siamese)", default="joint")
    sim_head: str = _help("head of a regression pair task (SIM) under siamese encoding: 'mlp' on [u; v; |u-v|] or 'cosine' "
                          "(scaled onto the label range)", default="mlp")
    siamese_features: str = _help("siamese pairs: features beside [u; v; |u-v|], comma-separated: 'prod' (u*v), "
                                  "'cos' (cos(u, v))", default="", new=True)
    dropout: float = _help("dropout before each head layer", default=0.5)
    encoder_dropout: float = _help("dropout inside the encoder (hidden and attention); -1 keeps the "
                                   "encoder's own setting", default=-1.0)
    head_hidden: int = _help("hidden width of the heads' first layer (0: the encoder's width)", default=0)
    head_depth: str = _help("hidden layers of each head (0: one linear layer; 1: the reference "
                            "linear-activation-linear); per task as task=value,...", default="1", new=True)
    head_activation: str = _help("activation between head layers: relu, leaky_relu or gelu; per task as "
                                 "task=value,...", default="relu", new=True)
    head_dropout: str = _help("per-task dropout of the heads as task=value,... (a task not named: --dropout)",
                              default="", new=True)
    head_widths: str = _help("per-task hidden width of the heads as task=value,... (a task not named: "
                             "--head-hidden)", default="", new=True)
    shared_layer: int = _help("width of a layer between the encoder and every head (linear, activation, "
                              "dropout; trained with the encoder and shared by all tasks); 0: none", default=0,
                              new=True)
    shared_activation: str = _help("the shared layer's activation: relu, leaky_relu, gelu or none",
                                   default="gelu", new=True)
    regression_activation: str = _help("a regression head's output onto the label range: 'sigmoid' (scaled to the "
                                       "range), 'relu' (low + relu(x), the reference study) or 'none' (x as it is)",
                                       default="sigmoid", new=True)
    max_length: int = _help("tokens per sequence (a pair counts as one sequence unless siamese)", default=128)

    freeze_encoder: bool = _help("train the heads only: the encoder stays as loaded (the frozen-encoder "
                                 "baseline; no encoder gradients, so no gradient method)", default=False)

    def __post_init__(self):
        _require(bool(self.model), "model.model", "must name an encoder")
        self.pooling = _per_task_setting(self.pooling, "model.pooling", _one_of(POOLINGS)) or "cls"
        self.pair_encoding = _per_task_setting(self.pair_encoding, "model.pair_encoding",
                                               _one_of(("joint", "siamese"))) or "joint"
        _require(self.sim_head in ("mlp", "cosine"), "model.sim_head", f"{self.sim_head!r} is not 'mlp' or 'cosine'")
        _require(self.sim_head == "mlp" or "siamese" in self.pair_encoding, "model.sim_head",
                 "'cosine' needs pair_encoding='siamese' (two sentence vectors)")
        extras = [w.strip() for w in self.siamese_features.split(",") if w.strip()]
        for w in extras:
            _require(w in SIAMESE_EXTRAS, "model.siamese_features", f"{w!r} is not one of {', '.join(SIAMESE_EXTRAS)}")
        _require(len(set(extras)) == len(extras), "model.siamese_features", "a feature is listed twice")
        self.siamese_features = ",".join(w for w in SIAMESE_EXTRAS if w in extras)
        self.head_depth = _per_task_setting(self.head_depth, "model.head_depth", _number_in(int, 0, 8)) or "1"
        self.head_activation = _per_task_setting(self.head_activation, "model.head_activation",
                                                 _one_of(HEAD_ACTIVATIONS)) or "relu"
        self.head_dropout = _per_task_setting(self.head_dropout, "model.head_dropout", _number_in(float, 0.0, 0.999))
        self.head_widths = _per_task_setting(self.head_widths, "model.head_widths", _number_in(int, 1, HEAD_HIDDEN_MAX))
        _require(0 <= self.shared_layer <= HEAD_HIDDEN_MAX, "model.shared_layer",
                 f"{self.shared_layer} is outside [0, {HEAD_HIDDEN_MAX}]")
        _require(self.shared_activation in HEAD_ACTIVATIONS + ("none",), "model.shared_activation",
                 f"{self.shared_activation!r} is not one of {', '.join(HEAD_ACTIVATIONS + ('none',))}")
        _require(self.regression_activation in REGRESSION_ACTIVATIONS, "model.regression_activation",
                 f"{self.regression_activation!r} is not one of {', '.join(REGRESSION_ACTIVATIONS)}")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", f"{self.dropout} is outside [0, 1)")
        _require(self.encoder_dropout == -1.0 or 0.0 <= self.encoder_dropout < 1.0, "model.encoder_dropout",
                 f"{self.encoder_dropout} is neither -1 nor in [0, 1)")
        _require_finite(self, "model.")
        _require(0 <= self.head_hidden <= HEAD_HIDDEN_MAX, "model.head_hidden",
                 f"{self.head_hidden} is outside [0, {HEAD_HIDDEN_MAX}]")
        _require(8 <= self.max_length <= 4096, "model.max_length", f"{self.max_length} is outside [8, 4096]")

    def for_task(self, name: str, task: str) -> str:
        """A per-task setting's value for one task (``name``: pooling, pair_encoding, head_depth, ...)."""
        defaults = {"head_dropout": repr(self.dropout), "head_widths": str(self.head_hidden),
                    "pooling": "cls", "pair_encoding": "joint", "head_depth": "1", "head_activation": "relu"}
        return per_task(getattr(self, name), task, defaults[name])

    def siamese(self, task: str) -> bool:
        return self.for_task("pair_encoding", task) == "siamese"


@dataclass
class DataConfig:
    tasks: tuple[str, ...] = _help("comma-separated tasks: of the built-in sst,para,sts and those of "
                                   "--task-specs", default=("sst",))
    eval_tasks: tuple[str, ...] = _help("comma-separated tasks scored on dev but not trained, their heads carried "
                                        "from the upstream stage and frozen (a sequential chain's earlier tasks: "
                                        "what training on later ones did to them); 'mean' stays over the trained "
                                        "tasks", default=())
    task_specs: tuple = _help("comma-separated task spec files (YAML or JSON: name, files, columns, kind, ...; "
                              "see mtl/task_specs.py) for tasks of your own; the trial keeps the specs of its "
                              "tasks (part of what it computes)", default=())
    data_dir: str = _help(f"folder or fsspec URL holding sst-/quora-/sts-{{train,dev}}.csv; "
                          f"{DEFAULT_DATA} is the sample shipped with mtl", default=DEFAULT_DATA)
    epoch_mode: str = _help("min_size: undersample every task to the smallest; max_size: cycle smaller tasks; "
                            "fixed_n: n examples per task; proportional/temperature: one task per step",
                            default="min_size")
    examples_per_task: int = _help("examples per task per epoch: for epoch_mode=fixed_n (any number: small tasks "
                                   "repeat), or for min_size to undersample every task to exactly this many "
                                   "(size control: a study's launcher pins the smallest task of the whole study; "
                                   "0: the smallest task of this trial)", default=0)
    temperature: float = _help("task sampling probability ~ size^(1/T) for epoch_mode=temperature", default=2.0)
    on_bad_row: str = _help("'error' stops at a malformed row naming file and line; 'skip' skips and counts",
                            default="error")
    cache_dir: str = _help("tokenization cache folder or URL (default: <out>/token_cache); a sweep shares one",
                           identity=False, default="")
    max_train_rows: int = _help("use a fixed random subset of this many training rows per task (0: all)",
                                default=0)
    max_dev_rows: int = _help("use a fixed random subset of this many dev rows per task (0: all)", default=0)

    def __post_init__(self):
        specs = parse_task_specs(self.task_specs)
        self.tasks = parse_tasks(self.tasks, tuple(s["name"] for s in specs))
        evals = self.eval_tasks.split(",") if isinstance(self.eval_tasks, str) else list(self.eval_tasks)
        self.eval_tasks = parse_tasks(evals, tuple(s["name"] for s in specs), "data.eval_tasks") if any(e.strip() for e in evals) else ()
        both = sorted(set(self.eval_tasks) & set(self.tasks))
        _require(not both, "data.eval_tasks", f"{', '.join(both)} is trained too (eval_tasks are scored only)")
        # A spec of a task this trial does not use is not part of it (a study's base config may
        # hold the specs of all its trials): its identity stays that of the same trial without.
        self.task_specs = tuple(s for s in specs if s["name"] in self.tasks + self.eval_tasks)
        for spec in self.task_specs:
            task_specs.register(spec)
        _require(self.epoch_mode in EPOCH_MODES, "data.epoch_mode",
                 f"{self.epoch_mode!r} is not one of {', '.join(EPOCH_MODES)}")
        _require(self.epoch_mode != "fixed_n" or self.examples_per_task > 0, "data.examples_per_task",
                 "epoch_mode=fixed_n needs examples_per_task > 0")
        _require(self.examples_per_task >= 0, "data.examples_per_task", "must be >= 0")
        _require(self.temperature > 0 and math.isfinite(self.temperature), "data.temperature", "must be > 0")
        _require(self.on_bad_row in ("error", "skip"), "data.on_bad_row", f"{self.on_bad_row!r} is not error|skip")
        _require(self.epoch_mode in ("fixed_n", "min_size") or self.examples_per_task == 0,
                 "data.examples_per_task", "applies to --epoch-mode fixed_n or min_size")
        _require(self.epoch_mode == "temperature" or self.temperature == 2.0, "data.temperature",
                 "applies to --epoch-mode temperature")
        _require(self.max_train_rows >= 0 and self.max_dev_rows >= 0, "data.max_*_rows", "must be >= 0")
        _require_finite(self, "data.")

    @property
    def one_task_per_step(self) -> bool:
        return self.epoch_mode in ("proportional", "temperature")


@dataclass
class OptimConfig:
    lr: float = _help("AdamW learning rate", default=1e-5)
    weight_decay: float = _help("AdamW weight decay (not applied to biases and LayerNorm)", default=0.01)
    eps: float = _help("AdamW epsilon", default=1e-6)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.999)
    batch_size: int = _help("examples per task per micro-batch on each worker", default=8)
    grad_accum: int = _help("micro-batches per optimizer step (same update as an N-times larger batch)", default=1)
    epochs: int = _help("training epochs", default=10)
    max_steps: int = _help("stop after this many optimizer steps in total (0: no limit)", default=0)
    warmup_ratio: float = _help("fraction of steps with linear learning-rate warm-up", default=0.0)
    schedule: str = _help("learning rate after warm-up: 'constant' or 'linear' decay to 0", default="constant")
    grad_clip: float = _help("clip the global gradient norm to this (0: off)", default=0.0)
    optimizer: str = _help("'adamw' (decoupled weight decay), 'adam' (weight decay as an L2 term in the "
                           "gradient) or 'sgd' (with --momentum); --lr, --weight-decay, --eps, --beta1/2 apply "
                           "as each reads them", default="adamw", new=True)
    momentum: float = _help("sgd: momentum", default=0.9, new=True)
    early_stop_patience: int = _help("end the trial after this many evaluations in a row without a better "
                                     "--select-metric (0: train every epoch); its results say so", default=0, new=True)
    early_stop_delta: float = _help("early stopping: an evaluation counts as better only by more than this",
                                    default=0.0, new=True)

    def __post_init__(self):
        _require_finite(self, "optim.")
        _require(self.optimizer in OPTIMIZERS, "optim.optimizer", f"{self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        _require(0 <= self.momentum < 1, "optim.momentum", "must be in [0, 1)")
        _require(self.optimizer == "sgd" or self.momentum == 0.9, "optim.momentum", "applies to --optimizer sgd")
        _require(self.early_stop_patience >= 0, "optim.early_stop_patience", "must be >= 0")
        _require(self.early_stop_delta >= 0, "optim.early_stop_delta", "must be >= 0")
        for name in ("lr", "eps"):
            _require(getattr(self, name) > 0, f"optim.{name}", "must be > 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"optim.{name}", "must be in [0, 1)")
        for name in ("batch_size", "grad_accum", "epochs"):
            _require(getattr(self, name) >= 1, f"optim.{name}", "must be >= 1")
        _require(self.max_steps >= 0, "optim.max_steps", "must be >= 0")
        _require(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
        _require(self.schedule in ("constant", "linear"), "optim.schedule", f"{self.schedule!r} is not constant|linear")
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")


@dataclass
class CombinerConfig:
    combiner: str = _help("how task losses combine: see mtl.combine.COMBINERS", default="sum")
    alpha: float = _help("scalarize, two tasks: weight of the first task (canonical order sst,para,sts); "
                         "the second gets 1-alpha.  A gradient method: its task gradients scaled by 2*alpha and "
                         "2*(1-alpha) before it acts (0.5: the plain method)",
                         methods=("scalarize",) + GRADIENT_METHODS, default=0.5)
    weights: tuple[float, ...] = _help("scalarize, any number of tasks: comma-separated weights summing to 1.  "
                                       "A gradient method: task gradient t scaled by T*w_t before it acts",
                                       methods=("scalarize",) + GRADIENT_METHODS, default=())

    pcgrad_reduction: str = _help("pcgrad: add ('sum', a pair's step matches loss addition) or average ('mean') "
                                  "the projected task gradients", methods=("pcgrad",), default="sum")
    pcgrad_on: str = _help("pcgrad: project gradients of the shared 'params' (exact) or of the shared pooled "
                           "'representation' (one encoder backward; an approximation)", methods=("pcgrad",),
                           default="params")
    pref_vector: tuple[float, ...] = _help("upgrad, dualproj, aligned_mtl, config: comma-separated preference "
                                           "weights of the aggregated gradients (empty: the method's default)",
                                           methods=("upgrad", "dualproj", "aligned_mtl", "config"), default=())
    mgda_epsilon: float = _help("mgda: Frank-Wolfe stops when the weights move less than this",
                                methods=("mgda",), default=1e-3)
    cagrad_c: float = _help("cagrad: radius of the ball around the mean gradient, relative to its norm "
                            "(0: the mean)", methods=("cagrad",), default=0.4)
    aligned_scale: str = _help("aligned_mtl: scale of the aligned gradients: min|median|rmse of the singular values",
                               methods=("aligned_mtl",), default="min")
    gradvac_beta: float = _help("gradvac: EMA rate of the target cosine similarities", methods=("gradvac",),
                                default=0.5)
    fairgrad_alpha: float = _help("fairgrad: alpha-fairness exponent (1: proportional fairness)",
                                  methods=("fairgrad",), default=1.0)
    nash_every: int = _help("nash_mtl: solve for new weights every N steps (keep the last in between)",
                            methods=("nash_mtl",), default=1)
    nash_max_norm: float = _help("nash_mtl: cap on the combined gradient's norm (0: none)", methods=("nash_mtl",),
                                 default=1.0)
    excess_step: float = _help("excess_mtl: step size of the exponentiated-gradient weight update",
                               methods=("excess_mtl",), default=1.0)
    excess_warmup: int = _help("excess_mtl: steps of uniform weights that set the excess-risk baseline",
                               methods=("excess_mtl",), default=0)
    gradnorm_alpha: float = _help("gradnorm: restoring force towards balanced training rates", methods=("gradnorm",),
                                  default=1.5)
    stch_mu: float = _help("stch: smoothing of the max over tasks (smaller: closer to the worst task alone)",
                           methods=("stch",), default=1.0)
    famo_lr: float = _help("famo: learning rate of its task logits (its own Adam)", methods=("famo",), default=0.025)
    famo_decay: float = _help("famo: weight decay of its task logits", methods=("famo",), default=1e-3)
    dwa_temperature: float = _help("dwa: softmax temperature of the loss-descent rates", methods=("dwa",),
                                   default=2.0)
    dtp_alpha: float = _help("dtp: weight of the newest KPI in its moving average", methods=("dtp",), default=0.1)
    dtp_gamma: float = _help("dtp: focusing exponent of -(1-kpi)^gamma log(kpi)", methods=("dtp",), default=1.0)
    dtp_kpi: str = _help("dtp: KPI from 'train' batches (every step) or 'dev' evaluation (every eval)",
                         methods=("dtp",), default="train")
    combiner_lr: float = _help("learning rate of learnable loss weights (uncertainty, imtl_l, gradnorm); "
                               "0: the model's", methods=("uncertainty", "imtl_l", "gradnorm"), default=1e-3)
    conflict_every: int = _help("log task-gradient cosines and norms every N steps (every step for gradient "
                                "methods, which compute them anyway; 0: off)", identity=False, default=50)

    def __post_init__(self):
        _require(self.pcgrad_reduction in ("sum", "mean"), "combiner.pcgrad_reduction",
                 f"{self.pcgrad_reduction!r} is not sum|mean")
        _require(self.pcgrad_on in ("params", "representation"), "combiner.pcgrad_on",
                 f"{self.pcgrad_on!r} is not params|representation")
        _require(0.0 < self.dtp_alpha <= 1.0, "combiner.dtp_alpha", f"{self.dtp_alpha} is outside (0, 1]")
        _require(self.dtp_gamma >= 0.0, "combiner.dtp_gamma", "must be >= 0")
        _require(self.dtp_kpi in ("train", "dev"), "combiner.dtp_kpi", f"{self.dtp_kpi!r} is not train|dev")
        _require(self.combiner_lr >= 0.0, "combiner.combiner_lr", "must be >= 0")
        _require(self.aligned_scale in ("min", "median", "rmse"), "combiner.aligned_scale",
                 f"{self.aligned_scale!r} is not min|median|rmse")
        for name in ("mgda_epsilon", "cagrad_c", "fairgrad_alpha", "nash_max_norm", "excess_step", "gradnorm_alpha",
                     "excess_warmup"):
            _require(getattr(self, name) >= 0, f"combiner.{name}", "must be >= 0")
        _require(0.0 < self.gradvac_beta <= 1.0, "combiner.gradvac_beta", f"{self.gradvac_beta} is outside (0, 1]")
        _require(self.nash_every >= 1, "combiner.nash_every", "must be >= 1")
        _require(self.dwa_temperature > 0, "combiner.dwa_temperature", "must be > 0")
        _require(self.stch_mu > 0, "combiner.stch_mu", "must be > 0")
        _require(self.famo_lr >= 0 and self.famo_decay >= 0, "combiner.famo_lr", "famo_lr and famo_decay must be >= 0")
        _require(self.conflict_every >= 0, "combiner.conflict_every", "must be >= 0")
        _require_finite(self, "combiner.")
        self.weights = _floats(self.weights, "combiner.weights")
        self.pref_vector = _floats(self.pref_vector, "combiner.pref_vector")
        _require(all(math.isfinite(w) and w >= 0 for w in self.pref_vector), "combiner.pref_vector",
                 "every weight must be >= 0")
        _require(math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0, "combiner.alpha",
                 f"{self.alpha} is outside [0, 1]")
        _require(all(math.isfinite(w) and w >= 0 for w in self.weights), "combiner.weights",
                 "every weight must be >= 0")
        _require(not self.weights or abs(sum(self.weights) - 1.0) < 1e-6, "combiner.weights",
                 f"{list(self.weights)} sums to {sum(self.weights):g}, not 1")
        # Both given: which one the method reads would be a silent choice.
        _require(not self.weights or self.alpha == 0.5, "combiner.weights",
                 f"given with --alpha {self.alpha:g}: the method takes one of them (--alpha for a pair, "
                 "--weights for any number of tasks)")

    def unused(self) -> dict[str, tuple[str, ...]]:
        """Settings given another value than their default that the chosen method never reads,
        with the methods that do read them."""
        defaults = CombinerConfig()
        return {f.name: f.metadata["methods"] for f in dataclasses.fields(self)
                if f.metadata.get("methods") and self.combiner not in f.metadata["methods"]
                and getattr(self, f.name) != getattr(defaults, f.name)}


@dataclass
class LossConfig:
    """How each task's loss is computed, beside what its spec says (mtl/losses.py)."""
    task_loss: str = _help("per-task loss as task=name,...: classification cross_entropy; binary bce, "
                           "cosine_embedding or triplet (siamese sentence vectors; in-batch negatives); "
                           "regression mse, l1, smooth_l1 or mse_lasso (MSE + --lasso-weight x the head's L1 "
                           "norm); a task not named: its spec's loss", default="", new=True)
    class_weights: str = _help("classification tasks: per-class loss weights, 'balanced' (n / (K n_k) from the "
                               "training rows) or K colon-separated numbers; per task as task=value,...",
                               default="", new=True)
    embedding_margin: float = _help("cosine_embedding: a negative pair's loss is max(0, cos - margin); triplet: "
                                    "the margin of cosine distances", default=0.5, new=True)
    pair_threshold: float = _help("cosine_embedding/triplet: a pair is predicted a paraphrase when cos(u, v) "
                                  "exceeds this", default=0.5, new=True)
    lasso_weight: float = _help("mse_lasso: weight of the head's L1 norm (mean |w| of its weight matrices)",
                                default=0.01, new=True)

    def __post_init__(self):
        self.task_loss = _per_task_setting(self.task_loss, "loss.task_loss",
                                           _one_of(tuple(sorted({n for v in TASK_LOSSES.values() for n in v}))))
        self.class_weights = _per_task_setting(self.class_weights, "loss.class_weights", _class_weights)
        _require_finite(self, "loss.")
        _require(0.0 <= self.embedding_margin <= 2.0, "loss.embedding_margin", f"{self.embedding_margin} is outside [0, 2]")
        _require(-1.0 <= self.pair_threshold <= 1.0, "loss.pair_threshold", f"{self.pair_threshold} is outside [-1, 1]")
        _require(self.lasso_weight >= 0, "loss.lasso_weight", "must be >= 0")


def _class_weights(v: str) -> str:
    if v == "balanced":
        return ""
    try:
        weights = [float(w) for w in v.split(":")]
    except ValueError:
        return f"{v!r} is not 'balanced' or colon-separated numbers"
    return "" if all(math.isfinite(w) and w >= 0 for w in weights) and any(weights) else \
        f"{v!r}: the weights must be >= 0 and not all 0"


@dataclass
class RegularizeConfig:
    """A term added to the training objective (mtl/regularize): it joins each task's loss before
    the combiner acts, so a gradient method's surgery sees the regularised task gradients."""
    regularizer: str = _help("'none'; 'smart' (adversarial smoothness + Bregman proximal point, Jiang et al. "
                             "2020; per micro-batch 1 + --smart-steps extra encoder forwards, --smart-steps "
                             "backwards to the input embeddings and the term's backward, and with --smart-mu > 0 "
                             "one forward of a momentum copy of the model, whose weights double the model's "
                             "memory and checkpoint); 'l1' or 'linf' (a weight penalty, mean |w| or the mean of "
                             "each weight matrix's max |w|; AdamW's decay stays as set)", default="none", new=True)
    reg_weight: float = _help("weight of the regulariser's term (SMART's lambda_s; the penalty's lambda)",
                              default=1.0, new=True)
    smart_epsilon: float = _help("smart: radius of the perturbation's L-infinity ball on the input embeddings",
                                 default=1e-5, new=True)
    smart_sigma: float = _help("smart: standard deviation of the perturbation's random start", default=1e-5, new=True)
    smart_step: float = _help("smart: step size of each ascent step (on the normalised gradient)", default=1e-3,
                              new=True)
    smart_steps: int = _help("smart: projected-gradient ascent steps", default=1, new=True)
    smart_mu: float = _help("smart: weight of the Bregman proximal point term (0: none, and no momentum copy)",
                            default=1.0, new=True)
    smart_beta: float = _help("smart: momentum of the proximal copy, updated after every optimizer step",
                              default=0.99, new=True)

    def __post_init__(self):
        _require(self.regularizer in REGULARIZERS, "regularize.regularizer",
                 f"{self.regularizer!r} is not one of {', '.join(REGULARIZERS)}")
        _require_finite(self, "regularize.")
        for name in ("reg_weight", "smart_epsilon", "smart_sigma", "smart_step", "smart_mu"):
            _require(getattr(self, name) >= 0, f"regularize.{name}", "must be >= 0")
        _require(1 <= self.smart_steps <= 10, "regularize.smart_steps", f"{self.smart_steps} is outside [1, 10]")
        _require(0 <= self.smart_beta < 1, "regularize.smart_beta", "must be in [0, 1)")
        defaults = RegularizeConfig.__dataclass_fields__
        if self.regularizer != "smart":
            changed = [n for n in defaults if n.startswith("smart_") and getattr(self, n) != defaults[n].default]
            _require(not changed, f"regularize.{changed[0] if changed else ''}", "applies to --regularizer smart")


@dataclass
class ParallelConfig:
    strategy: str = _help("'ddp' (plain PyTorch; DDP across workers) or 'deepspeed'", default="ddp")
    zero_stage: int = _help("deepspeed: ZeRO stage 0-3 (3 also partitions the weights)", default=0)
    offload_optimizer: bool = _help("deepspeed: keep optimizer state in CPU memory (ZeRO-Offload)", default=False)
    # Only what changes the numbers lives here; where the workers run (CPUs, GPUs, retries,
    # partition, time) is the launchers' placement (cluster/core/placement.py), never the trial's.
    workers: int = _help("cluster runs: data-parallel workers per trial", default=1)

    def __post_init__(self):
        _require(self.workers >= 1, "parallel.workers", "must be >= 1")
        _require(self.strategy in ("ddp", "deepspeed"), "parallel.strategy", f"{self.strategy!r} is not ddp|deepspeed")
        _require(self.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"{self.zero_stage} is not 0, 1, 2 or 3")
        _require(self.strategy == "deepspeed" or (self.zero_stage == 0 and not self.offload_optimizer),
                 "parallel.zero_stage", "ZeRO stages and offload need --strategy deepspeed")


@dataclass
class RunConfig:
    out: str = _help("run folder or fsspec URL: checkpoints, TensorBoard logs, results.json", identity=False,
                     default="runs/default")
    seed: int = _help("seed for weights of the heads, sampling and dropout", default=0)
    precision: str = _help("fp32, bf16 (autocast) or fp16 (autocast and a gradient scaler)", default="fp32")
    select_metric: str = _help("dev score that picks the best checkpoint: 'mean' of the tasks' primary "
                               "scores, or task/metric such as sst/acc, para/f1, sts/pearson", default="mean")
    eval_every_epochs: int = _help("dev evaluation (and best-checkpoint choice) every N epochs", default=1)
    save_every_steps: int = _help("also checkpoint every N optimizer steps (0: once per epoch only)", identity=False,
                                  default=0)
    keep_checkpoints: int = _help("how many recent full checkpoints a running trial keeps (a new one is "
                                  "written before the oldest is removed)", identity=False, default=1)
    keep_final_state: bool = _help("keep the last full checkpoint (optimizer state included) when the trial "
                                   "is done; by default a finished trial keeps its best weights, results and "
                                   "logs only", identity=False, default=False)
    allow_ephemeral_out: bool = _help("accept an --out that does not outlive this process (memory://)",
                                      identity=False, default=False)
    log_every_steps: int = _help("TensorBoard scalars every N optimizer steps", identity=False, default=10)
    progress: str = _help("terminal progress bar: auto (when a terminal), on, off", identity=False, default="auto")
    device: str = _help("auto, cpu, cuda or cuda:N", identity=False, default="auto")
    compile: bool = _help("torch.compile the encoder (dynamic shapes: the first steps of each kind compile, "
                          "then run faster; results equal within floating-point tolerance)", identity=False,
                          default=False)
    pad_to_multiple: int = _help("pad each batch's length up to a multiple of N (fewer shapes to compile; "
                                 "tensor-core friendly); 0: 16 with --compile, else 1 (the longest sequence)",
                                 identity=False, default=0)
    carry_heads: bool = _help("with an upstream stage: start the heads of the tasks it trained too from its best "
                              "weights (multi-task, then single-task fine-tuning with the head carried over)",
                              default=False)
    # The stage this trial starts from: the upstream trial's whole configuration (its identity is
    # part of this one's; its out says where its best weights are).  No flag: a chain file or a
    # study's grid sets it (mtl/stages.py).
    upstream: "RunConfig | None" = field(default=None, metadata={
        "help": "the upstream stage's configuration", "identity": True, "methods": (), "flag": False})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    combiner: CombinerConfig = field(default_factory=CombinerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    regularize: RegularizeConfig = field(default_factory=RegularizeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        _require(bool(self.out), "out", "must name a folder or URL")
        _require(0 <= self.seed <= SEED_MAX, "seed", f"{self.seed} is outside [0, {SEED_MAX}]")
        _require(self.precision in PRECISIONS, "precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for name in ("eval_every_epochs", "keep_checkpoints", "log_every_steps"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(self.save_every_steps >= 0, "save_every_steps", "must be >= 0")
        _require(self.pad_to_multiple >= 0, "pad_to_multiple", "must be >= 0")
        _require(self.progress in ("auto", "on", "off"), "progress", f"{self.progress!r} is not auto|on|off")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
                 f"{self.device!r} is not auto, cpu or cuda[:N]")
        if self.select_metric == "overall":
            _require(all(t in self.data.tasks for t in TASK_NAMES), "select_metric",
                     "'overall' (the leaderboard's (SEN acc + PAR acc + (SIM r + 1)/2) / 3) needs sst, para and sts")
        elif self.select_metric != "mean":
            task, _, metric = self.select_metric.partition("/")
            _require(task in self.data.tasks and bool(metric), "select_metric",
                     f"{self.select_metric!r} is not 'mean', 'overall' or task/metric for a task of this run")
        used = self.data.tasks + self.data.eval_tasks
        for section, name in (("model", "pooling"), ("model", "pair_encoding"), ("model", "head_depth"),
                              ("model", "head_activation"), ("model", "head_dropout"), ("model", "head_widths"),
                              ("loss", "task_loss"), ("loss", "class_weights")):
            for task in per_task_tasks(getattr(getattr(self, section), name)):
                _require(task in used, f"{section}.{name}", f"names task {task!r}, not a task of this run "
                                                            f"({', '.join(used)})")
        self._check_task_losses()
        if self.upstream is not None:
            _require(self.upstream.out.rstrip("/") != self.out.rstrip("/"), "upstream.out",
                     f"{self.out} cannot be its own upstream stage")
            _require(self.upstream.model.model == self.model.model, "upstream.model.model",
                     f"the upstream stage trains {self.upstream.model.model!r}, this stage {self.model.model!r}: "
                     "a stage carries the encoder on, so both name the same one")
        # Cross-section checks live with the sections' owners (the combiner registry checks its own fit).

    def _check_task_losses(self) -> None:
        """Each --task-loss fits its task's kind; the embedding losses need the task's two sentence
        vectors (siamese); class weights are for classification tasks, one per class."""
        for task in self.data.tasks + self.data.eval_tasks:
            spec = task_specs.get(task)
            loss = per_task(self.loss.task_loss, task, "")
            if loss:
                _require(loss in TASK_LOSSES.get(spec["kind"], ()), "loss.task_loss",
                         f"{task}: {loss!r} is not a loss of a {spec['kind']} task "
                         f"({', '.join(TASK_LOSSES.get(spec['kind'], ()))})")
            if loss in ("cosine_embedding", "triplet"):
                _require(len(spec["text_columns"]) == 2 and self.model.siamese(task), "loss.task_loss",
                         f"{task}: {loss} needs the pair's two sentence vectors: --pair-encoding siamese "
                         f"(or --pair-encoding {task}=siamese)")
            weights = per_task(self.loss.class_weights, task, "")
            if weights and "=" not in self.loss.class_weights and spec["kind"] != "classification":
                continue            # one value for all: every classification task of the run
            if weights:
                _require(spec["kind"] == "classification", "loss.class_weights",
                         f"{task}: a {spec['kind']} task has no class weights")
                _require(weights == "balanced" or len(weights.split(":")) == spec["classes"], "loss.class_weights",
                         f"{task}: {len(weights.split(':'))} weights for {spec['classes']} classes")

    def embedding_tasks(self) -> frozenset[str]:
        """The tasks trained by an embedding loss (cosine_embedding, triplet): their model output is
        [cos(u, v) - pair_threshold, u, v] and they have no head (mtl.model, mtl.losses)."""
        return frozenset(t for t in self.data.tasks + self.data.eval_tasks
                         if per_task(self.loss.task_loss, t, "") in ("cosine_embedding", "triplet"))

    @property
    def pad_multiple(self) -> int:
        return self.pad_to_multiple or (16 if self.compile else 1)

    # --- dict form -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["data"]["tasks"] = list(self.data.tasks)
        d["data"]["eval_tasks"] = list(self.data.eval_tasks)
        d["data"]["task_specs"] = [dict(s) for s in self.data.task_specs]
        d["upstream"] = self.upstream.to_dict() if self.upstream is not None else None
        d["combiner"]["weights"] = list(self.combiner.weights)
        d["combiner"]["pref_vector"] = list(self.combiner.pref_vector)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return _build(cls, d, prefix="")

    def replace(self, **overrides) -> "RunConfig":
        """A copy with dotted-path overrides, e.g. replace(**{"optim.lr": 2e-5, "seed": 1})."""
        d = self.to_dict()
        for key, value in overrides.items():
            set_dotted(d, key, value)
        return RunConfig.from_dict(d)

    def check_stage(self) -> None:
        """What a stage needs of its upstream (checked before a trial runs, not as the config is
        built: a chain's last stage is built before the stages it starts from)."""
        _require(not self.carry_heads or self.upstream is not None, "carry_heads", "needs an upstream stage")
        if self.data.eval_tasks:
            _require(self.upstream is not None, "data.eval_tasks", "needs an upstream stage (the heads come from it)")
            has = set(self.upstream.data.tasks) | set(self.upstream.data.eval_tasks)
            lacking = [t for t in self.data.eval_tasks if t not in has]
            _require(not lacking, "data.eval_tasks", f"the upstream stage has no head of {', '.join(lacking)} "
                                                     f"(it has {', '.join(sorted(has))})")

    def identity(self) -> dict:
        """What the trial computes: the dict form without the settings marked ``identity=False``
        (storage, logging, checkpoint cadence).  Two configs with equal identities train the same
        numbers, wherever and however they run."""
        d = self.to_dict()
        for key in NON_IDENTITY:
            section, _, name = key.rpartition(".")
            (d[section] if section else d).pop(name)
        for key in ("task_specs", "eval_tasks"):     # unused: identities as before these settings existed
            if not d["data"][key]:
                del d["data"][key]
        # Settings added with stages leave a one-stage trial's identity as it was before them.
        for key, default in (("upstream", None), ("carry_heads", False)):
            if d[key] == default:
                del d[key]
        if not d["model"]["freeze_encoder"]:
            del d["model"]["freeze_encoder"]
        for key, default in NEW_AT_DEFAULT.items():      # settings added later, at their defaults
            section, _, name = key.rpartition(".")
            node = d[section] if section else d
            if node.get(name) == default:
                del node[name]
        for section in ("loss", "regularize"):
            if not d[section]:
                del d[section]
        if self.upstream is not None:
            d["upstream"] = self.upstream.identity()
        return d

    def identity_changes(self, other: "RunConfig") -> str:
        """'' when both compute the same trial, else the settings that differ, as one line."""
        a, b = flatten(self.identity()), flatten(other.identity())
        return "; ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))

    def fingerprint(self) -> str:
        """Short stable hash of the identity."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:10]


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "combiner": CombinerConfig,
            "loss": LossConfig, "regularize": RegularizeConfig, "parallel": ParallelConfig}


# Placement settings that earlier versions kept in the run configuration: configs saved then
# (checkpoints, results.json) still load, and the settings are dropped (cluster/core/placement.py).
MOVED_TO_PLACEMENT = {"cpus_per_worker", "gpus_per_worker", "max_failures"}


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(d).__name__}")
    if cls is ParallelConfig:
        d = {k: v for k, v in d.items() if k not in MOVED_TO_PLACEMENT}
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field")
    kwargs = {}
    for name, value in d.items():
        sub = SECTIONS.get(name) if cls is RunConfig else None
        if cls is RunConfig and name == "upstream":
            kwargs[name] = None if value is None else _build(RunConfig, value, prefix="upstream.")
        elif sub is not None:
            kwargs[name] = _build(sub, value, prefix=f"{name}.")
        else:
            kwargs[name] = _coerce(known[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value, name: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int" and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {kind}")
    return value


def set_dotted(d: dict, key: str, value) -> None:
    """Set d['a']['b'] for key 'a.b'; a bare field name is looked up in the sections too."""
    parts = key.split(".")
    names_a_section = (len(parts) == 1 and parts[0] in SECTIONS and isinstance(d.get(parts[0]), dict)
                       and not isinstance(value, dict))
    if len(parts) == 1 and (parts[0] not in d or names_a_section):
        owners = [s for s in SECTIONS if parts[0] in d.get(s, {})]
        if len(owners) != 1:
            raise ConfigError(f"{key}: unknown field")
        parts = [owners[0], parts[0]]
    node = d
    for p in parts[:-1]:
        if p not in node or not isinstance(node[p], dict):
            raise ConfigError(f"{key}: unknown field")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"{key}: unknown field")
    node[parts[-1]] = value


def _non_identity() -> tuple[str, ...]:
    keys = [f.name for f in dataclasses.fields(RunConfig) if not f.metadata.get("identity", True)]
    keys += [f"{name}.{f.name}" for name, section in SECTIONS.items() for f in dataclasses.fields(section)
             if not f.metadata.get("identity", True)]
    return tuple(keys)


def field_docs() -> list[tuple[str, str, dataclasses.Field]]:
    """(flag name, dotted key, field) for every leaf setting; flag names are unique by design."""
    out = []
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("flag") is False:
            continue
        if f.name in SECTIONS:
            for sf in dataclasses.fields(SECTIONS[f.name]):
                out.append((sf.name, f"{f.name}.{sf.name}", sf))
        else:
            out.append((f.name, f.name, f))
    names = [n for n, _, _ in out]
    assert len(names) == len(set(names)), "config field names must be unique to make flat CLI flags"
    return out


NON_IDENTITY = _non_identity()


def _new_at_default() -> dict:
    out = {}
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("new"):
            out[f.name] = f.default
    for name, section in SECTIONS.items():
        for f in dataclasses.fields(section):
            if f.metadata.get("new"):
                out[f"{name}.{f.name}"] = f.default
    return out


NEW_AT_DEFAULT = _new_at_default()
