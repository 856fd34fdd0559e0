"""The memory planner (nemo_neo.distill.memory_plan / layouts, `nemo-neo-plan`) against measured peaks
on CPU, against Megatron-LM's bytes-per-parameter formula on the 8B / 12B presets, its JSON schema,
bad input, and the recipe's refusal of a layout that cannot fit."""

import json

import pytest
from conftest import read_json, torchrun
from omegaconf import OmegaConf

from nemo_neo.cli import plan as plan_cli
from nemo_neo.distill.memory_plan import Layout, Workload, rank_memory
from nemo_neo.models.arch import arch_from_hf_config

WORKER = "tests/workers/plan_worker.py"

# Three small pairs: GQA + untied head; explicit head_dim + tied embeddings + shallower student;
# q/k/v biases trained as LLM-Neo (LoRA adapters only).
A_T = dict(model_type="llama", vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
B_T = dict(model_type="mistral", vocab_size=2048, hidden_size=96, intermediate_size=192, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=256, sliding_window=None,
           tie_word_embeddings=True)
C_T = dict(model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
           use_sliding_window=False)
CASES = [dict(name="llama-gqa kd", teacher=A_T, student=dict(A_T, hidden_size=64, intermediate_size=128),
              seq=128, mbs=2, gbs=4, method="kd"),
         dict(name="mistral-tied kd", teacher=B_T, student=dict(B_T, hidden_size=64, intermediate_size=128, num_hidden_layers=2),
              seq=64, mbs=2, gbs=4, method="kd"),
         dict(name="qwen2-bias llm_neo", teacher=C_T, student=C_T, seq=256, mbs=1, gbs=4, method="llm_neo", lora_rank=8)]
LAYOUTS = {"TP=2": (2, 1), "PP=2": (1, 2), "DP=2": (1, 1)}  # two ranks each: (tp, pp), DP = 2 / (tp x pp)

LLAMA31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  rope_theta=500000.0, tie_word_embeddings=False,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192))
MISTRAL_NEMO_12B = dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1024000,
                        rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
# conf/preset/minitron_llama31_8b_width.yaml and minitron_mistral_nemo_12b_8b.yaml: targets, context, global batch
PRESETS = {"llama31_8b_to_4.5b": (LLAMA31_8B, "hidden_size=3072,ffn_hidden_size=9216", 1152),
           "mistral_nemo_12b_to_8b": (MISTRAL_NEMO_12B, "hidden_size=4096,ffn_hidden_size=11520", 768)}


def predicted(case, tp, pp, dp):
    teacher, student = arch_from_hf_config(case["teacher"]), arch_from_hf_config(case["student"])
    work = Workload(case["seq"], case["mbs"], case["gbs"], dtype="fp32", method=case["method"],
                    lora_rank=case.get("lora_rank", 8), device="cpu")
    return rank_memory(teacher, student, Layout(tp=tp, pp=pp, dp=dp), work)


