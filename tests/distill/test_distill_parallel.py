"""KD with the teacher on the same pipeline stages: PP=2 and TP=2 x PP=2 give the loss and student
gradients of a single process, for a teacher deeper and wider than the student."""

import pytest
import torch
from conftest import torchrun

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.native import read_index
from nemo_neo.distill.model import TeacherMismatchError, check_teacher_compatible

WORKER = "tests/workers/kd_worker.py"


@pytest.fixture(scope="module")
def pair_ckpts(hf_model_factory, module_tmp):
    tmp = module_tmp("kd")
    convert_hf_to_neo(hf_model_factory("llama3_gqa_untied"), tmp / "teacher")
    convert_hf_to_neo(hf_model_factory("student_of_llama3"), tmp / "student")
    return tmp


def run(tmp, name, tp, pp, kind):
    out = tmp / f"{name}_{kind}"
    out.mkdir(exist_ok=True)
    torchrun(WORKER, tp * pp, "--student", tmp / "student", "--teacher", tmp / "teacher", "--out", out,
             "--tp", tp, "--pp", pp, "--kind", kind)
    return torch.load(out / "loss.pt")["loss"], torch.load(out / "grads.pt")


@pytest.mark.parametrize("kind", ["forward_kl", "ce_kl"])
def test_kd_pipeline_matches_single_process(pair_ckpts, kind):
    ref_loss, ref_grads = run(pair_ckpts, "ref", 1, 1, kind)
    assert ref_loss > 0
    for tp, pp in [(1, 2), (2, 2)]:
        loss, grads = run(pair_ckpts, f"tp{tp}pp{pp}", tp, pp, kind)
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0), (tp, pp)  # fp32 KL: a difference of close sums
        assert sorted(grads) == sorted(ref_grads)
        for k in ref_grads:
            scale = ref_grads[k].abs().max()
            assert scale > 0, k
            assert ((grads[k] - ref_grads[k]).abs().max() / scale).item() <= 1e-5, (tp, pp, k)


def test_vocab_mismatch_is_refused_before_compute(pair_ckpts, hf_model_factory, tmp_path):
    convert_hf_to_neo(hf_model_factory("mistral_explicit_head_dim"), tmp_path / "other")
    student, _ = read_index(tmp_path / "other")
    teacher, _ = read_index(pair_ckpts / "teacher")
    with pytest.raises(TeacherMismatchError, match="vocab_size=96 != teacher vocab_size=130"):
        check_teacher_compatible(student, teacher)


def test_tokenizer_mismatch_is_refused(pair_ckpts, tmp_path):
    import shutil

    for name, text in [("a", '{"model": "one"}'), ("b", '{"model": "two"}')]:
        shutil.copytree(pair_ckpts / "student", tmp_path / name)
        (tmp_path / name / "tokenizer.json").write_text(text)
    arch, _ = read_index(tmp_path / "a")
    with pytest.raises(TeacherMismatchError, match="different tokenizer"):
        check_teacher_compatible(arch, arch, tmp_path / "a", tmp_path / "b")
