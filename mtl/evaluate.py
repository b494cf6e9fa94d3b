"""Score a trial's best model on any split and write its predictions as the course's
leaderboard takes them.

    python -m mtl.evaluate runs/x --split dev                       # the trial's own data
    python -m mtl.evaluate runs/x/best --split test --data-dir /data/minbert --out predictions/

Writes ``<sst|para|sts>-<split>-output.csv`` for each of the trial's tasks (a header
``id \\t Predicted_...``, then ``<id> , <prediction>`` per example, in file order), with the
trial's own tokenizer, max length and pair encoding.  A split without labels (a test set) gets
predictions only; a labelled one also prints its metrics as JSON.  For the dev split the
trial's own row limit applies, so the scores are the ones it recorded.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from mtl import storage
from mtl.checks import check_device
from mtl.cli import guarded
from mtl.data import encode_split, read_split
from mtl.errors import ConfigError
from mtl.evaluation import predict, score
from mtl.export import load_best
from mtl.strategy import AUTOCAST_DTYPES, autocast
from mtl.tasks import TASKS


def predictions_csv(task: str, ids: list[str], pred: torch.Tensor) -> str:
    spec = TASKS[task]
    values = [spec.label_text(v) for v in pred.tolist()]
    return f"id \t {spec.output_header} \n" + "".join(f"{i} , {v} \n" for i, v in zip(ids, values))


def read_predictions_csv(text: str) -> dict[str, float]:
    """id -> prediction, from a file predictions_csv wrote (or the leaderboard's own)."""
    rows = text.splitlines()[1:]
    return {i.strip(): float(v) for i, _, v in (row.partition(",") for row in rows if row.strip())}


def evaluate(path: str, split: str, data_dir: str | None = None, out: str | None = None,
             device: str = "cpu") -> dict:
    """Predictions for each of the trial's tasks on ``split``; returns the metrics (empty for an
    unlabelled split) and writes the CSV files to ``out`` (default: <trial>/predictions)."""
    model, cfg, meta, tokenizer = load_best(path, device)
    data_dir = data_dir or cfg.data.data_dir
    out = out or storage.join(path.rstrip("/").removesuffix("/best"), "predictions")
    rows = cfg.data.max_dev_rows if split == "dev" and data_dir == cfg.data.data_dir else 0
    # An mlm task has no predictions to hand in (its labels are masked tokens): left out.
    raw = {t: read_split(data_dir, TASKS[t], split, cfg.data.on_bad_row, rows, labels_optional=True)
           for t in cfg.data.tasks if not TASKS[t].mlm}
    if not raw:
        raise ConfigError(f"{path}: an mlm stage's model has no task predictions to write (evaluate the trials "
                          "that start from it)")
    encoded = {t: encode_split(r, TASKS[t], tokenizer, cfg.model.max_length, cfg.model.siamese(t), None)
               for t, r in raw.items()}
    # The trial's own precision (it evaluated under the same autocast), so the scores are the recorded ones.
    mixed = lambda: autocast(torch.device(device).type, AUTOCAST_DTYPES[cfg.precision])  # noqa: E731
    preds = predict(model, encoded, cfg.optim.batch_size * 4, mixed, torch.device(device), cfg.pad_multiple)
    for t, pred in preds.items():
        storage.write_text(storage.join(out, f"{t}-{split}-output.csv"), predictions_csv(t, raw[t].ids, pred))
    labelled = {t: p for t, p in preds.items() if raw[t].labelled}
    return score(labelled, {t: encoded[t] for t in labelled}) if labelled else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtl.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("trial", help="a trial's run folder or its best/ folder (any fsspec URL)")
    p.add_argument("--split", default="dev", help="dev, test or train: <task>-<split>.csv in the data folder")
    p.add_argument("--data-dir", default=None, help="folder or URL of the task files (default: the trial's)")
    p.add_argument("--out", default=None, help="where the CSV files go (default: <trial>/predictions)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def work() -> int:
        check_device(args.device)
        metrics = evaluate(args.trial, args.split, args.data_dir, args.out, args.device)
        print(json.dumps({"split": args.split, "metrics": metrics}))
        return 0
    return guarded(work)


if __name__ == "__main__":
    sys.exit(main())
