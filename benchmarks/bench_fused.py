"""Aggregate training throughput of K alpha-scalarisation trials of one pair, fused into one
stacked model (mtl.fused) against the same K trials as K processes packed on the device, for
each K, side by side in one run; and the reference study's projected device-hours.

    .venv/bin/python benchmarks/bench_fused.py --device cuda --model bert-base-uncased --ks 1,3,9,11,16
    .venv/bin/python benchmarks/bench_fused.py --device cpu --ks 1,2 --max-steps 10     # 2-core CPU, ~2 min

Both arms train the same configs (sst,para, --combiner scalarize, alpha spread over 0.1..0.9,
fixed --max-steps, one shared token cache) and read each trial's results.json: its examples and
``train_time_s`` (the optimizer steps, without start-up, evaluation and checkpoint writes).

- fused aggregate ex/s = all members' examples / the group's step-loop time (every member's
  ``train_time_s`` is the group's: the loop is shared);
- packed aggregate ex/s = the sum of the K processes' own rates (they start together);
- ratio = fused / packed, per K.  Target (issue 20): fused K = 11 >= 1.5x packed K = 8.

Projection: 36 trials per seed x ``--seeds``, each ``--examples-per-trial`` (default: the
reference protocol on the full data, 10 epochs x 2 x 8544 undersampled examples), at the best
fused aggregate rate: device-hours = examples / rate / 3600 (PCGrad and single-task trials run
unfused at their own rate: an estimate, said as such)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def configs(args, k: int, root: Path):
    from mtl.config import RunConfig
    alphas = [round(0.1 + 0.8 * i / max(k - 1, 1), 4) for i in range(k)] if k > 1 else [0.5]
    base = {"progress": "off", "device": args.device, "precision": args.precision, "data.tasks": "sst,para",
            "optim.max_steps": args.max_steps, "optim.batch_size": args.batch_size, "eval_every_epochs": 1000,
            "combiner.combiner": "scalarize", "data.cache_dir": str(root / "cache"), "keep_final_state": False,
            "combiner.conflict_every": 0, **({"model.model": args.model} if args.model else {}),
            **({"data.data_dir": args.data_dir} if args.data_dir else {})}
    return [RunConfig().replace(out=str(root / f"k{k}-{i}"), **base, **{"combiner.alpha": a})
            for i, a in enumerate(alphas)]


def examples(results: dict) -> int:
    return sum(results["examples"].values())


def fused(args, k: int, root: Path) -> float:
    from mtl.fused import train_group
    results = train_group(configs(args, k, root / "fused"))
    return sum(examples(r) for r in results) / max(r["train_time_s"] for r in results)


def packed(args, k: int, root: Path) -> float:
    cfgs = configs(args, k, root / "packed")
    procs = []
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // k))} if args.device == "cpu" else os.environ
    for cfg in cfgs:
        path = Path(cfg.out + ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg.to_dict()))
        procs.append(subprocess.Popen([sys.executable, __file__, "--trial", str(path)], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"a packed trial failed: {err.decode()[-500:]}")
    rates = []
    for cfg in cfgs:
        r = json.loads(Path(cfg.out, "results.json").read_text())
        rates.append(examples(r) / r["train_time_s"])
    return sum(rates)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="")
    p.add_argument("--data-dir", default="")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--ks", default="1,2")
    p.add_argument("--packed-ks", default="", help="K of the packed arm (default: the same as --ks)")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--examples-per-trial", type=int, default=10 * 2 * 8544)
    p.add_argument("--trial", default="", help=argparse.SUPPRESS)     # the packed arm's own processes
    args = p.parse_args()
    if args.trial:
        from mtl.config import RunConfig
        from mtl.train import train
        train(RunConfig.from_dict(json.loads(Path(args.trial).read_text())))
        return 0
    ks = [int(x) for x in args.ks.split(",")]
    packed_ks = [int(x) for x in args.packed_ks.split(",")] if args.packed_ks else ks
    with tempfile.TemporaryDirectory(prefix="bench-fused-") as tmp:
        root = Path(tmp)
        configs(args, 1, root)      # imports torch before timing
        fused(args, 1, root / "warm")   # fills the token cache
        rows = {}
        for k in sorted(set(ks) | set(packed_ks)):
            tick = time.time()
            rows[k] = {"fused": fused(args, k, root) if k in ks else None,
                       "packed": packed(args, k, root) if k in packed_ks else None}
            rows[k]["wall_s"] = round(time.time() - tick, 1)
    print(f"{'K':>3} {'fused ex/s':>11} {'packed ex/s':>12} {'fused/packed':>13}")
    for k, r in rows.items():
        ratio = r["fused"] / r["packed"] if r["fused"] and r["packed"] else None
        print(f"{k:>3} {r['fused'] or float('nan'):>11.1f} {r['packed'] or float('nan'):>12.1f} "
              f"{ratio if ratio else float('nan'):>13.2f}")
    best = max((r["fused"] for r in rows.values() if r["fused"]), default=None)
    packed_best = max((r["packed"] for r in rows.values() if r["packed"]), default=None)
    if best and packed_best:
        print(f"best fused / best packed: {best / packed_best:.2f}x")
    if best:
        total = 36 * args.seeds * args.examples_per_trial
        print(f"projected study ({args.seeds} seeds x 36 trials x {args.examples_per_trial} examples) at "
              f"{best:.1f} ex/s: {total / best / 3600:.2f} device-hours")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
