"""tools/throughput_bench.py on CPU with tiny models: the torch backend gives every request exactly
OSL new tokens, the request files are in trtllm-bench's format, results.json and the PNG are valid;
bad input (no trtllm-bench, malformed pairs, FP8 checkpoint on the torch backend) fails clearly."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

TOOL = REPO / "tools" / "throughput_bench.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only add overhead
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def tiny_models(hf_model_factory, smollm2_ckpt, module_tmp):
    """A teacher-like and a student-like random model on SmolLM2's vocabulary with its tokenizer:
    one as an HF directory, one as a nemo_neo checkpoint (the tool converts it)."""
    import shutil

    from nemo_neo.checkpoint.convert import convert_hf_to_neo
    from nemo_neo.checkpoint.hf_io import copy_tokenizer_files

    root = module_tmp("tput")
    teacher = root / "teacher_hf"
    shutil.copytree(hf_model_factory("tiny_teacher_smol_vocab"), teacher)
    copy_tokenizer_files(smollm2_ckpt, teacher)
    student_hf = root / "student_hf"
    shutil.copytree(hf_model_factory("tiny_student_smol_vocab"), student_hf)
    copy_tokenizer_files(smollm2_ckpt, student_hf)
    convert_hf_to_neo(student_hf, root / "student_neo")
    return teacher, root / "student_neo"


def test_torch_backend_exact_osl_json_and_png(tiny_models, tmp_path):
    teacher, student = tiny_models
    out = tmp_path / "run"
    pairs = [(12, 5), (6, 3)]
    proc = cli("--model", f"teacher={teacher}", "--model", f"student={student}", "--isl-osl", *[f"{i},{o}" for i, o in pairs],
               "--batch-sizes", "2", "3", "--num-requests", "5", "--backend", "torch", "--precision", "fp32", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert len(rows) == 2 * len(pairs) * 2
    for row in rows:
        assert row["backend"] == "torch" and row["num_requests"] == 5
        assert row["new_tokens_min"] == row["new_tokens_max"] == row["osl"]
        assert row["seconds"] > 0
        assert row["output_tokens_per_s"] == pytest.approx(5 * row["osl"] / row["seconds"], rel=1e-9)
        assert row["total_tokens_per_s"] == pytest.approx(5 * (row["isl"] + row["osl"]) / row["seconds"], rel=1e-9)
    assert set(result["speedup_vs_first"]) == {f"{r['model']}|{r['isl']}/{r['osl']}|bs{r['batch_size']}" for r in rows}
    assert result["machine"]["torch"] == torch.__version__
    png = (out / "throughput.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 2000
    for isl, osl in pairs:  # trtllm-bench's dataset format, exact ISL, no special tokens
        lines = (out / f"requests_isl{isl}_osl{osl}.jsonl").read_text().splitlines()
        assert len(lines) == 5
        for i, line in enumerate(lines):
            req = json.loads(line)
            assert set(req) == {"task_id", "input_ids", "output_tokens"} and req["task_id"] == i
            assert len(req["input_ids"]) == isl and req["output_tokens"] == osl
            assert not {0, 1, 2} & set(req["input_ids"])  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>


def test_torch_backend_ignores_eos(tiny_models):
    """Even when the model wants to stop right away (EOS forced to the top), OSL tokens come out."""
    from nemo_neo.recipes.throughput import TorchBackend

    teacher, _ = tiny_models
    backend = TorchBackend(teacher, precision="fp32", device="cpu")
    eos = backend.model.generation_config.eos_token_id or 2
    eos = eos[0] if isinstance(eos, list) else eos
    with torch.no_grad():
        backend.model.lm_head.bias = torch.nn.Parameter(torch.zeros(backend.model.config.vocab_size))
        backend.model.lm_head.bias[eos] = 1e4
    ids = [[5, 6, 7, 8], [9, 10, 11, 12]]
    plain = backend.model.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert plain.shape[1] < 4 + 6  # a normal generate stops at EOS ...
    seconds, counts = backend.run(ids, osl=6, batch_size=2, warmup=False)
    assert counts == [6, 6]  # ... the benchmark does not


@pytest.mark.parametrize("args,needle", [
    (["--backend", "trtllm"], "trtllm-bench"),
    (["--isl-osl", "128x32"], "128x32"),
    (["--model", "nopath"], "NAME=PATH"),
])
def test_bad_input(tiny_models, tmp_path, args, needle):
    if args[0] == "--backend" and __import__("shutil").which("trtllm-bench"):
        pytest.skip("trtllm-bench is installed here")
    teacher, _ = tiny_models
    proc = cli("--model", f"t={teacher}", "--out", tmp_path / "o", "--num-requests", "1", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
