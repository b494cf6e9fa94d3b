"""Evaluation: a model's predictions on encoded splits and their metrics, one way for the
training loop (dev scores, best-weights choice), ``mtl.evaluate`` (any split, the leaderboard's
files) and the study (the metric names TensorBoard's HParams columns are declared with)."""
from __future__ import annotations

import torch

from mtl.data import eval_order, make_batch
from mtl.model import MultiTaskModel
from mtl.tasks import TASKS


EVAL_MASK_SEED = 7_000_003


@torch.no_grad()
def predict(model: MultiTaskModel, dev: dict, batch_size: int, autocast, device,
            pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Each task's predictions (in label space), in the order of its examples."""
    was_training = model.training
    model.eval()
    predictions = {}
    for task, enc in dev.items():
        spec = TASKS[task]
        order = eval_order(enc)
        preds = []
        for chunk in order.split(batch_size):
            # An mlm task's dev masks are fixed (by each chunk's first example): every evaluation
            # scores the same masked tokens.
            batch = make_batch(enc, chunk, pad_multiple, mask_seed=EVAL_MASK_SEED + int(chunk[0]))
            with autocast():
                out = model.task_output(task, batch.to(device))
            preds.append(spec.output(out).cpu())
        pred = torch.empty((len(enc), *preds[0].shape[1:]), dtype=preds[0].dtype)
        pred[order] = torch.cat(preds)
        predictions[task] = pred
    model.train(was_training)
    return predictions


# The course leaderboard's overall score, of the three reference tasks' dev scores.
OVERALL_OF = ("sst", "para", "sts")


def metric_names(tasks) -> list[str]:
    """Every key ``score`` returns for these tasks (TensorBoard's HParams columns are declared
    with them): each task's metrics, 'mean', and 'overall' when sst, para and sts are scored."""
    tasks = list(tasks)
    overall = ["overall"] if all(t in tasks for t in OVERALL_OF) else []
    return [f"{t}/{m}" for t in tasks for m in TASKS[t].metric_names] + ["mean"] + overall


def overall(metrics: dict[str, float]) -> float:
    """The leaderboard's (SEN acc + PAR acc + (SIM r + 1) / 2) / 3: Pearson's r mapped onto [0, 1]
    so the three weigh alike."""
    return (metrics["sst/acc"] + metrics["para/acc"] + (metrics["sts/pearson"] + 1.0) / 2.0) / 3.0


def score(predictions: dict[str, torch.Tensor], dev: dict, mean_of=None) -> dict[str, float]:
    """Each task's dev metrics and their 'mean' over the primary metrics of ``mean_of`` (default:
    every task predicted; a trial's trained tasks, not those it only scores); 'overall' too when
    sst, para and sts are among the tasks predicted."""
    metrics = {f"{t}/{name}": value for t, pred in predictions.items()
               for name, value in TASKS[t].metrics(pred, dev[t].labels).items()}
    mean_of = list(predictions) if mean_of is None else list(mean_of)
    metrics["mean"] = sum(metrics[f"{t}/{TASKS[t].primary_metric}"] for t in mean_of) / len(mean_of)
    if all(t in predictions for t in OVERALL_OF):
        metrics["overall"] = overall(metrics)
    return metrics
