"""Reading the task files, tokenizing them once (cached on the run's storage), padding
batches, and the multi-task sampler that decides which examples each optimizer step sees."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtl import storage
from mtl.config import DEFAULT_DATA, DataConfig, OptimConfig, RunConfig
from mtl.dist import DistContext
from mtl.errors import DataError, NotFound
from mtl.mlm import mask_tokens, special_mask
from mtl.tasks import TaskSpec

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
SUBSET_SEED = 224   # which rows max_train_rows / max_dev_rows keep: fixed, so all trials agree


def resolve_data_dir(data_dir: str) -> str:
    return str(SAMPLE_DIR) if data_dir == DEFAULT_DATA else data_dir


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
@dataclass
class RawSplit:
    task: str
    url: str
    texts: list[tuple[str, ...]]
    labels: list[float]            # NaN throughout for a split without labels (a test set)
    skipped: int
    digest: str    # of the file's bytes: part of the tokenization cache key
    ids: list[str] = field(default_factory=list)    # the file's "id" column (row numbers if it has none)
    parts: list["RawSplit"] = field(default_factory=list)    # an mlm task's: the source splits it reads

    @property
    def labelled(self) -> bool:
        return not self.labels or self.labels[0] == self.labels[0]

    def __len__(self) -> int:
        return len(self.labels)


def read_split(data_dir: str, task: TaskSpec, split: str, on_bad_row: str = "error", max_rows: int = 0,
               labels_optional: bool = False) -> RawSplit:
    """Read one task file (tab-separated, header row, quoted fields) and check every row.
    With ``labels_optional`` a file without the label column (a test split) reads as unlabelled."""
    if task.sources:
        return _read_sentences(data_dir, task, split, on_bad_row, max_rows)
    url = storage.join(resolve_data_dir(data_dir), task.file(split))
    try:
        raw = storage.read_bytes(url)
    except NotFound:
        raise DataError(f"{url}: file not found (data_dir must hold {task.file(split)})") from None
    try:
        # utf-8-sig: a byte-order mark (spreadsheet exports write one) is not part of the first
        # column's name; read as text it would hide the "id" column and renumber every row.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{url}:{line}: not UTF-8 text (byte {exc.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()                   # the final newline ends the last row; it starts none
    header = _parse_line(lines[0]) if lines else None
    needed = (*task.text_columns, task.label_column)
    if header is None:
        raise DataError(f"{url}: file is empty (expected a header with {', '.join(needed)})")
    if isinstance(header, str):
        raise DataError(f"{url}:1: header: {header}")
    labelled = not task.mlm and (not labels_optional or task.label_column in header)
    if not labelled:
        needed = task.text_columns
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{url}:1: header lacks column {missing[0]!r} (found: {', '.join(h for h in header if h)})")
    where = [header.index(c) for c in needed]
    id_at = header.index("id") if "id" in header else None
    texts, labels, ids, skipped = [], [], [], 0
    for line, text_line in enumerate(lines[1:], start=2):
        row = _parse_line(text_line)
        reason = row if isinstance(row, str) else _row_problem(row, where, needed, task, labelled)
        if reason is None:
            texts.append(tuple(row[i].strip() for i in where[:len(task.text_columns)]))
            labels.append(task.parse_label(row[where[-1]]) if labelled else math.nan)
            ids.append(row[id_at].strip() if id_at is not None and id_at < len(row) else str(len(ids)))
        elif on_bad_row == "skip":
            skipped += 1
        else:
            raise DataError(f"{url}:{line}: {reason} (pass --on-bad-row skip to skip such rows)")
    if max_rows and len(labels) > max_rows:
        # Task files are often ordered (by source or label): the first N rows can be far from the
        # data's distribution.  A fixed-seed subset in file order is the same for every trial.
        keep = sorted(random.Random(SUBSET_SEED).sample(range(len(labels)), max_rows))
        texts, labels, ids = [texts[i] for i in keep], [labels[i] for i in keep], [ids[i] for i in keep]
    if skipped:
        log.warning("%s: skipped %d malformed row(s)", url, skipped)
    if not labels:
        raise DataError(f"{url}: no usable rows")
    return RawSplit(task.name, url, texts, labels, skipped, hashlib.sha256(raw).hexdigest(), ids)


def _read_sentences(data_dir: str, task: TaskSpec, split: str, on_bad_row: str, max_rows: int) -> RawSplit:
    """An mlm task's split: every sentence of its source tasks' split (both of a pair, each on its
    own), in file order, duplicates kept: dropping them would change how often each sentence of
    the tasks' data is seen."""
    from mtl.tasks import TASKS    # the registry: a source may be any task, built-in or the user's

    unknown = [s for s in task.sources if s not in TASKS]
    if unknown:
        raise DataError(f"task {task.name}: source {unknown[0]!r} is not a known task")
    parts = [read_split(data_dir, TASKS[s], split, on_bad_row, max_rows) for s in task.sources]
    texts = [(sentence,) for part in parts for row in part.texts for sentence in row]
    ids = [f"{part.task}:{i}:{j}" for part in parts for i, row in zip(part.ids, part.texts) for j in range(len(row))]
    digest = hashlib.sha256(" ".join(p.digest for p in parts).encode()).hexdigest()
    url = storage.join(resolve_data_dir(data_dir), f"{task.name}({'+'.join(task.sources)})-{split}")
    return RawSplit(task.name, url, texts, [0.0] * len(texts), sum(p.skipped for p in parts), digest, ids, parts)


