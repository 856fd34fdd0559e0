"""Shared fixtures: random HF models of several shapes, the real SmolLM2 teacher, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _nemo_llm_installed() -> bool:
    import importlib.util

    # Without importing nemo (a ~20 s import): nemo-toolkit 3.x exists but has no collections/llm.
    spec = importlib.util.find_spec("nemo")
    return spec is not None and any((Path(p) / "collections" / "llm").is_dir() for p in spec.submodule_search_locations or ())


# tests/nemo runs in its own venv (scripts/test_nemo.sh). Elsewhere its conftest must not even be
# imported: both files are module "conftest", and the test files here import from this one.
collect_ignore = [] if _nemo_llm_installed() else ["nemo"]
# Real public data beside the checkout (../shared/data, see its SOURCES.md); override for other layouts.
SHARED_DATA = Path(os.environ.get("NEMO_NEO_SHARED_DATA", REPO.parent / "shared" / "data"))

from nemo_neo import _compat  # noqa: E402
from nemo_neo.chaos import descendants  # noqa: E402  (used by kill_tree and the tests)

_compat.enable()  # what every nemo_neo entry point does first (the suite is one)

# Random configs that differ from SmolLM2 in the ways the converter must handle.
RANDOM_CONFIGS = {
    # GQA 4:1, untied head, llama3 RoPE scaling, odd sizes
    "llama3_gqa_untied": dict(
        model_type="llama", vocab_size=130, hidden_size=72, intermediate_size=100, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=10, max_position_embeddings=256,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32),
    ),
    # Mistral-NeMo style: heads x head_dim != hidden, plain multi-head attention, tied
    "mistral_explicit_head_dim": dict(
        model_type="mistral", vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=128,
        sliding_window=None, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
    # Qwen2: q/k/v biases, linear RoPE scaling, GQA 3:1
    "qwen2_bias_linear_rope": dict(
        model_type="qwen2", vocab_size=112, hidden_size=60, intermediate_size=90, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        use_sliding_window=False, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    ),
    # A student for the llama3 model above: same vocabulary, other depth and width
    "student_of_llama3": dict(
        model_type="llama", vocab_size=130, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=10, max_position_embeddings=256,
        tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    # An interleaved-pipeline pair (PP=2 x VPP=2): a teacher deeper (8 layers: 2 per chunk) and wider than
    # its tied student (4 layers: 1 per chunk), on one vocabulary
    "vpp_teacher": dict(
        model_type="llama", vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=8,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    "vpp_student": dict(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    # Tiny models on SmolLM2's vocabulary, so its real tokenizer feeds them (training-loop tests)
    "tiny_teacher_smol_vocab": dict(
        model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    ),
    # 4 layers: splits over PP=2 x VPP=2 (tests/recipes/test_recipe_vpp.py)
    "tiny_deep_teacher_smol_vocab": dict(
        model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    ),
    "tiny_student_smol_vocab": dict(
        model_type="llama", vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
    ),
}


# The configs that exercise the converter's architecture coverage (parity and round-trip tests).
ARCH_CONFIGS = ("llama3_gqa_untied", "mistral_explicit_head_dim", "qwen2_bias_linear_rope")


def make_hf_model(name: str, out: Path, dtype=torch.float32, seed: int = 0) -> Path:
    """Save a randomly initialised HF model for RANDOM_CONFIGS[name] to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(RANDOM_CONFIGS[name])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # norms start at exactly 1; make them informative
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.normal_(1.0 if "norm" in n else 0.0, 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_model_factory(tmp_path_factory):
    cache = {}

    def get(name: str, dtype=torch.float32) -> Path:
        key = (name, dtype)
        if key not in cache:
            cache[key] = make_hf_model(name, tmp_path_factory.mktemp(f"hf_{name}"), dtype)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """`mktemp(name)` for a module's fixtures; the directories go when the module is done. The suite
    writes ~13 GB of checkpoints; kept to the session's end they fill a small CI disk."""
    made = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_ckpt():
    """The real SmolLM2-135M-Instruct teacher as a nemo_neo checkpoint (converted once, cached)."""
    from nemo_neo.recipes.default_teacher import default_teacher_checkpoint

    return default_teacher_checkpoint()


@pytest.fixture
def one_thread():
    """Token-by-token decoding is many tiny matmuls: one thread is as fast on an idle 2-core
    machine and far faster on a busy one (OpenMP threads waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def parallel_ctx():
    """A single-process world (TP=PP=1) for in-process model tests."""
    from nemo_neo.parallel import ParallelConfig, initialize

    return initialize(ParallelConfig())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, nproc: int, *args, timeout: int = 300, extra=()) -> subprocess.CompletedProcess:
    """Run a worker under torchrun (gloo on CPU); fail the test with its output if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *extra, str(REPO / script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def tiny_pair(hf_model_factory, tmp_path_factory, smollm2_ckpt):
    """Tiny random teacher/student with SmolLM2's 49152-token vocabulary and its real tokenizer."""
    import shutil

    from nemo_neo.checkpoint.convert import convert_hf_to_neo

    tmp = tmp_path_factory.mktemp("tiny_pair")
    for name, config in (("teacher", "tiny_teacher_smol_vocab"), ("student", "tiny_student_smol_vocab")):
        convert_hf_to_neo(hf_model_factory(config), tmp / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2_ckpt / f, tmp / name / f)
    (tmp / "corpus.txt").write_text((SHARED_DATA / "tinyshakespeare.txt").read_text()[:60000])
    return tmp


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launched torchrun agent and all its workers, as a crash or an OOM killer would."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
