"""Hugging Face export of a checkpoint we produce (a depth-pruned SmolLM2 student), and the export
tool's refusals (existing output, checkpoint without tokenizer)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED_DATA

TOOL = REPO / "tools" / "export_fp8.py"


def cli(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def student(smollm2_ckpt, module_tmp):
    from nemo_neo.prune import drop_layers_checkpoint

    out = module_tmp("student") / "depth"
    drop_layers_checkpoint(smollm2_ckpt, out, layers=range(1, 30, 2))  # keep the 15 even layers
    return out


def test_pruned_student_export_has_identical_logits(student, parallel_ctx, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_neo.checkpoint.load import load_model
    from nemo_neo.export import export_hf

    report = export_hf(student, tmp_path / "hf", dtype="float32")
    assert report["has_tokenizer"]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 15
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = (SHARED_DATA / "wikitext2_valid.txt").read_text(encoding="utf-8")[:3000]
    ids = tok(text, return_tensors="pt").input_ids[:, :96]
    ours, _, _ = load_model(student, parallel_ctx, torch.float32)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.eval()(ids, position_ids=None, attention_mask=None)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def test_bf16_export_tool(student, tmp_path):
    out = tmp_path / "bf16"
    proc = cli("--ckpt", student, "--precision", "bf16", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 15
    assert (out / "tokenizer.json").is_file()


def test_existing_output_is_refused_unless_overwrite(student, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    one_line_error(cli("--ckpt", student, "--calib-data", SHARED_DATA / "wikitext2_valid.txt", "--out", out), str(out), "--overwrite")
    one_line_error(cli("--ckpt", student, "--precision", "bf16", "--out", out), "--overwrite")
    assert (out / "keep.txt").read_text() == "user data"
    proc = cli("--ckpt", student, "--precision", "bf16", "--out", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_checkpoint_without_tokenizer_is_refused(student, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(student, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model"):
        (bare / name).unlink(missing_ok=True)
    out = tmp_path / "out"
    one_line_error(cli("--ckpt", bare, "--calib-data", SHARED_DATA / "wikitext2_valid.txt", "--out", out), "no tokenizer", "--tokenizer")
    one_line_error(cli("--ckpt", bare, "--precision", "bf16", "--out", out), "no tokenizer")
    assert not out.exists()
    proc = cli("--ckpt", bare, "--precision", "bf16", "--out", out, "--tokenizer", student)  # the fix it names
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "tokenizer.json").is_file()


def test_fp8_needs_calibration_data(student, tmp_path):
    one_line_error(cli("--ckpt", student, "--out", tmp_path / "o"), "--calib-data")
    one_line_error(cli("--ckpt", student, "--calib-data", tmp_path / "missing.txt", "--out", tmp_path / "o"), "missing.txt")