def read_data(cfg: RunConfig, tasks: list[TaskSpec], splits=("train", "dev")) -> tuple[dict[str, RawSplit],
                                                                                      dict[str, RawSplit]]:
    """A trial's train and dev splits of every task, with its row limits (``splits``: which)."""
    d = cfg.data
    train = {t.name: read_split(d.data_dir, t, "train", d.on_bad_row, d.max_train_rows) for t in tasks} \
        if "train" in splits else {}
    dev = {t.name: read_split(d.data_dir, t, "dev", d.on_bad_row, d.max_dev_rows) for t in tasks} \
        if "dev" in splits else {}
    return train, dev


def data_record(splits: list[RawSplit]) -> dict[str, str]:
    """File name -> sha256 of its bytes, for the files a trial read: saved with its checkpoints
    and results, so a resume or a rerun on other rows at the same path is refused."""
    files = [p for s in splits for p in (s.parts or [s])]      # an mlm task's: the files it read
    return {s.url.rsplit("/", 1)[-1]: s.digest for s in files}


def file_digests(data_dir: str, tasks: list[TaskSpec], splits=("train", "dev"),
                 cache: dict[str, str] | None = None) -> dict[str, str]:
    """The same record computed from the files as they are now (bytes read and hashed, not
    parsed).  ``cache``: url -> digest, shared by one caller's many trials of the same files."""
    from mtl.tasks import TASKS    # an mlm task's sources, from the registry

    cache = {} if cache is None else cache
    out = {}
    for task in tasks:
        if task.sources:
            out.update(file_digests(data_dir, [TASKS[s] for s in task.sources if s in TASKS], splits, cache))
            continue
        for split in splits:
            url = storage.join(resolve_data_dir(data_dir), task.file(split))
            if url not in cache:
                try:
                    cache[url] = hashlib.sha256(storage.read_bytes(url)).hexdigest()
                except NotFound:
                    raise DataError(f"{url}: file not found (data_dir must hold {task.file(split)})") from None
            out[task.file(split)] = cache[url]
    return out


def data_changes(saved: dict[str, str], now: dict[str, str], data_dir: str) -> str:
    """'' when the files a trial read are unchanged, else which changed, as one line."""
    changed = sorted(name for name in saved.keys() & now.keys() if saved[name] != now[name])
    if not changed:
        return ""
    where = resolve_data_dir(data_dir)
    return "; ".join(f"{storage.join(where, n)} changed (sha256 {saved[n][:12]} -> {now[n][:12]})" for n in changed)


def _parse_line(line: str) -> list[str] | str:
    """One physical line as one row's fields, or why it is malformed.  A row is one line: no
    field of these files holds a tab or a line break, so a quote left open is a broken row, not
    a field that runs on through the next lines (a CSV reader would swallow every row up to the
    next stray quote into one field, and train on what is left without a word)."""
    if line.endswith("\r"):
        line = line[:-1]
    try:
        row = next(csv.reader([line], delimiter="\t", strict=True), [])
    except csv.Error as exc:
        if "end of data" in str(exc):
            return "unbalanced quote (a field opens a \" it never closes)"
        return f"malformed quoting ({exc})"
    if any("\t" in cell or "\r" in cell or "\n" in cell for cell in row):
        return "a quoted field holds a tab or a line break"
    return row


