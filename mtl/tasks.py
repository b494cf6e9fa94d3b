"""One TaskSpec per task, built from its spec (mtl.task_specs: the data form): how a label is
read and checked, the head's output, its loss and its dev metrics.  Everything task-specific
lives here; the built-in sst, para and sts are specs like any user's."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mtl import scores, task_specs


@dataclass(frozen=True)
class TaskSpec:
    name: str               # short name used on the command line: sst, para, sts
    title: str              # SEN / PAR / SIM, as the studies call them
    files: str              # file name pattern under data_dir, with {split}
    text_columns: tuple[str, ...]
    label_column: str
    num_outputs: int
    primary_metric: str
    parse_label: Callable[[str], float]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # per-example losses
    output: Callable[[torch.Tensor], torch.Tensor]               # head logits -> prediction in label space
    metrics: Callable[[torch.Tensor, torch.Tensor], dict]
    metric_names: tuple[str, ...]          # the keys ``metrics`` returns, primary first
    regression: bool = False
    output_header: str = ""                # the leaderboard CSV's prediction column
    label_range: tuple[float, float] = (0.0, 1.0)   # regression: what the head's activation maps onto
    label_names: tuple[str, ...] = ()      # the file's label texts, in class order ('' : numbers)
    sources: tuple[str, ...] = ()          # an mlm task on other tasks' sentences: those tasks
    mlm: bool = False                      # masked language modelling: the labels are masked tokens

    def kpi(self, output: torch.Tensor, labels: torch.Tensor) -> float:
        """A batch's score in [0, 1]: accuracy, or Pearson's r mapped from [-1, 1]."""
        pred = self.output(output.detach()).cpu()
        if self.mlm:
            return _masked_acc(pred)
        if self.regression:
            return (scores.pearson(pred, labels.cpu()) + 1.0) / 2.0
        return scores.accuracy(pred, labels.cpu().long())

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    def file(self, split: str) -> str:
        return self.files.format(split=split)

    def activate(self, out: torch.Tensor) -> torch.Tensor:
        """The head's raw output -> what the loss reads: a regression head's sigmoid scaled onto
        the label range (so the loss is on scores), logits as they are otherwise."""
        if not self.regression:
            return out
        low, high = self.label_range
        return low + (high - low) * torch.sigmoid(out.float())

    def label_text(self, value: float) -> str:
        """A prediction as the leaderboard's files write it: a class index (named labels too,
        so the file reads back as numbers), 0.0/1.0, or the score."""
        if self.regression:
            return repr(float(value))
        return str(int(value)) if self.num_outputs > 1 else f"{float(value):.1f}"


def _number(text: str) -> float:
    text = text.strip()
    if not text:
        raise ValueError("label is empty")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"label {text!r} is not a number") from None
    if value != value:
        raise ValueError("label is NaN")
    return value


def _label_parser(spec: dict) -> Callable[[str], float]:
    column, kind = spec["label_column"], spec["kind"]
    if spec["labels"]:
        index = {name: float(i) for i, name in enumerate(spec["labels"])}

        def by_name(text: str) -> float:
            value = index.get(text.strip())
            if value is None:
                raise ValueError(f"{column} {text.strip()!r} is not one of {', '.join(spec['labels'])}"
                                 if text.strip() else "label is empty")
            return value
        return by_name
    if kind == "regression":
        low, high = spec["range"]

        def in_range(text: str) -> float:
            value = _number(text)
            if not low <= value <= high:
                raise ValueError(f"{column} {text.strip()!r} is outside {low:g}..{high:g}")
            return value
        return in_range
    if kind == "binary":
        def zero_one(text: str) -> float:
            value = _number(text)
            if value not in (0.0, 1.0):
                raise ValueError(f"{column} {text.strip()!r} is not 0 or 1")
            return value
        return zero_one
    classes = spec["classes"]

    def class_index(text: str) -> float:
        value = _number(text)
        if not value.is_integer() or not 0 <= value < classes:
            raise ValueError(f"{column} {text.strip()!r} is not an integer in 0..{classes - 1}")
        return value
    return class_index


# A binary task's output is read at column 0: a head's (B, 1) logit, or the (B, 1 + 2H) output of
# an embedding loss's task, [cos(u, v) - threshold, u, v] (mtl.losses), so one spec serves both.
# On (B, 1) this reads the numbers ``squeeze(-1)`` did: the same loss, bit for bit.
LOSSES = {      # per-example losses by name: the specs' and --task-loss's (mtl.losses)
    "cross_entropy": lambda logits, y: F.cross_entropy(logits.float(), y.long(), reduction="none"),
    "bce": lambda logits, y: F.binary_cross_entropy_with_logits(logits.float()[..., 0], y.float(), reduction="none"),
    "mse": lambda score, y: F.mse_loss(score.float().squeeze(-1), y.float(), reduction="none"),
    "l1": lambda score, y: F.l1_loss(score.float().squeeze(-1), y.float(), reduction="none"),
    "smooth_l1": lambda score, y: F.smooth_l1_loss(score.float().squeeze(-1), y.float(), reduction="none"),
}
_OUTPUTS = {
    "classification": lambda logits: logits.argmax(-1),
    "binary": lambda logits: (logits[..., 0] > 0).long(),
    "regression": lambda score: score.squeeze(-1).float(),
}


def _metric(name: str, classes: int) -> Callable[[torch.Tensor, torch.Tensor], float]:
    return {"acc": lambda p, y: scores.accuracy(p, y.long()),
            "f1_macro": lambda p, y: scores.f1_macro(p, y.long(), classes),
            "f1": lambda p, y: scores.f1_binary(p, y.long()),
            "balanced_acc": lambda p, y: scores.balanced_accuracy(p, y.long(), classes),
            "precision_macro": lambda p, y: scores.precision_macro(p, y.long(), classes),
            "recall_macro": lambda p, y: scores.recall_macro(p, y.long(), classes),
            "precision": lambda p, y: scores.precision(p, y.long(), 1),      # of the positive class
            "recall": lambda p, y: scores.recall(p, y.long(), 1),
            "pearson": scores.pearson, "spearman": scores.spearman}[name]


def class_names(spec: dict) -> list[str]:
    """What per-class metric names call each class: its label text (letters, digits, '_', '-' and
    '.' kept, anything else '_', so the name stays one word for --select-metric and TensorBoard),
    or its index when the spec has no labels or two labels would read alike."""
    classes = spec["classes"] or 2
    if spec["labels"]:
        names = ["".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in label) for label in spec["labels"]]
        if len(set(names)) == len(names):
            return names
    return [str(k) for k in range(classes)]


def _metric_fns(spec: dict) -> dict[str, Callable[[torch.Tensor, torch.Tensor], float]]:
    """Metric key -> function, in the spec's order (primary first); the per_class_acc group gives
    one key per class, acc_<class>, each that class's recall (so the keys depend on the classes)."""
    classes = spec["classes"] or 2
    fns = {}
    for name in spec["metrics"]:
        if name == "per_class_acc":
            for k, label in enumerate(class_names(spec)):
                fns[f"acc_{label}"] = lambda p, y, k=k: scores.recall(p, y.long(), k)
        else:
            fns[name] = _metric(name, classes)
    return fns


