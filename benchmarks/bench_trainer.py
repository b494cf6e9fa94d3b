"""Single-task SST training throughput of the library (``mtl.train.train``) against Hugging
Face's ``Trainer`` on the same encoder, batch, maximum length, rows and order, on CPU.

    python3 -m venv /tmp/trainer-venv --without-pip && cp -a .venv/. /tmp/trainer-venv/   # or: cp -a .venv /tmp/trainer-venv
    /tmp/trainer-venv/bin/python -m pip install accelerate                  # Trainer needs it; .venv stays as pinned
    PYTHONPATH=. /tmp/trainer-venv/bin/python benchmarks/bench_trainer.py   # 150 steps x 5 rounds, ../shared/data
    PYTHONPATH=. /tmp/trainer-venv/bin/python benchmarks/bench_trainer.py --steps 60 --rounds 3 \\
        --data-dir embedded:sample --variants default,nonorm            # quicker; the library without its extra norm

Both sides: the embedded all-MiniLM-L6-v2 (``embedded:all-MiniLM-L6-v2``), SST-5 (5 classes),
batch 8, max length 128, padding to the longest sequence of the batch, fp32, AdamW
(lr 1e-5, weight decay 0.01 on weights only, eps 1e-6, constant lr), no evaluation, no
checkpoints or logs inside the timed window, one process, torch's default threads.
The rows are the library's fixed subset of ``--steps x 8`` training rows (``read_split`` with
``max_train_rows``), fed in the library sampler's epoch-0 order to both sides (the Trainer's
sampler is replaced by a sequential one over the rows in that order), so every step sees
the same examples with the same padded width on both sides.
The library: its default single-task trial (MLP head on [CLS], head dropout 0.5, fused AdamW,
global gradient norm measured every step, no clipping).  The Trainer: ``AutoModelForSequenceClassification``
(pooler + linear head), ``DataCollatorWithPadding``, its default optimizer (``adamw_torch_fused``
in transformers 5.x) and gradient clipping to 1.0, ``report_to="none"``, logging and saving
off, ``dataloader_num_workers=0``.

How examples/s is counted, the same on both sides: a global optimizer step post-hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``) stamps the time at the end
of every optimizer step; examples/s = 8 x (steps - warm-up) / (stamp[last] - stamp[warm-up]),
i.e. the wall time of the training loop only, step ``--warmup``+1 to the last, with
everything each loop does between optimizer steps (batching/collation, forward, backward,
norm/clip, step, scheduler, zero_grad, per-step bookkeeping, logging) and nothing before
(model load, tokenizing) or after (the library's end-of-epoch evaluation and checkpoint).
Each library's own figure is printed beside it for reference (the library's
``examples_per_s``: its step loop over all steps; the Trainer's ``train_samples_per_second``:
the whole ``train()`` call, setup included).

Every run is its own process (nothing one side sets, threads or allocator state, leaks into
the other); rounds alternate the sides, the order flipping every round so a drift in the
machine's load hits both alike.  Medians over rounds and the ratio library/Trainer are
printed (target >= 0.95 for the default library run).

``--variants`` adds library runs with one change each, patched in the child process
(never in ``mtl/``), as extra columns with their ratio to the Trainer:
``nonorm``: no global gradient norm when clipping is off (the guard reads the loss instead);
``foreach``: torch's default (foreach) AdamW instead of the fused one (the library before 2026-11-28);
``rowpad``: the per-row padding loop instead of the whole-batch one (the library before 2026-11-28);
``noseed``: no ``torch.manual_seed`` per step; ``notb``: no TensorBoard sink.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

BATCH = 8
MAX_LENGTH = 128
LR, WEIGHT_DECAY, EPS = 1e-5, 0.01, 1e-6
MODEL = "embedded:all-MiniLM-L6-v2"
VARIANTS = ("default", "nonorm", "foreach", "rowpad", "noseed", "notb")


# --------------------------------------------------------------------------------------------
# Timing: the same hook on both sides, and the baton that interleaves them
# --------------------------------------------------------------------------------------------
class Baton:
    """Installed in each child as a global optimizer step post-hook (so it sees the library's
    and the Trainer's steps alike).  At the end of step ``warmup`` the child says it is ready
    and waits; then, each time the driver says go, it runs ``chunk`` steps and reports their
    wall time: from the go to the end of the chunk's last optimizer step, i.e. everything the
    loop does for those steps.  Only one child computes at any moment."""

    def __init__(self, a):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.warmup, self.chunk, self.total = a.warmup, a.chunk, a.warmup + a.chunk * a.chunks
        self.go, self.done = os.fdopen(a.go_fd, "r"), os.fdopen(a.done_fd, "w")
        self.steps, self.t_go, self.cpu_go = 0, 0.0, 0.0
        self.handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, *_):
        now, cpu = time.perf_counter(), time.process_time()
        self.steps += 1
        s = self.steps - self.warmup
        if s < 0 or s % self.chunk:
            return
        self.done.write("ready\n" if s == 0 else f"{now - self.t_go!r} {cpu - self.cpu_go!r}\n")
        self.done.flush()
        if self.steps < self.total:
            self.go.readline()
            self.t_go, self.cpu_go = time.perf_counter(), time.process_time()


def _steps(a) -> int:
    return a.warmup + a.chunk * a.chunks


def _config(a, out: str):
    from mtl.config import RunConfig

    return RunConfig().replace(**{
        "out": out, "model.model": MODEL, "data.tasks": "sst", "data.data_dir": a.data_dir,
        "data.max_train_rows": _steps(a) * BATCH, "data.max_dev_rows": 16, "data.cache_dir": f"{a.tmp}/cache",
        "model.max_length": MAX_LENGTH, "optim.batch_size": BATCH, "optim.lr": LR,
        "optim.weight_decay": WEIGHT_DECAY, "optim.eps": EPS, "optim.epochs": 1, "optim.max_steps": _steps(a),
        "progress": "off", "device": "cpu", "precision": "fp32"})


def _rows_in_plan_order(a):
    """The library's rows for this run, in its sampler's epoch-0 order (texts, labels)."""
    from mtl.data import MultiTaskSampler, read_split
    from mtl.tasks import TASKS

    cfg = _config(a, f"{a.tmp}/unused")
    raw = read_split(cfg.data.data_dir, TASKS["sst"], "train", cfg.data.on_bad_row, cfg.data.max_train_rows)
    plan = MultiTaskSampler({"sst": len(raw)}, cfg.data, cfg.optim, cfg.seed).epoch(0)[: _steps(a)]
    order = [i for step in plan for i in step.micro[0]["sst"].tolist()]
    return [raw.texts[i][0] for i in order], [int(raw.labels[i]) for i in order]


# --------------------------------------------------------------------------------------------
# Library-side variants (patched in this child process only)
# --------------------------------------------------------------------------------------------
def _patch(variant: str) -> None:
    import torch

    import mtl.train as mt
    from mtl import strategy as ms

    if variant == "nonorm":
        def step(self):
            # As TorchStrategy.step, without the global norm (and its host sync) when
            # nothing is clipped; the loss check in train_step already guards divergence.
            self.scaler.unscale_(self.optimizer)
            scale_before = self.loss_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            stepped = self.loss_scale() >= scale_before
            if stepped:
                self.scheduler.step()
            return None, stepped
        ms.TorchStrategy.step = step
    elif variant == "foreach":
        build = mt.build_optimizer

        def build_foreach(*args, **kw):
            opt = build(*args, **kw)
            for group in opt.param_groups:
                group["fused"] = None        # torch's default implementation (foreach)
            return opt
        mt.build_optimizer = build_foreach
    elif variant == "rowpad":
        import mtl.data as md

        def pad_batch(segment, index, pad_id, multiple=1):
            # The padding before the library's vectorised one: a loop of three copies per row.
            starts, ends = segment.offsets[index], segment.offsets[index + 1]
            width = -(-int((ends - starts).max()) // multiple) * multiple
            ids = torch.full((len(index), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(index), width), dtype=torch.long)
            types = torch.zeros((len(index), width), dtype=torch.long) if segment.types is not None else None
            for row, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
                ids[row, : e - s] = segment.tokens[s:e]
                mask[row, : e - s] = 1
                if types is not None:
                    types[row, : e - s] = segment.types[s:e]
            batch = {"input_ids": ids, "attention_mask": mask}
            if types is not None:
                batch["token_type_ids"] = types
            return batch
        md.pad_batch = pad_batch
    elif variant == "noseed":
        real = torch.manual_seed
        calls = {"n": 0}

        def seed_once(s):
            calls["n"] += 1
            return real(s) if calls["n"] <= 1 else None     # the model-build seed only
        mt.torch = type(sys)("torch_shim")
        mt.torch.__dict__.update(torch.__dict__)
        mt.torch.manual_seed = seed_once
    elif variant == "notb":
        from mtl.monitor import NullSink

        mt.TensorBoardSink = lambda *_a, **_k: NullSink()
    elif variant != "default":
        raise SystemExit(f"unknown variant {variant}")


def child_library(a) -> dict:
    import torch

    from mtl.train import train

    _patch(a.variant)
    cfg = _config(a, tempfile.mkdtemp(prefix="lib-", dir=a.tmp))
    if a.go_fd < 0:     # the driver's untimed first run: fill the token cache
        from mtl.data import encode_split, read_split
        from mtl.model import load_tokenizer
        from mtl.tasks import TASKS

        encode_split(read_split(cfg.data.data_dir, TASKS["sst"], "train", cfg.data.on_bad_row, cfg.data.max_train_rows),
                     TASKS["sst"], load_tokenizer(cfg.model), MAX_LENGTH, False, cfg.data.cache_dir)
        return {}
    baton = Baton(a)
    res = train(cfg)
    return {"own": res["examples_per_s"], "steps": baton.steps, "threads": torch.get_num_threads()}


def child_trainer(a) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    from mtl.model import resolve_model_path

    hf_logging.set_verbosity_error()
    path = resolve_model_path(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    texts, labels = _rows_in_plan_order(a)
    enc = tok(texts, truncation=True, max_length=MAX_LENGTH)
    rows = [{**{k: v[i] for k, v in enc.items()}, "labels": labels[i]} for i in range(len(texts))]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-", dir=a.tmp), per_device_train_batch_size=BATCH,
        max_steps=_steps(a), learning_rate=LR, weight_decay=WEIGHT_DECAY, adam_epsilon=EPS,
        lr_scheduler_type="constant", logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", dataloader_num_workers=0, use_cpu=True, disable_tqdm=True, seed=0)

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    trainer = InOrder(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tok))
    baton = Baton(a)
    out = trainer.train()
    return {"own": out.metrics["train_samples_per_second"], "steps": baton.steps, "threads": torch.get_num_threads(),
            "optim": str(args.optim), "attn": model.config._attn_implementation}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
class Child:
    """One side's training process, driven chunk by chunk through two pipes."""

    def __init__(self, a, side: str, variant: str):
        self.name = f"{side}[{variant}]"
        go_r, self.go_w = os.pipe()
        self.done_r, done_w = os.pipe()
        self.log = tempfile.NamedTemporaryFile("w+", dir=a.tmp, suffix=".log", delete=False)
        cmd = [sys.executable, __file__, "--child", side, "--variant", variant, "--chunk", str(a.chunk),
               "--chunks", str(a.chunks), "--warmup", str(a.warmup), "--data-dir", a.data_dir, "--tmp", a.tmp,
               "--go-fd", str(go_r), "--done-fd", str(done_w)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, pass_fds=(go_r, done_w))
        os.close(go_r)
        os.close(done_w)
        self.go, self.done = os.fdopen(self.go_w, "w"), os.fdopen(self.done_r, "r")

    def _read(self) -> str:
        line = self.done.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            sys.stderr.write(self.log.read()[-4000:])
            raise SystemExit(f"{self.name} ended early (exit {self.proc.returncode})")
        return line.strip()

    def ready(self) -> None:
        assert self._read() == "ready"

    def run_chunk(self) -> tuple[float, float]:
        """Runs one turn: (its wall seconds, the process's CPU seconds in it)."""
        self.go.write("go\n")
        self.go.flush()
        wall, cpu = self._read().split()
        return float(wall), float(cpu)

    def finish(self) -> dict:
        """Waits for the process to end (the library's evaluation and checkpoint run here, while
        the other side waits) and returns its last line."""
        self.proc.wait()
        self.log.seek(0)
        text = self.log.read()
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        if self.proc.returncode != 0 or not lines:
            sys.stderr.write(text[-4000:])
            raise SystemExit(f"{self.name} failed (exit {self.proc.returncode})")
        return json.loads(lines[-1])


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    shared = os.path.normpath(os.path.join(here, "..", "..", "shared", "data"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunk", type=int, default=10, help="steps each side runs per turn")
    p.add_argument("--chunks", type=int, default=16, help="turns per side and process (steps: warm-up + chunk x chunks)")
    p.add_argument("--warmup", type=int, default=5, help="steps each process runs before its first timed turn")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes for every side, this many times")
    p.add_argument("--data-dir", default=shared if os.path.isdir(shared) else "embedded:sample",
                   help="folder with sst-train.csv (default: ../shared/data when present, else the shipped sample)")
    p.add_argument("--variants", default="default", help=f"library variants, comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both sides (0: torch's default)")
    p.add_argument("--child", choices=("library", "trainer"), help=argparse.SUPPRESS)
    p.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--go-fd", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--done-fd", type=int, default=-1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        result = (child_library if a.child == "library" else child_trainer)(a)
        print(json.dumps(result), flush=True)
        return
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if "default" not in variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants: needs 'default' and names from {', '.join(VARIANTS)} (got {a.variants})")
    if a.warmup < 1 or a.chunk < 1 or a.chunks < 1:
        p.error("--warmup, --chunk and --chunks must be >= 1")
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    a.tmp = tempfile.mkdtemp(prefix="mtl-bench-trainer-")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        p.error("the Trainer needs accelerate: run this with a Python that has it (see the docstring)")
    sides = [("library", v) for v in variants] + [("trainer", "default")]
    trainer = ("trainer", "default")
    clocks = ("wall", "cpu")
    speeds = {k: {s: [] for s in sides} for k in clocks}    # examples/s of every turn, per clock
    ratios = {k: {s: [] for s in sides} for k in clocks}    # per pass: this side / the Trainer's turn
    own: dict = {s: [] for s in sides}
    threads = None
    subprocess.run([sys.executable, __file__, "--child", "library", "--chunk", str(a.chunk), "--chunks",
                    str(a.chunks), "--warmup", str(a.warmup), "--data-dir", a.data_dir, "--tmp", a.tmp],
                   check=True, capture_output=True)          # fills the token cache; not measured
    for r in range(a.rounds):
        children = {s: Child(a, *s) for s in sides}
        for child in children.values():
            child.ready()
        for c in range(a.chunks):
            order = sides if (c + r) % 2 == 0 else sides[::-1]
            turn = {}
            for s in order:
                turn[s] = children[s].run_chunk()
                if c == a.chunks - 1:
                    res = children[s].finish()
                    own[s].append(res["own"])
                    threads = res["threads"]
            for i, k in enumerate(clocks):
                for s in sides:
                    speeds[k][s].append(BATCH * a.chunk / turn[s][i])
                    ratios[k][s].append(turn[trainer][i] / turn[s][i])
        print(f"round {r + 1}: " + ", ".join(
            f"{s[0]}[{s[1]}] {statistics.median(speeds['wall'][s][-a.chunks:]):.2f}" for s in sides)
            + f" examples/s (wall; median of {a.chunks} turns), paired library/Trainer wall " + ", ".join(
            f"{statistics.median(ratios['wall'][s][-a.chunks:]):.3f}" for s in sides if s != trainer), flush=True)
    print(f"\nsst, {MODEL}, batch {BATCH}, max length {MAX_LENGTH}, data {a.data_dir}, threads {threads}; per process "
          f"{a.warmup} warm-up steps + {a.chunks} turns of {a.chunk} steps; {a.rounds} rounds of fresh processes; "
          f"sides taking turns, the order flipping every pass")
    print("clock | side | median examples/s | paired ratio to Trainer: median [q1, q3] | turns")
    for k in clocks:
        for s in sides:
            x = ratios[k][s]
            q = statistics.quantiles(x, n=4, method="inclusive") if len(x) > 1 else x * 3
            print(f"{k} | {s[0]}[{s[1]}] | {statistics.median(speeds[k][s]):.2f} | {statistics.median(x):.3f} "
                  f"[{q[0]:.3f}, {q[2]:.3f}] | {len(x)}")
    print("own figures (median over rounds): " + ", ".join(
        f"{s[0]}[{s[1]}] {statistics.median(own[s]):.2f}" for s in sides))
    print("target: library[default] / Trainer >= 0.95 (paired wall ratio)")


if __name__ == "__main__":
    main()