def _row_problem(row: list[str], where: list[int], needed: tuple[str, ...], task: TaskSpec,
                 labelled: bool = True) -> str | None:
    if not any(cell.strip() for cell in row):
        return "empty row"
    for i, name in zip(where, needed):
        if i >= len(row):
            return f"missing column {name!r}"
    n_text = len(task.text_columns)
    for i, name in zip(where[:n_text], needed[:n_text]):
        if not row[i].strip():
            return f"empty {name}"
    if labelled:
        try:
            task.parse_label(row[where[-1]])
        except ValueError as exc:
            return str(exc)
    return None


# --------------------------------------------------------------------------------------------
# Tokenization (cached)
# --------------------------------------------------------------------------------------------
@dataclass
class Segment:
    """Token sequences stored flat: sequence i is tokens[offsets[i]:offsets[i+1]]."""
    tokens: torch.Tensor
    offsets: torch.Tensor
    types: torch.Tensor | None

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "offsets": self.offsets, "types": self.types}


@dataclass
class Masking:
    """What an mlm task's batches are masked with: the tokenizer's [MASK] id, its vocabulary
    size and its special ids (never masked)."""
    mask_id: int
    vocab_size: int
    special_ids: torch.Tensor


@dataclass
class Encoded:
    """One split of one task, tokenized: one segment for single sentences and joint pairs,
    two (a, b) for siamese pairs."""
    task: str
    segments: list[Segment]
    labels: torch.Tensor
    pad_id: int
    masking: Masking | None = None     # an mlm task's: its batches are masked as they are made

    def __len__(self) -> int:
        return len(self.labels)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Calling a tokenizer records its last truncation/padding settings here: not identity.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        ident = json.dumps(spec, sort_keys=True)
    else:
        ident = json.dumps([type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer)])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def encode_split(raw: RawSplit, task: TaskSpec, tokenizer, max_length: int, siamese: bool,
                 cache_dir: str | None) -> Encoded:
    """Tokenize a split, or load it from the cache when the same encoder, length and file were seen."""
    key = hashlib.sha256(json.dumps({
        "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length, "siamese": siamese,
        "file": raw.digest, "rows": len(raw), "subset": SUBSET_SEED, "skipped": raw.skipped,
        "columns": task.text_columns,
    }).encode()).hexdigest()[:24]
    cache_url = storage.join(cache_dir, f"{task.name}-{key}.pt") if cache_dir else None
    masking = _masking(tokenizer) if task.mlm else None
    if cache_url and storage.exists(cache_url):
        try:
            blob = storage.load_torch(cache_url)
            return Encoded(task.name, [Segment(**s) for s in blob["segments"]], blob["labels"], blob["pad_id"], masking)
        except Exception as exc:  # a damaged cache entry is rebuilt, never trusted
            log.warning("ignoring unreadable token cache %s: %s", cache_url, exc)
    columns = list(zip(*raw.texts))
    if task.is_pair and not siamese:
        segments = [_tokenize(tokenizer, list(columns[0]), list(columns[1]), max_length)]
    else:
        segments = [_tokenize(tokenizer, list(col), None, max_length) for col in columns]
    enc = Encoded(task.name, segments, torch.tensor(raw.labels, dtype=torch.float32), tokenizer.pad_token_id or 0,
                  masking)
    if cache_url:
        storage.save_torch(cache_url, {"segments": [s.to_dict() for s in segments],
                                       "labels": enc.labels, "pad_id": enc.pad_id})
    return enc


def _masking(tokenizer) -> Masking:
    if tokenizer.mask_token_id is None:
        raise DataError(f"task mlm: the tokenizer of {tokenizer.name_or_path} has no [MASK] token")
    return Masking(tokenizer.mask_token_id, len(tokenizer), torch.tensor(sorted(tokenizer.all_special_ids)))


