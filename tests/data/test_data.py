"""Training data: text sources -> disjoint train/valid documents in the indexed format, the DP batch
sampler, collate.

Expected values are computed independently (the tokenizer called directly on the split text and
compared with what megatron-core's reader returns, the rows of an epoch enumerated, ...), never
hard-coded.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from nemo_neo.data import DistributedBatchSampler, collate, indexed_from_text, split_documents, split_train_valid
from nemo_neo.data import from_text as from_text_module
from nemo_neo.data.from_text import text_prefixes
from nemo_neo.errors import DataError

WIKITEXT = SHARED_DATA / "wikitext2_valid.txt"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
SEQ = 64


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from nemo_neo.recipes.default_teacher import default_teacher_checkpoint

    return AutoTokenizer.from_pretrained(default_teacher_checkpoint())


def stored_documents(prefix) -> list[list[int]]:
    """The documents of an indexed dataset, read by megatron-core's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def encoded(docs, tokenizer) -> list[list[int]]:
    """Each non-empty document tokenized alone, EOS after it -- written independently of the module."""
    return [tokenizer(d, verbose=False).input_ids + [tokenizer.eos_token_id] for d in docs if d]


def row_set(rows: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in rows.tolist()}


# ---------------------------------------------------------------------------------------------
# Text sources -> train / validation documents in the indexed format (one loader for all data)
# ---------------------------------------------------------------------------------------------


def test_txt_documents_are_split_before_tokenizing_and_held_out_rows_never_train(tokenizer, tmp_path):
    text = WIKITEXT.read_text()
    train_prefix, valid_prefix = text_prefixes([WIKITEXT], tokenizer, 0.1, tmp_path, progress=False)
    train_text, valid_text = split_train_valid(text, 0.1)
    assert train_text + valid_text == text  # a partition of the characters
    assert 0.05 < len(valid_text) / len(text) < 0.15
    assert stored_documents(train_prefix) == encoded([train_text], tokenizer)
    assert stored_documents(valid_prefix) == encoded([valid_text], tokenizer)
    train, valid = indexed_from_text([WIKITEXT], tokenizer, SEQ, train_samples=8, cache_dir=tmp_path, progress=False)
    assert valid.dtype == torch.int64 and valid.shape[1] == SEQ + 1
    assert not row_set(train.rows()) & row_set(valid)  # held-out means held out
    assert len(train) > 5 * len(valid) > 0


def test_collate_shifts_labels_by_one(tokenizer, tmp_path):
    _, rows = indexed_from_text([WIKITEXT], tokenizer, SEQ, train_samples=8, max_valid=5, cache_dir=tmp_path,
                                progress=False)
    batch = collate(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["loss_mask"].shape == (5, SEQ)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["input_ids"], rows[:, :-1]) and torch.equal(batch["labels"], rows[:, 1:])
    assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())


def paragraphs(path: Path, n_chars: int) -> list[str]:
    return [p for p in path.read_text()[:n_chars].split("\n\n") if p.strip()]


def test_jsonl_documents_get_eos_each_and_split_per_source(tokenizer, tmp_path):
    docs = paragraphs(SHAKESPEARE, 40_000)
    jsonl = tmp_path / "shakespeare.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    txt = tmp_path / "wiki.txt"
    txt.write_text(WIKITEXT.read_text()[:30_000])

    train, valid = text_prefixes([jsonl, txt], tokenizer, 0.2, tmp_path / "cache", progress=False)
    j_train, j_valid = split_documents(docs, 0.2)
    w_train, w_valid = split_train_valid(txt.read_text(), 0.2)
    assert j_valid and j_train  # both sources contribute to both splits
    assert stored_documents(train) == encoded(j_train + [w_train], tokenizer)
    assert stored_documents(valid) == encoded(j_valid + [w_valid], tokenizer)


