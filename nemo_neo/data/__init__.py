"""Text data: real corpora, tokenization and packing to fixed-length sequences, DP batch sampling."""

from nemo_neo.data.dataset import (
    DistributedBatchSampler,
    collate,
    load_token_rows,
    read_documents,
    read_text,
    read_utf8,
    split_documents,
)
from nemo_neo.data.text import default_corpus, pack_tokens, split_train_valid

__all__ = [
    "DistributedBatchSampler",
    "collate",
    "default_corpus",
    "load_token_rows",
    "pack_tokens",
    "read_documents",
    "read_text",
    "read_utf8",
    "split_documents",
    "split_train_valid",
]