def _tokenize(tokenizer, first: list[str], second: list[str] | None, max_length: int) -> Segment:
    out = tokenizer(first, second, truncation=True, max_length=max_length, padding=False)
    ids = out["input_ids"]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
    offsets = torch.zeros(len(ids) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    tokens = torch.tensor([t for x in ids for t in x], dtype=torch.int32)
    types = None
    if "token_type_ids" in out:
        types = torch.tensor([t for x in out["token_type_ids"] for t in x], dtype=torch.int8)
    return Segment(tokens, offsets, types)


def tokenize_all(cfg: RunConfig, tasks: list[TaskSpec], raw: dict, dist: DistContext, tokenizer) -> dict:
    """Every task's split encoded with the trial's tokenizer, through the token cache."""
    cache = cfg.data.cache_dir or storage.join(cfg.out, "token_cache")
    encode = lambda t: encode_split(raw[t.name], t, tokenizer, cfg.model.max_length,  # noqa: E731
                                    cfg.model.siamese(t.name), cache)     # per task: --pair-encoding sts=siamese
    # Rank 0 fills the cache first so the other ranks load it rather than all tokenizing.
    if dist.is_main:
        encoded = {t.name: encode(t) for t in tasks}
    dist.barrier()
    if not dist.is_main:
        encoded = {t.name: encode(t) for t in tasks}
    return encoded


def pad_batch(segment: Segment, index: torch.Tensor, pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Pad the chosen sequences to the longest of them (not to max_length), rounded up to a
    ``multiple`` (fewer distinct shapes for torch.compile, tensor-core friendly widths; the
    attention mask hides the extra positions).  A few whole-batch tensor ops, whatever the
    batch size: a per-row loop costs the host three small ops per example."""
    starts, ends = segment.offsets[index], segment.offsets[index + 1]
    lengths = ends - starts
    width = int(lengths.max())
    width = -(-width // multiple) * multiple
    cols = torch.arange(width)
    mask = cols < lengths.unsqueeze(1)
    where = (starts.unsqueeze(1) + cols).clamp(max=len(segment.tokens) - 1)
    ids = torch.where(mask, segment.tokens[where].long(), pad_id)
    batch = {"input_ids": ids, "attention_mask": mask.long()}
    if segment.types is not None:
        batch["token_type_ids"] = torch.where(mask, segment.types[where].long(), 0)
    return batch


@dataclass
class TaskBatch:
    inputs: list[dict[str, torch.Tensor]]   # one padded batch per segment
    labels: torch.Tensor

    def to(self, device) -> "TaskBatch":
        return TaskBatch([{k: _to(v, device) for k, v in seg.items()} for seg in self.inputs], _to(self.labels, device))

    def __len__(self) -> int:
        return len(self.labels)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    # From pageable memory a copy is synchronous; staged through pinned memory (a host copy,
    # from PyTorch's caching pinned allocator) it is queued and the host runs on.
    return tensor.pin_memory().to(device, non_blocking=True)


def make_batch(enc: Encoded, index: torch.Tensor, pad_multiple: int = 1, mask_seed: int | None = None) -> TaskBatch:
    """The examples ``index`` of a split, padded; an mlm task's masked (BERT's 15%, 80/10/10) by a
    generator seeded with ``mask_seed``, its labels then the masked tokens ([B, L], -100 elsewhere)."""
    batch = TaskBatch([pad_batch(seg, index, enc.pad_id, pad_multiple) for seg in enc.segments], enc.labels[index])
    if enc.masking is None:
        return batch
    if mask_seed is None:
        raise ValueError(f"task {enc.task}: an mlm batch needs a mask seed")
    m, inputs = enc.masking, batch.inputs[0]
    gen = torch.Generator().manual_seed(mask_seed)
    ids, labels = mask_tokens(inputs["input_ids"], inputs["attention_mask"],
                              special_mask(inputs["input_ids"], m.special_ids), m.mask_id, m.vocab_size, gen)
    return TaskBatch([{**inputs, "input_ids": ids}], labels)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
@dataclass
class Step:
    """What one worker computes for one optimizer step: a list of micro-batches (gradient
    accumulation), each mapping task -> example indices, and for every task the number of
    examples the step has across all workers and micro-batches (to normalise the loss)."""
    micro: list[dict[str, torch.Tensor]]
    global_count: dict[str, int] = field(default_factory=dict)


class MultiTaskSampler:
    """Deterministic per (seed, epoch) and identical on every rank; each rank takes its slice.

    An optimizer step draws one global chunk of ``batch_size * world_size * grad_accum``
    examples per task (or for one task, in the one-task-per-step modes) and cuts it into
    ``grad_accum * world_size`` pieces, so 2 workers x batch b see exactly the data that
    1 worker x batch 2b sees, and accumulation of N sees what one N-times batch sees."""

    def __init__(self, sizes: dict[str, int], data: DataConfig, optim: OptimConfig, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.sizes, self.data, self.seed = dict(sizes), data, seed
        self.rank, self.world_size, self.accum = rank, world_size, optim.grad_accum
        self.chunk = optim.batch_size * world_size * optim.grad_accum
        self.pieces = world_size * optim.grad_accum

    def examples_per_task(self) -> int:
        mode = self.data.epoch_mode
        if mode == "min_size":
            # Pinned (size control: a study's every trial sees as many examples of each task),
            # else the smallest task of this trial; check_sizes refused a pin above that.
            return self.data.examples_per_task or min(self.sizes.values())
        if mode == "max_size":
            return max(self.sizes.values())
        return self.data.examples_per_task

    def check_sizes(self) -> None:
        """Undersampling draws without repeats: it cannot pin more examples than a task has."""
        n = self.data.examples_per_task
        if self.data.epoch_mode == "min_size" and n:
            short = {t: size for t, size in self.sizes.items() if size < n}
            if short:
                task, size = min(short.items(), key=lambda kv: kv[1])
                raise DataError(f"data.examples_per_task: {n} examples per epoch, but task {task} has {size} "
                                f"training rows; min_size undersamples and cannot draw more (pin at most {size}, "
                                f"or use --epoch-mode fixed_n to repeat examples)")

    def examples_per_epoch(self) -> dict[str, int]:
        """Examples of each task one epoch draws, all workers together (epoch 0's: the
        one-task-per-step modes draw their mix at random)."""
        counts = dict.fromkeys(self.sizes, 0)
        for step in self.epoch(0):
            for task, n in step.global_count.items():
                counts[task] += n
        return counts

    def task_probabilities(self) -> dict[str, float]:
        temp = 1.0 if self.data.epoch_mode == "proportional" else self.data.temperature
        weights = {t: n ** (1.0 / temp) for t, n in self.sizes.items()}
        total = sum(weights.values())
        return {t: w / total for t, w in weights.items()}

    def steps_per_epoch(self) -> int:
        if self.data.one_task_per_step:
            return max(1, sum(self.sizes.values()) // self.chunk)
        n = self.examples_per_task()
        full, rest = divmod(n, self.chunk)
        return full + (1 if rest >= self.pieces else 0) or 1

    def epoch(self, epoch: int) -> list[Step]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        streams = {t: _IndexStream(n, gen) for t, n in self.sizes.items()}
        if not self.data.one_task_per_step:
            n = self.examples_per_task()
            order = {t: streams[t].take(n) for t in self.sizes}
            steps = []
            for s in range(self.steps_per_epoch()):
                chunks = {t: idx[s * self.chunk:(s + 1) * self.chunk] for t, idx in order.items()}
                if min(len(c) for c in chunks.values()) < self.pieces:
                    # the step has fewer examples than workers x micro-batches: wrap around
                    chunks = {t: streams[t].take(self.chunk) for t in chunks}
                steps.append(self._split(chunks))
            return steps
        probs = self.task_probabilities()
        tasks = list(probs)
        picks = torch.multinomial(torch.tensor([probs[t] for t in tasks]), self.steps_per_epoch(),
                                  replacement=True, generator=gen)
        return [self._split({tasks[i]: streams[tasks[i]].take(self.chunk)}) for i in picks.tolist()]

    def _split(self, chunks: dict[str, torch.Tensor]) -> Step:
        micro = [dict() for _ in range(self.accum)]
        for task, chunk in chunks.items():
            pieces = torch.tensor_split(chunk, self.pieces)
            for m in range(self.accum):
                micro[m][task] = pieces[m * self.world_size + self.rank]
        return Step(micro, {t: len(c) for t, c in chunks.items()})


class _IndexStream:
    """Endless stream of indices 0..n-1: one fresh random permutation after another."""

    def __init__(self, n: int, gen: torch.Generator):
        self.n, self.gen = n, gen
        self.buffer = torch.empty(0, dtype=torch.long)

    def take(self, k: int) -> torch.Tensor:
        while len(self.buffer) < k:
            self.buffer = torch.cat([self.buffer, torch.randperm(self.n, generator=self.gen)])
        out, self.buffer = self.buffer[:k], self.buffer[k:]
        return out


def eval_order(enc: Encoded) -> torch.Tensor:
    """Dev examples sorted by length, so evaluation batches carry little padding."""
    return torch.argsort(enc.segments[0].lengths(), stable=True)
