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


def _tiny_tokenizer(out, text: str) -> None:
    """A 128-token BPE (fits the tiny models' 130-row embedding), so calibration text can be tokenized."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
                                                           "bos_token": "<s>", "eos_token": "</s>"}))


def test_width_pruning_nemo_to_nemo_cli_matches_transformers(neo_ckpts, tmp_path, capsys):
    """Heads, MLP and hidden pruned by activation importance on real text, to a shape that fits TP=2;
    NeMo loads the result and its logits equal transformers' on the HF export of the same checkpoint."""
    import os
    import shutil
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from nemo_neo.checkpoint.convert import convert_neo_to_hf
    from nemo_neo.nemo.__main__ import main
    from nemo_neo.nemo.models import neo_layer_spec

    shared = Path(os.environ.get("NEMO_NEO_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    text = (shared / "tinyshakespeare.txt").read_text()[:40000]
    (tmp_path / "calib.txt").write_text(text)
    shutil.copytree(neo_ckpts[TEACHER], tmp_path / "neo")
    _tiny_tokenizer(tmp_path / "neo", text)
    source = nn_nemo.neo_to_nemo(tmp_path / "neo", tmp_path / "nemo")

    target = "hidden_size=48,ffn_hidden_size=64,num_attention_heads=4"
    assert main(["prune", str(source), str(tmp_path / "pruned"), "--target", target, "--calib-data",
                 str(tmp_path / "calib.txt"), "--num-samples", "8", "--seq-length", "32", "--tp", "2"]) == 0
    assert '"importance"' in capsys.readouterr().out
    cfg = nn_nemo.convert.load_nemo_model_context(tmp_path / "pruned").config
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.num_layers) == (48, 64, 4, 2, 4)

    nemo_module = nn_nemo.convert.load_nemo_module(tmp_path / "pruned", neo_layer_spec)  # NeMo's config + loader
    assert main(["to-neo", str(tmp_path / "pruned"), str(tmp_path / "pruned_neo")]) == 0
    convert_neo_to_hf(tmp_path / "pruned_neo", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = nemo_module(tokens, position_ids=None, attention_mask=None)
        expected = hf(tokens).logits
    assert got.shape == expected.shape == (2, 24, 130)
    assert (got - expected).abs().max() <= 1e-4


def test_prune_refuses_a_target_that_does_not_fit_the_parallel_layout(nemo_ckpts, tmp_path, capsys):
    from nemo_neo.nemo.__main__ import main

    with pytest.raises(SystemExit):
        main(["prune", str(nemo_ckpts[TEACHER]), str(tmp_path / "pruned"), "--target", "num_layers=1", "--drop", "1,2,3",
              "--pp", "2"])
    assert "num_layers=1 < pipeline_parallel=2" in capsys.readouterr().err
    assert not (tmp_path / "pruned").exists()
