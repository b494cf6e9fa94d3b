"""Aggregate training throughput of K trials sharing one device, for K = 1, 2, 4, 8, 16 measured
side by side in one run, and the study's projected device-hours at the best packing.

    .venv/bin/python benchmarks/bench_pack.py --device cuda --model bert-base-uncased   # the GPU question
    .venv/bin/python benchmarks/bench_pack.py --device cpu --packs 1,2 --max-steps 20   # 2-core CPU, ~2-3 min

For each K, K trial processes start together on the device (each this script in its trial mode:
``mtl.train.train`` on one config, its own ``--out`` in a temporary folder; the same settings,
the same fixed ``--max-steps``; one shared token cache, filled before the first K).  Each trial's
``results.json`` gives its examples and its training-loop time (``train_time_s``: the optimizer
steps, without start-up, evaluation and checkpoint writes), so

- per-trial ex/s = examples / train_time_s, the mean over the K trials;
- aggregate ex/s = the sum of the K per-trial rates: the device's throughput while all K loops run
  (they start together; ``window`` is the conservative figure, all examples over the wall time
  from the first trial's start to the last one's end, start-up and evaluation included);
- speed-up = aggregate / aggregate at K = 1;
- peak memory = the largest trial's peak (CUDA: the caching allocator's reserved peak, without
  the ~0.5 GiB CUDA context; CPU: resident set), and on CUDA the device's peak ``memory.used``
  from nvidia-smi polled every 0.5 s (every process and context) beside cluster/core/memory.py's
  estimate for K workers.  A K whose estimate exceeds the GPU is refused as a sweep would refuse
  it (``--no-memory-check`` runs it anyway).

CPU threads: each trial gets ``--threads`` (default: this machine's CPUs // K, at least 1), so on a
CPU the comparison is K trials sharing the cores against one trial using them all.

Projection: the study (``--grid``, 36 trials per seed for pairings, ``--seeds``) needs, per trial,
epochs x steps per epoch x examples per step on the full ``--data-dir`` (the library's sampler,
``--epochs``), or ``--examples-per-trial``.  Device-hours = all those examples / the aggregate
ex/s of the best K / 3600, assuming every trial trains at the measured configuration's rate
(single-task trials are cheaper per step, PCGrad's separate backward passes dearer).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GiB = 1 << 30


def trial_mode(cfg_path: str) -> int:
    """One trial of a packing: train, then record this process's peak memory beside its results."""
    import torch

    from mtl.config import RunConfig
    from mtl.train import train

    cfg = RunConfig.from_dict(json.loads(Path(cfg_path).read_text()))
    train(cfg)
    peak = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_initialized():
        peak.update(cuda_reserved_bytes=torch.cuda.max_memory_reserved(),
                    cuda_allocated_bytes=torch.cuda.max_memory_allocated())
    Path(cfg.out, "peak_memory.json").write_text(json.dumps(peak))
    return 0


class DevicePeak:
    """The GPU's peak memory.used (all processes) from nvidia-smi, polled in a thread."""

    def __init__(self, enabled: bool):
        self.peak, self.enabled, self._stop = 0, enabled, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                   "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                                  capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.strip():
                self.peak = max(self.peak, int(float(done.stdout.split()[0])) << 20)
            self._stop.wait(0.5)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join()


