"""Pruning entry point: a NeMo 2 checkpoint in, a pruned NeMo 2 checkpoint out."""

from __future__ import annotations

import pytest
import torch

import nemo_neo.nemo as nn_nemo
from nemo_neo.checkpoint.native import load_full_state

TEACHER = "llama3_gqa_untied"  # 4 layers, see conftest.neo_ckpts


def test_depth_pruning_nemo_to_nemo_cli(neo_ckpts, nemo_ckpts, tmp_path, capsys):
    from nemo_neo.nemo.__main__ import main

    assert main(["prune", str(nemo_ckpts[TEACHER]), str(tmp_path / "pruned"), "--target", "num_layers=2", "--drop", "1,2"]) == 0
    assert '"dropped_layers": [\n    1,\n    2\n  ]' in capsys.readouterr().out
    cfg = nn_nemo.convert.load_nemo_model_context(tmp_path / "pruned").config
    assert cfg.num_layers == 2 and cfg.hidden_size == 72
    # The kept layers (0 and 3) are the original tensors, renumbered 0 and 1.
    assert main(["to-neo", str(tmp_path / "pruned"), str(tmp_path / "check")]) == 0
    _, pruned, _ = load_full_state(tmp_path / "check")
    _, original, _ = load_full_state(neo_ckpts[TEACHER])
    for new, old in ((0, 0), (1, 3)):
        for suffix in ("self_attention.linear_qkv.weight", "mlp.linear_fc2.weight", "input_layernorm.weight"):
            assert torch.equal(pruned[f"decoder.layers.{new}.{suffix}"], original[f"decoder.layers.{old}.{suffix}"])
    assert torch.equal(pruned["output_layer.weight"], original["output_layer.weight"])


def test_prune_refuses_existing_output(nemo_ckpts, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    from nemo_neo.checkpoint.atomic import OutputExistsError

    with pytest.raises(OutputExistsError, match="already exists"):
        nn_nemo.prune_nemo_checkpoint(nemo_ckpts[TEACHER], tmp_path / "taken", {"num_layers": 2}, drop=[1, 2])