def test_predicted_peak_within_15_percent_of_measured(tmp_path):
    """Per layout one torchrun (2 ranks, gloo) measures the 3 pairs: the peak of live tensor bytes over a
    whole training step (forward, KD loss, backward, optimizer), on the worst rank, vs the planner's total."""
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(CASES))
    rows = []
    for label, (tp, pp) in LAYOUTS.items():
        out = tmp_path / f"{tp}_{pp}.json"
        torchrun(WORKER, 2, "--cases", cases, "--out", out, "--tp", tp, "--pp", pp, timeout=300)
        for case, result in zip(CASES, read_json(out)):
            measured = max(r["peak"] for r in result["ranks"])
            plan = predicted(case, tp, pp, 2 // (tp * pp))
            rows.append((case["name"], label, plan.total, measured, plan.total / measured - 1))
    report = "\n".join(f"{n:<20} {lay:<5} predicted {p / 1e6:7.2f} MB measured {m / 1e6:7.2f} MB  {e:+.1%}"
                       for n, lay, p, m, e in rows)
    print(report)
    assert all(abs(e) <= 0.15 for *_, e in rows), report


def _plan_json(capsys, *args):
    code = plan_cli.main([*map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_on_8_x_80gb(preset, tmp_path, capsys):
    config, target, gbs = PRESETS[preset]
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = ["--teacher", tmp_path / "config.json", "--student-target", target, "--gpus-per-node", 8, "--gpu-memory-gb", 80,
            "--nodes", 1, "--seq-length", 8192, "--micro-batch-size", 1, "--global-batch-size", gbs, "--dtype", "bf16"]
    assert plan_cli.main([str(a) for a in args]) == 0
    text = capsys.readouterr().out
    assert "1. TP=" in text and "does not fit" in text
    assert "TP=1 x PP=1 x DP=8 does not fit" in text and "distributed optimizer" in text
    code, data = _plan_json(capsys, *args)
    layouts = data["layouts"]
    assert code == 0 and any(pl["fits"] for pl in layouts)
    base = next(pl for pl in layouts if (pl["tp"], pl["pp"], pl["vpp"], pl["sequence_parallel"], pl["distributed_optimizer"],
                                         pl["recompute"]) == (1, 1, 1, False, False, "none"))
    assert not base["fits"]
    # Megatron-LM's theoretical_memory_usage: 18 B per trained bf16 parameter (2 weight + 4 grad + 12 Adam)
    # without the distributed optimizer; the frozen teacher's 2 B
    teacher = arch_from_hf_config(config)
    b = base["per_rank_bytes"]
    assert b["teacher_weights"] == 2 * teacher.num_parameters()
    n_student = b["student_weights"] // 2
    assert b["grads"] + b["optimizer"] + b["student_weights"] == 18 * n_student
    assert b["total"] > 80 * 2**30
    # the distributed optimizer shards the 12 B of Adam state over DP=8: 6 + 12/8 B per parameter
    dist = next(pl for pl in layouts if (pl["tp"], pl["pp"], pl["vpp"], pl["distributed_optimizer"], pl["recompute"],
                                         pl["sequence_parallel"]) == (1, 1, 1, True, "none", False))
    assert dist["per_rank_bytes"]["optimizer"] == 12 * n_student // 8


def test_json_schema(tmp_path, capsys):
    (tmp_path / "t.json").write_text(json.dumps(A_T))
    (tmp_path / "s.json").write_text(json.dumps(CASES[0]["student"]))
    code, data = _plan_json(capsys, "--teacher", tmp_path / "t.json", "--student", tmp_path / "s.json", "--gpus-per-node", 4,
                            "--gpu-memory-gb", 1, "--seq-length", 128, "--micro-batch-size", 2, "--method", "llm_neo",
                            "--lora-rank", 8)
    assert code == 0 and data["layouts"]
    for pl in data["layouts"]:
        assert {"tp", "pp", "vpp", "dp", "sequence_parallel", "distributed_optimizer", "recompute", "fits",
                "per_rank_bytes"} <= set(pl)
        mem = pl["per_rank_bytes"]
        assert {"teacher_weights", "student_weights", "grads", "optimizer", "activations", "logits", "total"} <= set(mem)
        assert pl["tp"] * pl["pp"] * pl["dp"] == 4
        assert mem["total"] >= mem["teacher_weights"] + mem["student_weights"] + mem["grads"] + mem["optimizer"]
    fits = [pl["fits"] for pl in data["layouts"]]
    assert fits == sorted(fits, reverse=True)  # the layouts that fit come first


@pytest.mark.parametrize("args, message", [
    (["--teacher", "/nonexistent/config.json", "--student-target", "hidden_size=8"], "not a config.json"),
    (["--student-target", "hiden_size=8"], "unknown target key"),
    (["--student-drop-layers", "0-9"], "do not exist"),
    (["--student-target", "hidden_size=64", "--dtype", "int8"], "dtype"),
    (["--student-target", "hidden_size=64", "--global-batch-size", "3", "--micro-batch-size", "2"], "no TP x PP x DP layout"),
])
def test_bad_input_is_one_error_line(args, message, tmp_path, capsys):
    (tmp_path / "t.json").write_text(json.dumps(A_T))
    full = (["--teacher", str(tmp_path / "t.json")] if "--teacher" not in args else []) + args + ["--gpus-per-node", "2"]
    with pytest.raises(SystemExit) as exc:
        plan_cli.main(full)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_recipe_refuses_a_layout_that_cannot_fit(tmp_path):
    """The recipe's start-up check: the configured TP=1 x PP=1 layout of a pair that needs more than
    plan.gpu_memory_gb -> one RecipeConfigError naming the cheapest layout that fits (planned here)."""
    from nemo_neo.distill.layouts import Cluster, cheapest_fitting, plan_layouts
    from nemo_neo.recipes import config as rc
    from nemo_neo.recipes.plan_check import check_layout_fits

    (tmp_path / "config.json").write_text(json.dumps(A_T))
    cfg = OmegaConf.load(rc.conf_dir() / "prune_distill.yaml")
    cfg.merge_with(OmegaConf.load(rc.conf_dir() / "preset" / "smollm2_cpu.yaml"))
    cfg.pop("defaults", None)
    cfg.teacher.checkpoint = str(tmp_path)
    cfg.prune.target = {"hidden_size": 64, "ffn_hidden_size": 128}
    cfg.data.seq_length, cfg.distill.train.micro_batch_size, cfg.distill.train.global_batch_size = 128, 2, 4
    cfg.distill.method = "kd"
    recipe_cfg = rc.build(cfg)
    teacher = arch_from_hf_config(A_T)
    work = Workload(128, 2, 4, "fp32", "kd", device="cpu")
    student = arch_from_hf_config(CASES[0]["student"])
    need = rank_memory(teacher, student, Layout(), work).total / 2**30
    assert check_layout_fits(recipe_cfg, {"gpu_memory_gb": 2 * need}, 1, tmp_path) is not None
    with pytest.raises(rc.RecipeConfigError, match="needs .* per rank") as exc:
        check_layout_fits(recipe_cfg, {"gpu_memory_gb": need / 2}, 1, tmp_path)
    best = cheapest_fitting(plan_layouts(Cluster(1, 1, need / 2), teacher, student, work))
    assert (f"cheapest layout that fits is {best.layout}" if best else "no layout fits") in str(exc.value)
    assert check_layout_fits(recipe_cfg, None, 1, tmp_path) is None  # CPU, no memory given: no check
