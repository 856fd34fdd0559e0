"""tools/export_peft_adapters.py: writes the peft files; bad input gives one `error:` line."""

import subprocess
import sys

import pytest
from conftest import REPO

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.load import load_model
from nemo_neo.export.peft_adapters import PeftExportError, export_peft_adapters
from nemo_neo.peft import LoRAConfig, apply_lora, save_adapters

TOOL = REPO / "tools" / "export_peft_adapters.py"


def cli(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def saved(hf_model_factory, module_tmp, parallel_ctx):
    tmp = module_tmp("peft_cli")
    convert_hf_to_neo(hf_model_factory("llama3_gqa_untied"), tmp / "neo")
    convert_hf_to_neo(hf_model_factory("student_of_llama3"), tmp / "small")
    model, arch, _ = load_model(tmp / "neo", parallel_ctx)
    cfg = LoRAConfig(rank=4, alpha=8, targets=["linear_qkv", "linear_fc1"], qkv_parts=["q", "v"])
    apply_lora(model, cfg, parallel_ctx)
    save_adapters(tmp / "adapters.safetensors", model, arch, parallel_ctx, cfg)
    return tmp


def test_cli_writes_peft_files_and_refuses_bad_input(saved, tmp_path):
    ok = cli("--adapters", saved / "adapters.safetensors", "--base", saved / "neo", "--out", tmp_path / "out")
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    again = cli("--adapters", saved / "adapters.safetensors", "--base", saved / "neo", "--out", tmp_path / "out")
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--overwrite" in again.stderr
    missing = cli("--adapters", tmp_path / "nope.safetensors", "--base", saved / "neo", "--out", tmp_path / "o2")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    not_neo = cli("--adapters", saved / "adapters.safetensors", "--base", tmp_path, "--out", tmp_path / "o3")
    assert not_neo.returncode == 2 and "not a nemo_neo checkpoint" in not_neo.stderr


def test_adapters_of_another_model_are_refused(saved, tmp_path):
    with pytest.raises(PeftExportError, match="pass the base checkpoint the adapters were trained on"):
        export_peft_adapters(saved / "adapters.safetensors", saved / "small", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written
