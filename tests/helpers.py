"""Helpers shared by the unit and GPU tests."""
import torch


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
    model = build_model(cfg.model, tasks).to(device)
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
