"""Evaluation bad input: one clear error that names the problem and the fix.

unknown task (Python API and the CLI), checkpoint without tokenizer, a Hugging Face directory
passed as a nemo_neo checkpoint, and the task pack without its data directory."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SHARED_DATA

pytest.importorskip("lm_eval", reason='needs lm-eval: pip install "lm-eval[hf]==0.4.13"')


@pytest.fixture(scope="module")
def pack():
    from nemo_neo.eval.tasks import task_manager

    return task_manager(data_dir=SHARED_DATA, include_defaults=False)


def test_unknown_task_python(pack, smollm2_ckpt):
    from nemo_neo.eval.harness import UnknownTaskError, evaluate

    with pytest.raises(UnknownTaskError) as err:
        evaluate(smollm2_ckpt, ["neo_winogrand", "neo_arc_easy"], manager=pack)
    message = str(err.value)
    assert "neo_winogrand" in message and "neo_arc_easy" not in message.split(":")[0]
    assert "did you mean neo_winogrande" in message and "--include_path" in message
    assert "\n" not in message


def test_unknown_task_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "nemo_neo.cli.eval", "--model", "nemo_neo", "--model_args",
                           f"checkpoint={tmp_path}", "--tasks", "no_such_task_xyz"], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown task(s): no_such_task_xyz") and "--include_path" in last
    assert "Traceback" not in proc.stderr


def test_checkpoint_without_tokenizer(smollm2_ckpt, tmp_path, parallel_ctx):
    from nemo_neo.eval.lm_eval_model import EvalSetupError, NeoLM

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in smollm2_ckpt.iterdir():
        if not f.name.startswith("tokenizer") and f.name not in ("chat_template.jinja",):
            (bare / f.name).symlink_to(f)
    with pytest.raises(EvalSetupError, match="no tokenizer files") as err:
        NeoLM(checkpoint=bare)
    assert "tokenizer=" in str(err.value) and "\n" not in str(err.value)
    lm = NeoLM(checkpoint=bare, tokenizer=smollm2_ckpt, dtype="float32")  # the fix it names works
    assert lm.tok_encode("Hello") == lm.tokenizer.encode("Hello")


def test_hf_directory_is_not_a_checkpoint(hf_model_factory):
    from nemo_neo.eval.lm_eval_model import EvalSetupError, NeoLM

    hf_dir = hf_model_factory("llama3_gqa_untied")
    with pytest.raises(EvalSetupError, match="--model hf"):
        NeoLM(checkpoint=hf_dir)


def test_task_pack_without_data_dir(monkeypatch, tmp_path):
    from nemo_neo.eval.tasks import DATA_ENV, task_manager

    monkeypatch.delenv(DATA_ENV, raising=False)
    manager = task_manager(include_defaults=False)
    with pytest.raises(Exception) as err:
        manager.load_task_or_group(["neo_winogrande"])
    assert DATA_ENV in str(err.value) and "data_dir" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="winogrande_dev.jsonl"):
        task_manager(data_dir=empty, include_defaults=False).load_task_or_group(["neo_winogrande"])
    shutil.rmtree(empty)
