"""Data: text and Megatron indexed datasets through one megatron-core loader, DP batch sampling."""

from nemo_neo.data.dataset import (
    DistributedBatchSampler,
    collate,
    read_documents,
    read_text,
    read_utf8,
    split_documents,
)
from nemo_neo.data.from_text import indexed_from_text, text_prefixes
from nemo_neo.data.indexed import TokenSamples, build_gpt_datasets, parse_blend
from nemo_neo.data.preprocess import preprocess
from nemo_neo.data.text import default_corpus, split_train_valid

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
    "read_documents",
    "read_text",
    "read_utf8",
    "split_documents",
    "split_train_valid",
]
