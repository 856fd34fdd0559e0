"""Architecture search, the candidate list (no weights): budgets, bounds, exact counts, bad input.

References: the meta-device build of each candidate's HF config (transformers), Minitron's published
shapes of Llama-3.1-Minitron-4B (Sreenivas et al., 2024), and a brute-force walk of the grid."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
from conftest import REPO

from nemo_neo.cli.prune import main, meta_parameter_count
from nemo_neo.errors import ConfigError
from nemo_neo.models.arch import arch_from_hf_config
from nemo_neo.prune.search import AXES, SearchError, SearchSpace, axis_values, enumerate_candidates
from nemo_neo.prune.width import pruned_arch

sys.path.insert(0, str(REPO / "tests" / "recipes"))
from test_recipe_presets import LLAMA31_8B  # noqa: E402  (the public config.json values)

# SmolLM2-135M's public config.json (the embedded teacher's shape)
SMOLLM2 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
               intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
               hidden_act="silu")
MINITRON_GRID = "hidden_size=256,ffn_hidden_size=512"


def dry_run(capsys, cfg: dict, tmp_path, *args) -> dict:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert main(["--hf-config", str(path), "--dry-run", *args]) == 0
    return json.loads(capsys.readouterr().out)


def hf_config_of(cfg: dict, c: dict) -> dict:
    arch = arch_from_hf_config(cfg)
    for key in AXES:
        setattr(arch, key, c[key])
    return arch.to_hf_config()


def test_llama31_8b_at_4p6b_lists_minitrons_width_and_depth_shapes_at_their_exact_counts(capsys, tmp_path):
    out = dry_run(capsys, LLAMA31_8B, tmp_path, "--search", "params=4.6e9", "--multiple-of", MINITRON_GRID)
    cands = out["candidates"]
    assert cands and all(c["parameters"] <= 4.6e9 for c in cands)
    by_shape = {(c["num_layers"], c["hidden_size"], c["ffn_hidden_size"], c["num_attention_heads"], c["num_query_groups"]): c
                for c in cands}
    width, depth = by_shape[(32, 3072, 9216, 32, 8)], by_shape[(16, 4096, 14336, 32, 8)]
    # the paper's 4.5B: exact counts by the meta-device build, and as published to three digits
    for c, published in ((width, 4.513e9), (depth, 4.540e9)):
        total, non_embedding = meta_parameter_count(hf_config_of(LLAMA31_8B, c))
        assert (c["parameters"], c["non_embedding_parameters"]) == (total, non_embedding)
        assert round(total / 1e9, 3) == published / 1e9
    for c in cands[:: max(1, len(cands) // 3)]:  # a spread of the rest
        assert c["parameters"] == meta_parameter_count(hf_config_of(LLAMA31_8B, c))[0]


def brute_force(cfg: dict, space: SearchSpace, fits) -> set[str]:
    """Every valid in-budget grid point no single axis of which can grow and still fit (checked
    against every larger value, by pruning's own target validation)."""
    arch = arch_from_hf_config(cfg)
    values = {a: axis_values(arch, space, a) for a in AXES}
    source = {a: getattr(arch, a) for a in AXES}

    def ok(p):
        if p == source or p["hidden_size"] % p["num_attention_heads"]:  # transformers' LlamaConfig refuses those
            return False
        try:
            new = pruned_arch(arch, dict(p), space.tp, space.pp)
        except ConfigError:
            return False
        return fits(new)

    out = set()
    for combo in itertools.product(*values.values()):
        p = dict(zip(AXES, combo))
        if ok(p) and not any(ok({**p, a: v}) for a in AXES for v in values[a] if v > p[a]):
            out.add("L{num_layers}-h{hidden_size}-f{ffn_hidden_size}-a{num_attention_heads}-g{num_query_groups}".format(**p))
    return out


@pytest.mark.parametrize("budget", [{"params": 90e6}, {"non_embedding_params": 50e6, "params": 80e6},
                                    {"memory_gb": 0.25}])
def test_candidates_are_exactly_the_maximal_in_budget_shapes(budget, tmp_path):
    space = SearchSpace(budget=budget, axes=list(AXES), multiple_of={"hidden_size": 64, "ffn_hidden_size": 128}, tp=1,
                        memory={"batch_size": 4, "seq_length": 2048, "dtype": "bfloat16"})

    def fits(arch):  # the definitions: total, outside the embedding, bf16 weights + K and V of every layer
        n = arch.num_parameters()
        kv = 2 * arch.num_layers * arch.num_query_groups * arch.head_dim * 4 * 2048
        values = {"params": n, "non_embedding_params": n - arch.vocab_size * arch.hidden_size,
                  "memory_gb": (n + kv) * 2 / 1e9}
        return all(values[k] <= v for k, v in budget.items())

    cands = enumerate_candidates(arch_from_hf_config(SMOLLM2), space)
    assert {c["id"] for c in cands} == brute_force(SMOLLM2, space, fits)
    for c in cands:
        total, non_embedding = meta_parameter_count(hf_config_of(SMOLLM2, c))
        assert (c["parameters"], c["non_embedding_parameters"]) == (total, non_embedding)


def test_tp_divisibility_and_axis_bounds_hold(capsys, tmp_path):
    out = dry_run(capsys, LLAMA31_8B, tmp_path, "--search", "params=5e9", "--multiple-of", MINITRON_GRID, "--tp", "8",
                  "--pp", "4", "--max-width-pruning", "0.3", "--search-axes", "hidden_size,ffn_hidden_size,num_layers")
    for c in out["candidates"]:
        assert c["num_attention_heads"] == 32 and c["num_query_groups"] == 8  # axes not named stay
        assert c["ffn_hidden_size"] % 8 == 0 and c["num_layers"] % 4 == 0
        assert c["hidden_size"] >= 0.7 * 4096 and c["ffn_hidden_size"] >= 0.7 * 14336 and c["num_layers"] >= 16


def error_line(capsys, cfg, tmp_path, *args) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as exit_:
        main(["--hf-config", str(path), "--dry-run", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_impossible_budget_names_the_smallest_reachable_size(capsys, tmp_path):
    line = error_line(capsys, LLAMA31_8B, tmp_path, "--search", "params=1e9", "--multiple-of", MINITRON_GRID)
    # the smallest shape the bounds allow: every axis at half (heads 16 over 8 groups), 16 layers
    smallest = hf_config_of(LLAMA31_8B, dict(num_layers=16, hidden_size=2048, ffn_hidden_size=7168,
                                             num_attention_heads=16, num_query_groups=8))
    assert f"smallest reachable size is {meta_parameter_count(smallest)[0]:,} parameters" in line


def test_bounds_that_exclude_every_candidate_say_so(capsys, tmp_path):
    line = error_line(capsys, SMOLLM2, tmp_path, "--search", "params=1e8", "--max-width-pruning", "0",
                      "--max-depth-pruning", "0")
    assert "exclude every candidate" in line and f"{meta_parameter_count(SMOLLM2)[0]:,} parameters" in line


@pytest.mark.parametrize("args, match", [(("--search", "flops=3"), "unknown budget"),
                                         (("--search", "params=-1"), "positive"),
                                         (("--search", "params=1e8", "--search-axes", "depth"), "unknown search axis"),
                                         (("--search", "params=1e8", "--max-depth-pruning", "1.5"), r"\[0, 1\)")])
def test_bad_search_settings_are_one_line(capsys, tmp_path, args, match):
    import re

    assert re.search(match, error_line(capsys, SMOLLM2, tmp_path, *args))


def test_search_space_rejects_an_empty_budget():
    with pytest.raises(SearchError, match="needs a budget"):
        SearchSpace(budget={})
