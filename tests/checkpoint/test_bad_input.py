"""Bad input: one clear error naming the problem, and no partial output left behind."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.hf_io import CheckpointError
from nemo_neo.checkpoint.native import load_full_state
from nemo_neo.models.arch import UnsupportedConfigError, arch_from_hf_config

TOOL = REPO / "tools" / "convert_checkpoint.py"


def cli(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


def no_leftovers(out):
    assert not out.exists(), f"{out} was left behind"
    assert not list(out.parent.glob(f".{out.name}*")), "temporary directory left behind"


def edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unknown_architecture_cli(hf_model_factory, tmp_path):
    src = edited_copy(hf_model_factory("llama3_gqa_untied"), tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    out = tmp_path / "out"
    proc = cli("hf-to-neo", "--hf", src, "--out", out)
    assert proc.returncode == 2
    assert "unknown architecture" in proc.stderr and "gpt2" in proc.stderr
    assert "Traceback" not in proc.stderr
    no_leftovers(out)


@pytest.mark.parametrize(
    "changes,needle",
    [
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "yarn"),
        (dict(num_attention_heads=8, num_key_value_heads=3), "not divisible"),
    ],
)
def test_config_the_model_cannot_express(changes, needle):
    base = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with pytest.raises(UnsupportedConfigError, match=needle):
        arch_from_hf_config({**base, **changes})


def test_sliding_window_rejected():
    cfg = dict(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, sliding_window=1024)
    with pytest.raises(UnsupportedConfigError, match="sliding_window"):
        arch_from_hf_config(cfg)


def test_missing_safetensors(hf_model_factory, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_model_factory("llama3_gqa_untied"), src)
    (src / "model.safetensors").unlink()
    out = tmp_path / "out"
    proc = cli("hf-to-neo", "--hf", src, "--out", out)
    assert proc.returncode == 2 and "no model.safetensors" in proc.stderr
    no_leftovers(out)


def test_truncated_safetensors(hf_model_factory, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_model_factory("llama3_gqa_untied"), src)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "out"
    proc = cli("hf-to-neo", "--hf", src, "--out", out)
    assert proc.returncode == 2 and "truncated" in proc.stderr and "model.safetensors" in proc.stderr
    no_leftovers(out)


def test_truncated_native_checkpoint(hf_model_factory, tmp_path):
    ckpt = tmp_path / "neo"
    convert_hf_to_neo(hf_model_factory("llama3_gqa_untied"), ckpt)
    f = next(ckpt.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_full_state(ckpt)
    out = tmp_path / "hf"
    proc = cli("neo-to-hf", "--ckpt", ckpt, "--out", out)
    assert proc.returncode == 2 and "truncated" in proc.stderr
    no_leftovers(out)


@pytest.mark.parametrize("tp,needle", [(3, "num_attention_heads=8 is not divisible by TP=3"), (4, "vocab_size=130 is not divisible by TP=4")])
def test_tp_that_does_not_divide(hf_model_factory, tmp_path, tp, needle):
    out = tmp_path / "out"
    proc = cli("hf-to-neo", "--hf", hf_model_factory("llama3_gqa_untied"), "--out", out, "--tp", tp)
    assert proc.returncode == 2 and needle in proc.stderr
    no_leftovers(out)


def test_existing_output_is_refused_then_overwritten(hf_model_factory, tmp_path):
    src = hf_model_factory("mistral_explicit_head_dim")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = cli("hf-to-neo", "--hf", src, "--out", out)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    assert cli("hf-to-neo", "--hf", src, "--out", out, "--overwrite").returncode == 0
    assert (out / "nemo_neo.json").is_file() and not (out / "precious.txt").exists()


def test_failure_during_write_keeps_previous_checkpoint(hf_model_factory, tmp_path, monkeypatch):
    """A crash mid-write (simulated) leaves the previous checkpoint intact and no temp dir."""
    from nemo_neo.checkpoint import native

    src = hf_model_factory("mistral_explicit_head_dim")
    out = tmp_path / "neo"
    convert_hf_to_neo(src, out)
    before = (out / "nemo_neo.json").read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(native, "_write_index", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_hf_to_neo(src, out, overwrite=True)
    assert (out / "nemo_neo.json").read_text() == before
    assert not list(tmp_path.glob(".neo*"))
    load_full_state(out)  # still complete


def test_help():
    proc = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "hf-to-neo" in proc.stdout and "neo-to-hf" in proc.stdout


def test_world_size_not_divisible_by_tp_pp():
    from nemo_neo.parallel.state import ParallelConfigError, validate_layout

    assert validate_layout(8, 2, 2) == 2
    with pytest.raises(ParallelConfigError, match="world size 6 is not divisible by .* 2 x 2 = 4"):
        validate_layout(6, 2, 2)


def test_cpu_layer_leaves_global_torch_alone(parallel_ctx):
    """The CPU compatibility layer redirects megatron-core's view of torch.cuda only."""
    import torch
    from megatron.core.tensor_parallel import layers

    from nemo_neo._compat import cpu as cpu_compat

    assert cpu_compat.is_active()
    assert layers.torch.cuda.current_device() == torch.device("cpu")
    assert torch.cuda.synchronize is not layers.torch.cuda.synchronize
    with pytest.raises((RuntimeError, AssertionError, AttributeError)):
        torch.cuda.current_device()  # real torch still has no CUDA


def test_written_checkpoint_files_follow_the_umask(hf_model_factory, tmp_path):
    """safetensors creates its files 0600; a published checkpoint is readable as the umask allows."""
    import os
    import stat

    out = tmp_path / "neo"
    old = os.umask(0o022)
    try:
        convert_hf_to_neo(hf_model_factory("mistral_explicit_head_dim"), out)
    finally:
        os.umask(old)
    assert list(out.glob("*.safetensors"))
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
