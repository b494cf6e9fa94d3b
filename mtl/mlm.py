"""Masked language modelling (BERT's MLM objective) as pure parts: masking, the checkpoint's own
prediction head tied to the encoder being trained, the summed loss, accuracy counts, the corpus.

Nothing here touches the trainer.  A step would run, per micro-batch::

    special = special_mask(ids, special_ids(tokenizer))            # once per batch, or cached
    masked, labels = mask_tokens(ids, attn, special, tokenizer.mask_token_id, len(tokenizer), gen)
    hidden = encoder(input_ids=masked, attention_mask=attn).last_hidden_state
    keep = labels != -100                                          # the head only where it is scored
    loss_sum, n = mlm_loss(head(hidden[keep]), labels[keep])       # (~15% of the [B, L, V] logits; one sync)

and divide ``loss_sum`` by the step's global ``n`` (summed over micro-batches and workers), as
every other loss of the project is divided by its global count of examples.

Importing this module loads neither torch nor transformers (``sentences`` needs neither); each
function imports what it uses.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from mtl.errors import ConfigError

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

IGNORE = -100               # the label of a position the loss skips (cross_entropy's ignore_index)
MASK_SHARE = 0.8            # of the chosen tokens: replaced by [MASK] ...
RANDOM_SHARE = 0.1          # ... by a uniformly random id; the remaining 0.1 stay as they are


def special_ids(tokenizer) -> set[int]:
    """The ids never chosen for masking: the tokenizer's special tokens ([CLS], [SEP], [PAD],
    [MASK], and [UNK], whose prediction teaches nothing)."""
    return set(tokenizer.all_special_ids)


def special_mask(input_ids: torch.Tensor, tokenizer_special_ids: set[int] | torch.Tensor) -> torch.Tensor:
    """True where ``input_ids`` holds a special token, in one vectorised ``torch.isin``.
    Passing a set copies it to the ids' device on every call; a tensor built once avoids that."""
    import torch

    test = torch.as_tensor(sorted(tokenizer_special_ids) if isinstance(tokenizer_special_ids, (set, frozenset))
                           else tokenizer_special_ids, dtype=input_ids.dtype)
    return torch.isin(input_ids, test.to(input_ids.device))


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, special_tokens_mask: torch.Tensor,
                mask_id: int, vocab_size: int, generator: torch.Generator,
                probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of a batch [B, L]: (masked input ids, labels), both int64.

    Each real token (attention 1, not special) is chosen with ``probability``, independently
    (a plain Bernoulli: a row, or a whole batch, may have no chosen token; its labels are then
    all -100 and ``mlm_loss`` returns a zero that still back-propagates).  Of the chosen, 80%
    become ``mask_id``, 10% a token id drawn uniformly from [0, vocab_size) (it may be a
    special id or the original token, as in BERT), 10% stay.  Labels hold the original id at
    chosen positions and -100 elsewhere.  ``vocab_size`` should be ``len(tokenizer)``: the ids
    the tokenizer produces, not padded embedding rows nobody trains.

    Deterministic given ``generator``: three draws of the batch's shape, whatever the ids, so
    the generator's position after the call depends only on the shape (a resumed run that
    re-seeds per step and rank masks identically).  The draws happen on the generator's
    device: a CPU generator with CUDA ids costs three small host-to-device copies per call,
    and a CPU and a CUDA generator with the same seed give different masks.
    """
    import torch

    if not 0.0 <= probability <= 1.0:
        raise ConfigError(f"mlm: the masking probability must lie in [0, 1], not {probability}")
    if special_tokens_mask.shape != input_ids.shape:
        raise ValueError(f"special_tokens_mask {tuple(special_tokens_mask.shape)} is not input_ids' "
                         f"{tuple(input_ids.shape)}")
    shape, device, where = input_ids.shape, generator.device, input_ids.device
    choose = torch.rand(shape, generator=generator, device=device).to(where)
    kind = torch.rand(shape, generator=generator, device=device).to(where)
    random_ids = torch.randint(0, vocab_size, shape, generator=generator, device=device, dtype=torch.long).to(where)

    ids = input_ids.long()
    maskable = ~special_tokens_mask.bool()
    if attention_mask is not None:      # padding is special too; this also covers a pad id a real token shares
        maskable &= attention_mask.bool()
    chosen = maskable & (choose < probability)
    masked = torch.where(chosen & (kind < MASK_SHARE), torch.full_like(ids, mask_id), ids)
    to_random = chosen & (kind >= MASK_SHARE) & (kind < MASK_SHARE + RANDOM_SHARE)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return masked, labels


def build_mlm_head(model_path: str, encoder: nn.Module) -> tuple[nn.Module, bool]:
    """The checkpoint's masked-LM head (``model_path``: a folder or hub name, as
    mtl.model.resolve_model_path gives it), hidden states [..., H] -> logits [..., V], its decoder
    weight tied to ``encoder``'s input embeddings; and whether its weights came from the
    checkpoint (every head weight but the tied decoder weight, which BERT checkpoints do not
    store apart from the embeddings).  Without them, transformers initialises the head afresh.

    The head is the architecture's own module (``BertOnlyMLMHead`` for BERT): the child of
    ``AutoModelForMaskedLM`` that is not its base model and holds its output embeddings.  An
    architecture whose head is spread over several children (DistilBERT, ELECTRA) is refused.

    The embedded all-MiniLM-L6-v2 (a sentence-transformers checkpoint: ``BertModel`` weights
    only) has no MLM head: every ``cls.predictions.*`` weight is missing, so the head comes
    back fresh and the flag is False.

    Hidden cost: ``from_pretrained`` loads the whole checkpoint, encoder included, once more;
    that second encoder is dropped on return (its memory is only held during the call).
    """
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    # The load report calls a head-less checkpoint "corrupted"; the returned flag says it plainly.
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(model_path, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"mlm: cannot load a masked-LM model from {model_path!r}: {exc}".splitlines()[0]) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    name, head = _head_child(model)
    _tie(head, model.get_output_embeddings(), encoder)
    return head, not any(k == name or k.startswith(name + ".") for k in _not_loaded(info))


def _not_loaded(info: dict) -> set[str]:
    """The weights transformers initialised itself: missing, or of another shape (a list or a set,
    and mismatches as (key, shapes...) tuples, depending on the transformers version)."""
    mismatched = {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())}
    return set(info.get("missing_keys", ())) | mismatched


def _head_child(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the masked-LM model's one child, besides its base model, with weights."""
    out = model.get_output_embeddings()
    rest = [(n, m) for n, m in model.named_children()
            if n != model.base_model_prefix and next(m.parameters(), None) is not None]
    if out is None or len(rest) != 1 or not any(out is m for m in rest[0][1].modules()):
        raise ConfigError(f"mlm: {type(model).__name__}'s head is not one module holding its output embeddings "
                          f"(children besides {model.base_model_prefix!r}: {[n for n, _ in rest]})")
    return rest[0]


