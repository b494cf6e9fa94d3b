"""Named starting points; any flag given on the command line overrides them."""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # The reference protocol (Stanford CS 224N-style study): BERT-base, [CLS] heads, joint pairs,
    # undersampling to the smallest task, AdamW 1e-5 / wd 0.01 / eps 1e-6, batch 8, dropout 0.5,
    # 10 epochs, best dev weights kept.  Meant for GPUs.
    "paper": {"model.model": "bert-base-uncased", "optim.epochs": 10, "optim.batch_size": 8,
              "optim.lr": 1e-5, "optim.weight_decay": 0.01, "optim.eps": 1e-6, "model.dropout": 0.5,
              "model.pooling": "cls", "model.pair_encoding": "joint", "data.epoch_mode": "min_size"},
    # Embedded encoder and the whole shipped sample (400 train, 100 dev rows per task), 2 epochs
    # of 25 steps: half a minute to a minute per task on one CPU core, and the models learn (dev
    # SST accuracy above its majority class, PAR F1 > 0, STS Pearson > 0.3).  fp32: bf16 autocast
    # is 1.6x faster on CPUs with bf16 units but emulated, and ~80x slower per matmul, on those
    # without (AMD EPYC with AVX2 only, measured): a preset must be fast on any CPU.
    "smoke": {"data.tasks": "sst,para", "optim.epochs": 2, "optim.batch_size": 16, "model.max_length": 64,
              "optim.lr": 1e-4, "model.dropout": 0.1, "precision": "fp32", "log_every_steps": 5,
              "combiner.conflict_every": 5},
    # The library's defaults: the reference protocol on the embedded encoder and sample data.
    "default": {},
}
