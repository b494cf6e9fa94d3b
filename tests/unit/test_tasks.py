"""Tasks as data (mtl/task_specs.py, mtl/tasks.py): built-in specs, user spec files, their
errors, and a task of the user's own trained from its spec file alone."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mtl import task_specs
from mtl.config import RunConfig
from mtl.errors import ConfigError, DataError
from mtl.tasks import TASKS, build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NLI_SPEC = os.path.join(ROOT, "mtl", "sample_data", "nli.yaml")


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_builtin_tasks_are_specs_with_the_reference_losses_and_metrics():
    sst, para, sts = TASKS["sst"], TASKS["para"], TASKS["sts"]
    assert (sst.num_outputs, para.num_outputs, sts.num_outputs) == (5, 1, 1)
    assert (sst.file("train"), para.file("dev"), sts.file("test")) == ("sst-train.csv", "quora-dev.csv", "sts-test.csv")
    # The class-wise metrics come after the reference ones: the primary metric stays first.
    assert sst.metric_names == ("acc", "f1_macro", "balanced_acc", "acc_0", "acc_1", "acc_2", "acc_3", "acc_4",
                                "precision_macro", "recall_macro") and sts.primary_metric == "pearson"
    assert para.metric_names == ("acc", "f1", "balanced_acc", "acc_0", "acc_1", "precision", "recall")
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0.0])
    assert torch.allclose(sst.loss(logits, y), torch.nn.functional.cross_entropy(logits, y.long(), reduction="none"))
    raw = torch.randn(6, 1)
    assert torch.equal(sts.activate(raw), 5.0 * torch.sigmoid(raw))      # SIM's head maps onto 0..5
    for task, bad, message in (("sst", "7", "sentiment '7' is not an integer in 0..4"),
                               ("para", "2", "is_duplicate '2' is not 0 or 1"),
                               ("sts", "5.5", "similarity '5.5' is outside 0..5")):
        with pytest.raises(ValueError, match=message):
            TASKS[task].parse_label(bad)


def test_a_spec_file_defines_a_task_with_named_labels(tmp_path):
    cfg = RunConfig().replace(**{"data.task_specs": NLI_SPEC, "data.tasks": "nli,sst"})
    assert cfg.data.tasks == ("sst", "nli")        # built-ins first, then the user's, whatever the order typed
    nli = TASKS["nli"]
    assert nli.num_outputs == 3 and nli.is_pair and nli.title == "NLI"
    assert [nli.parse_label(t) for t in ("entailment", "neutral", "contradiction")] == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="label 'maybe' is not one of entailment, neutral, contradiction"):
        nli.parse_label("maybe")
    # The config carries the spec itself (part of the identity), not the file's path.
    saved = cfg.to_dict()
    assert saved["data"]["task_specs"][0]["labels"] == ["entailment", "neutral", "contradiction"]
    assert RunConfig.from_dict(json.loads(json.dumps(saved))).fingerprint() == cfg.fingerprint()
    assert cfg.identity()["data"]["task_specs"] == [task_specs.load(NLI_SPEC)]
    # A trial that does not train the task does not carry its spec (its identity is as without).
    assert RunConfig().replace(**{"data.task_specs": NLI_SPEC}).fingerprint() == RunConfig().fingerprint()


def test_a_regression_spec_gets_its_range_and_loss(tmp_path):
    path = write(tmp_path, "name: rating\nfiles: rate-{split}.csv\ntext_columns: [review]\nlabel_column: stars\n"
                           "kind: regression\nrange: [1, 10]\nloss: l1\nmetrics: [spearman, pearson]\n")
    spec = task_specs.load(path)
    task = build(spec)
    assert task.regression and task.label_range == (1.0, 10.0) and task.metric_names == ("spearman", "pearson")
    out = task.activate(torch.tensor([[-50.0], [0.0], [50.0]]))
    assert torch.allclose(out.squeeze(-1), torch.tensor([1.0, 5.5, 10.0]))
    assert torch.equal(task.loss(torch.tensor([[2.0]]), torch.tensor([5.0])), torch.tensor([3.0]))
    with pytest.raises(ValueError, match=r"stars '11' is outside 1..10"):
        task.parse_label("11")


@pytest.mark.parametrize("body, message", [
    ("name: Snli\nkind: binary\ntext_columns: [a]\nlabel_column: y\n", r"name: 'Snli' is not a task name"),
    ("name: sst\nkind: binary\ntext_columns: [a]\nlabel_column: y\n", r"name: 'sst' is taken"),
    ("name: x\nkind: ordinal\ntext_columns: [a]\nlabel_column: y\n", r"kind: 'ordinal' is not one of"),
    ("name: x\nkind: binary\ntext_columns: [a, b, c]\nlabel_column: y\n", r"text_columns: a list of one"),
    ("name: x\nkind: binary\ntext_columns: [a]\nlabel_column: a\n", r"label_column: 'a' is also a text column"),
    ("name: x\nkind: regression\ntext_columns: [a]\nlabel_column: y\n", r"range: None is not \[low, high\]"),
    ("name: x\nkind: regression\nrange: [5, 1]\ntext_columns: [a]\nlabel_column: y\n", r"range: \[5, 1\]"),
    ("name: x\nkind: classification\ntext_columns: [a]\nlabel_column: y\n", r"classes: None is not a number"),
    ("name: x\nkind: classification\nclasses: 3\nlabels: [a, b]\ntext_columns: [s]\nlabel_column: y\n",
     r"classes: 3 classes but 2 labels"),
    ("name: x\nkind: binary\nrange: [0, 1]\ntext_columns: [a]\nlabel_column: y\n", r"range: does not apply to kind"),
    ("name: x\nkind: binary\nloss: mse\ntext_columns: [a]\nlabel_column: y\n", r"loss: 'mse' is not a loss of a binary"),
    ("name: x\nkind: binary\nmetrics: [pearson]\ntext_columns: [a]\nlabel_column: y\n", r"metrics: \['pearson'\]"),
    ("name: x\nkind: binary\nprimary_metric: f1_macro\ntext_columns: [a]\nlabel_column: y\n", r"primary_metric:"),
    ("name: x\nkind: binary\nfiles: x.csv\ntext_columns: [a]\nlabel_column: y\n", r"files: 'x.csv' must hold"),
    ("name: x\nkind: binary\ncolour: red\ntext_columns: [a]\nlabel_column: y\n", r"colour: unknown field"),
    ("- name: x\n", r"a task spec is a mapping"),
    ("name: x\nkind: [binary\n", r":\d+: not valid YAML"),
])
def test_bad_spec_files_are_refused_naming_the_file_and_field(tmp_path, body, message):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError, match=f"^{path}" + r".*" + message):
        RunConfig().replace(**{"data.task_specs": path, "data.tasks": "sst"})


def test_spec_errors_of_the_config_and_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"data.tasks: unknown task 'nli' .*--task-specs FILE"):
        RunConfig().replace(**{"data.tasks": "nli"})
    with pytest.raises(ConfigError, match=r"nope.yaml: task spec file not found"):
        RunConfig().replace(**{"data.task_specs": str(tmp_path / "nope.yaml")})
    with pytest.raises(ConfigError, match=r"not valid JSON"):
        RunConfig().replace(**{"data.task_specs": write(tmp_path, "{name: x", "bad.json")})
    with pytest.raises(ConfigError, match=r"data.task_specs\[0\]: kind:"):
        RunConfig.from_dict({"data": {"task_specs": [{"name": "q", "kind": "nope"}]}})
    twice = write(tmp_path, open(NLI_SPEC).read(), "again.yaml")
    with pytest.raises(ConfigError, match=r"two specs name the task 'nli'"):
        RunConfig().replace(**{"data.task_specs": f"{NLI_SPEC},{twice}"})
    differs = write(tmp_path, open(NLI_SPEC).read().replace("title: NLI", "title: Other"), "differs.yaml")
    with pytest.raises(ConfigError, match=r"task 'nli' is defined twice, differently"):
        RunConfig().replace(**{"data.task_specs": differs, "data.tasks": "nli"})


def test_rows_that_do_not_fit_a_spec_are_refused_with_file_and_line(make_config, tmp_path):
    from mtl.data import read_split

    data = tmp_path / "data"
    data.mkdir()
    (data / "nli-train.csv").write_text("id\tpremise\thypothesis\tlabel\n0\tA.\tB.\tentailment\n1\tA.\tB.\tmaybe\n")
    cfg = make_config(**{"data.task_specs": NLI_SPEC, "data.tasks": "nli", "data.data_dir": str(data)})
    with pytest.raises(DataError, match=r"nli-train.csv:3: label 'maybe' is not one of"):
        read_split(cfg.data.data_dir, TASKS["nli"], "train")
    (data / "nli-train.csv").write_text("id\tpremise\tlabel\n0\tA.\tentailment\n")
    with pytest.raises(DataError, match=r"nli-train.csv:1: header lacks column 'hypothesis'"):
        read_split(cfg.data.data_dir, TASKS["nli"], "train")


def test_a_user_defined_nli_task_trains_from_its_spec_file_alone(tiny_model_dir, tmp_path):
    out = tmp_path / "nli"
    cmd = [sys.executable, "-m", "mtl.train", "--preset", "smoke", "--model", tiny_model_dir,
           "--task-specs", NLI_SPEC, "--tasks", "nli,sts", "--max-train-rows", "48", "--max-dev-rows", "24",
           "--epochs", "2", "--progress", "off", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "done"
    assert set(results["best"]["metrics"]) >= {"nli/acc", "nli/f1_macro", "sts/pearson"}
    assert results["config"]["data"]["task_specs"][0]["name"] == "nli"
    assert (out / "best" / "heads.safetensors").exists()
