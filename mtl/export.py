"""A trial's best model, kept in Hugging Face's format so users load and share it as any encoder:

    best/encoder/            config.json, model.safetensors, tokenizer files (save_pretrained)
    best/heads.safetensors   the task heads (heads.<task>.net.*) and the shared layer (shared.*) if any
    best/dev_predictions.json  per dev example: id, prediction, gold label, for each task
    best/meta.json           the run configuration, metrics, epoch and step (written last)

    from transformers import AutoModel
    encoder = AutoModel.from_pretrained("runs/x/best/encoder")
    model, cfg, meta, tokenizer = mtl.export.load_best("runs/x")   # encoder and heads, ready to score

Files are written one by one (an object store has no folder rename).  A trial killed half-way
through writing them re-evaluates the same epoch when it resumes (deterministically, to the same
score) and writes them all again, so a torn best/ never outlives the resume."""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile

from mtl import storage
from mtl.config import RunConfig
from mtl.errors import CheckpointError
from mtl.model import build_model
from mtl.tasks import TASKS

ENCODER, HEADS, META, PREDICTIONS = "encoder", "heads.safetensors", "meta.json", "dev_predictions.json"
# What heads.safetensors holds: everything outside the encoder (the shared layer is no part of
# the Hugging Face encoder, so it travels with the heads).
BESIDE_ENCODER = ("heads.", "shared.")


def best_folder(path: str) -> str:
    """A trial folder or its best/ folder -> the best/ folder."""
    return path if storage.exists(storage.join(path, META)) else storage.join(path, "best")


def save_best(out: str, model, weights: dict, tokenizer, meta: dict, predictions: dict) -> None:
    """``weights`` is the whole model's state dict (gathered under ZeRO 3), ``model`` the module
    whose encoder knows how to save itself."""
    from safetensors.torch import save

    folder = storage.join(out, "best")
    local = tempfile.mkdtemp(prefix="mtl-best-")
    try:
        encoder = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
        model.encoder.save_pretrained(local, state_dict=encoder, safe_serialization=True)
        tokenizer.save_pretrained(local)
        storage.upload_files(local, storage.join(folder, ENCODER))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    heads = _untied({k: v for k, v in weights.items() if k.startswith(BESIDE_ENCODER)}, weights)
    storage.write_bytes(storage.join(folder, HEADS), save({k: v.detach().cpu().contiguous() for k, v in heads.items()}))
    storage.write_text(storage.join(folder, PREDICTIONS), json.dumps(predictions))
    storage.write_text(storage.join(folder, META), json.dumps(meta, indent=2))


def read_meta(path: str) -> dict:
    url = storage.join(best_folder(path), META)
    if not storage.exists(url):
        raise CheckpointError(f"{path}: no best model (neither {path}/best/{META} nor {path}/{META})")
    try:
        meta = json.loads(storage.read_text(url))
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{url}: truncated or not valid JSON (the trial writes it last: its best model "
                              "was not saved whole; rerun the trial)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{url}: not a best model's meta (no config)")
    return meta


def load_best(path: str, device: str = "cpu"):
    """(model in eval mode, config, meta, tokenizer) of a trial's best weights."""
    from safetensors.torch import load

    folder = best_folder(path)
    meta = read_meta(path)
    cfg = RunConfig.from_dict(meta["config"])
    encoder_url = storage.join(folder, ENCODER)
    local = tempfile.mkdtemp(prefix="mtl-best-")
    try:
        storage.download_files(encoder_url, local)
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()       # the saved encoder has no pooler (the heads pool): no report
        try:
            tasks = [TASKS[t] for t in cfg.data.tasks + cfg.data.eval_tasks]     # eval-only tasks have heads too
            model = build_model(dataclasses.replace(cfg.model, model=local), tasks, cfg.embedding_tasks(),
                                cfg.loss.pair_threshold)
            tokenizer = _tokenizer(local)
        except Exception as exc:  # noqa: BLE001 - transformers' and safetensors' errors for a broken folder
            raise CheckpointError(f"{encoder_url}: cannot load the encoder ({_first_line(exc)}): its files are "
                                  "truncated or missing; rerun the trial") from None
        finally:
            hf_logging.set_verbosity(verbosity)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    heads_url = storage.join(folder, HEADS)
    try:
        heads = load(storage.read_bytes(heads_url))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a torn file
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{heads_url}: cannot load the heads ({_first_line(exc)}): truncated or not "
                              "safetensors; rerun the trial") from None
    missing, unexpected = model.load_state_dict(heads, strict=False)
    tied = _tied_names(model)
    heads_missing = [k for k in missing if k.startswith(BESIDE_ENCODER) and k not in tied]
    if heads_missing or unexpected:
        raise CheckpointError(f"{folder}/{HEADS}: does not fit the trial's heads "
                              f"(missing {heads_missing[:2]}, unexpected {unexpected[:2]})")
    return model.to(device).eval(), cfg, meta, tokenizer


def _untied(heads: dict, weights: dict) -> dict:
    """The heads' tensors less those tied to another (a masked-LM head's decoder weight is the
    encoder's embeddings, its decoder bias its own bias): safetensors stores one name per
    storage, and the model ties them again when it is built."""
    seen = {v.data_ptr() for k, v in weights.items() if not k.startswith(BESIDE_ENCODER) and v.numel()}
    out = {}
    for name, tensor in heads.items():
        if tensor.numel() and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


def _tied_names(model) -> set[str]:
    """State-dict names whose tensor another name holds too (kept once by ``_untied``)."""
    by_ptr: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(tensor.data_ptr(), []).append(name)
    return {n for names in by_ptr.values() if len(names) > 1 for n in names}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:120]


def _tokenizer(local: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local)


def read_predictions(path: str) -> dict:
    return json.loads(storage.read_text(storage.join(best_folder(path), PREDICTIONS)))

