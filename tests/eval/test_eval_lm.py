"""The nemo_neo lm-eval model against independent references.

- lm-eval's own `hf` model (HFLM) on the Hugging Face export of the same checkpoint: per-request
  log-likelihoods within 1e-4 and the same accuracy on 40 real WinoGrande documents (task pack,
  local files), and the same loglikelihood_rolling sums with short windows (several per text);
- transformers' greedy `generate` on the export: generate_until returns the same text;
- TP=2 and PP=2 x DP=2 under torchrun answer like TP=1 (log-likelihoods within 1e-4, the same
  generations), and every rank returns the same answers.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import SHARED_DATA, torchrun

pytest.importorskip("lm_eval", reason='needs lm-eval: pip install "lm-eval[hf]==0.4.13"')

from workers.eval_requests import answer_all, generation_requests, instances, rolling_texts  # noqa: E402

LIMIT = 40


@pytest.fixture(scope="module")
def smol_hf(smollm2_ckpt, module_tmp):
    from nemo_neo.export import export_hf

    out = module_tmp("smol") / "hf"
    export_hf(smollm2_ckpt, out, dtype="float32")
    return out


@pytest.fixture(scope="module")
def neo_lm(smollm2_ckpt, parallel_ctx):
    from nemo_neo.eval.lm_eval_model import NeoLM

    return NeoLM(checkpoint=smollm2_ckpt, dtype="float32", batch_size=16)


@pytest.fixture(scope="module")
def hf_lm(smol_hf):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(smol_hf), dtype="float32", batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def pack():
    from nemo_neo.eval.tasks import task_manager

    return task_manager(data_dir=SHARED_DATA, include_defaults=False)


def _run(lm, pack, task):
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=[task], limit=LIMIT, task_manager=pack, log_samples=True)


def test_winogrande_matches_lm_eval_hf_per_document(neo_lm, hf_lm, pack):
    ours, ref = _run(neo_lm, pack, "neo_winogrande"), _run(hf_lm, pack, "neo_winogrande")
    ours_docs = {s["doc_id"]: s for s in ours["samples"]["neo_winogrande"]}
    ref_docs = {s["doc_id"]: s for s in ref["samples"]["neo_winogrande"]}
    assert sorted(ours_docs) == sorted(ref_docs) == list(range(LIMIT))
    worst = 0.0
    for doc_id, sample in ours_docs.items():
        a = [r[0][0] for r in sample["resps"]]
        b = [r[0][0] for r in ref_docs[doc_id]["resps"]]
        assert len(a) == len(b) == 2
        worst = max(worst, *(abs(x - y) for x, y in zip(a, b)))
        assert sample["acc"] == ref_docs[doc_id]["acc"], f"doc {doc_id}: {a} vs {b}"
    assert worst <= 1e-4, f"largest per-request log-likelihood difference {worst}"
    assert ours["results"]["neo_winogrande"]["acc,none"] == ref["results"]["neo_winogrande"]["acc,none"]


def test_rolling_loglikelihood_matches_lm_eval_hf(neo_lm, hf_lm, monkeypatch):
    """max_length 32 splits each ~100-token text into several disjoint windows."""
    monkeypatch.setattr(neo_lm, "_max_length", 32)
    monkeypatch.setattr(hf_lm, "_max_length", 32)
    ours = neo_lm.loglikelihood_rolling(instances("loglikelihood_rolling", rolling_texts()), disable_tqdm=True)
    ref = hf_lm.loglikelihood_rolling(instances("loglikelihood_rolling", rolling_texts()), disable_tqdm=True)
    assert len(neo_lm.tok_encode(rolling_texts()[0][0])) > 2 * 32
    assert all(x < 0 for x in ours)
    assert ours == pytest.approx(ref, abs=1e-4)


def test_generate_until_equals_transformers_greedy(neo_lm, hf_lm, one_thread):
    requests = generation_requests(max_gen_toks=10)
    requests.append(("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
                     {"until": ["."], "max_gen_toks": 10, "do_sample": False}))
    ours = neo_lm.generate_until(instances("generate_until", requests), disable_tqdm=True)
    tok = hf_lm.tokenizer
    for (prompt, kwargs), text in zip(requests, ours):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf_lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=kwargs["max_gen_toks"], do_sample=False)
        expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        for stop in kwargs["until"]:
            expected = expected.split(stop)[0]
        assert text == expected, prompt
    assert ours[-1].strip() == "Rome"  # the real model's known answer; stops at "."


@pytest.fixture(scope="module")
def tiny_ckpt(smollm2_ckpt, module_tmp):
    """A random 2-layer model on SmolLM2's vocabulary (splits over TP=2; SmolLM2's 9 heads do not),
    untied with larger init so greedy generations vary, carrying the real tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_neo.checkpoint.convert import convert_hf_to_neo
    from nemo_neo.checkpoint.hf_io import copy_tokenizer_files

    root = module_tmp("tiny_eval")
    config = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  tie_word_embeddings=False, initializer_range=0.1, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    copy_tokenizer_files(smollm2_ckpt, root / "hf")
    convert_hf_to_neo(root / "hf", root / "neo")
    return root / "neo"


