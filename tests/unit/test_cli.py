"""Bad input gets one clear line naming the field, file or URL, a non-zero exit, and leaves
nothing behind."""
import json
import os
import shutil

import pytest

from mtl import checkpoint
from mtl.train import main as run_cli
from mtl.config import field_docs


def run(argv, capsys):
    code = run_cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def base(tiny_model_dir, out):
    return ["--model", tiny_model_dir, "--max-length", "32", "--max-train-rows", "16", "--max-dev-rows", "8",
            "--batch-size", "4", "--epochs", "1", "--progress", "off", "--out", str(out)]


@pytest.mark.parametrize("flags,message", [
    (["--tasks", "sst,nli"], "error: data.tasks: unknown task 'nli' (known: sst, para, sts, mlm; a task of your own needs its spec: --task-specs FILE)"),
    (["--combiner", "scalarize", "--alpha", "1.5"], "error: combiner.alpha: 1.5 is outside [0, 1]"),
    (["--combiner", "nope"], "error: combiner.combiner: unknown method 'nope'"),
    (["--combiner", "scalarize", "--tasks", "sst,para", "--epoch-mode", "temperature"],
     "error: combiner.combiner: 'scalarize' needs every task's loss in each step"),
])
def test_config_errors(tiny_model_dir, tmp_path, capsys, flags, message):
    code, err = run(base(tiny_model_dir, tmp_path / "out") + flags, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(message)
    assert not (tmp_path / "out").exists()


def test_malformed_row_stops_before_anything_is_written(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"sst-{split}.csv").write_text("\tid\tsentence\tsentiment\n0\ta\tfine\t1\n1\tb\tbad\tfive\n")
    code, err = run(base(tiny_model_dir, tmp_path / "out") + ["--data-dir", str(data)], capsys)
    assert code == 2 and err == [f"error: {data}/sst-train.csv:3: label 'five' is not a number "
                                 "(pass --on-bad-row skip to skip such rows)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("url,reason", [("/proc/mtl-no-such-dir/run", "is not writable"),
                                        ("nosuchproto://bucket/run", "Protocol not known")])
def test_unwritable_storage(tiny_model_dir, capsys, url, reason):
    code, err = run(base(tiny_model_dir, url), capsys)
    assert code == 2 and len(err) == 1 and url in err[0] and reason in err[0]


def test_a_corrupt_newest_checkpoint_names_the_intact_one_before_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = base(tiny_model_dir, out) + ["--epochs", "2", "--keep-checkpoints", "2", "--keep-final-state", "true"]
    assert run(args, capsys)[0] == 0
    (out / "results.json").unlink()              # as if the run died after its last checkpoint
    newest = checkpoint.latest(str(out))
    older = sorted(p.name for p in (out / "checkpoints").glob("step-*"))[0]
    state = checkpoint.state_url(newest)
    with open(state, "r+b") as fh:
        fh.truncate(os.path.getsize(state) // 2)
    before = sorted(p.name for p in out.rglob("*"))
    code, err = run(args, capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {state}: checkpoint is truncated or corrupt (")
    assert err[0].endswith(f"; {older} before it is intact: delete {newest} to resume from {older}")
    assert sorted(p.name for p in out.rglob("*")) == before           # nothing written
    shutil.rmtree(newest)                                             # the remedy the error names
    assert run(args, capsys)[0] == 0
    assert json.loads((out / "results.json").read_text())["resumed_from_steps"] == [int(older.split("-")[1])]


def test_a_corrupt_only_checkpoint_says_to_start_over(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = base(tiny_model_dir, out) + ["--keep-final-state", "true"]
    assert run(args, capsys)[0] == 0
    (out / "results.json").unlink()
    state = checkpoint.state_url(checkpoint.latest(str(out)))
    with open(state, "wb") as fh:
        fh.write(b"garbage")
    code, err = run(args, capsys)
    assert code == 2 and err[0].endswith(f"; no intact checkpoint before it: delete {out / 'checkpoints'} to start over")


def test_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit):
        run_cli(["--help"])
    text = capsys.readouterr().out
    for flag, _, _ in field_docs():
        assert f"--{flag.replace('_', '-')}" in text
    from mtl.combine import COMBINERS
    listed = {line.split()[0]: line for line in text.split("loss-combination methods (--combiner)")[1].splitlines()[2:]}
    assert set(listed) == set(COMBINERS)
    for name, cls in COMBINERS.items():         # its cost class and a line on what it does
        assert f"[{cls.cost}]" in listed[name] and len(listed[name].split("]", 1)[1].strip()) > 20
    assert "[T backwards]" in listed["upgrad"] and "[one backward]" in listed["sum"]


def test_presets_resolve_and_flags_override(capsys):
    assert run_cli(["--preset", "paper", "--seed", "3", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["model"] == "bert-base-uncased" and cfg["seed"] == 3 and cfg["optim"]["lr"] == 1e-5
    assert run_cli(["--preset", "smoke", "--tasks", "sts", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["data"]["tasks"] == ["sts"] and cfg["data"]["data_dir"] == "embedded:sample"
