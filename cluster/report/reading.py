"""Reading a study: every trial's results.json (and, for the bootstrap and the best-model figures,
its best/dev_predictions.json), on any fsspec URL.  Nothing in a trial's folder stops the reading:
a missing or broken file makes that trial 'missing' or 'unreadable', with its reason."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from mtl import storage
from mtl.config import NEW_AT_DEFAULT, RunConfig
from mtl.stages import links
from mtl.errors import MtlError
from mtl.monitor import flatten
from mtl.tasks import TASKS


@dataclass
class Trial:
    name: str
    status: str                                  # done, failed, missing, unreadable
    tasks: tuple[str, ...] = ()
    method: str = ""                             # addition, α=0.3, PCGrad, ...
    variant: str = ""                            # other settings that vary across the study
    seed: int = 0
    weights: dict = field(default_factory=dict)  # task -> its loss weight (scalarization)
    scores: dict = field(default_factory=dict)   # task -> primary dev metric
    examples: dict = field(default_factory=dict)  # task -> examples of it seen per epoch (None: unknown)
    cos_mean: float | None = None                # mean cosine of the pair's task gradients
    conflict: float | None = None                # fraction of measured steps with a conflict
    step_time_s: float | None = None             # mean wall seconds per optimizer step (None: not recorded)
    peak_memory_mb: float | None = None          # peak memory while training, of the kind below
    memory_kind: str = ""                        # cuda_allocated or cpu_rss (mtl.cost)
    backwards_per_step: float | None = None      # backward passes per optimizer step, counted
    cost_class: str = ""                         # the method's declared cost class
    overall: float | None = None                 # the leaderboard's overall score (sst, para and sts trained)
    error: str = ""                              # why it failed, or why its results are unreadable
    folder: str = ""
    identity: dict = field(default_factory=dict, repr=False)

    @property
    def grouping(self) -> str:
        return "+".join(self.tasks)

    @property
    def label(self) -> str:
        return row_label(self.method, self.variant)


@dataclass
class Study:
    root: str
    trials: list[Trial]
    notes: list[str] = field(default_factory=list)   # problems with the study table itself


def row_label(method: str, variant: str) -> str:
    """A trial's row in the report's tables: its loss combination, then its other varied settings."""
    return f"{method}, {variant}" if variant else method


def done_trials(trials: list[Trial]) -> list[Trial]:
    return [t for t in trials if t.status == "done"]


def method_of(cfg: RunConfig) -> tuple[str, dict]:
    """A readable name for the loss combination, and each task's weight where it is fixed."""
    c, tasks = cfg.combiner, cfg.data.tasks
    if c.combiner == "sum":
        return "addition", {}
    if c.combiner == "scalarize":
        if c.weights:
            return "weights " + ",".join(f"{w:g}" for w in c.weights), dict(zip(tasks, c.weights))
        if len(tasks) == 2:
            return f"α={c.alpha:g}", {tasks[0]: c.alpha, tasks[1]: round(1 - c.alpha, 10)}
        return "addition", {}
    names = {"pcgrad": "PCGrad", "uncertainty": "uncertainty", "dtp": "DTP"}
    name = names.get(c.combiner, c.combiner)
    if c.combiner == "pcgrad" and c.pcgrad_on != "params":
        name += f" ({c.pcgrad_on})"
    return name, {}


# --------------------------------------------------------------------------------------------
# The trials' results.json
# --------------------------------------------------------------------------------------------
def load_study(root: str, per_task_best: bool = False) -> Study:
    """Every trial the sweep's table lists (or, without a readable table, every trial folder),
    read fresh from its own results.json.  Nothing in a trial's folder stops the reading: a
    broken file makes that trial 'unreadable', with its reason.  ``per_task_best``: each task's
    score from its own best evaluation (results' best_by_task), not the trial's best epoch."""
    names, notes = _trial_names(root)
    if not names:
        raise MtlError(f"{root}: no sweep here (no results.json table and no trial folders with results)")
    trials = [_read_trial(root, n, per_task_best) for n in names]
    _name_variants([t for t in trials if t.identity])
    return Study(root, trials, notes)


