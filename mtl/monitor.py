"""What a run shows while it trains: TensorBoard on rank 0 (a null sink on the others) and a
terminal progress bar for runs started by hand."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

from mtl import storage


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def hparam_value(value):
    if isinstance(value, (bool, int, float, str)):
        return value
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


class NullSink:
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def start_session(self, config: dict, metric_names: list[str]) -> None: ...
    def end_session(self, ok: bool) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink(NullSink):
    """Event files under <out>/tb.  On non-local storage they are written to a local staging
    folder and copied up at every flush, since TensorBoard's writer speaks only to local
    paths (and a few clouds), not to every fsspec filesystem."""

    def __init__(self, out: str, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.target = storage.join(out, "tb")
        self.remote = not storage.is_local(out)
        self.logdir = tempfile.mkdtemp(prefix="mtl-tb-") if self.remote else self.target
        # purge_step hides events logged after the checkpoint we resumed from (a crashed tail).
        self.writer = SummaryWriter(self.logdir, purge_step=resume_step or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def start_session(self, config: dict, metric_names: list[str]) -> None:
        """Declare this run an HParams session from its start, so the dashboard lists it while
        it trains; its metric values are the ``hparam/<metric>`` scalars (best so far)."""
        from torch.utils.tensorboard.summary import hparams

        hp = {k: hparam_value(v) for k, v in flatten(config).items()}
        # The session's start only: the experiment (which settings the dashboard shows as columns)
        # is the study's, written once at its root by the launcher (TensorBoard takes the first
        # experiment it finds, so a trial's own would hide it).  A run on its own has none and
        # the dashboard lists every setting.
        _, start, _ = hparams(hp, {f"hparam/{m}": 0.0 for m in metric_names})
        self.writer.file_writer.add_summary(start)

    def end_session(self, ok: bool) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams.api_pb2 import Status
        from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME, SESSION_END_INFO_TAG
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

        end = SessionEndInfo(status=Status.Value("STATUS_SUCCESS" if ok else "STATUS_FAILURE"))
        content = HParamsPluginData(session_end_info=end, version=PLUGIN_DATA_VERSION).SerializeToString()
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content))
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=meta)]))

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:
            fs, path = storage.filesystem(self.target)
            for root, _, files in os.walk(self.logdir):
                for name in files:
                    local = os.path.join(root, name)
                    rel = os.path.relpath(local, self.logdir)
                    fs.put_file(local, f"{path.rstrip('/')}/{rel}")

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.remote:
            shutil.rmtree(self.logdir, ignore_errors=True)


def progress_bar(total: int, initial: int, mode: str, is_main: bool, desc: str):
    enabled = is_main and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True)
