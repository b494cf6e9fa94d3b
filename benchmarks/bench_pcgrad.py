"""Step time and peak memory of PCGrad against loss addition, and of PCGrad's representation
mode against full PCGrad, side by side on the same model, batches and data.

    .venv/bin/python benchmarks/bench_pcgrad.py                     # embedded MiniLM, sst+para, CPU
    .venv/bin/python benchmarks/bench_pcgrad.py --device cuda --precision bf16 --model bert-base-uncased --batch-size 16

Each (method, round) runs in its own process, rounds alternating methods, so each peak is
that method's own (CPU: peak resident memory; CUDA: peak allocated) and machine load hits
every method alike.  Targets: pcgrad/sum step time <= 1.15 (the two tasks' batches are
separate, so the backward work is the same); representation mode cheaper than full PCGrad.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile

METHODS = {
    "sum": {"combiner.combiner": "sum"},
    "pcgrad": {"combiner.combiner": "pcgrad"},
    "pcgrad-repr": {"combiner.combiner": "pcgrad", "combiner.pcgrad_on": "representation"},
}


def worker(a) -> None:
    import torch

    from mtl.config import RunConfig
    from mtl.train import train

    out = tempfile.mkdtemp(prefix="mtl-bench-pcgrad-")
    cfg = RunConfig().replace(**{
        "model.model": a.model, "data.tasks": a.tasks, "optim.batch_size": a.batch_size, "optim.max_steps": a.steps,
        "model.max_length": a.max_length, "data.max_dev_rows": 8, "progress": "off", "optim.epochs": 1,
        "device": a.device, "out": out, "data.cache_dir": a.cache, "combiner.conflict_every": 0,
        "precision": a.precision, "data.data_dir": a.data_dir,
        **METHODS[a.worker]})
    if a.device.startswith("cuda"):
        # A short run first, in the same process: CUDA's context, cuBLAS and the caching
        # allocator warm up there, not in the measured steps.
        train(cfg.replace(out=out + "-warmup", **{"optim.max_steps": 3}))
        torch.cuda.reset_peak_memory_stats()
    res = train(cfg)
    peak = (torch.cuda.max_memory_allocated() if a.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"step_s": res["train_time_s"] / res["steps"], "peak_mb": peak / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:all-MiniLM-L6-v2")
    p.add_argument("--tasks", default="sst,para")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--data-dir", default="embedded:sample")
    p.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--cache", default=tempfile.gettempdir() + "/mtl-bench-cache", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    runs = {m: [] for m in METHODS}
    for r in range(a.rounds):
        for method in METHODS:
            cmd = [sys.executable, __file__, "--worker", method, *sys.argv[1:]]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{method} round {r + 1} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            line = done.stdout.strip().splitlines()[-1]
            runs[method].append(json.loads(line))
            print(f"round {r + 1} {method:12s} step {runs[method][-1]['step_s'] * 1000:7.1f} ms  "
                  f"peak {runs[method][-1]['peak_mb']:8.1f} MiB", flush=True)
    step = {m: statistics.median(x["step_s"] for x in v) for m, v in runs.items()}
    peak = {m: statistics.median(x["peak_mb"] for x in v) for m, v in runs.items()}
    print(f"model={a.model} tasks={a.tasks} batch={a.batch_size} steps={a.steps} device={a.device} "
          f"precision={a.precision}")
    for m in METHODS:
        print(f"{m:12s} median step {step[m] * 1000:7.1f} ms   peak {peak[m]:8.1f} MiB")
    print(f"step time pcgrad / sum          = {step['pcgrad'] / step['sum']:.3f} (target <= 1.15)")
    print(f"step time pcgrad-repr / pcgrad  = {step['pcgrad-repr'] / step['pcgrad']:.3f}")
    print(f"peak memory pcgrad / sum        = {peak['pcgrad'] / peak['sum']:.3f}")
    print(f"peak memory pcgrad-repr / pcgrad = {peak['pcgrad-repr'] / peak['pcgrad']:.3f}")


if __name__ == "__main__":
    main()
