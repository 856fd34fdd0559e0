"""Real text for runs that must work offline, and the held-out split of one text.

The default corpus is CPython's own reference documentation (`pydoc_data.topics`, ~465 kB of
English prose and code shipped with every Python), so the README demo has real text on a fresh
machine with no network. Tests and CI use WikiText-2 / tiny Shakespeare from ../shared/data.
"""

from __future__ import annotations


def default_corpus() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def split_train_valid(text: str, valid_fraction: float = 0.1) -> tuple[str, str]:
    """Deterministic split at a paragraph boundary: the last `valid_fraction` is validation."""
    cut = int(len(text) * (1 - valid_fraction))
    boundary = text.find("\n\n", cut)
    cut = boundary if boundary != -1 else cut
    return text[:cut], text[cut:]