def run_pack(base, k: int, threads: int, root: str, device_peak: bool) -> dict:
    """K trials of ``base`` at once; their results and peaks."""
    folder = Path(root, f"k{k}")
    procs = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    with DevicePeak(device_peak) as dev:
        started = time.time()
        for i in range(k):
            cfg = base.replace(out=str(folder / f"trial-{i}"))
            path = folder / f"trial-{i}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cfg.to_dict()))
            # stderr to a file, not a pipe: a trial blocked on a full pipe would pause its
            # training while another's is being read, and skew the timings.
            log = open(folder / f"trial-{i}.log", "w")
            procs.append((cfg, subprocess.Popen([sys.executable, __file__, "--trial", str(path)], env=env,
                                                stdout=subprocess.DEVNULL, stderr=log), log))
        failed = []
        for cfg, p, log in procs:
            p.wait()
            log.close()
            if p.returncode:
                err = Path(log.name).read_text()
                failed.append(f"{cfg.out}: exit {p.returncode}: {(err.strip().splitlines() or [''])[-1]}")
        ended = time.time()
    if failed:
        return {"k": k, "error": failed[0]}
    res = [json.loads(Path(cfg.out, "results.json").read_text()) for cfg, _, _ in procs]
    peaks = [json.loads(Path(cfg.out, "peak_memory.json").read_text()) for cfg, _, _ in procs]
    rates = [sum(r["examples"].values()) / r["train_time_s"] for r in res]
    examples = sum(sum(r["examples"].values()) for r in res)
    key = "cuda_reserved_bytes" if "cuda_reserved_bytes" in peaks[0] else "rss_bytes"
    return {"k": k, "aggregate": sum(rates), "per_trial": sum(rates) / k, "window": examples / (ended - started),
            "peak_trial": max(p[key] for p in peaks), "peak_kind": "CUDA reserved" if key != "rss_bytes" else "RSS",
            "device_peak": dev.peak, "steps": res[0]["steps"], "examples_per_trial": examples / k}


def warm_token_cache(base) -> None:
    """Tokenize once, here, so that no K pays for it or races to write the shared cache."""
    from mtl.data import encode_split, read_split
    from mtl.model import load_tokenizer
    from mtl.tasks import TASKS

    tok = load_tokenizer(base.model)
    for name in base.data.tasks:
        for split in ("train", "dev"):
            raw = read_split(base.data.data_dir, TASKS[name], split, base.data.on_bad_row,
                             base.data.max_train_rows if split == "train" else base.data.max_dev_rows)
            encode_split(raw, TASKS[name], tok, base.model.max_length, base.model.siamese(name),
                         base.data.cache_dir)


