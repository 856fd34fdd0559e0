"""Text data: real corpora, tokenization and packing to fixed-length sequences."""

from nemo_neo.data.text import default_corpus, pack_tokens, read_text, split_train_valid

__all__ = ["default_corpus", "pack_tokens", "read_text", "split_train_valid"]
