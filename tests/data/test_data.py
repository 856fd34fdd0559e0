"""Training data: text sources -> disjoint train/valid token rows, the DP batch sampler, collate.

Expected values are computed independently (the tokenizer called directly on the split text, the
rows of an epoch enumerated, ...), never hard-coded.
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

from nemo_neo.data import (
    DistributedBatchSampler,
    collate,
    load_token_rows,
    split_documents,
    split_train_valid,
)
from nemo_neo.data import dataset as dataset_module

WIKITEXT = SHARED_DATA / "wikitext2_valid.txt"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
SEQ = 64


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from nemo_neo.recipes.default_teacher import default_teacher_checkpoint

    return AutoTokenizer.from_pretrained(default_teacher_checkpoint())


def unpack(rows: torch.Tensor) -> torch.Tensor:
    """The token stream that packed rows were cut from (rows share their boundary token)."""
    return torch.cat([rows[:, :-1].reshape(-1), rows[-1:, -1]])


def stream_of(docs, tokenizer) -> list[int]:
    """Documents tokenized one by one, EOS between them -- written independently of the module."""
    out: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            out.append(tokenizer.eos_token_id)
        out += tokenizer(doc, verbose=False).input_ids
    return out


def assert_packed(rows: torch.Tensor, stream: list[int], seq: int):
    n = (len(stream) - 1) // seq
    assert rows.dtype == torch.int64 and rows.shape == (n, seq + 1)
    assert torch.equal(unpack(rows), torch.tensor(stream[: n * seq + 1]))
    assert torch.equal(rows[1:, 0], rows[:-1, -1])  # consecutive rows share the boundary token


def row_set(rows: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in rows.tolist()}


# ---------------------------------------------------------------------------------------------
# Reading, splitting, tokenizing, packing
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wikitext_rows(tokenizer):
    return load_token_rows([WIKITEXT], tokenizer, SEQ, valid_fraction=0.1)


def test_txt_rows_are_the_packed_tokens_of_a_disjoint_split(tokenizer, wikitext_rows):
    train, valid = wikitext_rows
    text = WIKITEXT.read_text()
    train_text, valid_text = split_train_valid(text, 0.1)
    assert train_text + valid_text == text  # a partition of the characters
    assert 0.05 < len(valid_text) / len(text) < 0.15
    assert_packed(train, tokenizer(train_text, verbose=False).input_ids, SEQ)
    assert_packed(valid, tokenizer(valid_text, verbose=False).input_ids, SEQ)
    # held-out means held out: no validation row is also a training row
    assert not row_set(train) & row_set(valid)
    assert len(train) > 5 * len(valid) > 0


def test_collate_shifts_labels_by_one(wikitext_rows):
    rows = wikitext_rows[0][:5]
    batch = collate(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["loss_mask"].shape == (5, SEQ)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["input_ids"], rows[:, :-1]) and torch.equal(batch["labels"], rows[:, 1:])
    assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())


def paragraphs(path: Path, n_chars: int) -> list[str]:
    return [p for p in path.read_text()[:n_chars].split("\n\n") if p.strip()]


def test_jsonl_documents_get_eos_between_them_and_split_per_source(tokenizer, tmp_path):
    docs = paragraphs(SHAKESPEARE, 40_000)
    jsonl = tmp_path / "shakespeare.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    txt = tmp_path / "wiki.txt"
    txt.write_text(WIKITEXT.read_text()[:30_000])

    train, valid = load_token_rows([jsonl, txt], tokenizer, SEQ, valid_fraction=0.2)
    j_train, j_valid = split_documents(docs, 0.2)
    w_train, w_valid = split_train_valid(txt.read_text(), 0.2)
    assert j_valid and j_train  # both sources contribute to both splits
    assert_packed(train, stream_of(j_train + [w_train], tokenizer), SEQ)
    assert_packed(valid, stream_of(j_valid + [w_valid], tokenizer), SEQ)
    eos = tokenizer.eos_token_id
    assert int((unpack(train) == eos).sum()) >= len(j_train) - 1  # at least the separators
    assert not row_set(train) & row_set(valid)


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


def test_limits_and_no_validation(tokenizer, tmp_path, wikitext_rows):
    txt = tmp_path / "wiki.txt"
    txt.write_text(WIKITEXT.read_text()[:20_000])
    full_train, full_valid = load_token_rows([txt], tokenizer, SEQ)
    train, valid = load_token_rows([txt], tokenizer, SEQ, max_train=7, max_valid=2)
    assert torch.equal(train, full_train[:7]) and torch.equal(valid, full_valid[:2])
    train0, valid0 = load_token_rows([txt], tokenizer, SEQ, valid_fraction=0.0)
    assert valid0.shape == (0, SEQ + 1) and len(train0) > len(full_train)
    assert_packed(train0, tokenizer(txt.read_text(), verbose=False).input_ids, SEQ)


def test_default_corpus_when_no_sources(tokenizer):
    from nemo_neo.data import default_corpus

    train, valid = load_token_rows([], tokenizer, 512, max_train=3)
    assert train.shape == (3, 513) and len(valid) > 0
    train_text, _ = split_train_valid(default_corpus(), 0.1)
    assert torch.equal(train, torch.tensor(tokenizer(train_text[:20_000], verbose=False).input_ids[: 3 * 512 + 1])
                       .unfold(0, 513, 512))


def test_cache_hit_returns_equal_tensors_without_tokenizing(tokenizer, tmp_path, monkeypatch):
    txt = tmp_path / "shakespeare.txt"
    txt.write_text(SHAKESPEARE.read_text()[:20_000])
    cache = tmp_path / "cache"
    first = load_token_rows([txt], tokenizer, SEQ, cache_dir=cache)
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    with monkeypatch.context() as m:
        m.setattr(dataset_module, "tokenize_documents", no_tokenizing)
        second = load_token_rows([txt], tokenizer, SEQ, cache_dir=cache, max_train=5)
    assert torch.equal(second[0], first[0][:5]) and torch.equal(second[1], first[1])

    # a different seq_length or a modified source is a different key
    load_token_rows([txt], tokenizer, SEQ // 2, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 2
    txt.write_text(SHAKESPEARE.read_text()[:20_000].upper())
    st = txt.stat()
    os.utime(txt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = load_token_rows([txt], tokenizer, SEQ, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 3 and not torch.equal(changed[0][:5], first[0][:5])


def test_missing_and_bad_sources_have_clear_errors(tokenizer, tmp_path):
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*does not exist.*\.txt.*\.jsonl.*save_to_disk"):
        load_token_rows([WIKITEXT, missing], tokenizer, SEQ)
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        load_token_rows([tmp_path], tokenizer, SEQ)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r'bad.jsonl:2 has no "text" field.*content'):
        load_token_rows([bad], tokenizer, SEQ)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("only a few words\n\nand a few more")
    with pytest.raises(ValueError, match=r"fewer than one row of seq_length \+ 1 = 65"):
        load_token_rows([tiny], tokenizer, SEQ)
    with pytest.raises(ValueError, match="valid_fraction"):
        load_token_rows([tiny], tokenizer, SEQ, valid_fraction=1.0)


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
    train, valid = load_token_rows([path], tokenizer, SEQ)
    assert loaded == [str(path)]
    j_train, j_valid = split_documents(docs, 0.1)
    assert_packed(train, stream_of(j_train, tokenizer), SEQ)
    assert_packed(valid, stream_of(j_valid, tokenizer), SEQ)

    FakeDataset.column_names = ["content"]
    with pytest.raises(ValueError, match=r'no "text" column.*content'):
        load_token_rows([path], tokenizer, SEQ)


def test_hf_dataset_without_datasets_installed(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"hf_ds.*pip install datasets"):
        load_token_rows([hf_dataset_dir(tmp_path)], tokenizer, SEQ)


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
        load_token_rows([bad], tokenizer, SEQ)
