"""Tasks as data: a task is a spec (its files, columns, kind, loss and metrics), not code.

The three reference tasks are built-in specs; a user adds another with a YAML or JSON file and
no code (``--task-specs snli.yaml``)::

    name: snli                       # the name --tasks uses: lowercase letters, digits, _
    title: NLI                       # what tables and plots call it (default: the name, upper case)
    files: snli-{split}.csv          # under --data-dir; {split} is train, dev or test
    text_columns: [premise, hypothesis]   # one column (a sentence) or two (a sentence pair)
    label_column: label
    kind: classification             # classification (K classes), binary, or regression
    labels: [entailment, neutral, contradiction]   # the file's label texts, in class order
    # classes: 3                     # instead of labels, when the file holds 0..K-1
    # range: [0, 5]                  # regression: the labels' range (the head's output range)
    # loss: cross_entropy            # classification: cross_entropy; binary: bce; regression: mse, l1, smooth_l1
    # metrics: [acc, f1_macro]       # default: the kind's first metrics (below); the first is primary
    # primary_metric: acc

Specs are checked here (torch-free: the launchers import it) and normalised to a plain dict,
which a trial's configuration carries whole: a task's spec is part of what a trial computes.
``mtl.tasks`` turns a normalised spec into the TaskSpec the training code uses."""
from __future__ import annotations

import re

from mtl.errors import ConfigError, NotFound

KINDS = ("classification", "binary", "regression", "mlm")
LOSSES = {"classification": ("cross_entropy",), "binary": ("bce",), "regression": ("mse", "l1", "smooth_l1"),
          "mlm": ("mlm",)}
# The metrics a spec may name, per kind.  per_class_acc is a group: each class's recall, as
# acc_<k> (acc_<label> with named labels); it cannot be primary (it is several numbers).
METRICS = {"classification": ("acc", "f1_macro", "balanced_acc", "per_class_acc", "precision_macro", "recall_macro"),
           "binary": ("acc", "f1", "balanced_acc", "per_class_acc", "precision", "recall"),
           "regression": ("pearson", "spearman"), "mlm": ("masked_acc",)}
# A spec that names no metrics gets these: the metrics specs had before the class-wise ones, so a
# user spec normalises (and its trial's identity reads) as it did then.
DEFAULT_METRICS = {"classification": ("acc", "f1_macro"), "binary": ("acc", "f1"),
                   "regression": ("pearson", "spearman"), "mlm": ("masked_acc",)}
GROUP_METRICS = ("per_class_acc",)
FIELDS = ("name", "title", "files", "text_columns", "label_column", "kind", "classes", "labels", "range", "loss",
          "metrics", "primary_metric", "output_header", "sources")
RESERVED = {"mean"}     # a select_metric
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}$")

_BUILTIN_SPECS = {
    "sst": {"name": "sst", "title": "SEN", "files": "sst-{split}.csv", "text_columns": ["sentence"],
            "label_column": "sentiment", "kind": "classification", "classes": 5,
            "output_header": "Predicted_Sentiment", "metrics": list(METRICS["classification"])},
    "para": {"name": "para", "title": "PAR", "files": "quora-{split}.csv", "text_columns": ["sentence1", "sentence2"],
             "label_column": "is_duplicate", "kind": "binary", "output_header": "Predicted_Is_Paraphrase",
             "metrics": list(METRICS["binary"])},
    "sts": {"name": "sts", "title": "SIM", "files": "sts-{split}.csv", "text_columns": ["sentence1", "sentence2"],
            "label_column": "similarity", "kind": "regression", "range": [0, 5],
            "output_header": "Predicted_Similiary"},    # sic: the course's leaderboard spells it so
    # Further pretraining on the three tasks' own sentences (the pretraining study's MLM stage).
    "mlm": {"name": "mlm", "title": "MLM", "kind": "mlm", "sources": ["sst", "para", "sts"]},
}


