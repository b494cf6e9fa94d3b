"""The field's gradient aggregators, from TorchJD (torchjd, pinned), on the task-gradient buffer.

TorchJD's ``Weighting``s take the T x T Gramian of the task gradients and return one weight
per task: exactly what ``mtl.combine.gradients`` hands over, already averaged over workers and
micro-batches, so each method here is exact under DDP, accumulation and mixed precision
without re-deriving it.  Methods written for the T x P matrix that read it only through
inner products (Nash-MTL, random weighting) get a T x T factor L of the Gramian (L L^T = G);
the few that read the parameters elementwise (ExcessMTL) or return a vector outside the
rows' span (GradDrop, ConFIG) get the buffer itself, at the cost of its copies.

State a method carries across steps (GradVac's target cosines, Nash-MTL's last weights,
ExcessMTL's history) is this module's ``_extra_state``: checkpointed and restored with the
trial.  A method whose solver is missing is refused when the trial is built, naming the
extra that installs it.
"""
from __future__ import annotations

from importlib.util import find_spec
from typing import ClassVar

import torch

from mtl.combine.base import register
from mtl.combine.gradients import GradientCombiner, check_one_per_task, gram_factor
from mtl.config import CombinerConfig
from mtl.errors import ConfigError

SOLVER_EXTRA = "pip install -e '.[methods]'"


class TorchJDMethod(GradientCombiner):
    """A TorchJD weighting (or aggregator) behind the Combiner interface."""
    # What the TorchJD object is called on: "gram" (T x T), "factor" (L with L L^T = G, T x T),
    # "matrix" (the T x P rows, unscaled: weights back) or "aggregate" (the rows: a vector back).
    reads: ClassVar[str] = "gram"
    requires: ClassVar[tuple[str, ...]] = ()        # Python modules of the method's solver
    state: ClassVar[tuple[str, ...]] = ()           # the TorchJD object's attributes that carry over steps

    def __init__(self, tasks: tuple[str, ...], cfg: CombinerConfig):
        super().__init__(tasks, cfg)
        missing = [m for m in self.requires if find_spec(m) is None]
        if missing:
            raise ConfigError(f"combiner.combiner: {self.name} needs {', '.join(missing)} (its solver): "
                              f"{SOLVER_EXTRA}")
        if cfg.pref_vector:
            check_one_per_task(cfg.pref_vector, tasks, "combiner.pref_vector")
        # A plain attribute: TorchJD's modules hold no parameters, and their state is ours to save.
        self.__dict__["method"] = self.make(cfg, len(tasks))

    def make(self, cfg: CombinerConfig, n_tasks: int):
        raise NotImplementedError

    def pref(self) -> torch.Tensor | None:
        return torch.tensor(self.cfg.pref_vector, dtype=torch.float64) if self.cfg.pref_vector else None

    def weigh(self, gram, tasks, grads, loss_scale):
        if self.reads == "gram":
            return self.method(gram)
        if self.reads == "factor":
            return self.method(gram_factor(gram))
        rows = grads.rows_of(tasks)
        return self.method(rows if loss_scale == 1.0 else rows / loss_scale).cpu()     # a T x P copy under fp16

    def apply(self, grads, tasks, gram, loss_scale):
        if self.reads != "aggregate":
            return super().apply(grads, tasks, gram, loss_scale)
        # Linear in the rows' scale, so the vector carries the loss scale like every gradient.
        # Computed alike on every rank from the same averaged rows: no P-sized broadcast.
        grads.write_vector(tasks, self.method(grads.rows_of(tasks)))

    def get_extra_state(self) -> dict:
        out = {}
        for name in self.state:
            value = getattr(self.method, name)
            out[name] = torch.as_tensor(value).clone() if hasattr(value, "shape") else value
        return out

    def set_extra_state(self, state: dict) -> None:
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                value = self.restore_value(name, value)
            setattr(self.method, name, value)
        self.after_restore()

    def restore_value(self, name: str, value: torch.Tensor):
        return value.to(self.dist.device) if self.reads == "matrix" else value

    def after_restore(self) -> None:
        """What the TorchJD object needs beyond its attributes once they are restored."""


@register("upgrad")
class UPGrad(TorchJDMethod):
    """UPGrad (Quinton & Rey 2024): each gradient projected onto the dual cone of all, then averaged."""
    requires = ("quadprog", "qpsolvers")

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import UPGradWeighting
        return UPGradWeighting(pref_vector=self.pref())


@register("mgda")
class MGDA(TorchJDMethod):
    """MGDA (Desideri 2012; Sener & Koltun 2018): the min-norm point of the gradients' convex hull."""

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import MGDAWeighting
        return MGDAWeighting(epsilon=cfg.mgda_epsilon)


@register("cagrad")
class CAGrad(TorchJDMethod):
    """CAGrad (Liu et al. 2021): the best worst-task improvement within a ball around the mean gradient."""
    requires = ("cvxpy", "clarabel")

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import CAGradWeighting
        return CAGradWeighting(c=cfg.cagrad_c)


