"""A trial's ``results.json``: the one reader, so that "is this trial finished?" has one answer
for the trial itself, the launchers and the report.

A trial writes the file once, at its end: ``{"status": "done", ...}`` with its best metrics, or
``{"status": "failed", "error": ...}`` when training diverged.  Anything else found there (a
truncated write by a tool that is not atomic, ``[]``, a hand-edited ``{"status": "done"}``) is
*unreadable*: never counted as a result, named with its reason, and the trial runs again."""
from __future__ import annotations

import json
import logging

from mtl import storage
from mtl.errors import MtlError

FILE = "results.json"
log = logging.getLogger(__name__)

# What the readers of a done trial's results use (the results table, the report, resumes).
DONE_KEYS = {"config": dict, "best": dict, "steps": int, "wall_time_s": (int, float), "train_time_s": (int, float),
             "examples_per_s": (int, float), "world_size": int}
FAILED_KEYS = {"config": dict, "error": str}
# What a trial's steps cost (mtl.cost): written by trials since issue 17, so results written
# before lack them and no reader may require them (the results table and the report say n/a).
COST_KEYS = ("step_time_s", "peak_memory_mb", "peak_memory_kind", "backwards_per_step", "cost_class", "cost_note")


class UnreadableResults(MtlError):
    """A results.json that is not what a trial writes."""


def url(out: str) -> str:
    return storage.join(out, FILE)


def problem(results) -> str | None:
    """Why ``results`` is not a trial's results, or None when it is."""
    if not isinstance(results, dict):
        return f"a JSON {type(results).__name__}, not a trial's results"
    status = results.get("status", "done")
    if status not in ("done", "failed"):
        return f"status {status!r} is neither done nor failed"
    for key, kind in (DONE_KEYS if status == "done" else FAILED_KEYS).items():
        if key not in results:
            return f"a {status} trial's results without {key!r}"
        if isinstance(results[key], bool) or not isinstance(results[key], kind):
            return f"{key!r} is a {type(results[key]).__name__}"
    if status == "done" and not isinstance(results["best"].get("metrics", {}), dict):
        return "'best.metrics' is not a mapping"
    return None


def read(out: str) -> dict | None:
    """The trial's results, None when it has none yet; UnreadableResults (naming the file and
    why) when the file is there but is not a trial's results."""
    where = url(out)
    if not storage.exists(where):
        return None
    try:
        results = json.loads(storage.read_text(where))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnreadableResults(f"{where}: not valid JSON ({str(exc).splitlines()[0][:80]})") from None
    why = problem(results)
    if why:
        raise UnreadableResults(f"{where}: {why}")
    return results


_warned: set[str] = set()


def read_or_none(out: str) -> dict | None:
    """``read``, with an unreadable file counted as no results and said once per process: the
    trial is not finished and runs again (its run rewrites the file at its end)."""
    try:
        return read(out)
    except UnreadableResults as exc:
        if str(exc) not in _warned:
            _warned.add(str(exc))
            log.warning("%s: not counted as finished, the trial runs again", exc)
        return None


# "Is this trial finished?", answered here once for everyone.  Two questions, on purpose:
def ended(out: str) -> dict | None:
    """The results of a trial that ran to an end, done or failed, else None.  Launchers never
    run an ended trial again: a diverged trial would fail the same way (delete its results.json
    to try it anyway).  An unreadable results.json is not an end: said once, the trial runs."""
    return read_or_none(out)


def done(out: str) -> dict | None:
    """The results of a trial that finished training (status done), else None.  A failed trial
    started again by hand (``python -m mtl.train``) is tried again: its user asked for it."""
    results = read_or_none(out)
    return results if results is not None and results.get("status", "done") == "done" else None
