"""mtl/mlm.py: BERT's masking, the tied MLM head, the summed loss, and that training on it learns."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtl.errors import ConfigError
from mtl.mlm import (build_mlm_head, mask_tokens, masked_accuracy, mlm_loss, sentences, special_ids,
                     special_mask)

ROOT = Path(__file__).resolve().parents[2]
CLS, SEP, PAD, MASK, VOCAB = 101, 102, 0, 103, 30522


def _batch(rows: int, width: int, seed: int = 0):
    """Random ids framed as [CLS] ... [SEP] [PAD]..., rows of random length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (rows, width), generator=g)
    lengths = torch.randint(3, width + 1, (rows,), generator=g)
    attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(rows), lengths - 1] = SEP
    ids[attention == 0] = PAD
    return ids, attention


def _mask(ids, attention, seed: int = 1, probability: float = 0.15):
    special = special_mask(ids, {CLS, SEP, PAD})
    return mask_tokens(ids, attention, special, MASK, VOCAB, torch.Generator().manual_seed(seed), probability)


def test_masking_statistics_follow_bert():
    ids, attention = _batch(1000, 200)                  # 200k positions
    masked, labels = _mask(ids, attention)
    assert masked.dtype == labels.dtype == torch.int64
    maskable = (attention == 1) & (ids != CLS) & (ids != SEP)
    chosen = labels != -100
    assert not (chosen & ~maskable).any()               # never a special or padding position
    assert torch.equal(labels[chosen], ids[chosen])     # labels: the original id, exactly where chosen
    assert torch.equal(masked[~chosen], ids[~chosen])   # nothing else changes
    assert abs(chosen.sum().item() / maskable.sum().item() - 0.15) < 0.005
    n = chosen.sum().item()
    to_mask = (masked == MASK) & chosen
    kept = (masked == ids) & chosen
    to_random = chosen & ~to_mask & ~kept
    assert abs(to_mask.sum().item() / n - 0.8) < 0.015
    assert abs(to_random.sum().item() / n - 0.1) < 0.01
    assert abs(kept.sum().item() / n - 0.1) < 0.01
    assert masked[to_random].min() >= 0 and masked[to_random].max() < VOCAB
    # Random replacements are spread over the vocabulary, not a few ids.
    assert masked[to_random].unique().numel() > 0.9 * to_random.sum().item()


def test_masking_is_deterministic_and_uses_a_fixed_amount_of_the_stream():
    ids, attention = _batch(16, 40)
    first, second = _mask(ids, attention, seed=7), _mask(ids, attention, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[1], _mask(ids, attention, seed=8)[1])
    # The generator's position after a call depends on the shape only, not on the ids.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    other, other_attention = _batch(16, 40, seed=5)
    mask_tokens(ids, attention, special_mask(ids, {CLS, SEP, PAD}), MASK, VOCAB, g1)
    mask_tokens(other, other_attention, special_mask(other, {CLS, SEP, PAD}), MASK, VOCAB, g2)
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


def test_int32_ids_give_the_same_int64_masks():
    ids, attention = _batch(8, 30)
    wide = _mask(ids, attention)
    narrow = _mask(ids.int(), attention.int())
    assert narrow[0].dtype == narrow[1].dtype == torch.int64
    assert all(torch.equal(a, b) for a, b in zip(wide, narrow))


def test_special_mask_on_the_real_tokenizer():
    from mtl.config import ModelConfig
    from mtl.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    enc = tokenizer(["a short one", "a longer first sentence"], ["and its pair", "b"], padding=True,
                    return_tensors="pt")
    ids = special_ids(tokenizer)
    assert {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id} <= ids
    expected = torch.tensor([[tokenizer.convert_ids_to_tokens(i) in tokenizer.all_special_tokens for i in row]
                             for row in enc["input_ids"].tolist()])
    assert torch.equal(special_mask(enc["input_ids"], ids), expected)
    assert torch.equal(special_mask(enc["input_ids"], torch.tensor(sorted(ids))), expected)
    assert expected[:, 0].all() and (expected | enc["attention_mask"].bool()).all()   # CLS, and every PAD
    assert not special_mask(enc["input_ids"], set()).any()


