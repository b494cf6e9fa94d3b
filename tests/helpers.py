"""Helpers shared by the unit, integration and GPU tests."""
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def first_step_gradients(cfg, loss_scale: float = 2.0 ** 8) -> torch.Tensor:
    """The model's gradients of one batch of every task, unscaled, as one vector."""
    from mtl.data import encode_split, make_batch
    from mtl.dist import DistContext
    from mtl.model import build_model, load_tokenizer
    from mtl.strategy import TorchStrategy
    from mtl.tasks import TASKS
    from mtl.data import read_data

    device = torch.device("cuda" if cfg.device.startswith("cuda") else "cpu")
    tasks = [TASKS[t] for t in cfg.data.tasks]
    raw, _ = read_data(cfg, tasks)
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tasks, cfg.embedding_tasks(), cfg.loss.pair_threshold).to(device)
    opt = torch.optim.AdamW(model.parameters())
    strategy = TorchStrategy(cfg, DistContext(device=device))
    strategy.setup(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    if strategy.scaler.is_enabled():   # a scale the tiny model's gradients do not overflow
        strategy.scaler = torch.amp.GradScaler(device.type, init_scale=loss_scale)
    batches = {t.name: make_batch(encode_split(raw[t.name], t, tokenizer, 32, False, None), torch.arange(8)).to(device)
               for t in tasks}
    with strategy.autocast():
        out = strategy.forward(batches)
    strategy.backward(sum(TASKS[t].loss(out[t], batches[t].labels).mean() for t in out))
    strategy.scaler.unscale_(opt)
    return torch.cat([p.grad.flatten().float().cpu() for p in model.parameters() if p.grad is not None])


# Upstream stages (tests/integration): one shared upstream, three dependents
def staged_study(model: str, root: Path, data_dir: str | None = None) -> list:
    """A joint SST+Quora+STS stage, then each task fine-tuned alone from its encoder: the upstream
    first, as ``study.expand`` lists a grid with stages.  ``data_dir`` (the upstream's data only)."""
    from cluster.core.study import with_absolute_paths
    from mtl.config import RunConfig

    base = RunConfig().replace(progress="off", **{
        "model.model": model, "model.max_length": 32, "data.max_train_rows": 16, "data.max_dev_rows": 8,
        "optim.batch_size": 4, "optim.epochs": 1, "data.cache_dir": str(root / "token_cache")})
    up = with_absolute_paths(base.replace(out=str(root / "sst+para+sts-s0"), **{"data.tasks": "sst,para,sts"},
                                          **({"data.data_dir": data_dir} if data_dir else {})))
    deps = [with_absolute_paths(base.replace(out=str(root / f"sst+para+sts-then-{t}-sum-s0"), **{"data.tasks": t}))
            .replace(upstream=up.to_dict()) for t in ("sst", "para", "sts")]
    return [up, *deps]


def broken_data(tmp_path: Path) -> Path:
    """The shipped sample without the Quora training file: a trial reading it fails at its start."""
    data = tmp_path / "data"
    shutil.copytree(ROOT / "mtl" / "sample_data", data)
    (data / "quora-train.csv").rename(tmp_path / "quora-train.csv")
    return data


def assert_ran_after(trials: list) -> None:
    """The upstream (first) ran once, uninterrupted, and every dependent started after it ended."""
    up = json.loads((Path(trials[0].out) / "results.json").read_text())
    assert up["status"] == "done" and up["resumed_from_steps"] == []
    for dep in trials[1:]:
        res = json.loads((Path(dep.out) / "results.json").read_text())
        assert res["status"] == "done" and res["started_at"] >= up["finished_at"], dep.out
        assert res["stages"][0]["out"] == trials[0].out
