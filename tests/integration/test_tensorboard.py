"""TensorBoard on a study launched the way the README launches it, on every backend: the real
launcher (`launch/submit.py --backend ray|slurm|submitit`) in a subprocess, then `tensorboard
--logdir <storage>`, read back through TensorBoard's HTTP API and the HParams page rendered by
headless Chromium.  What a user must see: each trial once, named by its settings (`<trial>/tb`),
beside the study's root run and nothing else (no copies from Ray Tune's own logger under
`_ray/`), and an HParams dashboard whose columns are the settings that vary (here tasks and
combiner) with the best dev metrics, one session per trial.

The SLURM backends need the local cluster (`bash tools/test_deps.sh`); `-m 'not slurm'` leaves
out the `slurm` backend (submitit runs with `--cluster local`)."""
from __future__ import annotations

import contextlib
import json
import os
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
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "runs" / "test-artifacts"
GRID = 'axes:\n  tasks: [sst, "sst,para"]\n  combiner: [sum, pcgrad]\n'
TRIALS = ["sst-sum-s0", "sst-pcgrad-s0", "sst+para-sum-s0", "sst+para-pcgrad-s0"]
# How each backend is launched (README: "Study grids on Ray / on SLURM"), and how long it may take.
LAUNCH = {"ray": (["--backend", "ray"], 600),
          "slurm": (["--backend", "slurm", "--wait", "--gpus-per-worker", "0"], 300),
          "submitit": (["--backend", "submitit", "--cluster", "local", "--gpus-per-worker", "0"], 300)}
