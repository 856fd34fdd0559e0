"""The layer contract (tests/layering.py) holds for the package, and it would catch a breach."""

from __future__ import annotations

import shutil

import layering
from conftest import REPO


def test_no_lower_layer_imports_a_higher_one_and_no_cycles():
    result = layering.report(REPO)
    assert result["upward"] == [], "\n".join(map(str, result["upward"]))
    assert result["cycles"] == [], result["cycles"]


def test_function_local_imports_only_for_optional_dependencies():
    result = layering.report(REPO)
    assert result["needless_function_local"] == [], "\n".join(map(str, result["needless_function_local"]))


def test_every_module_is_in_a_layer():
    modules = layering.read_modules(REPO)
    for name in modules:
        layering.layer_of(name)  # raises KeyError naming the module otherwise


def test_the_contract_fails_on_an_added_upward_import_a_cycle_and_a_hidden_import(tmp_path):
    """A copy of the package with three breaches: each is reported (the contract can fail)."""
    shutil.copytree(REPO / "nemo_neo", tmp_path / "nemo_neo", ignore=shutil.ignore_patterns("__pycache__"))
    losses = tmp_path / "nemo_neo" / "distill" / "losses.py"
    losses.write_text(losses.read_text() + "\nfrom nemo_neo.recipes.methods import METHODS  # a block imports a workflow\n")
    arch = tmp_path / "nemo_neo" / "models" / "arch.py"
    arch.write_text(arch.read_text() + "\nfrom nemo_neo.models.gpt import build_gpt  # gpt imports arch: a cycle\n")
    width = tmp_path / "nemo_neo" / "prune" / "width.py"
    width.write_text(width.read_text() + "\n\ndef _hidden():\n    from nemo_neo.checkpoint.native import INDEX\n    return INDEX\n")
    result = layering.report(tmp_path)
    upward = {(i.source, i.target) for i in result["upward"]}
    assert ("nemo_neo.distill.losses", "nemo_neo.recipes.methods") in upward
    assert ("nemo_neo.models.arch", "nemo_neo.models.gpt") not in upward  # same package: not upward...
    assert any({"nemo_neo.models.arch", "nemo_neo.models.gpt"} <= set(c) for c in result["cycles"])  # ...but a cycle
    assert [(i.source, i.target) for i in result["needless_function_local"]] == [("nemo_neo.prune.width",
                                                                                   "nemo_neo.checkpoint.native")]
