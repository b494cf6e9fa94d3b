"""SMART (Jiang et al. 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural
Language Models through Principled Regularized Optimization").

Smoothness-inducing adversarial term, per task and micro-batch, on the word-embedding output
(a forward hook on ``model.encoder.get_input_embeddings()`` adds a perturbation delta):

    delta_0 ~ N(0, sigma^2) on real tokens (0 on padding)
    K times: g = d/d delta D(f(x + delta), f(x).detach());
             delta <- proj_{||.||_inf <= eps}(delta + step * g / (||g||_inf of the example + tiny))
    term = lambda_s * D_sym(f(x + delta), f(x))          (delta fixed; gradient through both)

Bregman proximal point (mu > 0): a momentum copy theta~ of the model (no gradient, eval mode),
``theta~ <- beta theta~ + (1 - beta) theta`` after every optimizer step, and the term
``mu * D_sym(f(x; theta), f(x; theta~))``.

D_sym per example: symmetric KL of the softmax (classification), of the Bernoulli given by the
sigmoid of column 0 (binary; an embedding loss's output holds cos - threshold there), squared
error otherwise (regression, and any other output).  An mlm task gets no term.

Cost per task and micro-batch: K + 1 extra forwards of the model (the unwrapped module, so its
gradients reach the same parameters in the same backward and DDP's one reduction covers them),
K backwards to delta only (``torch.autograd.grad``: no parameter's .grad is touched), the
term's share of the step's backward, and with mu > 0 one forward of the copy without a graph.
The copy doubles the weights' memory and is saved in every full checkpoint (a second copy of
the weights on disk).  Under ZeRO 3 the weights are partitioned: refused (mtl.regularize.check).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtl.config import RegularizeConfig
from mtl.regularize.base import MicroBatch, Regularizer, task_key
from mtl.tasks import TaskSpec

TINY = 1e-12        # keeps the normalised step finite where the gradient is 0


def divergence(task: TaskSpec, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D_sym(a, b) per example (float32), for the outputs ``a``, ``b`` of one task's head."""
    a, b = a.float(), b.float()
    if not task.regression and task.num_outputs > 1:
        la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
        # KL(p||q) + KL(q||p) = sum (p - q)(log p - log q)
        return ((la.exp() - lb.exp()) * (la - lb)).sum(-1)
    if not task.regression and task.num_outputs == 1:
        za, zb = a[..., 0], b[..., 0]
        # The Bernoulli's symmetric KL in its logits: (sigmoid(za) - sigmoid(zb)) (za - zb)
        return (torch.sigmoid(za) - torch.sigmoid(zb)) * (za - zb)
    return (a - b).pow(2).reshape(len(a), -1).sum(-1)


def embedding_rows(batch) -> tuple[torch.Tensor, list[int]]:
    """The token mask of the rows the word embeddings see in ``task_output`` ([R, L]) and which
    sentence of its pair each row is: one segment (a sentence, or a joint pair) gives B rows;
    a siamese pair's two segments are padded to one width and stacked (MultiTaskModel._pool_pair):
    2B rows, the second half the pairs' second sentences."""
    masks = [seg["attention_mask"] for seg in batch.inputs]
    width = max(m.shape[1] for m in masks)
    mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks])
    return mask, [part for part, m in enumerate(masks) for _ in range(len(m))]


