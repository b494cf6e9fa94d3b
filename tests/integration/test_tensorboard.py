"""TensorBoard across a finished study: `tensorboard --logdir <storage>` serves every trial's
scalars side by side, named by the trial, and the HParams dashboard compares the trials by the
settings that vary (tasks, combiner, alpha, seed) with their best dev metrics.  Read back
through TensorBoard's HTTP API, and the HParams page rendered by headless Chromium."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ARTIFACTS = Path(__file__).resolve().parents[2] / "runs" / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def study(tiny_model_dir, tmp_path_factory):
    from cluster.study import expand, results_table, write_table, write_tensorboard_experiment
    from mtl.config import RunConfig
    from mtl.train import train

    root = tmp_path_factory.mktemp("tb-study")
    grid = root / "grid.yaml"
    grid.write_text('axes:\n  tasks: [sst, para, "sst,para"]\n  seed: [0, 1]\n')
    base = RunConfig().replace(progress="off", **{
        "model.model": tiny_model_dir, "model.max_length": 32, "data.max_train_rows": 24, "data.max_dev_rows": 16,
        "optim.batch_size": 4, "optim.epochs": 2, "optim.lr": 1e-3, "log_every_steps": 2})
    trials = expand(str(grid), base, str(root / "sweep"), seeds=[0])
    write_tensorboard_experiment(trials, str(root / "sweep"))
    for t in trials:
        train(t)
    write_table(str(root / "sweep"), results_table(trials))
    return root / "sweep", trials


@pytest.fixture(scope="module")
def tensorboard(study):
    root, _ = study
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(root),
                             "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            runs = json.loads(urllib.request.urlopen(f"{url}/data/runs", timeout=5).read())
            if len(runs) >= 7:           # 6 trials and the experiment's root run
                break
        except OSError:
            pass
        assert time.time() < deadline and proc.poll() is None, "TensorBoard did not serve the study"
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def get(url: str):
    return json.loads(urllib.request.urlopen(url, timeout=30).read())


def post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def test_every_trial_is_a_run_named_by_its_settings(study, tensorboard):
    root, trials = study
    runs = get(f"{tensorboard}/data/runs")
    names = [t.out.rsplit("/", 1)[-1] for t in trials]
    assert {f"{n}/tb" for n in names} <= set(runs)
    for name in names:
        query = urllib.parse.urlencode({"run": f"{name}/tb", "tag": "dev/mean"})
        points = get(f"{tensorboard}/data/plugin/scalars/scalars?{query}")
        results = json.loads((root / name / "results.json").read_text())
        assert [p[2] for p in points] == pytest.approx([e["metrics"]["mean"] for e in results["epochs"]])


def test_the_hparams_dashboard_compares_trials_by_what_varies(study, tensorboard):
    root, trials = study
    experiment = post(f"{tensorboard}/data/plugin/hparams/experiment", {"experimentName": ""})
    hparams = {h["name"] for h in experiment["hparamInfos"]}
    assert hparams == {"data.tasks", "seed"}
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"hparam/mean", "hparam/sst/acc", "hparam/para/f1"} <= metrics
    groups = post(f"{tensorboard}/data/plugin/hparams/session_groups", {
        "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"hparam": "seed", "order": "ORDER_ASC", "includeInResult": True},
                      {"hparam": "data.tasks", "includeInResult": True},
                      {"metric": {"tag": "hparam/mean", "group": ""}, "includeInResult": True}],
        "startIndex": 0, "sliceSize": 100})
    sessions = {g["name"]: g for g in groups["sessionGroups"]}
    assert len(sessions) == len(trials)
    for t in trials:
        name = t.out.rsplit("/", 1)[-1]
        group = sessions[f"{name}/tb"]
        best = json.loads((root / name / "results.json").read_text())["best"]["metrics"]["mean"]
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert values["hparam/mean"] == pytest.approx(best)
        assert group["hparams"]["seed"] == t.seed and group["hparams"]["data.tasks"] == ",".join(t.data.tasks)


def test_the_hparams_page_renders_in_a_browser(tensorboard):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("no chromium here: install Debian's chromium (bash tools/test_deps.sh does)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "tensorboard-hparams.png"
    shot.unlink(missing_ok=True)
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={ARTIFACTS / 'chromium-profile'}",
                           "--hide-scrollbars", "--window-size=1400,900", "--virtual-time-budget=20000",
                           f"--screenshot={shot}", f"{tensorboard}/#hparams"],
                          capture_output=True, text=True, timeout=120)
    shutil.rmtree(ARTIFACTS / "chromium-profile", ignore_errors=True)
    assert shot.exists(), done.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 900)
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "a blank page"       # a rendered dashboard, not a blank page
