"""Single-task SST training throughput of the library (``mtl.train.train``) against Hugging
Face's ``Trainer`` on the same encoder, batch, maximum length, rows and order, on CPU.

    cp -a .venv /tmp/trainer-venv && /tmp/trainer-venv/bin/python -m pip install accelerate   # once
    PYTHONPATH=. /tmp/trainer-venv/bin/python benchmarks/bench_trainer.py        # 5-10 min on 2 cores
    PYTHONPATH=. /tmp/trainer-venv/bin/python benchmarks/bench_trainer.py --variants default,plainadamw,nonorm \\
        --threads 1 --chunks 8 --rounds 1                                       # suspects, one thread, quicker

(The Trainer needs ``accelerate``, which the project does not pin: it runs from a copy of the
project's venv with it added, so .venv stays as pinned; ``PYTHONPATH=.`` makes ``import mtl``
find this checkout.)

Both sides: the embedded all-MiniLM-L6-v2 (``embedded:all-MiniLM-L6-v2``), SST-5 (5 classes),
batch 8, max length 128, padding to the longest sequence of the batch, fp32, AdamW
(lr 1e-5, weight decay 0.01 on weights only, eps 1e-6, constant lr), no evaluation and no
checkpoint inside the timed window, one process each, torch's default threads (``--threads``
sets OMP_NUM_THREADS for both).  The rows: the library's fixed subset of ``steps x 8``
training rows of ``--data-dir`` (``read_split`` with ``max_train_rows``; steps = warm-up +
turns x turn length), fed in the library sampler's epoch-0 order to both sides (the
Trainer's sampler is replaced by a sequential one over the rows in that order), so step k
sees the same examples, padded to the same width, on both sides.
The library: its default single-task trial (MLP head on [CLS], head dropout 0.5, fused AdamW,
the global gradient norm measured every step, no clipping, TensorBoard scalars every 10
steps).  The Trainer: ``AutoModelForSequenceClassification`` (pooler + linear head),
``DataCollatorWithPadding``, its default optimizer (``TrainingArguments().optim`` is
``adamw_torch_fused`` in transformers 5.x) and its default clipping to norm 1.0,
``report_to="none"``, logging and saving off, ``dataloader_num_workers=0``.

How examples/s is counted, the same on both sides: a global optimizer step post-hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``, which fires inside either
loop's ``optimizer.step()``) runs a baton.  Both sides start at once, each in its own
process; after ``--warmup`` steps each waits in the hook.  The driver then lets one side at a
time run a turn of ``--chunk`` steps, timed from the go to the end of the turn's last
optimizer step: the wall time of the training loop only (batching/collation, forward,
backward, norm/clip, step, scheduler, zero_grad, per-step bookkeeping and logging), nothing
before (model load, tokenizing) or after (the library's end-of-epoch evaluation and
checkpoint).  The sides take turns, the order flipping every pass, so the load other jobs put
on the machine hits both alike; each pass gives a paired ratio (library turn / the Trainer's
turn next to it).  Printed: per side the median examples/s over all turns and the median and
quartiles of the paired ratios, by wall clock and by the process's CPU time (threads
summed; less sensitive to other jobs than wall time, but it counts OpenMP spin-waits), over
``--rounds`` fresh pairs of processes.  Target: library[default] / Trainer >= 0.95.
On 2 CPU cores (2026-11-28, torch 2.13, transformers 5.23): library/Trainer (paired wall
ratio 1.02-1.03); with ``plainadamw`` 0.80-0.83, as the library before e393fc2 (0.82-0.86).
(Each library's own figure is useless here: the waits between turns fall inside both.)

``--variants`` adds library sides with one change each, patched in the child process (never
in ``mtl/``), to measure a suspect beside the default:
``plainadamw``: ``torch.optim.AdamW`` without ``fused=True``, i.e. torch's default, which on CPU is
the per-parameter for-loop (foreach kernels are CUDA-only) (the library before e393fc2);
``rowpad``: the per-row padding loop instead of the whole-batch one (the library before e393fc2);
``nonorm``: no global gradient norm (and its host sync) in the step when clipping is off;
``noseed``: no ``torch.manual_seed`` per step; ``notb``: no TensorBoard sink.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BATCH = 8
MAX_LENGTH = 128
LR, WEIGHT_DECAY, EPS = 1e-5, 0.01, 1e-6
MODEL = "embedded:all-MiniLM-L6-v2"
VARIANTS = ("default", "plainadamw", "rowpad", "nonorm", "noseed", "notb")


# --------------------------------------------------------------------------------------------
# Timing: the same hook on both sides, and the baton that interleaves them
# --------------------------------------------------------------------------------------------
class Baton:
    """Installed in each child as a global optimizer step post-hook (so it sees the library's
    and the Trainer's steps alike).  At the end of step ``warmup`` the child says it is ready
    and waits; then, each time the driver says go, it runs ``chunk`` steps and reports their
    wall and process CPU time: from the go to the end of the chunk's last optimizer step, i.e.
    everything the loop does for those steps.  Only one child computes at any moment."""

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

    import mtl.trainer as mt
    from mtl import strategy as ms

    if variant == "nonorm":
        def step(self):
            # As TorchStrategy.step, without the global norm (and its host sync) when
            # nothing is clipped; the loss check in Trainer.step already guards divergence.
            self.scaler.unscale_(self.optimizer)
            return None, self.apply_step()
        ms.TorchStrategy.step = step
    elif variant == "plainadamw":
        build = mt.build_optimizer

        def build_plain(*args, **kw):
            opt = build(*args, **kw)
            for group in opt.param_groups:
                group["fused"] = None        # torch's default choice: on CPU, the for-loop
            return opt
        mt.build_optimizer = build_plain
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
    return {"steps": baton.steps, "threads": torch.get_num_threads(), "examples_per_s_own": res["examples_per_s"]}


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
    trainer.train()
    return {"steps": baton.steps, "threads": torch.get_num_threads(), "optim": getattr(args.optim, "value", args.optim),
            "attn": model.config._attn_implementation}


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
    p.add_argument("--chunks", type=int, default=16, help="turns per side and process (steps: warmup + chunk x chunks)")
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
    try:
        import accelerate  # noqa: F401
    except ImportError:
        p.error("the Trainer needs accelerate: run this with a Python that has it (see the docstring)")
    a.tmp = tempfile.mkdtemp(prefix="mtl-bench-trainer-")
    try:
        measure(a, variants)
    finally:
        shutil.rmtree(a.tmp, ignore_errors=True)     # run folders (best weights) and the token cache


def take_turns(a, parity: int, sides: list, children: dict, speeds: dict, ratios: dict, setup: dict,
               last: bool) -> None:
    """One pass: every side runs one turn, in order or reversed by ``parity``; after its last
    turn a side's process is waited for (its end of training runs while the others wait)."""
    trainer = ("trainer", "default")
    order = sides if parity % 2 == 0 else sides[::-1]
    turn = {}
    for s in order:
        turn[s] = children[s].run_chunk()
        if last:
            setup.update(children[s].finish())
    for i, k in enumerate(("wall", "cpu")):
        for s in sides:
            speeds[k][s].append(BATCH * a.chunk / turn[s][i])
            ratios[k][s].append(turn[trainer][i] / turn[s][i])


def measure(a, variants: list[str]) -> None:
    sides = [("library", v) for v in variants] + [("trainer", "default")]
    trainer = ("trainer", "default")
    clocks = ("wall", "cpu")
    speeds = {k: {s: [] for s in sides} for k in clocks}    # examples/s of every turn, per clock
    ratios = {k: {s: [] for s in sides} for k in clocks}    # per pass: this side / the Trainer's turn
    setup: dict = {}         # the children's last lines: threads, the Trainer's optimizer and attention
    fill = subprocess.run([sys.executable, __file__, "--child", "library", "--chunk", str(a.chunk), "--chunks",
                           str(a.chunks), "--warmup", str(a.warmup), "--data-dir", a.data_dir, "--tmp", a.tmp],
                          capture_output=True, text=True)    # fills the token cache; not measured
    if fill.returncode != 0:
        sys.stderr.write((fill.stdout + fill.stderr)[-4000:])
        raise SystemExit(f"reading and tokenizing {a.data_dir} failed (exit {fill.returncode})")
    for r in range(a.rounds):
        children = {}
        try:
            for s in sides:
                children[s] = Child(a, *s)
            for child in children.values():
                child.ready()
            for c in range(a.chunks):
                take_turns(a, c + r, sides, children, speeds, ratios, setup, last=c == a.chunks - 1)
        finally:
            for child in children.values():
                if child.proc.poll() is None:      # a side failed: stop the others
                    child.proc.kill()
                    child.proc.wait()
        print(f"round {r + 1}: " + ", ".join(
            f"{s[0]}[{s[1]}] {statistics.median(speeds['wall'][s][-a.chunks:]):.2f}" for s in sides)
            + f" examples/s (wall; median of {a.chunks} turns), paired library/Trainer wall " + ", ".join(
            f"{statistics.median(ratios['wall'][s][-a.chunks:]):.3f}" for s in sides if s != trainer), flush=True)
    print(f"\nsst, {MODEL}, batch {BATCH}, max length {MAX_LENGTH}, data {a.data_dir}, threads {setup.get('threads')}; "
          f"per process {a.warmup} warm-up steps + {a.chunks} turns of {a.chunk} steps; {a.rounds} rounds of "
          f"fresh processes; sides taking turns, the order flipping every pass")
    print("clock | side | median examples/s | paired ratio to Trainer: median [q1, q3] | turns")
    for k in clocks:
        for s in sides:
            x = ratios[k][s]
            q = statistics.quantiles(x, n=4, method="inclusive") if len(x) > 1 else x * 3
            print(f"{k} | {s[0]}[{s[1]}] | {statistics.median(speeds[k][s]):.2f} | {statistics.median(x):.3f} "
                  f"[{q[0]:.3f}, {q[2]:.3f}] | {len(x)}")
    print(f"Trainer: optim {setup.get('optim')}, attention {setup.get('attn')}")
    print("target: library[default] / Trainer >= 0.95 (paired wall ratio)")


if __name__ == "__main__":
    main()