class Smart(Regularizer):
    name = "smart"

    def __init__(self, model: nn.Module, cfg: RegularizeConfig, seed: int):
        self.model, self.cfg, self.seed = model, cfg, seed
        self.embeddings = model.encoder.get_input_embeddings()
        self.width = self.embeddings.weight.shape[1]
        self.delta: torch.Tensor | None = None
        self.copy = self._momentum_copy(model) if cfg.smart_mu > 0 else None

    @property
    def stateful(self) -> bool:       # type: ignore[override]
        return self.copy is not None

    @property
    def active(self) -> bool:
        return self.cfg.reg_weight > 0 or self.copy is not None

    # --- the perturbation ---------------------------------------------------------------------
    @contextlib.contextmanager
    def perturbed(self, delta: torch.Tensor):
        """Forwards inside add ``delta`` to the word embeddings' output (shape checked)."""
        def hook(module, inputs, out):
            if out.shape != delta.shape:
                raise RuntimeError(f"smart: the word embeddings gave {tuple(out.shape)}, the perturbation "
                                   f"is {tuple(delta.shape)} (does the model encode this task's batch "
                                   "differently?)")
            return out + delta.to(out.dtype)
        handle = self.embeddings.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def random_start(self, task: str, indices: torch.Tensor, mask: torch.Tensor, parts: list[int],
                     step: int) -> torch.Tensor:
        """delta_0: each row's N(0, sigma^2) noise of shape (its real tokens, H), drawn from a
        generator seeded by (seed, step, task, example index, sentence of the pair), 0 on padding,
        so it does not depend on the step's split over workers or micro-batches.  Host cost: a
        generator and a small randn per row (and one copy to the device)."""
        rows, width = mask.shape
        delta = torch.zeros(rows, width, self.width)
        if self.cfg.smart_sigma > 0:
            lengths = mask.sum(1).tolist()              # a host sync on a GPU
            index = indices.tolist() * (rows // len(indices))
            key = (self.seed * 1_000_003 + step) * 1_000_033 + task_key(task)
            for r, (n, i, part) in enumerate(zip(lengths, index, parts)):
                gen = torch.Generator().manual_seed((key * 4_000_037 + i * 2 + part) % 2 ** 63)
                delta[r, :n] = torch.randn(n, self.width, generator=gen) * self.cfg.smart_sigma
        return delta.to(mask.device)

    def ascend(self, task: TaskSpec, batch, clean: torch.Tensor, delta: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """``smart_steps`` projected normalised-gradient ascent steps on D(f(x + delta), f(x))."""
        cfg, keep = self.cfg, mask.unsqueeze(-1).to(delta.dtype)
        target = clean.detach()
        pairs = len(batch.inputs)
        for _ in range(cfg.smart_steps):
            delta = delta.detach().requires_grad_(True)
            with self.perturbed(delta):
                out = self.model.task_output(task.name, batch)
            (g,) = torch.autograd.grad(divergence(task, out, target).sum(), delta)
            g = g * keep
            # ||g||_inf per example: a siamese pair's two rows are one example.
            norm = g.abs().amax(dim=(1, 2)).reshape(pairs, -1).amax(0).repeat(pairs)
            delta = delta.detach() + cfg.smart_step * g / (norm.view(-1, 1, 1) + TINY)
            delta = delta.clamp(-cfg.smart_epsilon, cfg.smart_epsilon) * keep
        self.delta = delta.detach()     # the final perturbation (the tests read it)
        return self.delta

    def adversarial(self, task: TaskSpec, micro: MicroBatch) -> torch.Tensor:
        """D_sym(f(x + delta), f(x)) per example, delta after the ascent."""
        batch, clean = micro.batches[task.name], micro.outputs[task.name]
        mask, parts = embedding_rows(batch)
        delta = self.random_start(task.name, micro.indices[task.name], mask, parts, micro.step)
        delta = self.ascend(task, batch, clean, delta, mask)
        with self.perturbed(delta):
            out = self.model.task_output(task.name, batch)
        return divergence(task, out, clean)

    # --- the proximal point -------------------------------------------------------------------
    @staticmethod
    def _momentum_copy(model: nn.Module) -> nn.Module:
        twin = copy.deepcopy(model)       # a second copy of the weights (memory, and on disk)
        twin.requires_grad_(False)
        twin.eval()                       # no dropout in the copy's forward
        for m in twin.modules():          # torch.compile's wrapper (if any) stays with the model
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None
        return twin

    def proximal(self, task: TaskSpec, micro: MicroBatch) -> torch.Tensor:
        with torch.no_grad():
            ref = self.copy.task_output(task.name, micro.batches[task.name])
        return divergence(task, micro.outputs[task.name], ref)

    def after_optimizer_step(self) -> None:
        """theta~ <- beta theta~ + (1 - beta) theta (every parameter; buffers copied)."""
        if self.copy is None:
            return
        beta = self.cfg.smart_beta
        with torch.no_grad():
            mine, theirs = list(self.copy.parameters()), [p.detach() for p in self.model.parameters()]
            torch._foreach_mul_(mine, beta)
            torch._foreach_add_(mine, theirs, alpha=1.0 - beta)
            for b, src in zip(self.copy.buffers(), self.model.buffers()):
                b.copy_(src)

    # --- the terms ----------------------------------------------------------------------------
    def terms(self, micro: MicroBatch) -> dict[str, torch.Tensor]:
        out = {}
        saved = dict(getattr(self.model, "last_pooled", {}))    # the extra forwards overwrite them
        for name in micro.batches:
            task = self.model.tasks[name]
            if task.mlm:
                continue
            per_example = 0.0
            if self.cfg.reg_weight > 0:
                per_example = self.cfg.reg_weight * self.adversarial(task, micro)
            if self.copy is not None:
                per_example = per_example + self.cfg.smart_mu * self.proximal(task, micro)
            out[name] = per_example.sum() * micro.example_weight(name)
        if saved:
            self.model.last_pooled.update(saved)    # PCGrad's representation mode reads the step's own
        return out

    def state_dict(self) -> dict:
        return {"copy": self.copy.state_dict()} if self.copy is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.copy is not None:
            self.copy.load_state_dict(state["copy"])
