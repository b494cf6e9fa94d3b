"""Training throughput of the library's loop against a minimal hand-written PyTorch loop, on the
chosen device and precision, with model FLOP utilisation, over a sweep of batch sizes.

    .venv/bin/python benchmarks/bench_step.py                        # embedded MiniLM, sst+para, CPU
    python benchmarks/bench_step.py --device cuda --precision bf16 --model /path/bert-base \\
        --batch-sizes 8,32,128 --steps 30 --variants default,compile

Both loops train the same encoder and heads, on the same tokenized examples in the same
order (the library's sampler plan), on the same device, in the same precision (autocast;
fp16 with a gradient scaler); the hand loop does its own padding, forward, loss and step in
a dozen lines with torch's default AdamW.  Rounds alternate library/hand so load on the
machine hits both alike; the ratio of median examples/s is printed (target >= 0.95).

``--variants`` adds library runs with speed options (``compile``: ``--compile``, which pads
to a multiple of 16; ``pad16``: padding alone) beside the default, each as its own column
with its speed-up over the default: the options' gain measured in the same run.

MFU = counted FLOPs per training example (``torch.utils.flop_counter.FlopCounterMode`` over one
forward+backward of the hand loop on the plan's first steps) x examples/s / ``--peak-tflops``
(the chip's dense bf16 peak: 989 for an H100/H200 SXM; not printed on CPU unless given).
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
from mtl.strategy import AUTOCAST_DTYPES, autocast
from mtl.tasks import TASKS
from mtl.train import train

VARIANTS = {"default": {}, "compile": {"compile": True}, "pad16": {"pad_to_multiple": 16}}


def library_run(cfg: RunConfig) -> float:
    return train(cfg)["examples_per_s"]


def _hand_batch(enc, idx, device):
    seg = enc.segments[0]
    seqs = [seg.tokens[seg.offsets[i]:seg.offsets[i + 1]].long() for i in idx.tolist()]
    types = [seg.types[seg.offsets[i]:seg.offsets[i + 1]].long() for i in idx.tolist()]
    ids = pad_sequence(seqs, batch_first=True, padding_value=enc.pad_id)
    mask = pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
    return (ids.to(device), mask.to(device), pad_sequence(types, batch_first=True).to(device),
            enc.labels[idx].to(device))


def _hand_loss(model, task, batch):
    ids, mask, types, y = batch
    hidden = model.encoder(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    out = model.heads[task](hidden[:, 0]).float()
    return (F.cross_entropy(out, y.long()) if task == "sst" else
            F.binary_cross_entropy_with_logits(out.squeeze(-1), y.float()) if task == "para" else
            F.mse_loss(5 * torch.sigmoid(out.squeeze(-1)), y.float()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_run(cfg: RunConfig, encoded: dict, plan, device: torch.device) -> float:
    """The minimal loop: pad, forward each task, sum the losses, backward, AdamW step."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, [TASKS[t] for t in cfg.data.tasks]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    dtype = AUTOCAST_DTYPES[cfg.precision]
    model.train()
    examples = 0
    _sync(device)
    start = time.perf_counter()
    for step in plan:
        with autocast(device.type, dtype):
            loss = sum(_hand_loss(model, task, _hand_batch(encoded[task], idx, device))
                       for task, idx in step.micro[0].items())
        examples += sum(len(idx) for idx in step.micro[0].values())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return examples / (time.perf_counter() - start)


