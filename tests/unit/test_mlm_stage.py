"""The mlm stage through the trainer: further pretraining on the tasks' own sentences, scored
by masked-token accuracy on their held-out dev sentences, then carried into a supervised stage."""
import json

import torch

from mtl import checkpoint
from mtl.train import train


def initial_score(cfg) -> float:
    """Masked-token accuracy of the weights the trial starts from (built as the trainer builds
    them: its seed, then the model), on the same dev sentences and masks."""
    from mtl.data import encode_split, read_split
    from mtl.evaluation import predict, score
    from mtl.model import build_model, load_tokenizer
    from mtl.tasks import TASKS

    task = TASKS["mlm"]
    dev = {"mlm": encode_split(read_split(cfg.data.data_dir, task, "dev", max_rows=cfg.data.max_dev_rows), task,
                               load_tokenizer(cfg.model), cfg.model.max_length, False, None)}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, [task])
    return score(predict(model, dev, 32, _no_autocast, "cpu"), dev)["mlm/masked_acc"]


def _no_autocast():
    import contextlib
    return contextlib.nullcontext()


def test_masked_token_accuracy_on_held_out_sentences_rises_and_the_encoder_carries_on(make_config, tmp_path):
    mlm = make_config(out=str(tmp_path / "mlm"), **{"data.tasks": "mlm", "optim.epochs": 3, "optim.lr": 3e-3,
                                                     "data.max_train_rows": 40, "data.max_dev_rows": 20,
                                                     "optim.batch_size": 8})
    before = initial_score(mlm)
    results = train(mlm)
    acc = [e["metrics"]["mlm/masked_acc"] for e in results["epochs"]]
    # sst: 40 sentences, para and sts: 40 pairs each -> 200 training sentences; dev held out.
    assert results["train_rows"] == {"mlm": 200}
    # A random tiny model guesses ~1/30522 before; a short run learns at least the commonest tokens.
    assert before < 0.01 and acc[-1] > before + 0.03 and results["best"]["metrics"]["mlm/masked_acc"] == max(acc), \
        (before, acc)
    # The data record names the source files the stage read (a changed file is refused later).
    assert {"sst-train.csv", "quora-dev.csv", "sts-train.csv"} <= set(results["data"])

    from safetensors.torch import load

    encoder = load((tmp_path / "mlm" / "best" / "encoder" / "model.safetensors").read_bytes())
    down = make_config(out=str(tmp_path / "sst"), **{"data.tasks": "sst", "optim.lr": 1e-12,
                                                     "optim.warmup_ratio": 0.0, "upstream": mlm.to_dict()})
    done = train(down)
    final = checkpoint.load(checkpoint.latest(down.out))["model"]
    assert all(torch.allclose(final[f"encoder.{k}"], v, rtol=0, atol=1e-9) for k, v in encoder.items())
    assert done["stages"][0]["best_metrics"]["mlm/masked_acc"] == max(acc)
    assert json.loads((tmp_path / "sst" / "results.json").read_text())["status"] == "done"
