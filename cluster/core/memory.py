"""Will these trials fit on one GPU together?  An estimate of one worker's peak GPU memory from
its RunConfig, without loading any weights, and the check that refuses a packing of several
workers on one GPU whose estimated sum exceeds the GPU's memory.

The estimate, for one worker of a trial (bytes)::

    P      trainable parameters: the encoder (built on the meta device from its config: no
           weights read, no memory) without its pooler (the heads pool), plus the task heads
           (each task's own depth and widths; none for an embedding-loss task) and the
           --shared-layer, which is shared: counted with the encoder as P_enc below
    states = P x bytes per parameter:
             ddp        fp32 weights 4 + fp32 grads 4 + AdamW's two moments 8           = 16
                        + 2 under bf16/fp16 autocast (its bf16 weight copies, cached from the
                          forward and saved for the backward)
                        + 4 with 2+ workers (DDP's gradient buckets are a second copy)
             deepspeed  weights w + grads w + optimizer (fp32 master 4 if w = 2) + 8, with
                        w = 2 in bf16/fp16 (the engine casts the model) else 4; ZeRO stage >= 1
                        divides the optimizer by the workers, >= 2 the grads, 3 the weights;
                        --offload-optimizer moves the optimizer off the GPU
    pcgrad = T x P_enc x grad bytes   PCGrad on params keeps every task's whole gradient of the
                                      encoder until the step, one row per task of a (T x P_enc)
                                      buffer, beside the ordinary gradient each backward writes
                                      before it is moved into its row (T tasks)
    acts   = every task of a step is forwarded before any backward, so their activations add:
             sum over the step's tasks of  b x s x [layers x ((6e + 10) h + 2e i) + 9 h]
                                          + layers x b x a x s^2 x (9 + 2 [e = 2])  (eager attention)
             b sequences per micro-batch (--batch-size; twice that for a task's siamese pairs), s the
             --max-length, h hidden, i the MLP's width, a heads, e bytes per activation (2 under
             bf16/fp16 autocast, 4 in fp32).  Per layer and token: the attention block saves its
             input, Q, K, V and context (5 h e) and a dropout mask (h); the MLP its input (h e),
             GELU input and output (2 i e) and a mask (h); the two LayerNorms fp32 inputs (8 h,
             fp32 even under autocast) [Korthikanti et al. 2022, with fp32 LayerNorms].  The
             embeddings add ~9 h per token.  Eager attention also keeps the s x s probabilities
             (fp32 softmax out 4, mask 1, dropout out 4, and a 16-bit copy for the matmul 2);
             SDPA's fused kernels (transformers' default where the model supports it) keep none.
    total  = (states + pcgrad + acts) x 1.10 (the caching allocator's slack) + 0.75 GiB (each
             process's CUDA context, cuBLAS/cuDNN workspaces and kernels)

Assumptions, mostly on the side of more memory: every batch is padded to --max-length (batches are
padded to their longest sequence, so short sentences use less); evaluation (no gradients, batch
x 4) needs less than training; one-task-per-step modes (proportional, temperature) forward one
task at a time, counted as the largest.  Not counted: DeepSpeed's communication buckets, NCCL's
buffers (a few hundred MB for multi-GPU trials), memory other processes hold on the GPU.  Not
yet compared with a measured GPU peak: ``benchmarks/bench_pack.py --device cuda`` prints the
estimate beside nvidia-smi's peak for each packing (trials record no GPU peak of their own yet).

Where it runs: on Ray, in the launcher before Ray starts (the launcher imports torch anyway); on
SLURM, the submitter computes the estimates of the trials that share a GPU and pins them beside
the trial list, and the array task compares them with nvidia-smi's capacity at its start, before
launching workers, without importing torch (a task started from a trial list without them, e.g.
``sbatch slurm/sweep.sh --grid ...`` by hand, computes them itself: importing torch and
transformers, a few seconds, only when it packs several workers on a GPU).  One trial alone on a
GPU is never refused: the estimate is conservative, and the trial is the judge of its own fit.
"""
from __future__ import annotations

import functools
import logging
import shutil
import subprocess
from dataclasses import dataclass

from mtl.config import RunConfig
from mtl.errors import ConfigError, MtlError

from cluster.core.placement import Placement, parse_size
from cluster.core.study import trial_name

log = logging.getLogger("cluster.core.memory")
GiB = 1 << 30
CONTEXT_BYTES = int(0.75 * GiB)
ALLOCATOR_SLACK = 1.10


class MemoryUnknown(MtlError):
    """The estimate needs what is not at hand (a model config that cannot be read here)."""


