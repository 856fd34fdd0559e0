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
from nemo_neo.data.from_text import indexed_from_text, text_prefixes
from nemo_neo.data.indexed import TokenSamples, build_gpt_datasets, parse_blend
from nemo_neo.data.preprocess import preprocess
from nemo_neo.data.text import default_corpus, pack_tokens, split_train_valid

__all__ = [
    "DistributedBatchSampler",
    "TokenSamples",
    "build_gpt_datasets",
    "indexed_from_text",
    "parse_blend",
    "preprocess",
    "text_prefixes",
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
