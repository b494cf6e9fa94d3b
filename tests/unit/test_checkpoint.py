import json

import pytest
import torch

from mtl import checkpoint, storage
from mtl.errors import CheckpointError


def test_the_pointer_is_written_after_the_state_and_old_ones_go_only_after_it(tmp_path, monkeypatch):
    """The order of writes is what makes a kill at any moment safe: state, then the pointer,
    then pruning.  Recorded as it happens."""
    events = []
    write, remove = storage.write_bytes, storage.remove
    monkeypatch.setattr(storage, "write_bytes", lambda url, data: (events.append(("write", url)), write(url, data)))
    monkeypatch.setattr(storage, "remove", lambda url, recursive=False: (events.append(("remove", url)),
                                                                        remove(url, recursive)))
    for step in (1, 2):
        checkpoint.save(str(tmp_path), {"model": {"w": torch.tensor([float(step)])}, "step": step}, step, keep=1)
    names = [(kind, url.split(str(tmp_path) + "/checkpoints/")[1]) for kind, url in events]
    assert names == [("write", "step-00000001/state.pt"), ("write", "latest.json"),
                     ("write", "step-00000002/state.pt"), ("write", "latest.json"), ("remove", "step-00000001")]


def test_pointer_is_published_last_and_old_checkpoints_are_pruned(tmp_path):
    out = str(tmp_path)
    assert checkpoint.latest(out) is None
    for step in (1, 2, 3):
        checkpoint.save(out, {"model": {"w": torch.tensor([float(step)])}, "step": step}, step, keep=2)
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text()) == {"checkpoint": "step-00000003", "step": 3}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest.json", "step-00000002", "step-00000003"]
    assert checkpoint.load(checkpoint.latest(out))["model"]["w"].item() == 3.0


def test_a_checkpoint_is_loaded_without_unpickling_code(tmp_path):
    import io

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"model": {}, "step": 1, "x": Evil()}, buf)
    storage.write_bytes(str(tmp_path / "bad" / "state.pt"), buf.getvalue())
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(str(tmp_path / "bad"))


def test_missing_or_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="is missing"):
        checkpoint.load(str(tmp_path / "nope"))
    storage.save_torch(str(tmp_path / "other" / "state.pt"), {"weights": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not a checkpoint of this library"):
        checkpoint.load(str(tmp_path / "other"))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid checkpoint pointer"):
        checkpoint.latest(str(tmp_path))


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    storage.write_text(str(tmp_path / "a" / "f.json"), "1")
    storage.write_text(str(tmp_path / "a" / "f.json"), "2")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.json"]
    assert (tmp_path / "a" / "f.json").read_text() == "2"
