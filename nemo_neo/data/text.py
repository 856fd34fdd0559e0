"""Real text for runs that must work offline, and packing of tokens into training sequences.

The default corpus is CPython's own reference documentation (`pydoc_data.topics`, ~465 kB of
English prose and code shipped with every Python), so the README demo has real text on a fresh
machine with no network. Tests and CI use WikiText-2 / tiny Shakespeare from ../shared/data.
"""

from __future__ import annotations

import torch

from nemo_neo.errors import DataError


def default_corpus() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def pack_tokens(token_ids, seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """Cut one token stream (list of ints or 1-D tensor) into int64 [n, seq_len + 1] rows (inputs
    are row[:-1], labels row[1:]); row i is tokens [i * seq_len, (i + 1) * seq_len], so consecutive
    rows share one boundary token. The tail that does not fill a row is dropped."""
    n = (len(token_ids) - 1) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n <= 0:
        raise DataError(f"text has {len(token_ids)} tokens, fewer than one sequence of {seq_len + 1}")
    ids = torch.as_tensor(token_ids[: n * seq_len + 1], dtype=torch.long)
    return ids.unfold(0, seq_len + 1, seq_len).contiguous()


def split_train_valid(text: str, valid_fraction: float = 0.1) -> tuple[str, str]:
    """Deterministic split at a paragraph boundary: the last `valid_fraction` is validation."""
    cut = int(len(text) * (1 - valid_fraction))
    boundary = text.find("\n\n", cut)
    cut = boundary if boundary != -1 else cut
    return text[:cut], text[cut:]