def _tie(head: nn.Module, decoder: nn.Module, encoder: nn.Module) -> None:
    """Make the decoder's weight the encoder's input-embedding weight (the same Parameter), and
    move the rest of the head to that weight's device and dtype.

    Tied, it is one parameter, not two, for the optimizer: ``named_parameters()`` of a module
    holding both encoder and head yields it once (so ``mtl.optim.build_optimizer`` counts it
    once when the head is a submodule of the model it is given).  Listing ``head.parameters()``
    beside the encoder's would pass it twice: torch refuses it in two groups, and in one group
    only warns and then steps it twice (AdamW: two updates and step count 2 per step).  Its
    gradient sums both uses (input lookup and output projection), one AdamW state, weight decay
    as a matrix.  The head's other weights (and its own bias) stay its own.
    """
    embedding = encoder.get_input_embeddings().weight
    if decoder.weight.shape != embedding.shape:
        raise ConfigError(f"mlm: the head's decoder {tuple(decoder.weight.shape)} cannot tie to the encoder's "
                          f"embeddings {tuple(embedding.shape)}: a different vocabulary or width")
    decoder.weight = embedding
    # After the tie, so the checkpoint's own copy of the embeddings is never moved; the tied
    # weight already has this device and dtype, so .to leaves the encoder's untouched.
    head.to(device=embedding.device, dtype=embedding.dtype)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy summed over the positions whose label is not -100, their count).

    The sum, not the mean, so the caller divides by the global count over micro-batches and
    workers.  ``logits`` [..., V] and ``labels`` [...] (the whole batch, or only the masked
    positions, which is cheaper).  The selected logits are upcast to fp32 (only those: a full
    [B, L, V] fp32 copy would cost B*L*V*4 bytes); the boolean selection is one host sync on
    CUDA.  No label: a zero that has a grad_fn (a sum over nothing), never a NaN mean.
    The count is an int64 tensor, ready for an all-reduce without a sync.
    """
    import torch.nn.functional as F

    keep = labels != IGNORE
    chosen = logits[keep].float()
    return F.cross_entropy(chosen, labels[keep].long(), reduction="sum"), keep.sum()


def masked_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correctly predicted masked positions, masked positions), int64 tensor counts (summable
    over batches and workers before one division)."""
    keep = labels != IGNORE
    correct = (logits.argmax(dim=-1) == labels) & keep
    return correct.sum(), keep.sum()


def sentences(texts: Iterable[tuple[str, ...]]) -> list[str]:
    """The MLM corpus of a task split's rows (``RawSplit.texts``): every sentence on its own, a
    pair task's two sentences in turn, in the rows' order.

    Exact duplicates are kept: a sentence that recurs in the task data (a Quora question in many
    pairs) recurs here as often, so the corpus has the sentence frequencies the task has;
    dropping them would shift the MLM's weight towards rarely seen sentences.
    """
    return [sentence for row in texts for sentence in row]
