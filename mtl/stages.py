"""Trials as chains of stages: a trial may start from an upstream trial's best weights.

A stage is an ordinary trial.  ``RunConfig.upstream`` holds the whole configuration of the
stage before it (its identity is part of this trial's; its ``out`` says where its weights
are), so a chain is a linked list of trials, each with its own run folder, checkpoints and
results: a chain killed in its second stage resumes there, since every stage resumes by
itself, and a finished stage is never run again.  What a stage carries on: the encoder
(always) and, with ``carry_heads``, the heads of the tasks both stages train.

A chain file (``python -m mtl.train --stages chain.yaml ...``) lists the stages before the
trial the flags describe; each is a mapping of settings over those flags::

    stages:
      - {tasks: sst}                 # sequential training: SST, then Quora, then (the flags) STS
      - {tasks: para}

The stages before the last live in ``<out>/stages/<i>-<tasks>``; a study instead puts each
shared upstream stage once at its storage root (cluster.core.study)."""
from __future__ import annotations

import logging
from typing import Callable


from mtl import results as trial_results, storage
from mtl.config import RunConfig
from mtl.errors import ConfigError, MtlError, kind

log = logging.getLogger(__name__)
ENCODER_WEIGHTS = "best/encoder/model.safetensors"
HEADS = "best/heads.safetensors"


class UpstreamNotReady(MtlError):
    """The stage this trial starts from has not finished, or failed."""


def chain(base: RunConfig, stages: list[dict], where: str = "stages",
          each: Callable[[RunConfig], RunConfig] | None = None) -> RunConfig:
    """``base`` with its upstream chain: stage i is ``base`` with stage i's settings, run in
    ``<base.out>/stages/<i>-<tasks>``, each starting from the one before (``each``: applied to
    every stage's config as it is made, such as a study's method defaults)."""
    upstream = None
    for i, settings in enumerate(stages):
        if not isinstance(settings, dict) or not settings:
            raise ConfigError(f"{where}[{i}]: a stage is a mapping of settings over the trial's, not {kind(settings)}")
        try:
            # What only the last stage asked for (heads carried, tasks scored only) is not its stages'.
            stage = base.replace(**{"carry_heads": False, "data.eval_tasks": "", **settings,
                                    "upstream": upstream.to_dict() if upstream is not None else None})
        except ConfigError as exc:
            raise ConfigError(f"{where}[{i}]: {exc}") from None
        upstream = stage.replace(out=storage.join(base.out, "stages", f"{i}-{'+'.join(stage.data.tasks)}"))
        upstream = each(upstream) if each else upstream
    # Without stages, carry_heads stays as given: check_stage refuses it, rather than a silent reset.
    return base.replace(upstream=upstream.to_dict() if upstream is not None else None)


def load_chain_file(path: str) -> list[dict]:
    """The stages of a chain file: ``stages:`` and a list of mappings of settings."""
    spec = storage.read_yaml(path)
    if not isinstance(spec, dict) or set(spec) != {"stages"} or not isinstance(spec["stages"], list):
        raise ConfigError(f"{path}: a chain file is 'stages:' and a list of stages (mappings of settings)")
    return spec["stages"]


def links(cfg: RunConfig) -> list[RunConfig]:
    """The chain ending in ``cfg``, first stage first."""
    out = [cfg]
    while out[0].upstream is not None:
        out.insert(0, out[0].upstream)
    return out


def upstream_results(cfg: RunConfig) -> dict | None:
    """The finished upstream's results (None without an upstream).  Raises UpstreamNotReady,
    naming it and why, when it has not finished, failed, or is another trial than the one
    this trial names."""
    up = cfg.upstream
    if up is None:
        return None
    results = trial_results.read(up.out)
    if results is None:
        raise UpstreamNotReady(f"upstream: {up.out} has not finished (run it first; a study or --stages runs it)")
    if results.get("status") == "failed":
        raise UpstreamNotReady(f"upstream: {up.out} failed: {results.get('error', 'no reason recorded')}")
    changed = RunConfig.from_dict(results["config"]).identity_changes(up)
    if changed:
        raise ConfigError(f"upstream: {up.out} holds another trial than this stage starts from ({changed})")
    return results


def load_upstream(model, cfg: RunConfig) -> None:
    """The upstream's best encoder (and, with carry_heads, the heads of tasks both train) into
    ``model``, in place.  One read of the upstream's weights files (a copy on the host)."""
    from safetensors.torch import load

    up = cfg.upstream
    url = storage.join(up.out, ENCODER_WEIGHTS)
    try:
        encoder = load(storage.read_bytes(url))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own type for a torn file
        raise ConfigError(f"upstream: {url}: cannot read the encoder's weights ({str(exc)[:120]})") from None
    missing, unexpected = model.encoder.load_state_dict(encoder, strict=False)
    if missing or unexpected:
        raise ConfigError(f"upstream: {url} does not fit the encoder (missing {missing[:2]}, unexpected "
                          f"{unexpected[:2]})")
    shared = [t for t in cfg.data.tasks if t in up.data.tasks and t in model.heads] if cfg.carry_heads else []
    if cfg.carry_heads and not shared:
        raise ConfigError(f"carry_heads: the upstream {up.out} trains {', '.join(up.data.tasks)}, this stage "
                          f"{', '.join(cfg.data.tasks)}: no head to carry over")
    shared += [t for t in cfg.data.eval_tasks if t in model.heads]     # scored only: always the upstream's
    if shared:
        heads = load(storage.read_bytes(storage.join(up.out, HEADS)))
        mine = {k: v for k, v in heads.items() if k.split(".")[1] in shared}
        model.load_state_dict(mine, strict=False)
        log.info("carried the heads of %s over from %s", ", ".join(shared), up.out)


def history(cfg: RunConfig) -> list[dict]:
    """Every earlier stage's dev scores, first stage first, as its results recorded them."""
    out = []
    for stage in links(cfg)[:-1]:
        results = trial_results.read(stage.out) or {}
        best = results.get("best", {})
        out.append({"out": stage.out, "tasks": list(stage.data.tasks), "combiner": stage.combiner.combiner,
                    "best_metrics": best.get("metrics"), "best_epoch": best.get("epoch")})
    return out