def test_probability_zero_and_the_loss_of_an_unmasked_batch():
    ids, attention = _batch(4, 12)
    masked, labels = _mask(ids, attention, probability=0.0)
    assert torch.equal(masked, ids) and (labels == -100).all()
    logits = torch.randn(4, 12, 50, requires_grad=True)
    loss, n = mlm_loss(logits, labels)
    assert n.item() == 0 and loss.item() == 0.0 and torch.isfinite(loss) and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    correct, total = masked_accuracy(logits, labels)
    assert correct.item() == total.item() == 0


def test_loss_is_summed_in_fp32_over_the_masked_positions():
    logits = torch.randn(2, 3, 7, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([[4, -100, 1], [-100, -100, 6]])
    loss, n = mlm_loss(logits, labels)
    assert n.item() == 3 and loss.dtype == torch.float32
    keep = labels != -100
    expected = F.cross_entropy(logits.float()[keep], labels[keep], reduction="sum")
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[~keep].abs().sum() == 0 and logits.grad[keep].abs().sum() > 0
    # Only the masked positions given (the cheap path) is the same loss.
    assert torch.allclose(mlm_loss(logits[keep], labels[keep])[0], loss)


def test_masked_accuracy_counts():
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = logits[0, 1, 3] = logits[0, 2, 1] = logits[0, 3, 4] = 1.0
    correct, total = masked_accuracy(logits, torch.tensor([[2, 0, 1, -100]]))
    assert (correct.item(), total.item()) == (2, 3)


def test_sentences_keeps_every_sentence_in_order_with_duplicates():
    assert sentences([("a",), ("b",), ("a",)]) == ["a", "b", "a"]
    assert sentences([("q1", "q2"), ("q3", "q1")]) == ["q1", "q2", "q3", "q1"]
    assert sentences([]) == []


def test_importing_mlm_loads_neither_torch_nor_transformers():
    code = "import sys, mtl.mlm; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    from mtl.model import resolve_model_path

    path = resolve_model_path("embedded:all-MiniLM-L6-v2")
    encoder = AutoModel.from_pretrained(path)
    return encoder, *build_mlm_head(resolve_model_path("embedded:all-MiniLM-L6-v2"), encoder)


def test_the_embedded_minilm_has_no_mlm_head_and_gets_a_tied_fresh_one(minilm):
    encoder, head, from_checkpoint = minilm
    assert from_checkpoint is False         # a sentence-transformers checkpoint: BertModel weights only
    embedding = encoder.get_input_embeddings().weight
    assert head.predictions.decoder.weight is embedding
    hidden = encoder(input_ids=torch.tensor([[CLS, 2023, 2003, SEP]])).last_hidden_state
    assert head(hidden).shape == (1, 4, VOCAB)
    # One parameter, not two: a module holding both yields the tied weight once.
    both = list(torch.nn.ModuleList([encoder, head]).parameters())
    assert len(both) == len(list(encoder.parameters())) + len(list(head.parameters())) - 1
    assert sum(p is embedding for p in both) == 1


def _tiny_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32, **extra)


def test_a_checkpoint_with_its_head_loads_it(tmp_path, tiny_model_dir):
    from transformers import AutoModel, BertForMaskedLM

    torch.manual_seed(0)
    saved = BertForMaskedLM(_tiny_config())
    saved.save_pretrained(tmp_path)
    encoder = AutoModel.from_pretrained(tmp_path)
    head, from_checkpoint = build_mlm_head(str(tmp_path), encoder)
    assert from_checkpoint is True
    assert head.predictions.decoder.weight is encoder.get_input_embeddings().weight
    for name, value in saved.cls.state_dict().items():
        assert torch.equal(head.state_dict()[name], value), name
    # The head follows the encoder's dtype; the tie leaves the encoder's weight itself alone.
    half = AutoModel.from_pretrained(tmp_path).to(torch.bfloat16)
    embedding = half.get_input_embeddings().weight
    head16, _ = build_mlm_head(str(tmp_path), half)
    assert {p.dtype for p in head16.parameters()} == {torch.bfloat16}
    assert head16.predictions.decoder.weight is embedding is half.get_input_embeddings().weight
    # The tiny fixture is a bare BertModel: a fresh head.
    bare = AutoModel.from_pretrained(tiny_model_dir)
    assert build_mlm_head(tiny_model_dir, bare)[1] is False
    with pytest.raises(ConfigError, match="cannot tie"):     # vocabulary 99 against 30522
        build_mlm_head(str(tmp_path), bare)


