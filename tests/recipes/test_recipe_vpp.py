"""The recipe with `parallel.virtual_pipeline=2`: `torchrun examples/prune_distill.py
parallel.pipeline_parallel=2 parallel.virtual_pipeline=2` prunes (one model per rank) and distills
with LLM-Neo on the interleaved pipeline, following the single-process run."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import SHARED_DATA, read_json
from test_recipe import losses, run_recipe, tiny

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.native import load_full_state


@pytest.fixture(scope="module")
def deep_pair(hf_model_factory, smollm2_ckpt, module_tmp):
    """A tiny random 4-layer teacher (hidden 32) with SmolLM2's tokenizer, and a text corpus."""
    tmp = module_tmp("deep_pair")
    convert_hf_to_neo(hf_model_factory("tiny_deep_teacher_smol_vocab"), tmp / "teacher")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_ckpt / f, tmp / "teacher" / f)
    (tmp / "corpus.txt").write_text((SHARED_DATA / "tinyshakespeare.txt").read_text()[:60000])
    return tmp


def test_recipe_llm_neo_at_pp2_vpp2_matches_one_process(deep_pair, tmp_path):
    args = tiny(deep_pair, "stages=[prune,distill]", "distill.method=llm_neo", "distill.lora.rank=4",
                "distill.lora.alpha=8.0", "distill.train.steps=4", "distill.train.save_every=2",
                "distill.train.eval_every=4")
    run_recipe(tmp_path / "single", *args)
    run_recipe(tmp_path / "vpp", *args, "parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2",
               "keep_training_state=true", nproc=2)
    state = torch.load(tmp_path / "vpp" / "distill" / "checkpoints" / "step_0000004" / "train_state" / "rank00001.pt",
                       weights_only=False)
    assert state["layout"] == {"tp": 1, "pp": 2, "dp": 1, "vpp": 2}  # distilled on the interleaved schedule
    a, b = (losses(tmp_path / r / "distill" / "distill_log.jsonl") for r in ("single", "vpp"))
    assert list(a) == [1, 2, 3, 4] and a == pytest.approx(b, rel=1e-4, abs=1e-6)
    metrics = [read_json(tmp_path / r / "distill" / "metrics.json") for r in ("single", "vpp")]
    assert metrics[1]["after"] == pytest.approx(metrics[0]["after"], rel=1e-4)
    # adapters in every chunk: rank 0's two chunks hold half the layers, so half the adapters
    assert metrics[1]["trainable"]["trainable"] * 2 == metrics[0]["trainable"]["trainable"] > 0
    (_, want, _), (_, got, index) = (load_full_state(tmp_path / r / "distill" / "student") for r in ("single", "vpp"))
    assert index["saved_with"]["pipeline_parallel"] == 2
    assert sorted(got) == sorted(want) and all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
