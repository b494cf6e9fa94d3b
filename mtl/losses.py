"""Each trained task's loss: its spec's, or the one --task-loss names, with --class-weights.

``build_losses`` gives, per task, ``fn(out, labels) -> per-example losses``.  The trainer sums
them and scales the sum by world_size / the step's global example count (Trainer.shares), so a
loss that is per example adds up to the exact global mean over any split of a step into workers
and micro-batches.  Every loss here is per example but the triplet loss's in-batch negatives
(see ``triplet``).

The embedding losses (cosine_embedding, triplet) read a siamese pair task's output
[cos(u, v) - pair_threshold, u, v], shape (B, 1 + 2H): the model builds no head for such a task
(mtl.model; ``RunConfig.embedding_tasks``).  Column 0 is what the binary spec's output, kpi and
bce read (mtl.tasks), so a paraphrase is predicted where cos(u, v) > pair_threshold.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mtl.config import RunConfig, per_task
from mtl.errors import ConfigError
from mtl.tasks import LOSSES, TASKS, TaskSpec

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EMBEDDING_LOSSES = ("cosine_embedding", "triplet")


def build_losses(cfg: RunConfig, tasks, raw_train: dict) -> dict[str, LossFn]:
    """Task name -> its per-example loss.  ``tasks``: the trained tasks (TaskSpecs or names);
    ``raw_train``: their training rows as the trial trains on them (after --max-train-rows), whose
    labels 'balanced' class weights are counted from.  A task with no setting keeps its spec's
    loss function itself: default trials compute exactly what they did before."""
    losses = {}
    for task in tasks:
        spec = task if isinstance(task, TaskSpec) else TASKS[task]
        name = per_task(cfg.loss.task_loss, spec.name, "")
        if name in EMBEDDING_LOSSES:
            losses[spec.name] = _embedding_loss(name, cfg)
        elif name == "mse_lasso":
            # Per example this is MSE; the Lasso term (lasso_weight x mean |w| of the head's
            # weight matrices) is a task-scoped term the regularisers add once per step
            # (mtl.regularize): it is not a per-example quantity.
            losses[spec.name] = LOSSES["mse"]
        else:
            losses[spec.name] = LOSSES[name] if name else spec.loss
        weights = per_task(cfg.loss.class_weights, spec.name, "")
        if weights and spec.num_outputs > 1:      # one value for all: the classification tasks only
            losses[spec.name] = weighted_cross_entropy(class_weights(weights, spec, raw_train[spec.name].labels))
    return losses


def _embedding_loss(name: str, cfg: RunConfig) -> LossFn:
    margin = cfg.loss.embedding_margin
    if name == "cosine_embedding":
        return lambda out, labels: cosine_embedding(out, labels, margin)
    return lambda out, labels: triplet(out, labels, margin)


# ---------------------------------------------------------------------------------------------
# Class weights
# ---------------------------------------------------------------------------------------------
def class_weights(value: str, spec: TaskSpec, labels) -> torch.Tensor:
    """K per-class weights: 'balanced', n / (K n_k) over the training labels (sklearn's
    'balanced'; a class with no training row gets 0: no example ever carries its weight, and 0
    keeps a finite tensor), or K colon-separated numbers."""
    k = spec.num_outputs
    if value != "balanced":
        weights = [float(w) for w in value.split(":")]
        if len(weights) != k:
            raise ConfigError(f"loss.class_weights: {spec.name}: {len(weights)} weights for {k} classes")
        return torch.tensor(weights, dtype=torch.float32)
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.float64).long(), minlength=k).double()
    if counts.sum() == 0:
        raise ConfigError(f"loss.class_weights: {spec.name}: 'balanced' needs training rows to count")
    weights = torch.where(counts > 0, counts.sum() / (k * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def weighted_cross_entropy(weights: torch.Tensor) -> LossFn:
    """Per example w_y x CE(logits, y).  Not PyTorch's ``cross_entropy(weight=...)`` mean, which
    divides by the batch's sum of weights: that is a ratio per micro-batch, so it would not add
    up to the global mean over workers and micro-batches as the trainer's sums do.  The weights
    go to the logits' device once (one small copy), then stay there."""
    on: dict[torch.device, torch.Tensor] = {}

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = on.get(logits.device)
        if w is None:
            w = on[logits.device] = weights.to(logits.device)
        y = labels.long()
        return w[y] * F.cross_entropy(logits.float(), y, reduction="none")
    return loss


# ---------------------------------------------------------------------------------------------
# Embedding losses on [cos(u, v) - threshold, u, v]
# ---------------------------------------------------------------------------------------------
def split_embeddings(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u and v, the pooled sentence vectors, from an embedding task's (B, 1 + 2H) output."""
    width = out.shape[-1] - 1
    if out.dim() != 2 or width < 2 or width % 2:
        raise ValueError(f"an embedding loss reads [cos(u, v) - threshold, u, v] of shape (B, 1 + 2H); got "
                         f"{tuple(out.shape)} (does the model build this task without a head?)")
    h = width // 2
    return out[:, 1:1 + h].float(), out[:, 1 + h:].float()


def cosine_embedding(out: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Per pair: 1 - cos(u, v) for a paraphrase (y = 1); max(0, cos(u, v) - margin) otherwise.
    cos is recomputed from u and v (column 0 also holds it, less the threshold, but the loss
    does not depend on the threshold)."""
    u, v = split_embeddings(out)
    cos = F.cosine_similarity(u, v, dim=-1)
    positive = labels.float() > 0.5
    return torch.where(positive, 1.0 - cos, (cos - margin).clamp(min=0.0))


def triplet(out: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Triplet loss with in-batch negatives, on cosine distances d = 1 - cos.  For a paraphrase
    pair i (y_i = 1): anchor u_i, positive v_i, negatives every v_j, j != i, of this micro-batch;
    its loss is the mean over them of max(0, d(u_i, v_i) - d(u_i, v_j) + margin).  A pair with
    y_i = 0 has loss 0 and serves as a negative only; a one-pair batch has no negative: 0.

    The one loss here not exact across worker counts: an example's negatives are the other
    examples of its micro-batch on its worker, so splitting a step over more workers or
    micro-batches gives each example fewer (and other) negatives and changes its loss itself,
    not only how the sums add up.  It costs a B x B cosine matrix per micro-batch."""
    u, v = split_embeddings(out)
    b = u.shape[0]
    distance = 1.0 - F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T        # d(u_i, v_j)
    positive = distance.diagonal().unsqueeze(1)                                # d(u_i, v_i)
    hinge = (positive - distance + margin).clamp(min=0.0)
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=u.device)
    per_anchor = (hinge * off_diagonal).sum(1) / max(b - 1, 1)
    return torch.where(labels.float() > 0.5, per_anchor, torch.zeros_like(per_anchor))