def flops_per_example(cfg: RunConfig, encoded: dict, plan, device: torch.device) -> float:
    """Counted FLOPs of forward+backward per example, over the plan's first steps."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg.model, [TASKS[t] for t in cfg.data.tasks]).to(device)
    steps = plan[:3]
    with FlopCounterMode(display=False) as counter:
        for step in steps:
            sum(_hand_loss(model, task, _hand_batch(encoded[task], idx, device))
                for task, idx in step.micro[0].items()).backward()
    return counter.get_total_flops() / sum(len(i) for s in steps for i in s.micro[0].values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:all-MiniLM-L6-v2")
    p.add_argument("--tasks", default="sst,para")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch-sizes", default="8", help="comma-separated batch sizes per task (default: 8)")
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)   # the old single-size flag
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=sorted(AUTOCAST_DTYPES))
    p.add_argument("--variants", default="default", help=f"library variants, comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the chip's dense peak for --precision, TFLOP/s (default: 989 on CUDA, none on CPU)")
    p.add_argument("--data-dir", default="embedded:sample")
    a = p.parse_args()
    device = torch.device(a.device)
    peak = a.peak_tflops if a.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "default" not in variants:
        p.error(f"--variants: needs 'default' and names from {', '.join(VARIANTS)} (got {a.variants})")
    sizes = [a.batch_size] if a.batch_size else [int(b) for b in a.batch_sizes.split(",")]
    tmp = tempfile.mkdtemp(prefix="mtl-bench-")
    base = RunConfig().replace(**{
        "model.model": a.model, "data.tasks": a.tasks, "optim.max_steps": a.steps, "data.data_dir": a.data_dir,
        "model.max_length": a.max_length, "data.max_dev_rows": 8, "progress": "off", "optim.epochs": 1,
        "data.cache_dir": f"{tmp}/cache", "log_every_steps": 10, "device": a.device, "precision": a.precision,
        "combiner.conflict_every": 0})
    tok = load_tokenizer(base.model)
    tasks = [TASKS[t] for t in base.data.tasks]
    encoded = {t.name: encode_split(read_split(base.data.data_dir, t, "train"), t, tok, a.max_length, False,
                                    base.data.cache_dir) for t in tasks}
    table = []
    for batch in sizes:
        cfg = base.replace(**{"optim.batch_size": batch})
        sampler = MultiTaskSampler({t: len(e) for t, e in encoded.items()}, cfg.data, cfg.optim, cfg.seed)
        plan = sampler.epoch(0)[: a.steps]
        if len(plan) < a.steps:
            p.error(f"batch {batch}: the data has {len(plan)} steps per epoch, fewer than --steps {a.steps}")
        runs = {v: [] for v in variants}
        hand = []
        # Warm-up runs, in this process: CUDA's context, cuBLAS, the allocator and (for
        # compile) the graphs are made here, not in the measured rounds; compile's one-off
        # cost is printed, since a trial pays it once.
        for v in variants:
            t0 = time.perf_counter()
            library_run(cfg.replace(out=f"{tmp}/warm-{batch}-{v}", **VARIANTS[v], **{"optim.max_steps": 3}))
            print(f"batch {batch} warm-up [{v}]: {time.perf_counter() - t0:.1f} s", flush=True)
        hand_run(cfg, encoded, plan[:3], device)
        for r in range(a.rounds):
            for v in variants:
                runs[v].append(library_run(cfg.replace(out=f"{tmp}/lib-{batch}-{v}-{r}", **VARIANTS[v])))
            hand.append(hand_run(cfg, encoded, plan, device))
            print(f"batch {batch} round {r + 1}: " + ", ".join(f"library[{v}] {runs[v][-1]:.1f}" for v in variants)
                  + f", hand loop {hand[-1]:.1f} examples/s", flush=True)
        flops = flops_per_example(cfg, encoded, plan, device)
        med = {v: statistics.median(x) for v, x in runs.items()}
        table.append((batch, med, statistics.median(hand), flops))
    print(f"\nmodel={a.model} tasks={a.tasks} device={a.device} precision={a.precision} steps={a.steps} "
          f"rounds={a.rounds} threads={torch.get_num_threads()}"
          + (f" peak={peak:g} TFLOP/s" if peak else ""))
    extra = [v for v in variants if v != "default"]
    head = (["batch", "library ex/s", "hand ex/s", "library/hand", "GFLOP/example", "MFU"]
            + [f"{v} ex/s" for v in extra] + [f"{v}/default" for v in extra])
    print(" | ".join(head))
    for batch, med, hand_med, flops in table:
        mfu = f"{flops * med['default'] / (peak * 1e12):.2%}" if peak else "n/a"
        row = [str(batch), f"{med['default']:.1f}", f"{hand_med:.1f}", f"{med['default'] / hand_med:.3f}",
               f"{flops / 1e9:.2f}", mfu]
        row += [f"{med[v]:.1f}" for v in extra] + [f"{med[v] / med['default']:.3f}" for v in extra]
        print(" | ".join(row))
    print("targets: library/hand >= 0.95; compile/default >= 1.5 at batch 32 in bf16 on a GPU")


if __name__ == "__main__":
    main()
