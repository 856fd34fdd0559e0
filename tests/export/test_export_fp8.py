"""FP8 export of the real SmolLM2-135M with nvidia-modelopt (CPU), checked without TensorRT-LLM.

The FP8 directory is read back directly (transformers has no loader for modelopt's format):
float8_e4m3fn weights with scalar weight_scale / input_scale for every decoder Linear, k/v scales
with --kv-cache-fp8, BF16 embeddings and norms, hf_quant_config.json and config.json saying FP8.
Each dequantized weight must lie within E4M3 rounding (nemo_neo.export.fp8_check.rounding_bound)
of the BF16 export's weight. Then the dequantized model's greedy generations are compared with
the BF16 model's (both computed in fp32, so the only difference is FP8 weight rounding):

- teacher-forced agreement >= 0.85: at every position of the BF16 model's greedy continuation the
  FP8 model's top-1 token is the same. FP8 E4M3 keeps 3 mantissa bits (up to 6% error per weight),
  which moves logits by a few percent; a 135M model's open-ended continuations often have
  near-ties between its top-2 tokens, and those flip. Measured here (6 prompts x 16 new tokens):
  0.98; over 32 new tokens 0.95. 0.85 leaves room for BLAS differences and still fails broken
  exports: measured with the same prompts, MLP weights at twice their scale agree on 0.01, and
  shuffling the rows of a single layer's down_proj already drops agreement to 0.81.
- free-running greedy: >= 50% of positions identical. Once one token differs the continuations
  drift apart, so this is the weaker criterion: measured 0.96 over 16 new tokens (the first
  difference came after 12-16 tokens), 0.64 over 32; 0.5 still passes if three of the six
  prompts diverged at their first token.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED_DATA

# find_spec, not import: modelopt is only needed by the export subprocess, and importing it here
# would cost ~10 s in the test process.
if importlib.util.find_spec("modelopt") is None:
    pytest.skip('needs nvidia-modelopt: pip install "nvidia-modelopt==0.47.0" requests huggingface_hub', allow_module_level=True)

from nemo_neo.export.fp8_check import FP8, dequantized_model, fp8_weights, quant_config, read_state, rounding_bound  # noqa: E402

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "The three primary colors are",
]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def exported(smollm2_ckpt, module_tmp):
    root = module_tmp("fp8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, str(REPO / "tools" / "export_fp8.py"), "--ckpt", str(smollm2_ckpt), "--calib-data",
           str(SHARED_DATA / "wikitext2_valid.txt"), "--out", str(root / "fp8"), "--calib-samples", "4",
           "--calib-seq-len", "64", "--kv-cache-fp8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    from nemo_neo.export.fp8 import export_bf16

    bf16 = export_bf16(smollm2_ckpt, root / "bf16")
    assert bf16["dtype"] == "bfloat16" and bf16["has_tokenizer"]
    return root / "fp8", root / "bf16", report


def test_fp8_checkpoint_format(exported):
    fp8_dir, bf16_dir, report = exported
    assert report["quant_algo"] == "FP8" and report["calib_samples"] == 4
    quant = quant_config(fp8_dir)
    assert quant["quant_algo"] == "FP8" and quant["kv_cache_quant_algo"] == "FP8"
    assert "lm_head" in quant["exclude_modules"]
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "FP8"
    assert (fp8_dir / "tokenizer.json").is_file()
    state = read_state(fp8_dir)
    layers = config["num_hidden_layers"]
    quantized = fp8_weights(state)
    assert len(quantized) == layers * len(LINEARS)
    for name in quantized:
        prefix = name[: -len("weight")]
        assert state[prefix + "weight_scale"].numel() == 1 and state[prefix + "weight_scale"] > 0
        assert state[prefix + "input_scale"].numel() == 1 and state[prefix + "input_scale"] > 0
    for i in range(layers):
        assert f"model.layers.{i}.self_attn.k_proj.k_scale" in state and f"model.layers.{i}.self_attn.v_proj.v_scale" in state
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert state["model.norm.weight"].dtype == torch.bfloat16


def test_dequantized_weights_within_fp8_rounding(exported):
    fp8_dir, bf16_dir, _ = exported
    state, reference = read_state(fp8_dir), read_state(bf16_dir)
    exact = total = 0
    for name in fp8_weights(state):
        w = reference[name].float()
        scale = state[name[: -len("weight")] + "weight_scale"].float()
        deq = state[name].float() * scale
        assert deq.shape == w.shape
        err = (deq - w).abs()
        assert bool((err <= rounding_bound(w, scale)).all()), f"{name}: max error {err.max():.3g} beyond FP8 rounding"
        assert float(w.abs().max()) <= 448.0 * float(scale) * (1 + 2**-7)  # scale covers amax: no clipping
        exact += int((deq == w).sum())
        total += w.numel()
    assert exact < total  # the weights really were rounded (not copied through at higher precision)
    assert state[fp8_weights(state)[0]].dtype == FP8


def test_dequantized_greedy_generation_matches_bf16(exported, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp8_dir, bf16_dir, _ = exported
    tok = AutoTokenizer.from_pretrained(str(bf16_dir))
    tok.padding_side = "left"
    ref = AutoModelForCausalLM.from_pretrained(str(bf16_dir), dtype=torch.bfloat16).float().eval()
    deq = dequantized_model(fp8_dir, dtype=torch.float32)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    n_new = 16
    with torch.no_grad():
        a = ref.generate(**batch, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        b = deq.generate(**batch, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        mask = torch.cat([batch["attention_mask"], torch.ones(len(PROMPTS), n_new, dtype=torch.long)], dim=1)
        start = batch["input_ids"].shape[1]
        la = ref(input_ids=a, attention_mask=mask).logits[:, start - 1 : -1].argmax(-1)
        lb = deq(input_ids=a, attention_mask=mask).logits[:, start - 1 : -1].argmax(-1)
    teacher_forced = (la == lb).float().mean().item()
    free_running = (a[:, start:] == b[:, start:]).float().mean().item()
    assert teacher_forced >= 0.85, f"teacher-forced top-1 agreement {teacher_forced:.3f}"
    assert free_running >= 0.5, f"free-running greedy agreement {free_running:.3f}"
