"""Training at scale on megatron-core, on CPU over gloo: the distributed optimizer (state sharded
over DP) against the same DP=2 training without it, and a stop + resume with it against the
uninterrupted run. One torchrun launch checks them all (tests/workers/scale_worker.py)."""

import json

from conftest import torchrun

from nemo_neo.recipes.config import train_config


def test_distributed_optimizer_equals_plain_dp_and_resumes_exactly(tiny_pair, tmp_path):
    torchrun("tests/workers/scale_worker.py", 2, "--pair", tiny_pair, "--out", tmp_path, timeout=600)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["dp"] == 2 and result["has_shards"]
    for case in ("kd", "lora"):  # full-parameter KD; LLM-Neo / KD-LoRA (adapters only in the optimizer)
        r = result[case]
        assert len(r["losses"][0]) == 5 and r["same_keys"], (case, r)
        assert r["loss_rel"] <= 1e-6 and r["weights_rel"] <= 1e-6, (case, r)
    # back to the step-3 checkpoint, rebuilt from scratch: the same curve and weights, bit for bit
    assert result["resumed_from"] == 3
    assert result["resume"]["losses"][0] == result["resume"]["losses"][1]
    assert result["resume"]["weights_equal"]


def test_distributed_optimizer_is_a_train_key():
    cfg = train_config({"steps": 3, "lr": 1e-4, "use_distributed_optimizer": True}, "distill.train")
    assert cfg.optim.use_distributed_optimizer and cfg.steps == 3