@register("nash_mtl")
class NashMTL(TorchJDMethod):
    """Nash-MTL (Navon et al. 2022): the tasks bargain for the update (a Nash bargaining solution)."""
    reads = "factor"
    requires = ("cvxpy", "ecos")
    state = ("prvs_alpha", "step", "normalization_factor")

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import NashMTL as Aggregator
        return Aggregator(n_tasks=n_tasks, max_norm=cfg.nash_max_norm, update_weights_every=cfg.nash_every).weighting

    def get_extra_state(self) -> dict:
        state = super().get_extra_state()
        state["prvs_alpha"] = torch.as_tensor(self.method.prvs_alpha, dtype=torch.float64)
        state["normalization_factor"] = torch.as_tensor(self.method.normalization_factor, dtype=torch.float64)
        return state

    def weigh(self, gram, tasks, grads, loss_scale):
        import warnings
        with warnings.catch_warnings():     # cvxpy's note that the problem is not DPP, at every solve
            warnings.filterwarnings("ignore", message=".*not DPP.*")
            return super().weigh(gram, tasks, grads, loss_scale)

    def restore_value(self, name, value):
        return value.numpy().astype("float32" if name == "prvs_alpha" else "float64")

    def after_restore(self) -> None:
        # Its convex problem is built on the first call (step 0) around the last weights: rebuild it.
        if self.method.step > 0:
            self.method._init_optim_problem()


@register("imtl_g")
class IMTLG(TorchJDMethod):
    """IMTL-G (Liu et al. 2021): the combination whose projections on every task's unit gradient are equal."""

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import IMTLGWeighting
        return IMTLGWeighting()


@register("aligned_mtl")
class AlignedMTL(TorchJDMethod):
    """Aligned-MTL (Senushkin et al. 2023): the gradients' system made well-conditioned (aligned) first."""

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import AlignedMTLWeighting
        return AlignedMTLWeighting(pref_vector=self.pref(), scale_mode=cfg.aligned_scale)


@register("dualproj")
class DualProj(TorchJDMethod):
    """DualProj (Quinton & Rey 2024): the mean gradient projected onto the gradients' dual cone."""
    requires = ("quadprog", "qpsolvers")

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import DualProjWeighting
        return DualProjWeighting(pref_vector=self.pref())


@register("gradvac")
class GradVac(TorchJDMethod):
    """GradVac (Wang et al. 2021): each pair's cosine pushed up towards its running target."""
    state = ("_phi_t",)

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import GradVacWeighting
        return GradVacWeighting(beta=cfg.gradvac_beta)

    def after_restore(self) -> None:
        phi = self.method._phi_t
        self.method._state_key = None if phi is None else (phi.shape[0], phi.dtype)


@register("graddrop")
class GradDrop(TorchJDMethod):
    """GradDrop (Chen et al. 2020): per coordinate, the gradients of one sign, chosen by their purity, kept."""
    reads = "aggregate"

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import GradDrop as Aggregator
        return Aggregator()


@register("fairgrad")
class FairGrad(TorchJDMethod):
    """FairGrad (Ban & Ji 2024): the update that is alpha-fair across the tasks' loss decreases."""
    requires = ("scipy",)

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import FairGradWeighting
        return FairGradWeighting(alpha=cfg.fairgrad_alpha)


@register("excess_mtl")
class ExcessMTL(TorchJDMethod):
    """ExcessMTL (He et al. 2024): weights grow with each task's excess risk (AdaGrad-diagonal estimate)."""
    reads = "matrix"
    state = ("_weights", "_sq_grad_sum", "_initial_w", "_warmup_w_sum", "_n_steps")

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import ExcessMTLWeighting
        return ExcessMTLWeighting(robust_step_size=cfg.excess_step, n_warmup_steps=cfg.excess_warmup)

    def after_restore(self) -> None:
        history = self.method._sq_grad_sum
        if history is not None:
            self.method._state_key = (*history.shape, history.dtype, history.device)


@register("config")
class ConFIG(TorchJDMethod):
    """ConFIG (Liu et al. 2024): the conflict-free direction with equal cosine to every unit gradient."""
    reads = "aggregate"

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import ConFIG as Aggregator
        return Aggregator(pref_vector=self.pref() if cfg.pref_vector else None)

    def apply(self, grads, tasks, gram, loss_scale):
        rows = grads.rows_of(tasks)
        if self.cfg.pref_vector:        # its preference vector must be the rows' dtype
            self.method.pref_vector = torch.tensor(self.cfg.pref_vector, dtype=rows.dtype, device=rows.device)
        grads.write_vector(tasks, self.method(rows))


@register("rgw")
class RandomGradientWeighting(TorchJDMethod):
    """Random gradient weighting (Lin et al. 2022): softmax of normal draws, fresh every step."""
    reads = "factor"

    def make(self, cfg, n_tasks):
        from torchjd.aggregation import RandomWeighting
        return RandomWeighting()
