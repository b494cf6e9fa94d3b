"""Command line for one trial.  Every RunConfig field is a flag (generated, so --help always
matches the config); a preset fills the starting values.  The command itself is
mtl.train.main; this module holds what it shares with the launchers (flags, the config from
them, ``guarded`` exit codes, the summary line) and imports no training code."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from mtl import storage
from mtl.config import MOVED_TO_PLACEMENT, RunConfig, field_docs, set_dotted
from mtl.errors import ConfigError, MtlError, kind
from mtl.stop import EXIT_STOPPED, TrialStopped
from mtl.presets import PRESETS


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="starting values: paper (reference protocol, GPUs), smoke (seconds on CPU), "
                             "default (reference protocol on the embedded encoder and sample data)")
    parser.add_argument("--config", metavar="JSON", help="settings to start from: a JSON file (a results.json, "
                        "meta.json or config as saved, whole or in part) or inline JSON ('{\"optim\": {\"lr\": 2e-5}}')")
    defaults = RunConfig().to_dict()
    group = parser.add_argument_group("run configuration")
    for flag, key, f in field_docs():
        default = defaults
        for part in key.split("."):
            default = default[part]
        if isinstance(default, list):
            default = ",".join(str(v) for v in default)
        kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else "", str)   # bool: true/false
        group.add_argument(f"--{flag.replace('_', '-')}", dest=key, type=kind, default=argparse.SUPPRESS,
                           metavar=flag.upper(), help=f"{f.metadata['help']} (default: {default})")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    d = RunConfig().to_dict()
    if args.config:
        merge_config(d, load_config_arg(args.config), "--config" if args.config.lstrip().startswith("{")
                     else args.config)
    for key, value in PRESETS[args.preset].items():
        set_dotted(d, key, value)
    for _, key, _ in field_docs():
        if hasattr(args, key):
            set_dotted(d, key, getattr(args, key))
    return RunConfig.from_dict(d)


def load_config_arg(value: str) -> dict:
    """--config's settings: inline JSON, or a file holding a config, or a results/meta file
    holding one under "config"."""
    inline = value.lstrip().startswith("{")
    where = "--config" if inline else value
    try:
        loaded = json.loads(value if inline else storage.read_text(value))
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from None
    if isinstance(loaded, dict) and "config" in loaded:
        loaded = loaded["config"]
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where}: a config is a JSON object of settings (as results.json's \"config\"), "
                          f"not {kind(loaded)}")
    return loaded


def merge_config(d: dict, loaded: dict, where: str, prefix: str = "") -> None:
    """Settings of ``loaded`` (whole or partial) over ``d``; an unknown one is named with its file."""
    for key, value in loaded.items():
        if prefix == "parallel." and key in MOVED_TO_PLACEMENT:
            continue                       # placement, kept by configs saved before it moved out
        if key not in d:
            raise ConfigError(f"{where}: {prefix}{key}: unknown setting")
        if isinstance(d[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {prefix}{key}: a section of settings, not {kind(value)}")
            merge_config(d[key], value, where, f"{prefix}{key}.")
        else:
            d[key] = value


def trial_parser() -> argparse.ArgumentParser:
    """The flags of one trial's command (``python -m mtl.train``, mtl-train): mtl.train.main."""
    parser = argparse.ArgumentParser(prog="python -m mtl.train", description="Run one multi-task fine-tuning trial.",
                                     epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--stages", metavar="YAML", help="a chain file: the stages to train before this trial, "
                        "each a mapping of settings over these flags (see mtl/stages.py); each stage runs once, "
                        "in <out>/stages/, and carries its encoder on")
    return parser


def methods_help() -> str:
    """Every --combiner method, its cost class and a line on what it does, from the registry."""
    # Lazy: the registry imports torch, which only this help text needs of it here.
    from mtl.combine import COMBINERS

    width = max(map(len, COMBINERS))
    lines = [f"  {name:<{width}}  {'[' + cls.cost + ']':<15}  {(cls.__doc__ or '').strip().splitlines()[0]}"
             for name, cls in sorted(COMBINERS.items())]
    return ("loss-combination methods (--combiner), with what a step costs beside addition (one backward per "
            "micro-batch;\nT backwards: one per task; extra forward: the losses again after the step):\n"
            + "\n".join(lines))


def guarded(work: Callable[[], int]) -> int:
    """Runs a trial's command.  Input errors become one line on stderr and exit 2; a stop on
    request (SIGUSR1/SIGTERM: a scheduler's warning; a first Ctrl-C), after its checkpoint,
    exits 75; a second Ctrl-C exits 130 at once."""
    try:
        return work()
    except TrialStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("error: interrupted (a second Ctrl-C): work since the last checkpoint is lost; run the same "
              "command again to resume from it", file=sys.stderr)
        return 130
    except MtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not getattr(exc, "filename", None):
            raise
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2


def print_summary(cfg: RunConfig, results: dict) -> None:
    best = results["best"]
    print(json.dumps({"out": cfg.out, "best_epoch": best.get("epoch"), "best": best.get("metrics"),
                      "wall_time_s": round(results["wall_time_s"], 1),
                      "examples_per_s": round(results["examples_per_s"], 1)}))
