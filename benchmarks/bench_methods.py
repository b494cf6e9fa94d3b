"""Every loss method's cost, side by side on the same model, batches and data: its cost class,
the backward passes it runs per optimizer step (counted), and its step time and peak memory
relative to loss addition's, measured in the same run.

    .venv/bin/python benchmarks/bench_methods.py                    # embedded MiniLM, sst,para,sts, CPU
    .venv/bin/python benchmarks/bench_methods.py --device cuda --precision bf16 --model bert-base-uncased --markdown
    .venv/bin/python benchmarks/bench_methods.py --methods sum,pcgrad --steps 20 --rounds 3
    .venv/bin/python benchmarks/bench_methods.py --threads 1        # a CPU someone else is using too

Every method of ``mtl.combine.COMBINERS`` runs with its default settings (scalarize, whose defaults
weigh a pair, gets equal weights over three tasks) through the real trial path, ``mtl.train.train``
with ``--max-steps``, each (method, round) in its own process, rounds alternating methods, so each
peak is that method's own and machine load hits every method alike.  The peak is the trial's
``peak_memory_mb`` (CPU: the process's peak resident set, interpreter and libraries included,
so ratios understate the method's own share; CUDA: peak allocated since training began).  The
step time is the trial's ``step_time_s`` (evaluation and checkpoints left out), after a short
warm-up trial in the same process.  Backward passes are counted by wrapping the strategy's
``backward`` here, independently of the trial's own count, and checked against it.  A method
that needs a package missing here (an optional solver) or refuses these settings is listed as
skipped, with the reason.

On a CPU another process is using, ``--threads 1`` steadies the ratios: torch's threads stall
whenever the other process holds a core (measured on the 2-core machine under another user's
tests: the same step took 1.2 to 9.4 s across methods with 2 threads, 1.8 to 2.5 s with 1; the
default run took 7 min 20 s and 3 min 30 s).  Idle, a step of the three tasks is ~0.75 s (NOTES:
0.5 s for two), so the default run should take about 2 minutes idle (estimated, not measured).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile

# The one method whose defaults do not run on three tasks: --alpha weighs a pair.
SETTINGS = {"scalarize": lambda tasks: {"combiner.weights": [1.0 / len(tasks)] * len(tasks)} if len(tasks) > 2 else {}}


def count_backwards() -> list[int]:
    """Wrap the backward of every strategy the trials build, counting its calls (any strategy:
    DeepSpeed's overrides the plain one's)."""
    import mtl.trainer

    calls = [0]
    build = mtl.trainer.build_strategy

    def counting_build(cfg, dist):
        strategy = build(cfg, dist)
        plain = strategy.backward

        def backward(loss):
            calls[0] += 1
            plain(loss)
        strategy.backward = backward
        return strategy
    mtl.trainer.build_strategy = counting_build
    return calls


def worker(a) -> dict:
    import torch

    from mtl.config import RunConfig
    from mtl.errors import MtlError
    from mtl.train import train

    if a.threads:
        torch.set_num_threads(a.threads)
    calls = count_backwards()
    # Each trial leaves its best weights (87 MB for MiniLM): removed with the folder below.
    tmp = tempfile.mkdtemp(prefix=f"mtl-bench-methods-{a.worker}-")
    out = f"{tmp}/trial"
    tasks = [t for t in a.tasks.split(",") if t]
    try:
        cfg = RunConfig().replace(**{
            "model.model": a.model, "data.tasks": a.tasks, "optim.batch_size": a.batch_size,
            "optim.max_steps": a.steps, "model.max_length": a.max_length, "data.max_dev_rows": 8, "progress": "off",
            "optim.epochs": 1, "device": a.device, "out": out, "data.cache_dir": a.cache,
            "combiner.conflict_every": 0, "precision": a.precision, "data.data_dir": a.data_dir,
            "combiner.combiner": a.worker, **SETTINGS.get(a.worker, lambda _: {})(tasks)})
        if a.warmup_steps:
            # First steps pay one-off costs (CUDA context, cuBLAS handles, the allocator's pool, the
            # token cache): a short trial in this process pays them outside the measured one.
            train(cfg.replace(out=out + "-warmup", **{"optim.max_steps": a.warmup_steps}))
        calls[0] = 0
        res = train(cfg)
    except ImportError as exc:
        return {"skipped": f"needs {exc.name or exc}, not installed"}
    except MtlError as exc:
        return {"skipped": str(exc).splitlines()[0]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"step_s": res["step_time_s"], "peak_mb": res["peak_memory_mb"], "kind": res["peak_memory_kind"],
            "backwards": calls[0] / res["steps"], "recorded": res["backwards_per_step"],
            "cost_class": res["cost_class"], "note": res.get("cost_note"), "threads": torch.get_num_threads()}


def run_all(a, methods: list[str]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(a.rounds):
        for method in methods:
            if runs[method] and "skipped" in runs[method][-1]:
                continue
            cmd = [sys.executable, __file__, "--worker", method, *sys.argv[1:]]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{method} round {r + 1} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            runs[method].append(got)
            print(f"round {r + 1} {method:12s} " + (f"skipped: {got['skipped']}" if "skipped" in got else
                  f"step {got['step_s'] * 1000:8.1f} ms  peak {got['peak_mb']:8.1f} MiB  "
                  f"backwards/step {got['backwards']:g}"), file=sys.stderr, flush=True)
    return runs


def _count(value: float) -> str:
    return f"{value:g}" if value == int(value) else f"{value:.2f}"


def table_rows(runs: dict[str, list[dict]], tasks: int, micro: int) -> tuple[list[list[str]], list[str]]:
    """One row per method (medians over rounds), and notes: a count that disagrees with the
    method's cost class, or with the trial's own count."""
    from mtl.cost import expected_backwards

    base = runs["sum"][0]
    sum_step = statistics.median(x["step_s"] for x in runs["sum"])
    sum_peak = statistics.median(x["peak_mb"] for x in runs["sum"])
    rows, notes = [], []
    for method, got in runs.items():
        if "skipped" in got[0]:
            rows.append([method, f"skipped: {got[0]['skipped']}", "", "", "", "", ""])
            continue
        step = statistics.median(x["step_s"] for x in got)
        peak = statistics.median(x["peak_mb"] for x in got)
        first = got[0]
        implied = expected_backwards(first["cost_class"], tasks, micro)
        if first["backwards"] != implied:
            notes.append(f"{method}: {_count(first['backwards'])} backwards per step counted, its cost class "
                         f"{first['cost_class']!r} implies {implied}")
        if first["recorded"] != first["backwards"]:
            notes.append(f"{method}: the trial recorded {first['recorded']} backwards per step, {first['backwards']} "
                         "counted here")
        if first["note"]:
            notes.append(f"{method}: {first['note']}")
        memory = f"{peak / sum_peak:.2f}" if first["kind"] == base["kind"] else "n/a"
        rows.append([method, first["cost_class"], _count(first["backwards"]), f"{step / sum_step:.2f}", memory,
                     f"{step * 1000:.1f}", f"{peak:.0f}"])
    return rows, notes


HEAD = ["method", "cost class", "backwards/step", "step time vs sum", "peak memory vs sum", "step ms", "peak MiB"]


def render(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    width = [max(len(r[i]) for r in [HEAD] + [r for r in rows if not r[1].startswith("skipped")])
             for i in range(len(HEAD))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in [HEAD] + rows)


def parse(argv=None):
    from mtl.config import DEFAULT_DATA, DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="any Hugging Face encoder name or folder")
    p.add_argument("--tasks", default="sst,para,sts")
    p.add_argument("--methods", default="", help="comma-separated (default: every method of mtl.combine.COMBINERS)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0, help="torch's CPU threads in each trial (default: torch's own)")
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--cache", default=tempfile.gettempdir() + "/mtl-bench-cache", help=argparse.SUPPRESS)
    return p, p.parse_args(argv)


def main() -> None:
    p, a = parse()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    from mtl.combine import COMBINERS

    asked = [m.strip() for m in a.methods.split(",") if m.strip()] or sorted(COMBINERS)
    unknown = [m for m in asked if m not in COMBINERS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(sorted(COMBINERS))})")
    methods = ["sum"] + [m for m in asked if m != "sum"]      # the reference, always measured, first
    runs = run_all(a, methods)
    if "skipped" in runs["sum"][0]:
        raise SystemExit(f"sum, the reference, did not run: {runs['sum'][0]['skipped']}")
    rows, notes = table_rows(runs, len(a.tasks.split(",")), 1)
    print(f"model={a.model} tasks={a.tasks} batch={a.batch_size} steps={a.steps} rounds={a.rounds} device={a.device} "
          f"precision={a.precision} threads={runs['sum'][0]['threads']} peak={runs['sum'][0]['kind']}")
    print(render(rows, a.markdown))
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