def _trial_names(root: str) -> tuple[list[str], list[str]]:
    url = storage.join(root, "results.json")
    notes = []
    if storage.exists(url):
        try:
            rows = json.loads(storage.read_text(url))
            if not isinstance(rows, list) or not rows:
                raise ValueError(f"a JSON {type(rows).__name__}{' with no rows' if rows == [] else ''}, "
                                 "not a list of trial rows")
            names = [row["trial"] for row in rows]
            if not all(isinstance(n, str) and n for n in names):
                raise ValueError("a row's 'trial' is not a name")
            return list(dict.fromkeys(names)), notes
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, MtlError) as exc:
            reason = f"row without {exc}" if isinstance(exc, KeyError) else _one_line(exc)
            notes.append(f"The study table `results.json` is unreadable ({reason}): its trials were found by "
                         "listing the trial folders instead, so trials never started are not named.")
    names = [n for n in storage.listdir(root) if storage.exists(storage.join(root, n, "results.json"))]
    return names, notes


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _read_trial(root: str, name: str, per_task_best: bool = False) -> Trial:
    folder = storage.join(root, name)
    url = storage.join(folder, "results.json")
    if not storage.exists(url):
        return Trial(name, "missing", folder=folder)

    def unreadable(why: str) -> Trial:
        return Trial(name, "unreadable", error=why, folder=folder)

    try:
        res = json.loads(storage.read_text(url))
    except (ValueError, UnicodeDecodeError, MtlError, OSError) as exc:
        return unreadable(f"results.json is not valid JSON ({_one_line(exc)})")
    why = _results_problem(res)
    if why:
        return unreadable(why)
    status = res.get("status", "done")
    if status == "failed" and not isinstance(res.get("config"), dict):
        return Trial(name, "failed", error=str(res.get("error", "")), folder=folder)
    try:
        cfg = RunConfig.from_dict(res["config"])
    except (MtlError, TypeError, ValueError, AttributeError) as exc:
        if status == "failed":
            return Trial(name, "failed", error=str(res.get("error", "")), folder=folder)
        return unreadable(f"its config does not load ({_one_line(exc)})")
    method, weights = method_of(cfg)
    trial = Trial(name, status, cfg.data.tasks, method, seed=cfg.seed, weights=weights,
                  error=str(res.get("error", "")), folder=folder, identity=report_identity(cfg))
    if status == "done":
        metrics = res["best"]["metrics"]
        by_task = res.get("best_by_task") if per_task_best else None
        if per_task_best and not isinstance(by_task, dict):
            return unreadable("its results have no per-task best epochs (written before they were recorded)")
        for task in cfg.data.tasks:
            key = f"{task}/{TASKS[task].primary_metric}"
            value = metrics.get(key) if by_task is None else (by_task.get(task) or {}).get("value")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return unreadable(f"its best metrics have no number for {key}")
            trial.scores[task] = float(value)
        overall = metrics.get("overall")
        trial.overall = float(overall) if isinstance(overall, (int, float)) and not isinstance(overall, bool) else None
        trial.examples = _examples_per_epoch(res, cfg)
        cos = res.get("grad_cos_mean")
        cos = [v for v in cos.values() if isinstance(v, (int, float))] if isinstance(cos, dict) else []
        trial.cos_mean = sum(cos) / len(cos) if cos else None
        conflict = res.get("grad_conflict_fraction")
        trial.conflict = float(conflict) if isinstance(conflict, (int, float)) else None
        _read_cost(trial, res)
    return trial


def _read_cost(trial: Trial, res: dict) -> None:
    """The trial's cost (mtl.cost), where its results record one: results written before trials
    recorded their cost, or with a value that is not a positive number, leave it None (n/a)."""
    def positive(key: str) -> float | None:
        value = res.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        return float(value) if ok else None

    trial.step_time_s, trial.backwards_per_step = positive("step_time_s"), positive("backwards_per_step")
    trial.peak_memory_mb = positive("peak_memory_mb")
    kind, cost = res.get("peak_memory_kind"), res.get("cost_class")
    trial.memory_kind = kind if isinstance(kind, str) else ""
    trial.cost_class = cost if isinstance(cost, str) else ""


def _results_problem(res) -> str | None:
    """Why a results.json's content is not what a trial writes (None when it is).  Only what the
    report reads is checked: the status, and for a done trial its config and best metrics."""
    if not isinstance(res, dict):
        return f"results.json is a JSON {type(res).__name__}, not a trial's results"
    status = res.get("status", "done")
    if status not in ("done", "failed"):
        return f"results.json has status {status!r}, neither done nor failed"
    if status == "failed":
        return None
    if not isinstance(res.get("config"), dict):
        return "results.json of a done trial has no config"
    if not isinstance(res.get("best"), dict) or not isinstance(res["best"].get("metrics"), dict):
        return "results.json of a done trial has no best metrics"
    return None