@dataclass(frozen=True)
class ModelShape:
    encoder_params: int      # without the pooler, which mtl.model removes
    hidden: int
    layers: int
    heads: int
    intermediate: int
    attention: str           # transformers' attention implementation: eager, sdpa, flash_attention_2...


@functools.lru_cache(maxsize=None)
def model_shape(model: str) -> ModelShape:
    """The encoder's size and shape from its config alone: the model is built on the meta device
    (no weights read, no memory; ~0.1-1 s, once per model name and process)."""
    # torch and transformers (seconds): only where a packing is checked, never in an array task
    # whose estimates the submitter pinned.
    import torch
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    from mtl.model import resolve_model_path

    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model))
        with torch.device("meta"):
            encoder = AutoModel.from_config(config)
    except (OSError, ValueError, MtlError) as exc:
        raise MemoryUnknown(f"cannot read the config of {model!r} ({str(exc).strip().splitlines()[0]})") from None
    params = sum(p.numel() for name, p in encoder.named_parameters() if not name.startswith("pooler."))
    hidden = config.hidden_size
    return ModelShape(params, hidden, config.num_hidden_layers, config.num_attention_heads,
                      getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None) or 4 * hidden,
                      getattr(config, "_attn_implementation", None) or "eager")


def head_params(cfg: RunConfig, hidden: int) -> int:
    """The task heads' parameters: mtl.model's own heads, built on the meta device (no memory)."""
    import torch                          # as in model_shape: only where a packing is checked

    from mtl.model import build_heads
    from mtl.tasks import TASKS

    with torch.device("meta"):
        heads = build_heads([TASKS[t] for t in cfg.data.tasks], cfg.model, hidden, cfg.embedding_tasks())
    return sum(p.numel() for p in heads.parameters())


def shared_layer_params(cfg: RunConfig, hidden: int) -> int:
    """The --shared-layer's parameters (0 without one): mtl.model's own, on the meta device."""
    import torch                          # as in model_shape

    from mtl.model import build_shared_layer

    with torch.device("meta"):
        layer = build_shared_layer(cfg.model, hidden)
    return sum(p.numel() for p in layer.parameters()) if layer is not None else 0


@dataclass(frozen=True)
class Estimate:
    total: int
    parts: dict          # name -> bytes, before the allocator's slack and the context


def estimate_worker(cfg: RunConfig) -> Estimate:
    """One worker's estimated peak GPU memory (see the module's docstring); 0 for a trial pinned to
    the CPU.  Raises MemoryUnknown when the model's config cannot be read here."""
    if cfg.device == "cpu":
        return Estimate(0, {})
    from mtl.tasks import TASKS           # torch: as in model_shape

    shape = model_shape(cfg.model.model)
    p_enc = shape.encoder_params + shared_layer_params(cfg, shape.hidden)   # the shared parameters
    p = p_enc + head_params(cfg, shape.hidden)
    mixed = cfg.precision in ("bf16", "fp16")
    workers, par = cfg.parallel.workers, cfg.parallel
    if par.strategy == "deepspeed":
        w = 2 if mixed else 4
        stage = par.zero_stage
        optimizer = 0 if par.offload_optimizer else (12 if mixed else 8) / (workers if stage >= 1 else 1)
        per_param = w / (workers if stage >= 3 else 1) + w / (workers if stage >= 2 else 1) + optimizer
        grad_bytes = w
    else:
        per_param = 16 + (2 if mixed else 0) + (4 if workers > 1 else 0)
        grad_bytes = 4
    parts = {"weights, gradients, optimizer": int(per_param * p)}
    tasks = cfg.data.tasks
    if cfg.combiner.combiner == "pcgrad" and cfg.combiner.pcgrad_on == "params" and len(tasks) > 1:
        parts["pcgrad task gradients"] = len(tasks) * p_enc * grad_bytes

    e = 2 if mixed else 4
    s, h, i = cfg.model.max_length, shape.hidden, shape.intermediate
    per_token = shape.layers * ((6 * e + 10) * h + 2 * e * i) + 9 * h
    eager = shape.attention == "eager"

    def task_acts(name: str) -> int:
        b = cfg.optim.batch_size * (2 if TASKS[name].is_pair and cfg.model.siamese(name) else 1)
        scores = shape.layers * b * shape.heads * s * s * (9 + (2 if e == 2 else 0)) if eager else 0
        return b * s * per_token + scores

    acts = [task_acts(t) for t in tasks]
    parts["activations"] = max(acts) if cfg.data.one_task_per_step else sum(acts)
    return Estimate(int(sum(parts.values()) * ALLOCATOR_SLACK) + CONTEXT_BYTES, parts)


