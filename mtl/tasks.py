"""One spec per task: its files and columns, how a label is read and checked, the head's
output, its loss and its dev metrics.  Everything task-specific lives here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mtl import scores


@dataclass(frozen=True)
class TaskSpec:
    name: str               # short name used on the command line: sst, para, sts
    title: str              # SEN / PAR / SIM, as the studies call them
    file_prefix: str        # <prefix>-train.csv, <prefix>-dev.csv
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

    def kpi(self, output: torch.Tensor, labels: torch.Tensor) -> float:
        """A batch's score in [0, 1]: accuracy, or Pearson's r mapped from [-1, 1]."""
        pred = self.output(output.detach()).cpu()
        if self.regression:
            return (scores.pearson(pred, labels.cpu()) + 1.0) / 2.0
        return scores.accuracy(pred, labels.cpu().long())

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    def file(self, split: str) -> str:
        return f"{self.file_prefix}-{split}.csv"


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


def _sentiment(text: str) -> float:
    value = _number(text)
    if not value.is_integer() or not 0 <= value <= 4:
        raise ValueError(f"sentiment {text.strip()!r} is not an integer in 0..4")
    return value


def _duplicate(text: str) -> float:
    value = _number(text)
    if value not in (0.0, 1.0):
        raise ValueError(f"is_duplicate {text.strip()!r} is not 0 or 1")
    return value


def _similarity(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 5.0:
        raise ValueError(f"similarity {text.strip()!r} is outside 0..5")
    return value


SIM_SCALE = 5.0

SST = TaskSpec(
    name="sst", title="SEN", file_prefix="sst", text_columns=("sentence",), label_column="sentiment",
    num_outputs=5, primary_metric="acc", parse_label=_sentiment,
    loss=lambda logits, y: F.cross_entropy(logits.float(), y.long(), reduction="none"),
    output=lambda logits: logits.argmax(-1),
    metrics=lambda p, y: {"acc": scores.accuracy(p, y.long()), "f1_macro": scores.f1_macro(p, y.long(), 5)},
    metric_names=("acc", "f1_macro"), output_header="Predicted_Sentiment",
)
PARA = TaskSpec(
    name="para", title="PAR", file_prefix="quora", text_columns=("sentence1", "sentence2"),
    label_column="is_duplicate", num_outputs=1, primary_metric="acc", parse_label=_duplicate,
    loss=lambda logits, y: F.binary_cross_entropy_with_logits(logits.float().squeeze(-1), y.float(), reduction="none"),
    output=lambda logits: (logits.squeeze(-1) > 0).long(),
    metrics=lambda p, y: {"acc": scores.accuracy(p, y.long()), "f1": scores.f1_binary(p, y.long())},
    metric_names=("acc", "f1"), output_header="Predicted_Is_Paraphrase",
)
# SIM's activation maps the head onto the label range 0..5 (sigmoid scaled), so the MSE is on scores.
STS = TaskSpec(
    name="sts", title="SIM", file_prefix="sts", text_columns=("sentence1", "sentence2"),
    label_column="similarity", num_outputs=1, primary_metric="pearson", parse_label=_similarity,
    loss=lambda score, y: F.mse_loss(score.float().squeeze(-1), y.float(), reduction="none"),
    output=lambda score: score.squeeze(-1).float(),
    metrics=lambda p, y: {"pearson": scores.pearson(p, y), "spearman": scores.spearman(p, y)},
    metric_names=("pearson", "spearman"), regression=True,
    output_header="Predicted_Similiary",    # sic: the course's leaderboard spells it so
)

TASKS: dict[str, TaskSpec] = {t.name: t for t in (SST, PARA, STS)}