def study_examples(a, base) -> tuple[int, int]:
    """(trials, training examples of the whole study) at full length, from the data's sizes."""
    from cluster.core.study import expand
    from mtl.data import MultiTaskSampler, read_split
    from mtl.tasks import TASKS

    full = base.replace(**{"optim.max_steps": 0, "optim.epochs": a.epochs, "data.max_train_rows": a.train_rows})
    trials = expand(a.grid, full, tempfile.gettempdir() + "/mtl-bench-pack-study",
                    [int(s) for s in a.seeds.split(",")])
    if a.examples_per_trial:
        return len(trials), a.examples_per_trial * len(trials)
    sizes = {}
    total = 0
    for t in trials:
        for task in t.data.tasks:
            if task not in sizes:
                sizes[task] = len(read_split(t.data.data_dir, TASKS[task], "train", t.data.on_bad_row,
                                             t.data.max_train_rows))
        sampler = MultiTaskSampler({x: sizes[x] for x in t.data.tasks}, t.data, t.optim, t.seed, 0,
                                   t.parallel.workers)
        per_step = sampler.chunk * (1 if t.data.one_task_per_step else len(t.data.tasks))
        total += sampler.steps_per_epoch() * t.optim.epochs * per_step
    return len(trials), total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when there is one)")
    p.add_argument("--packs", default="1,2,4,8,16", help="trials per device to measure (comma-separated)")
    p.add_argument("--model", default="embedded:all-MiniLM-L6-v2")
    p.add_argument("--tasks", default="sst,para")
    p.add_argument("--combiner", default="sum")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-steps", type=int, default=40, help="optimizer steps each trial measures")
    p.add_argument("--data-dir", default="embedded:sample", help="data for the trials and the projection")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per trial (0: CPUs // K)")
    p.add_argument("--no-memory-check", action="store_true", help="run packings the memory estimate refuses")
    p.add_argument("--grid", default="pairings", help="the study to project (default: pairings, 36 trials a seed)")
    p.add_argument("--seeds", default="0", help="its seeds (default: 0)")
    p.add_argument("--epochs", type=int, default=10, help="its epochs (default: the reference's 10)")
    p.add_argument("--train-rows", type=int, default=0, help="its rows per task (0: all of --data-dir)")
    p.add_argument("--examples-per-trial", type=int, default=0, help="instead of counting them from the data")
    p.add_argument("--trial", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.trial:
        return trial_mode(a.trial)

    import torch

    from mtl.config import RunConfig

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    packs = [int(k) for k in a.packs.split(",")]
    root = tempfile.mkdtemp(prefix="mtl-bench-pack-")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    base = RunConfig().replace(**{
        "model.model": a.model, "data.tasks": a.tasks, "combiner.combiner": a.combiner, "precision": a.precision,
        "optim.batch_size": a.batch_size, "model.max_length": a.max_length, "optim.max_steps": a.max_steps,
        "optim.epochs": 1000, "data.data_dir": a.data_dir, "data.max_dev_rows": 16, "device": device,
        "progress": "off", "log_every_steps": 1000, "combiner.conflict_every": 0, "data.cache_dir": f"{root}/cache"})

    warm_token_cache(base)
    capacity = estimate = None
    if device.startswith("cuda"):
        from cluster.core.memory import detect_gpu_memory, estimate_worker

        capacity, estimate = detect_gpu_memory(), estimate_worker(base).total
    print(f"device {device} | model {a.model} | tasks {a.tasks} ({a.combiner}) | {a.precision} | batch "
          f"{a.batch_size} | max length {a.max_length} | {a.max_steps} steps per trial | {cpus} CPUs"
          + (f" | GPU {capacity / GiB:.1f} GiB, estimate {estimate / GiB:.1f} GiB per trial" if capacity else ""),
          flush=True)

    rows = []
    for k in packs:
        if estimate and capacity and k > 1 and k * estimate > capacity and not a.no_memory_check:
            print(f"K={k}: refused by the memory check: estimated {k * estimate / GiB:.1f} GiB > "
                  f"{capacity / GiB:.1f} GiB", flush=True)
            continue
        threads = a.threads or max(1, cpus // k)
        row = run_pack(base, k, threads, root, device_peak=bool(capacity))
        if "error" in row:
            print(f"K={k}: failed: {row['error']}", flush=True)
            continue
        row["threads"] = threads
        rows.append(row)
        print(f"K={k:2d} ({threads} threads each): aggregate {row['aggregate']:8.1f} ex/s, per trial "
              f"{row['per_trial']:7.1f} ex/s, window {row['window']:7.1f} ex/s", flush=True)
    if not rows:
        print("error: no packing ran", file=sys.stderr)
        return 1

    one = next((r["aggregate"] for r in rows if r["k"] == 1), None)
    kind = rows[0]["peak_kind"]
    print(f"\nside by side ({rows[0]['steps']} steps per trial; aggregate = sum of the trials' own loop rates, "
          f"window = all examples / wall time incl. start-up):")
    columns = ["K", "aggregate ex/s", "per-trial ex/s", "speed-up over K=1", f"peak memory per trial ({kind})"]
    columns += ["device peak (nvidia-smi)", "estimate (K x trial)"] if capacity else []
    columns += ["window ex/s"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = [str(r["k"]), f"{r['aggregate']:.1f}", f"{r['per_trial']:.1f}",
                 f"{r['aggregate'] / one:.2f}" if one else "-", f"{r['peak_trial'] / GiB:.2f} GiB"]
        cells += [f"{r['device_peak'] / GiB:.1f} GiB", f"{r['k'] * estimate / GiB:.1f} GiB"] if capacity else []
        cells += [f"{r['window']:.1f}"]
        print("| " + " | ".join(cells) + " |")

    best = max(rows, key=lambda r: r["aggregate"])
    trials, examples = study_examples(a, base)
    hours = examples / best["aggregate"] / 3600
    unit = "GPU-hours" if device.startswith("cuda") else "device-hours (this CPU)"
    print(f"\nstudy: grid {a.grid}, seeds {a.seeds}: {trials} trials, {examples:,} training examples "
          f"({a.epochs} epochs on {a.data_dir}" + (f", {a.train_rows} rows/task" if a.train_rows else "") + ")")
    print(f"best packing K={best['k']}: {best['aggregate']:.1f} ex/s per device -> {hours:.2f} {unit}"
          + (f" (K=1: {examples / one / 3600:.2f})" if one else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