def format_size(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


# --------------------------------------------------------------------------------------------
# The GPU's capacity
# --------------------------------------------------------------------------------------------
def detect_gpu_memory() -> int | None:
    """The smallest GPU nvidia-smi lists here (bytes), or None without nvidia-smi or a GPU.  Under
    MIG it reports the whole GPU: pass --gpu-memory the slice's size."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    sizes = [float(x) for x in done.stdout.split() if x.replace(".", "", 1).isdigit()]
    return int(min(sizes) * (1 << 20)) if done.returncode == 0 and sizes else None   # MiB


def gpu_capacity(placement: Placement, detect: bool) -> tuple[int | None, str]:
    """(bytes, where the figure comes from): --gpu-memory, else nvidia-smi when ``detect``."""
    stated = placement.gpu_memory_bytes
    if stated is not None:
        return stated, f"--gpu-memory {placement.gpu_memory}"
    if detect:
        found = detect_gpu_memory()
        if found is not None:
            return found, "nvidia-smi"
    return None, ""


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------
def check_gpu(workers: list[tuple[str, int]], capacity: int, source: str, what: str, hint: str) -> None:
    """Refuse, in one line, ``workers`` ((trial name, estimated bytes), one per worker) sharing one
    GPU whose memory is ``capacity``."""
    if len(workers) < 2:
        return
    total = sum(b for _, b in workers)
    if total <= capacity:
        return
    names = list(dict.fromkeys(n for n, _ in workers))
    sizes = sorted({b for _, b in workers})
    each = f"{format_size(sizes[0])} each" if len(sizes) == 1 else f"{format_size(sizes[-1])} the largest"
    raise ConfigError(f"GPU memory: {what} {len(workers)} workers on one GPU (trials {', '.join(names)}) need an "
                      f"estimated {format_size(total)} ({each}), more than the GPU's {format_size(capacity)} "
                      f"({source}): {hint}, or pass --gpu-memory off to skip this check")


def estimates(trials: list[RunConfig]) -> dict[str, int] | None:
    """{trial name: one worker's estimate}, or None (logged) where a model's config is unknown."""
    try:
        return {trial_name(t): estimate_worker(t).total for t in trials}
    except MemoryUnknown as exc:
        log.warning("GPU memory: not checked: %s", exc)
        return None


def check_ray_packing(trials: list[RunConfig], placement: Placement, gpu_default: float, detect: bool,
                      groups: list[list[RunConfig]] | None = None) -> None:
    """On Ray, a fraction g packs up to 1/g workers of any trials on one GPU: refuse when the 1/g
    largest workers of these trials would not fit together (the worst packing Ray may choose).
    ``groups`` (--fuse): a fused group is one worker holding every member's memory."""
    per_gpu = placement.workers_per_gpu(gpu_default)
    on_gpu = [t for t in trials if t.device != "cpu"]
    units = [g for g in (groups or [[t] for t in trials]) if g[0].device != "cpu"]
    if not placement.memory_check or per_gpu < 2 or sum(g[0].parallel.workers for g in units) < 2:
        return
    capacity, source = gpu_capacity(placement, detect)
    if capacity is None:
        log.info("GPU memory: up to %d workers per GPU (--gpus-per-worker %g), GPU memory unknown here (no "
                 "nvidia-smi, no --gpu-memory): packing not checked", per_gpu, placement.gpus(gpu_default))
        return
    sizes = estimates(on_gpu)
    if sizes is None:
        return
    workers = sorted(((trial_name(g[0]), sum(sizes[trial_name(t)] for t in g)) for g in units
                      for _ in range(g[0].parallel.workers)), key=lambda w: -w[1])[:per_gpu]
    check_gpu(workers, capacity, source, f"--gpus-per-worker {placement.gpus(gpu_default):g} packs up to",
              "use a larger --gpus-per-worker (fewer workers per GPU)")
    log.info("GPU memory: up to %d workers per GPU need at most %s of %s (%s)", len(workers),
             format_size(sum(b for _, b in workers)), format_size(capacity), source)


def check_slurm_gpus(packed: dict[str, list[RunConfig]], sizes: dict[str, int], capacity: int, source: str) -> None:
    """SLURM: ``packed`` maps each of a task's GPUs to the trials whose workers it runs (a trial
    once per worker there)."""
    for gpu, trials in packed.items():
        check_gpu([(trial_name(t), sizes[trial_name(t)]) for t in trials], capacity, source,
                  "--trials-per-task puts", "use a smaller --trials-per-task or a larger --gpus-per-worker")


__all__ = ["Estimate", "MemoryUnknown", "check_gpu", "check_ray_packing", "check_slurm_gpus", "detect_gpu_memory",
           "estimate_worker", "estimates", "format_size", "gpu_capacity", "model_shape", "parse_size"]