@pytest.fixture(scope="module")
def tiny_tp1_answers(tiny_ckpt, parallel_ctx):
    from nemo_neo.eval.lm_eval_model import NeoLM

    lm = NeoLM(checkpoint=tiny_ckpt, dtype="float32", batch_size=3, max_length=24)
    return answer_all(lm)


@pytest.mark.parametrize("tp,pp,nproc", [(2, 1, 2), (1, 2, 4)], ids=["tp2", "pp2xdp2"])
def test_parallel_answers_equal_single_process(tiny_ckpt, tiny_tp1_answers, tmp_path, tp, pp, nproc):
    out = tmp_path / "answers.json"
    torchrun("tests/workers/eval_worker.py", nproc, tiny_ckpt, out, tp, pp)
    got = json.loads(out.read_text())
    assert got["ctx"] == {"tp": tp, "pp": pp, "dp": nproc // (tp * pp)}
    ref, ans = tiny_tp1_answers, got["answers"]
    assert len(ans["loglikelihood"]) == len(ref["loglikelihood"]) == 12
    for (a, ga), (b, gb) in zip(ans["loglikelihood"], ref["loglikelihood"]):
        assert abs(a - b) <= 1e-4 and ga == gb
    assert ans["rolling"] == pytest.approx(ref["rolling"], abs=1e-4)
    assert ans["generate"] == ref["generate"]
    assert len(set(ref["generate"])) == len(ref["generate"])  # distinct, non-trivial generations


def test_cli_registers_model_and_task_pack(tiny_ckpt, tmp_path):
    """`python -m nemo_neo.cli.eval` is lm-eval's CLI with --model nemo_neo and the pack; its
    accuracy equals the Python API's on the same documents."""
    from conftest import REPO

    from nemo_neo.eval.harness import evaluate

    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "nemo_neo.cli.eval", "--model", "nemo_neo", "--model_args",
           f"checkpoint={tiny_ckpt},dtype=float32", "--tasks", "neo_winogrande", "--limit", "8", "--batch_size", "4",
           "--metadata", json.dumps({"data_dir": str(SHARED_DATA)}), "--output_path", str(out)]
    # a fresh world of one: drop the torch.distributed variables this process's own world set
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1, proc.stdout[-2000:]
    cli_acc = json.loads(files[0].read_text())["results"]["neo_winogrande"]["acc,none"]
    api = evaluate(tiny_ckpt, ["neo_winogrande"], limit=8, data_dir=SHARED_DATA, include_defaults=False, dtype="float32", batch_size=4)
    assert cli_acc == api["results"]["neo_winogrande"]["acc,none"]
    shutil.rmtree(out)
