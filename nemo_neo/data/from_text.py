"""Text sources (.txt / .jsonl / HF save_to_disk dirs, or the default offline corpus) -> the same
indexed format and loader as cluster data, in one call:

    train, valid = indexed_from_text(sources, tokenizer, seq_length=256, train_samples=steps * gbs)

Each source is split into train and validation documents BEFORE tokenization (`split_documents`:
the last `valid_fraction` of its characters, cut at a paragraph or document boundary), the two parts are tokenized once into
`<cache>/text-<key>-train` and `-valid` indexed datasets (local rank 0 of each node; the key hashes
the sources' paths, sizes and mtimes and the tokenizer), and read back through megatron-core's
GPTDataset with one blend per split, so no validation document is ever in a training sample.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from nemo_neo.data.dataset import _cache_key, _check_source, read_documents, split_documents
from nemo_neo.data.indexed import TokenSamples, _world, build_gpt_datasets
from nemo_neo.data.preprocess import preprocess_documents
from nemo_neo.data.text import default_corpus
from nemo_neo.errors import DataError, DataFileNotFoundError


def default_text_cache() -> Path:
    return Path(os.environ.get("NEMO_NEO_DATA_CACHE", Path.home() / ".cache" / "nemo_neo" / "indexed_text"))


def text_prefixes(sources: Sequence[str | os.PathLike], tokenizer, valid_fraction: float = 0.1, cache_dir=None,
                  progress: bool = True) -> tuple[Path, Path | None]:
    """The (train, valid) indexed prefixes of text sources, tokenized into the cache on first use.
    valid is None when valid_fraction is 0. Collective under torch.distributed (one writer per node)."""

    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}.")
    paths = [Path(s) for s in sources]
    for path in paths:
        try:
            _check_source(path)
        except FileNotFoundError as e:
            raise DataFileNotFoundError(str(e)) from None
    root = Path(cache_dir) if cache_dir is not None else default_text_cache()
    key = _cache_key(paths, tokenizer, 0, valid_fraction)  # tokens do not depend on seq_length
    train = root / f"text-{key}-train"
    valid = root / f"text-{key}-valid" if valid_fraction > 0 else None
    wanted = [p for p in (train, valid) if p is not None]
    rank, world = _world()
    if int(os.environ.get("LOCAL_RANK", rank)) == 0 and not all(Path(f"{p}.idx").is_file() for p in wanted):
        train_docs, valid_docs = [], []
        for docs in ([read_documents(p) for p in paths] if paths else [[default_corpus()]]):
            t, v = split_documents(docs, valid_fraction)
            train_docs += t
            valid_docs += v
        desc = ", ".join(str(p.resolve()) for p in paths) if paths else "default_corpus"
        for prefix, docs in ((train, train_docs), (valid, valid_docs)):
            if prefix is not None:
                preprocess_documents(docs, prefix, tokenizer, source=desc, overwrite=True, progress=progress)
    if world > 1:
        torch.distributed.barrier()
    return train, valid


def indexed_from_text(sources: Sequence[str | os.PathLike], tokenizer, seq_length: int, train_samples: int,
                      valid_fraction: float = 0.1, max_valid: int | None = None, seed: int = 1234, cache_dir=None,
                      progress: bool = True, mmap_bin_files: bool = False) -> tuple[TokenSamples, torch.Tensor]:
    """(train samples for the Trainer, validation rows int64 [n, seq_length + 1]) of text sources.

    train_samples: what training consumes (steps x global batch size). max_valid: keep at most this
    many validation rows (one epoch of the held-out documents, megatron-core's order); an empty
    `[0, seq_length + 1]` tensor when valid_fraction is 0."""
    root = Path(cache_dir) if cache_dir is not None else default_text_cache()
    train, valid = text_prefixes(sources, tokenizer, valid_fraction, root, progress)
    per_split = {"train": [str(train)], **({"valid": [str(valid)]} if valid is not None else {})}
    # valid: one epoch (None), never repeated to reach a count; max_valid cuts it afterwards
    try:
        tr, va, _ = build_gpt_datasets(blend_per_split=per_split, split=None, seq_length=seq_length,
                                       train_samples=train_samples, valid_samples=None if valid is not None else 0,
                                       seed=seed, tokenizer=tokenizer, cache_dir=root / "indices",
                                       mmap_bin_files=mmap_bin_files)
    except DataError as e:  # name the user's files, not only the cache prefix they were tokenized into
        named = ", ".join(map(str, sources)) if sources else "the default corpus"
        raise DataError(f"{named}: {e}") from None
    valid_rows = va.rows(max_valid) if va is not None else torch.empty(0, seq_length + 1, dtype=torch.long)
    return tr, valid_rows