@pytest.mark.parametrize("fraction", [0.1, 0.35])
def test_split_documents_partitions_at_paragraph_or_document_boundaries(fraction):
    docs = paragraphs(SHAKESPEARE, 20_000)
    docs = ["\n\n".join(docs[i : i + 4]) for i in range(0, len(docs), 4)]  # multi-paragraph documents
    train, valid = split_documents(docs, fraction)
    assert "".join(train) + "".join(valid) == "".join(docs)  # disjoint and complete
    share = sum(map(len, valid)) / sum(map(len, docs))
    assert fraction - 0.02 < share <= fraction + max(map(len, docs)) / sum(map(len, docs))
    # a cut inside a document lands on a paragraph boundary
    assert valid[0] in docs or valid[0].startswith("\n\n")
    single_train, single_valid = split_documents(["".join(docs)], fraction)
    assert (single_train[0], single_valid[0]) == split_train_valid("".join(docs), fraction)


def test_limits_and_no_validation(tokenizer, tmp_path):
    txt = tmp_path / "wiki.txt"
    txt.write_text(WIKITEXT.read_text()[:20_000])
    _, full_valid = indexed_from_text([txt], tokenizer, SEQ, train_samples=8, cache_dir=tmp_path, progress=False)
    _, valid = indexed_from_text([txt], tokenizer, SEQ, train_samples=8, max_valid=2, cache_dir=tmp_path,
                                 progress=False)
    assert len(full_valid) > 2 and torch.equal(valid, full_valid[:2])
    train0, valid0 = indexed_from_text([txt], tokenizer, SEQ, train_samples=8, valid_fraction=0.0,
                                       cache_dir=tmp_path, progress=False)
    assert valid0.shape == (0, SEQ + 1)
    train_prefix, none = text_prefixes([txt], tokenizer, 0.0, tmp_path, progress=False)
    assert none is None and stored_documents(train_prefix) == encoded([txt.read_text()], tokenizer)
    with pytest.raises(ValueError, match="valid_fraction"):
        text_prefixes([txt], tokenizer, 1.0, tmp_path, progress=False)


def test_default_corpus_when_no_sources(tokenizer, tmp_path):
    from nemo_neo.data import default_corpus

    train, valid = indexed_from_text([], tokenizer, 512, train_samples=3, cache_dir=tmp_path, progress=False)
    assert train.rows(3).shape == (3, 513) and len(valid) > 0
    train_prefix, _ = text_prefixes([], tokenizer, 0.1, tmp_path, progress=False)
    train_text, _ = split_train_valid(default_corpus(), 0.1)
    assert stored_documents(train_prefix) == encoded([train_text], tokenizer)