def _masked_acc(pred: torch.Tensor) -> float:
    """Masked-token accuracy from per-example (correct, masked) counts."""
    return float(pred[:, 0].sum() / pred[:, 1].sum().clamp(min=1))


def _build_mlm(spec: dict) -> TaskSpec:
    """An mlm task's head (mtl.model) returns per example: the summed cross-entropy of its
    masked tokens, how many it predicted right, and how many were masked.  The loss is the
    first, summed over examples and divided by their global count as every task's is."""
    return TaskSpec(
        name=spec["name"], title=spec["title"], files=spec["files"] or "", text_columns=tuple(spec["text_columns"]),
        label_column="", num_outputs=0, primary_metric="masked_acc", parse_label=float,
        loss=lambda out, y: out[:, 0].float(), output=lambda out: out[:, 1:].float(),
        metrics=lambda p, y: {"masked_acc": _masked_acc(p)}, metric_names=("masked_acc",),
        sources=tuple(spec["sources"] or ()), mlm=True)


def build(spec: dict) -> TaskSpec:
    """The TaskSpec of a normalised spec (mtl.task_specs.normalise)."""
    if spec["kind"] == "mlm":
        return _build_mlm(spec)
    kind, fns = spec["kind"], _metric_fns(spec)
    return TaskSpec(
        name=spec["name"], title=spec["title"], files=spec["files"], text_columns=tuple(spec["text_columns"]),
        label_column=spec["label_column"], num_outputs=spec["classes"] if kind == "classification" else 1,
        primary_metric=spec["primary_metric"], parse_label=_label_parser(spec), loss=LOSSES[spec["loss"]],
        output=_OUTPUTS[kind], metrics=lambda p, y: {m: fn(p, y) for m, fn in fns.items()}, metric_names=tuple(fns),
        regression=kind == "regression", output_header=spec["output_header"],
        label_range=tuple(spec["range"]) if kind == "regression" else (0.0, 1.0),
        label_names=tuple(spec["labels"] or ()))


class _Registry(Mapping):
    """Task name -> TaskSpec: the built-in specs and every user spec a configuration of this
    process registered (mtl.config.DataConfig); built once per spec."""

    def __init__(self):
        self._built: dict[str, tuple[dict, TaskSpec]] = {}

    def __getitem__(self, name: str) -> TaskSpec:
        spec = task_specs.get(name)
        if spec is None:
            raise KeyError(name)
        built = self._built.get(name)
        if built is None or built[0] is not spec:
            built = self._built[name] = (spec, build(spec))
        return built[1]

    def __iter__(self):
        return iter(task_specs.known_names())

    def __len__(self) -> int:
        return len(task_specs.known_names())


TASKS: Mapping[str, TaskSpec] = _Registry()
SST, PARA, STS = TASKS["sst"], TASKS["para"], TASKS["sts"]
