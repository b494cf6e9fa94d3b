"""Named starting points; any flag given on the command line overrides them."""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # The reference protocol (Stanford CS 224N-style study): BERT-base, [CLS] heads, joint pairs,
    # undersampling to the smallest task, AdamW 1e-5 / wd 0.01 / eps 1e-6, batch 8, dropout 0.5,
    # 10 epochs, best dev weights kept.  Meant for GPUs.
    "paper": {"model.model": "bert-base-uncased", "optim.epochs": 10, "optim.batch_size": 8,
              "optim.lr": 1e-5, "optim.weight_decay": 0.01, "optim.eps": 1e-6, "model.dropout": 0.5,
              "model.pooling": "cls", "model.pair_encoding": "joint", "data.epoch_mode": "min_size"},
    # Embedded encoder and sample data, a few dozen steps: seconds to a minute on a laptop CPU.
    "smoke": {"data.tasks": "sst,para", "optim.epochs": 2, "data.max_train_rows": 96, "data.max_dev_rows": 64,
              "model.max_length": 64, "optim.lr": 5e-5, "model.dropout": 0.1, "log_every_steps": 2},
    # The library's defaults: the reference protocol on the embedded encoder and sample data.
    "default": {},
}