BACKENDS = [pytest.param("ray"), pytest.param("slurm", marks=pytest.mark.slurm), pytest.param("submitit")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=BACKENDS)
def study(request, tiny_model_dir, tmp_path_factory):
    """A 4-trial study (tasks x combiner) launched by `launch/submit.py` on one backend; its
    storage root and the backend's name."""
    backend = request.param
    if backend == "slurm" and subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh"), "status"],
                                             capture_output=True).returncode != 0:
        pytest.fail("no SLURM cluster answers here: start one with `bash slurm/local_cluster.sh start` (root), "
                    "or deselect the slurm backend with -m 'not slurm'")
    base = tmp_path_factory.mktemp(f"tb-{backend}")
    (base / "grid.yaml").write_text(GRID)
    root = base / "study"
    flags, timeout = LAUNCH[backend]
    cmd = [sys.executable, str(ROOT / "launch" / "submit.py"), *flags, "--grid", str(base / "grid.yaml"),
           "--storage", str(root), "--model", tiny_model_dir, "--max-length", "32", "--max-train-rows", "16",
           "--max-dev-rows", "8", "--batch-size", "4", "--epochs", "2", "--log-every-steps", "2",
           "--progress", "off", "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MTL_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}

    def launch() -> subprocess.CompletedProcess:
        started = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        print(f"{backend}: launch of {len(TRIALS)} trials ended in {time.monotonic() - started:.1f} s")
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        assert f"{len(TRIALS)}/{len(TRIALS)} trials done" in done.stdout
        return done

    launch()
    return root, backend, launch


@contextlib.contextmanager
def tensorboard_serving(logdir: Path, runs: int):
    """`tensorboard --logdir` on a free port, once it lists ``runs`` runs; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(logdir),
                             "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if len(get(f"{url}/data/runs")) >= runs:
                    break
            except OSError:
                pass
            assert time.time() < deadline and proc.poll() is None, "TensorBoard did not serve the study"
            time.sleep(0.5)
        time.sleep(2)         # one more reload: a run listed late (a copy somewhere) would show now
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tensorboard(study):
    root, _, _ = study
    with tensorboard_serving(root, runs=len(TRIALS) + 1) as url:
        yield url


def get(url: str):
    return json.loads(urllib.request.urlopen(url, timeout=30).read())


def post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def assert_one_run_per_trial(root: Path, tensorboard: str) -> None:
    runs = sorted([".", *(f"{n}/tb" for n in TRIALS)])
    assert sorted(get(f"{tensorboard}/data/runs")) == runs
    events = [p.relative_to(root) for p in root.rglob("events.out.tfevents*")]
    assert sorted(str(p.parent) for p in events) == runs, f"event files: {events}"


def test_every_trial_is_one_run_named_by_its_settings(study, tensorboard):
    root, backend, _ = study
    assert [r["trial"] for r in json.loads((root / "results.json").read_text())] == TRIALS
    # Exactly the study's root run (its HParams experiment) and one run per trial: no second copy
    # of the trials (Ray Tune's logger wrote one under _ray/sweep/<trial>/).
    assert_one_run_per_trial(root, tensorboard)
    for name in TRIALS:
        query = urllib.parse.urlencode({"run": f"{name}/tb", "tag": "dev/mean"})
        points = get(f"{tensorboard}/data/plugin/scalars/scalars?{query}")
        results = json.loads((root / name / "results.json").read_text())
        assert len(points) == 2
        assert [p[2] for p in points] == pytest.approx([e["metrics"]["mean"] for e in results["epochs"]])


def test_the_hparams_dashboard_compares_trials_by_what_varies(study, tensorboard):
    root, _, _ = study
    experiment = post(f"{tensorboard}/data/plugin/hparams/experiment", {"experimentName": ""})
    assert {h["name"] for h in experiment["hparamInfos"]} == {"data.tasks", "combiner.combiner"}
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"hparam/mean", "hparam/sst/acc", "hparam/para/f1"} <= metrics
    assert not any(m.startswith("ray/") for m in metrics)
    groups = post(f"{tensorboard}/data/plugin/hparams/session_groups", {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"hparam": "data.tasks", "order": "ORDER_ASC", "includeInResult": True},
                      {"hparam": "combiner.combiner", "includeInResult": True},
                      {"metric": {"tag": "hparam/mean", "group": ""}, "includeInResult": True}],
        "startIndex": 0, "sliceSize": 100})
    sessions = {g["name"]: g for g in groups["sessionGroups"]}
    assert sorted(sessions) == sorted(f"{n}/tb" for n in TRIALS)
    for name in TRIALS:
        group = sessions[f"{name}/tb"]
        tasks, combiner, _ = name.split("-")
        assert group["hparams"] == {"data.tasks": tasks.replace("+", ","), "combiner.combiner": combiner}
        best = json.loads((root / name / "results.json").read_text())["best"]["metrics"]["mean"]
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert values["hparam/mean"] == pytest.approx(best)
        assert [s["status"] for s in group["sessions"]] == ["STATUS_SUCCESS"]


def test_the_hparams_page_renders_in_a_browser(study, tensorboard):
    _, backend, _ = study
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("no chromium here: install Debian's chromium (bash tools/test_deps.sh does)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"tensorboard-hparams-{backend}.png"
    shot.unlink(missing_ok=True)
    profile = ARTIFACTS / f"chromium-profile-{backend}"
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={profile}",
                           "--hide-scrollbars", "--window-size=1400,900", "--virtual-time-budget=20000",
                           f"--screenshot={shot}", f"{tensorboard}/#hparams"],
                          capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert shot.exists(), done.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 900)
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "a blank page"       # a rendered dashboard, not a blank page


def test_a_rerun_skips_every_trial_and_tensorboard_still_shows_each_once(study, tensorboard):
    """The same command again: nothing runs, the study's experiment is replaced rather than added
    to, and on Ray the copies an older launch left under _ray/ (Ray Tune's own TensorBoard logger,
    before it was turned off) are removed, so an existing study's TensorBoard is right again."""
    root, backend, launch = study
    if backend == "ray":
        stale = root / "_ray" / "sweep" / TRIALS[0] / "events.out.tfevents.1796000000.node"
        shutil.copy(next((root / TRIALS[0] / "tb").glob("events.out.tfevents*")), stale)
    stamps = {n: (root / n / "results.json").stat().st_mtime for n in TRIALS}
    launch()
    assert {n: (root / n / "results.json").stat().st_mtime for n in TRIALS} == stamps
    # On Ray a TensorBoard started now, as the user would (a running one keeps the runs of files
    # that went); elsewhere the running one, which reloads every second.
    serving = (tensorboard_serving(root, runs=len(TRIALS) + 1) if backend == "ray"
               else contextlib.nullcontext(tensorboard))
    with serving as fresh:
        time.sleep(2)
        assert_one_run_per_trial(root, fresh)
        experiment = post(f"{fresh}/data/plugin/hparams/experiment", {"experimentName": ""})
        assert {h["name"] for h in experiment["hparamInfos"]} == {"data.tasks", "combiner.combiner"}
