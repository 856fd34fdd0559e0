"""NeMo 2.x integration tests: collected only where NeMo's LLM collection is installed.

`scripts/test_nemo.sh` runs them in their own virtual environment (.venv-nemo, nemo_neo[nemo]); the
main suite (.venv, no NeMo) skips this directory without importing anything from it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _nemo_llm_installed() -> bool:
    # Without importing nemo (a ~20 s import): nemo-toolkit 3.x exists but has no collections/llm.
    spec = importlib.util.find_spec("nemo")
    return spec is not None and any((Path(p) / "collections" / "llm").is_dir() for p in spec.submodule_search_locations or ())


if not _nemo_llm_installed():
    collect_ignore_glob = ["test_*.py"]


# No __init__.py here: a package named "nemo" under tests/ would shadow NeMo itself.
TEACHER = "llama3_gqa_untied"  # GQA, untied head, llama3 RoPE scaling
STUDENT = "student_of_llama3"  # same vocabulary, tied embeddings, default RoPE


@pytest.fixture(scope="session")
def neo_ckpts(hf_model_factory, tmp_path_factory):
    """nemo_neo checkpoints of the tiny teacher and student (from random HF models)."""
    from nemo_neo.checkpoint.convert import convert_hf_to_neo

    root = tmp_path_factory.mktemp("neo")
    out = {}
    for name in (TEACHER, STUDENT):
        convert_hf_to_neo(hf_model_factory(name), root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def nemo_ckpts(neo_ckpts, tmp_path_factory):
    """The same two models as NeMo 2 checkpoints (written by NeMo's trainer through our importer)."""
    import nemo_neo.nemo as nn_nemo

    root = tmp_path_factory.mktemp("nemo")
    return {name: nn_nemo.neo_to_nemo(path, root / name) for name, path in neo_ckpts.items()}