def normalise(spec, where: str) -> dict:
    """A spec with every field filled in, or a one-line error naming ``where`` and the field."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a task spec is a mapping of fields ({', '.join(FIELDS[:6])}, ...)")
    unknown = sorted(set(map(str, spec)) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown field (known: {', '.join(FIELDS)})")
    bad = lambda field, why: ConfigError(f"{where}: {field}: {why}")  # noqa: E731
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise bad("name", f"{name!r} is not a task name (lowercase letters, digits and _, starting with a letter)")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise bad("kind", f"{kind!r} is not one of {', '.join(KINDS)}")
    out = {"name": name, "title": _text(spec.get("title", name.upper()), "title", bad), "kind": kind}
    if kind == "mlm":
        return _mlm(spec, out, bad)
    files = _text(spec.get("files", f"{name}-{{split}}.csv"), "files", bad)
    if "{split}" not in files or "/" in files.replace("{split}", ""):
        raise bad("files", f"{files!r} must hold {{split}} and name a file under --data-dir, such as {name}-{{split}}.csv")
    out["files"] = files
    columns = spec.get("text_columns")
    if (not isinstance(columns, list) or len(columns) not in (1, 2) or len(set(map(str, columns))) != len(columns)
            or not all(isinstance(c, str) and c for c in columns)):
        raise bad("text_columns", "a list of one column name (a sentence) or two (a sentence pair)")
    out["text_columns"] = list(columns)
    out["label_column"] = _text(spec.get("label_column"), "label_column", bad)
    if out["label_column"] in columns:
        raise bad("label_column", f"{out['label_column']!r} is also a text column")
    out.update(_labels(spec, kind, bad))
    out.update(_loss_and_metrics(spec, kind, bad))
    out["output_header"] = _text(spec.get("output_header", f"Predicted_{out['title']}"), "output_header", bad)
    out["sources"] = None
    return out


def _mlm(spec: dict, out: dict, bad) -> dict:
    """Masked language modelling on text: the sentences of other tasks' files (``sources``: their
    train split to train on, their dev split held out), or a corpus of its own (``files`` with one
    text column, dev split held out).  Labels are the masked tokens: no label column."""
    for field in ("label_column", "classes", "labels", "range", "output_header"):
        if spec.get(field) is not None:
            raise bad(field, "does not apply to kind mlm (its labels are the masked tokens)")
    sources, files = spec.get("sources"), spec.get("files")
    if (sources is None) == (files is None):
        raise bad("sources", "an mlm task reads either the sentences of other tasks (sources: [sst, ...]) or "
                             "files of its own (files and one text column)")
    if sources is not None:
        if (not isinstance(sources, list) or not sources or len(set(map(str, sources))) != len(sources)
                or not all(isinstance(t, str) and NAME.match(t) for t in sources)):
            raise bad("sources", f"{sources!r} is not a list of distinct task names")
        if spec.get("text_columns") is not None:
            raise bad("text_columns", "comes from the sources")
        out.update(files=None, text_columns=[])
    else:
        columns = spec.get("text_columns")
        if not isinstance(columns, list) or len(columns) != 1 or not isinstance(columns[0], str) or not columns[0]:
            raise bad("text_columns", "an mlm corpus has one text column")
        out.update(files=_text(files, "files", bad), text_columns=list(columns))
        if "{split}" not in out["files"]:
            raise bad("files", f"{files!r} must hold {{split}} (train is trained on, dev held out)")
    out.update(label_column=None, classes=None, labels=None, range=None, sources=list(sources) if sources else None,
               output_header="")
    out.update(_loss_and_metrics(spec, "mlm", bad))
    return out


def _text(value, field: str, bad) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad(field, f"{value!r} is not a non-empty text")
    return value


def _labels(spec: dict, kind: str, bad) -> dict:
    """classes/labels (classification, binary) or range (regression); a field of another kind is refused."""
    given = {f for f in ("classes", "labels", "range") if spec.get(f) is not None}    # None: as normalised
    allowed = {"regression": {"range"}, "classification": {"classes", "labels"}, "binary": {"labels"}}[kind]
    if kind == "binary" and spec.get("classes") == 2:
        given.discard("classes")
    if given - allowed:
        raise bad(sorted(given - allowed)[0], f"does not apply to kind {kind}")
    if kind == "regression":
        lo_hi = spec.get("range")
        if (not isinstance(lo_hi, list) or len(lo_hi) != 2 or not all(isinstance(v, (int, float)) and
                                                                      not isinstance(v, bool) for v in lo_hi)
                or not lo_hi[0] < lo_hi[1]):
            raise bad("range", f"{lo_hi!r} is not [low, high] with low < high (a regression task needs its range)")
        return {"classes": None, "labels": None, "range": [float(lo_hi[0]), float(lo_hi[1])]}
    labels = spec.get("labels")
    if labels is not None:
        if (not isinstance(labels, list) or not all(isinstance(v, str) and v.strip() for v in labels)
                or len(set(labels)) != len(labels)):
            raise bad("labels", "a list of distinct label texts, in class order")
        if kind == "binary" and len(labels) != 2:
            raise bad("labels", f"a binary task has two labels (negative, positive), not {len(labels)}")
    classes = 2 if kind == "binary" else spec.get("classes", len(labels) if labels else None)
    if kind == "classification":
        if not isinstance(classes, int) or isinstance(classes, bool) or not 2 <= classes <= 100_000:
            raise bad("classes", f"{classes!r} is not a number of classes >= 2 (or give labels)")
        if labels and len(labels) != classes:
            raise bad("classes", f"{classes} classes but {len(labels)} labels")
    return {"classes": classes, "labels": list(labels) if labels else None, "range": None}


def _loss_and_metrics(spec: dict, kind: str, bad) -> dict:
    loss = spec.get("loss", LOSSES[kind][0])
    if loss not in LOSSES[kind]:
        raise bad("loss", f"{loss!r} is not a loss of a {kind} task ({', '.join(LOSSES[kind])})")
    metrics = spec.get("metrics", list(DEFAULT_METRICS[kind]))
    if (not isinstance(metrics, list) or not metrics or len(set(map(str, metrics))) != len(metrics)
            or any(m not in METRICS[kind] for m in metrics)):
        raise bad("metrics", f"{metrics!r} is not a list of distinct metrics of a {kind} task "
                             f"({', '.join(METRICS[kind])})")
    primary = spec.get("primary_metric", metrics[0])
    if primary not in metrics:
        raise bad("primary_metric", f"{primary!r} is not one of the task's metrics ({', '.join(metrics)})")
    if primary in GROUP_METRICS:
        raise bad("primary_metric", f"{primary!r} is one score per class, not one score (name another metric "
                                    "first, or give primary_metric)")
    return {"loss": loss, "metrics": [primary] + [m for m in metrics if m != primary], "primary_metric": primary}


def load(path: str) -> dict:
    """A spec file (YAML, or JSON, which YAML reads too) checked and normalised."""
    # Lazy: fsspec (mtl.storage) and yaml stay off mtl.config's import path until a spec file is read.
    from mtl import storage

    try:
        text = storage.read_text(path)
    except NotFound:
        raise ConfigError(f"{path}: task spec file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    spec = storage.read_yaml(path, text)
    spec = normalise(spec, path)
    if spec["name"] in BUILTIN or spec["name"] in RESERVED:
        raise ConfigError(f"{path}: name: {spec['name']!r} is taken (built-in: {', '.join(BUILTIN)}; reserved: "
                          f"{', '.join(sorted(RESERVED))})")
    return spec


BUILTIN: dict[str, dict] = {n: normalise(s, f"built-in task {n}") for n, s in _BUILTIN_SPECS.items()}

# A process's user specs by name: registered by the configs that carry them (DataConfig), so that
# every part reading a task by name (model, report, evaluation) finds the same spec.
_USER: dict[str, dict] = {}


def register(spec: dict, where: str = "data.task_specs") -> None:
    known = _USER.get(spec["name"])
    if known is not None and known != spec:
        raise ConfigError(f"{where}: task {spec['name']!r} is defined twice, differently (one process holds one "
                          "spec per name: rename one of them)")
    _USER[spec["name"]] = spec


def get(name: str) -> dict | None:
    return BUILTIN[name] if name in BUILTIN else _USER.get(name)


def known_names() -> list[str]:
    return [*BUILTIN, *sorted(_USER)]


def order(names) -> list[str]:
    """Task names in the canonical order: the built-ins first (sst, para, sts), then the rest by name."""
    builtin = list(BUILTIN)
    return sorted(set(names), key=lambda n: (builtin.index(n) if n in builtin else len(builtin), n))