def _examples_per_epoch(res: dict, cfg: RunConfig) -> dict:
    """task -> examples of it the trial saw per epoch (all workers): the trial's own record, else
    the pinned ``data.examples_per_task`` (results written before the record), else None."""
    given = res.get("examples_per_epoch")
    given = given if isinstance(given, dict) else {}
    out = {}
    for task in cfg.data.tasks:
        value = given.get(task)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            out[task] = int(value)
        else:
            out[task] = cfg.data.examples_per_task if cfg.data.examples_per_task > 0 else None
    return out


# Settings the report shows in its own way (tasks, combination, seed), how the batch is split
# (workers x batch x accumulation: the same steps as one worker with the whole batch; the global
# batch stands for them), and the examples per task per epoch, which size matching explains (a
# baseline of another size is another baseline row, not another variant).
_SHOWN = ("data.tasks", "combiner.", "seed", "parallel.", "optim.batch_size", "optim.grad_accum",
          "data.examples_per_task")


def report_identity(cfg: RunConfig) -> dict:
    """The trial's identity, flat, with its upstream chain as one setting: ``after`` = the stages'
    tasks (mlm, then nli: 'mlm > nli'; heads carried or an encoder frozen say so), so a pretraining
    variant is one part of a row label and baselines match on it like any other variant."""
    flat = {k: v for k, v in flatten(cfg.identity()).items() if not k.startswith("upstream.")}
    for key, default in NEW_AT_DEFAULT.items():      # left out of the identity at their defaults: label them
        flat.setdefault(key, default)
    if cfg.upstream is not None:
        flat["after"] = " > ".join("+".join(s.data.tasks) for s in links(cfg.upstream))
    return flat


def _name_variants(trials: list[Trial]) -> None:
    """Other settings that vary across the study (an lr axis, say) become part of the row label,
    so that runs of different settings are never averaged together."""
    for t in trials:
        i = t.identity
        i["global batch"] = i["optim.batch_size"] * i["optim.grad_accum"] * i["parallel.workers"]
    keys = sorted({k for t in trials for k in t.identity})
    varied = [k for k in keys if not k.startswith(_SHOWN) and len({json.dumps(t.identity.get(k)) for t in trials}) > 1]
    for t in trials:
        t.variant = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(t.identity.get(k))}" for k in varied)


def _fmt(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------
# The trials' dev predictions (for the bootstrap and the best-model figures)
# --------------------------------------------------------------------------------------------
class Predictions:
    """Each trial's best/dev_predictions.json, read once; a missing or broken file is a reason.
    ``unavailable``: a reason that holds for every trial (per-task best epochs: the predictions
    kept are those of the trial's one best epoch, not of each task's)."""

    def __init__(self, unavailable: str = ""):
        self._cache: dict[str, tuple[dict | None, str]] = {}
        self.unavailable = unavailable

    def file(self, trial: Trial) -> tuple[dict | None, str]:
        if self.unavailable:
            return None, self.unavailable
        if trial.folder not in self._cache:
            self._cache[trial.folder] = _read_predictions(trial.folder)
        return self._cache[trial.folder]

    def rows(self, trial: Trial, task: str):
        """(ids, pred, gold) of one task as numpy arrays, or (None, reason)."""
        data, why = self.file(trial)
        if data is None:
            return None, why
        rows = data.get(task)
        if not isinstance(rows, dict) or not all(isinstance(rows.get(k), list) for k in ("ids", "pred", "gold")):
            return None, f"its dev predictions have no ids/pred/gold for {task}"
        ids, pred, gold = rows["ids"], rows["pred"], rows["gold"]
        if not len(ids) == len(pred) == len(gold) or not ids:
            return None, (f"its dev predictions of {task} have {len(ids)} ids, {len(pred)} predictions, "
                          f"{len(gold)} labels")
        try:
            pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
        except (TypeError, ValueError):
            return None, f"its dev predictions of {task} are not all numbers"
        if pred.ndim != 1 or gold.ndim != 1 or not (np.isfinite(pred).all() and np.isfinite(gold).all()):
            return None, f"its dev predictions of {task} are not all finite numbers"
        return ([str(i) for i in ids], pred, gold), ""


def _read_predictions(folder: str) -> tuple[dict | None, str]:
    url = storage.join(folder, "best", "dev_predictions.json")
    try:
        if not storage.exists(url):
            return None, "no dev predictions saved with its best weights"
        data = json.loads(storage.read_text(url))
    except (ValueError, UnicodeDecodeError, MtlError, OSError) as exc:
        return None, f"best/dev_predictions.json is unreadable ({_one_line(exc)})"
    if not isinstance(data, dict):
        return None, f"best/dev_predictions.json is a JSON {type(data).__name__}, not predictions per task"
    return data, ""
