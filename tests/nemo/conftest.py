"""NeMo 2.x integration tests: collected only where NeMo's LLM collection is installed.

`scripts/test_nemo.sh` runs them in their own virtual environment (.venv-nemo, nemo_neo[nemo]); the
main suite (.venv, no NeMo) skips this directory without importing anything from it.
"""

from __future__ import annotations

import pytest

from nemo_neo import _compat

_compat.enable_nemo()  # NeMo's bridges, before anything imports NeMo

# tests/conftest.py leaves this directory out where NeMo's LLM collection is not installed.
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


@pytest.fixture(scope="session")
def torchrun(pytestconfig):
    """tests/conftest.py's torchrun launcher (gloo, one thread per rank); ``from conftest import`` here
    would find this file, which shadows it."""
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1] / "conftest.py")
    return next(p for p in pytestconfig.pluginmanager.get_plugins() if getattr(p, "__file__", None) == root).torchrun
