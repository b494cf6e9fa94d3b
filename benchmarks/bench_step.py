"""Training throughput of the library's loop against a minimal hand-written PyTorch loop.

    .venv/bin/python benchmarks/bench_step.py                  # embedded MiniLM, sst+para, batch 8
    .venv/bin/python benchmarks/bench_step.py --model bert-base-uncased --steps 30

Both loops train the same encoder and heads, on the same tokenized examples in the same
order (the library's sampler plan), with the same optimizer; the hand loop does its own
padding, forward, loss and step in a dozen lines.  Rounds alternate library/hand so load
on the machine hits both alike; the ratio of median examples/s is printed (target >= 0.95).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from mtl.config import RunConfig
from mtl.data import MultiTaskSampler, encode_split, read_split
from mtl.model import build_model, load_tokenizer
from mtl.tasks import TASKS
from mtl.train import train


def library_run(cfg: RunConfig) -> float:
    res = train(cfg)
    return res["examples_per_s"]


def hand_run(cfg: RunConfig, encoded: dict, plan) -> float:
    """The minimal loop: pad, forward each task, sum the losses, backward, AdamW step."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, [TASKS[t] for t in cfg.data.tasks])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    model.train()
    examples, start = 0, time.perf_counter()
    for step in plan:
        loss = 0.0
        for task, idx in step.micro[0].items():
            enc = encoded[task]
            seg = enc.segments[0]
            seqs = [seg.tokens[seg.offsets[i]:seg.offsets[i + 1]].long() for i in idx.tolist()]
            types = [seg.types[seg.offsets[i]:seg.offsets[i + 1]].long() for i in idx.tolist()]
            ids = pad_sequence(seqs, batch_first=True, padding_value=enc.pad_id)
            mask = pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
            hidden = model.encoder(input_ids=ids, attention_mask=mask,
                                   token_type_ids=pad_sequence(types, batch_first=True)).last_hidden_state
            out = model.heads[task](hidden[:, 0])
            y = enc.labels[idx]
            loss = loss + (F.cross_entropy(out, y.long()) if task == "sst" else
                           F.binary_cross_entropy_with_logits(out.squeeze(-1), y) if task == "para" else
                           F.mse_loss(5 * torch.sigmoid(out.squeeze(-1)), y))
            examples += len(idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return examples / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:all-MiniLM-L6-v2")
    p.add_argument("--tasks", default="sst,para")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="mtl-bench-")
    cfg = RunConfig().replace(**{
        "model.model": a.model, "data.tasks": a.tasks, "optim.batch_size": a.batch_size, "optim.max_steps": a.steps,
        "model.max_length": a.max_length, "data.max_dev_rows": 8, "progress": "off", "optim.epochs": 1,
        "data.cache_dir": f"{tmp}/cache", "log_every_steps": 10})
    tasks = [TASKS[t] for t in cfg.data.tasks]
    tok = load_tokenizer(cfg.model)
    encoded = {t.name: encode_split(read_split(cfg.data.data_dir, t, "train"), t, tok, a.max_length, False,
                                    cfg.data.cache_dir) for t in tasks}
    sampler = MultiTaskSampler({t: len(e) for t, e in encoded.items()}, cfg.data, cfg.optim, cfg.seed)
    plan = sampler.epoch(0)[: a.steps]
    assert len(plan) == a.steps, "not enough training rows for that many steps"
    lib, hand = [], []
    for r in range(a.rounds):
        lib.append(library_run(cfg.replace(out=f"{tmp}/lib-{r}")))
        hand.append(hand_run(cfg, encoded, plan))
        print(f"round {r + 1}: library {lib[-1]:.1f} ex/s, hand loop {hand[-1]:.1f} ex/s", flush=True)
    ratio = statistics.median(lib) / statistics.median(hand)
    print(f"model={a.model} tasks={a.tasks} batch={a.batch_size} steps={a.steps} threads={torch.get_num_threads()}")
    print(f"median examples/s: library {statistics.median(lib):.1f}, hand loop {statistics.median(hand):.1f}")
    print(f"throughput ratio library/hand = {ratio:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