def test_a_head_spread_over_several_modules_is_refused(tmp_path):
    from transformers import DistilBertConfig, DistilBertForMaskedLM, DistilBertModel

    config = DistilBertConfig(vocab_size=99, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32)
    DistilBertForMaskedLM(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not one module"):
        build_mlm_head(str(tmp_path), DistilBertModel(config))


def _sst(split: str) -> list[str]:
    with open(ROOT / "mtl" / "sample_data" / f"sst-{split}.csv", newline="") as f:
        return sentences([(row["sentence"].strip(),) for row in csv.DictReader(f, delimiter="\t")])


def _dev_score(encoder, head, ids, attention, special, mask_id) -> tuple[float, float]:
    """(masked accuracy, mean cross-entropy) on three fixed maskings of the dev sentences."""
    gen = torch.Generator().manual_seed(1234)      # the same masks before and after training
    encoder.eval(), head.eval()
    correct = total = loss = 0.0
    with torch.no_grad():
        for _ in range(3):
            masked, labels = mask_tokens(ids, attention, special, mask_id, VOCAB, gen)
            hidden = encoder(input_ids=masked, attention_mask=attention).last_hidden_state
            keep = labels != -100
            logits = head(hidden[keep])
            c, t = masked_accuracy(logits, labels[keep])
            correct, total, loss = correct + c.item(), total + t.item(), loss + mlm_loss(logits, labels[keep])[0].item()
    encoder.train(), head.train()
    return correct / total, loss / total


def _train_and_score(model_dir: str, seed: int, steps: int = 30):
    """(dev score before, after) ``steps`` AdamW steps of the MLM loss on the SST train sentences."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(texts):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    special = torch.tensor(sorted(special_ids(tokenizer)))
    train_ids, train_attention = encode(_sst("train"))
    dev_ids, dev_attention = encode(_sst("dev"))
    dev = (dev_ids, dev_attention, special_mask(dev_ids, special), tokenizer.mask_token_id)
    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(model_dir)
    head, _ = build_mlm_head(model_dir, encoder)
    before = _dev_score(encoder, head, *dev)
    opt = torch.optim.AdamW(torch.nn.ModuleList([encoder, head]).parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(train_ids), (32,), generator=gen)
        ids, attention = train_ids[rows], train_attention[rows]
        masked, labels = mask_tokens(ids, attention, special_mask(ids, special), tokenizer.mask_token_id, VOCAB, gen)
        hidden = encoder(input_ids=masked, attention_mask=attention).last_hidden_state
        keep = labels != -100
        loss_sum, n = mlm_loss(head(hidden[keep]), labels[keep])
        opt.zero_grad()
        (loss_sum / n.clamp(min=1)).backward()
        opt.step()
    return before, _dev_score(encoder, head, *dev)


def test_training_on_the_mlm_loss_raises_held_out_masked_accuracy(tiny_model_dir):
    # A random tiny model: accuracy 0 before; 30 steps reach the commonest-token level (5.3%: "."
    # every time, for seeds 0-2), and the dev cross-entropy falls from ~10.3 (ln V) by ~2.8 nats.
    # One thread: on a shared machine two threads wait on each other for seconds per step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before, after = _train_and_score(tiny_model_dir, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert before[0] < 0.01 and after[0] > 0.03, (before, after)
    assert after[1] < before[1] - 2.0, (before, after)       # nats per masked token
