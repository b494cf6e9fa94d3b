"""TensorBoard across a study's trials: the HParams dashboard's experiment at the storage root.

Each trial writes its own ``<trial>/tb`` run as it trains (mtl.monitor); this module writes the
one experiment summary those runs are sessions of, before any backend starts them."""
from __future__ import annotations

import json
import shutil
import tempfile

from mtl import storage
from mtl.config import RunConfig
from mtl.monitor import flatten, hparam_value


def write_tensorboard_experiment(trials: list[RunConfig], root: str) -> None:
    """The HParams dashboard's columns for ``tensorboard --logdir <root>``: the settings that vary
    across the study (seed, tasks, combiner, alpha, ...) and every dev metric, written as the
    experiment summary of the root run.  Each trial's tb/ run is one session of it."""
    # torch (seconds): only when a study is launched, never for --help, --dry-run or --count.
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    from mtl.evaluation import metric_names

    configs = [flatten(t.identity()) for t in trials]
    varied = sorted(k for k in configs[0] if len({json.dumps(c[k]) for c in configs}) > 1) or ["seed"]
    values = {k: sorted({hparam_value(c[k]) for c in configs}, key=str) for k in varied}
    metrics = list(dict.fromkeys(m for t in trials for m in metric_names(t.data.tasks)))
    discrete = {k: v for k, v in values.items() if all(isinstance(x, (str, bool)) for x in v)}
    experiment, _, _ = hparams({k: v[0] for k, v in values.items()}, {f"hparam/{m}": 0.0 for m in metrics},
                               hparam_domain_discrete=discrete)
    local = root if storage.is_local(root) else tempfile.mkdtemp(prefix="mtl-tb-exp-")
    # One experiment file: a rerun replaces it rather than adding another beside it.
    for name in storage.listdir(root):
        if name.startswith("events.out.tfevents.") and name.endswith(".mtl-experiment"):
            storage.remove(storage.join(root, name))
    writer = SummaryWriter(local, filename_suffix=".mtl-experiment")
    writer.file_writer.add_summary(experiment)
    writer.close()
    if local != root:
        storage.upload_files(local, root)
        shutil.rmtree(local, ignore_errors=True)