def test_cache_hit_reads_without_tokenizing_and_a_changed_source_is_a_new_key(tokenizer, tmp_path, monkeypatch):
    txt = tmp_path / "shakespeare.txt"
    txt.write_text(SHAKESPEARE.read_text()[:20_000])
    cache = tmp_path / "cache"
    first = indexed_from_text([txt], tokenizer, SEQ, train_samples=8, cache_dir=cache, progress=False)
    assert len(list(cache.glob("text-*.idx"))) == 2  # train and valid prefixes

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    with monkeypatch.context() as m:
        m.setattr(from_text_module, "preprocess_documents", no_tokenizing)
        second = indexed_from_text([txt], tokenizer, SEQ, train_samples=8, cache_dir=cache, progress=False)
        indexed_from_text([txt], tokenizer, SEQ // 2, train_samples=8, cache_dir=cache, progress=False)  # same tokens
    assert torch.equal(second[0].rows(), first[0].rows()) and torch.equal(second[1], first[1])
    txt.write_text(SHAKESPEARE.read_text()[:20_000].upper())
    st = txt.stat()
    os.utime(txt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = indexed_from_text([txt], tokenizer, SEQ, train_samples=8, cache_dir=cache, progress=False)
    assert len(list(cache.glob("text-*.idx"))) == 4 and not torch.equal(changed[1], first[1])


def test_missing_and_bad_sources_have_clear_errors(tokenizer, tmp_path):
    missing = tmp_path / "nope" / "corpus.txt"

    def load(sources):
        return indexed_from_text(sources, tokenizer, SEQ, train_samples=8, cache_dir=tmp_path / "c", progress=False)

    with pytest.raises(FileNotFoundError, match=rf"{missing}.*does not exist.*\.txt.*\.jsonl.*save_to_disk"):
        load([WIKITEXT, missing])
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        load([tmp_path])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r'bad.jsonl:2 has no "text" field.*content'):
        load([bad])
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("only a few words\n\nand a few more")
    with pytest.raises(DataError, match=r"tiny.txt.*fewer than one sample of seq_length \+ 1 = 65"):
        load([tiny])
    assert not list((tmp_path / "c").glob("indices/*/.ready"))  # refused before any index was built


def hf_dataset_dir(tmp_path) -> Path:
    path = tmp_path / "hf_ds"
    path.mkdir()
    (path / "dataset_info.json").write_text("{}")
    (path / "state.json").write_text("{}")
    return path


def test_hf_dataset_directory_reads_the_text_column(tokenizer, tmp_path, monkeypatch):
    docs = paragraphs(SHAKESPEARE, 20_000)
    path = hf_dataset_dir(tmp_path)

    class FakeDataset:  # what datasets.load_from_disk returns, reduced to what the loader uses
        column_names = ["text", "id"]

        def __getitem__(self, column):
            return {"text": docs, "id": list(range(len(docs)))}[column]

    loaded = []
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda p: loaded.append(p) or FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    train, valid = text_prefixes([path], tokenizer, 0.1, tmp_path / "cache", progress=False)
    assert loaded == [str(path)]
    j_train, j_valid = split_documents(docs, 0.1)
    assert stored_documents(train) == encoded(j_train, tokenizer)
    assert stored_documents(valid) == encoded(j_valid, tokenizer)

    FakeDataset.column_names = ["content"]
    with pytest.raises(ValueError, match=r'no "text" column.*content'):
        text_prefixes([path], tokenizer, 0.1, tmp_path / "cache2", progress=False)


def test_hf_dataset_without_datasets_installed(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"hf_ds.*pip install datasets"):
        text_prefixes([hf_dataset_dir(tmp_path)], tokenizer, 0.1, tmp_path / "cache", progress=False)


# ---------------------------------------------------------------------------------------------
# DistributedBatchSampler
# ---------------------------------------------------------------------------------------------


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def rank_samplers(num_rows, gbs, mbs, dp, seed=0):
    return [DistributedBatchSampler(num_rows, gbs, mbs, dp_rank=r, dp_size=dp, seed=seed) for r in range(dp)]


@pytest.mark.parametrize("num_rows", [48, 53])  # divisible by the global batch, and with a tail
def test_ranks_are_disjoint_and_an_epoch_covers_the_rows(num_rows):
    gbs, mbs, dp = 12, 2, 3
    samplers = rank_samplers(num_rows, gbs, mbs, dp)
    steps = samplers[0].steps_per_epoch
    assert steps == num_rows // gbs and samplers[0].num_microbatches == gbs // (mbs * dp)
    per_rank = [take(s, steps) for s in samplers]
    epoch_rows = []
    for step in range(steps):
        step_rows = []
        for rank in range(dp):
            micro = per_rank[rank][step]
            assert len(micro) == gbs // (mbs * dp)
            assert all(m.dtype == torch.int64 and m.shape == (mbs,) for m in micro)
            step_rows += torch.cat(micro).tolist()
        assert len(step_rows) == len(set(step_rows)) == gbs  # disjoint across ranks, a full batch
        epoch_rows += step_rows
    assert len(set(epoch_rows)) == len(epoch_rows) == steps * gbs  # no row twice in an epoch
    assert set(epoch_rows) <= set(range(num_rows))
    if num_rows % gbs == 0:
        assert sorted(epoch_rows) == list(range(num_rows))


def test_global_batches_do_not_depend_on_the_dp_layout():
    gbs = 16
    def global_rows(mbs, dp):
        per_rank = [take(s, 5) for s in rank_samplers(64, gbs, mbs, dp, seed=3)]
        return [sorted(torch.cat([m for r in range(dp) for m in per_rank[r][k]]).tolist()) for k in range(5)]

    assert global_rows(4, 1) == global_rows(2, 2) == global_rows(1, 4)


def test_same_seed_same_batches_other_seed_other_batches():
    a = take(DistributedBatchSampler(40, 8, 2, dp_rank=1, dp_size=2, seed=5), 6)
    b = take(DistributedBatchSampler(40, 8, 2, dp_rank=1, dp_size=2, seed=5), 6)
    c = take(DistributedBatchSampler(40, 8, 2, dp_rank=1, dp_size=2, seed=6), 6)
    flat = lambda steps: torch.cat([torch.cat(s) for s in steps]).tolist()  # noqa: E731
    assert flat(a) == flat(b)
    assert flat(a) != flat(c)


def test_resume_continues_with_exactly_the_same_batches():
    def make():
        return DistributedBatchSampler(30, 6, 1, dp_rank=2, dp_size=3, seed=11)

    reference = take(make(), 7)  # 30 // 6 = 5 steps per epoch: steps 6-7 are in epoch 1
    interrupted = make()
    it = iter(interrupted)
    for _ in range(3):
        next(it)
    state = interrupted.state_dict()
    assert state["consumed_steps"] == 3
    resumed = make()
    resumed.load_state_dict(state)
    continued = take(resumed, 4)
    for got, want in zip(continued, reference[3:]):
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
    assert resumed.state_dict()["consumed_steps"] == 7

    other = DistributedBatchSampler(30, 6, 1, dp_rank=2, dp_size=3, seed=12)
    with pytest.raises(ValueError, match=r"seed: saved 11, now 12"):
        other.load_state_dict(state)


def test_epochs_wrap_with_a_fresh_shuffle():
    num_rows, gbs = 20, 4
    sampler = DistributedBatchSampler(num_rows, gbs, 2, seed=0)
    steps = take(sampler, 3 * sampler.steps_per_epoch + 2)  # runs past the end of several epochs
    assert sampler.epoch == 3
    epochs = [
        torch.cat([torch.cat(s) for s in steps[e * 5 : (e + 1) * 5]]).tolist() for e in range(3)
    ]
    for order in epochs:
        assert sorted(order) == list(range(num_rows))
    assert epochs[0] != epochs[1] != epochs[2]
    expected_first = torch.randperm(num_rows, generator=torch.Generator().manual_seed(0 + 1))[:gbs]
    assert torch.cat(steps[5]).tolist() == expected_first.tolist()


def test_sampler_errors_name_values_and_the_fix():
    with pytest.raises(ValueError, match=r"global_batch_size=10 .*2 \* 4 = 8.*multiple of 8"):
        DistributedBatchSampler(100, 10, 2, dp_rank=0, dp_size=4)
    with pytest.raises(ValueError, match=r"only 7 rows.*global_batch_size=8.*more text.*lower global_batch_size"):
        DistributedBatchSampler(7, 8, 2, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match=r"dp_rank must be in \[0, dp_size=2\)"):
        DistributedBatchSampler(16, 8, 2, dp_rank=2, dp_size=2)


def test_a_jsonl_file_that_is_not_utf8_names_the_file_and_byte(tokenizer, tmp_path):
    """Streamed .jsonl reading (the loader and the preprocess command share it): one DataError, no
    UnicodeDecodeError traceback."""
    from nemo_neo.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl is not UTF-8 text: byte 30 \(line 2\)"):
        text_prefixes([bad], tokenizer, 0.1, tmp_path / "cache", progress=False)
