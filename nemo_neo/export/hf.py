"""Hugging Face export of any nemo_neo checkpoint (teacher, pruned, distilled, LoRA-merged).

The checkpoint format stores whole tensors under megatron-core names, so export is a rename
(`nemo_neo.checkpoint.convert.convert_neo_to_hf`) plus checks that make the output usable by the
tools that read it next (transformers, lm-eval's `hf` model, TensorRT-LLM, vLLM): it must carry a
tokenizer, and an existing non-empty output is refused unless `overwrite`.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

from nemo_neo.checkpoint import atomic
from nemo_neo.checkpoint.convert import convert_neo_to_hf
from nemo_neo.checkpoint.hf_io import copy_tokenizer_files, has_tokenizer
from nemo_neo.checkpoint.native import INDEX, is_neo_checkpoint
from nemo_neo.errors import UserError
from nemo_neo.models.dtype import parse_dtype


class ExportError(UserError, ValueError):
    """The export cannot run as asked (one line: the problem and the fix)."""


def is_hf_dir(path) -> bool:
    return (Path(path) / "config.json").is_file() and not is_neo_checkpoint(path)


def tokenizer_source(ckpt, tokenizer=None) -> Path:
    """Where the output's tokenizer files come from, or one clear error."""
    src = Path(tokenizer) if tokenizer else Path(ckpt)
    if not has_tokenizer(src):
        raise ExportError(
            f"{src} has no tokenizer files (tokenizer.json / tokenizer.model / vocab.json); the exported model would be "
            "unusable by transformers, lm-eval and TensorRT-LLM. Copy them into the checkpoint or pass --tokenizer <dir>."
        )
    return src


def check_source(ckpt) -> Path:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise ExportError(f"{ckpt} does not exist or is not a directory; pass a nemo_neo checkpoint (or HF model) directory.")
    if not (is_neo_checkpoint(ckpt) or is_hf_dir(ckpt)):
        raise ExportError(f"{ckpt} is neither a nemo_neo checkpoint ({INDEX}) nor a Hugging Face model (config.json).")
    return ckpt


def export_hf(ckpt, out, dtype="bfloat16", overwrite: bool = False, tokenizer=None) -> dict:
    """nemo_neo checkpoint -> HF directory in `dtype` (bfloat16 is what TensorRT-LLM and vLLM serve).
    Loads with transformers.AutoModelForCausalLM; logits match the checkpoint's (fp32: <= 1e-4)."""

    atomic.check_output_dir(out, overwrite)
    ckpt = check_source(ckpt)
    if not is_neo_checkpoint(ckpt):
        raise ExportError(f"{ckpt} is already a Hugging Face directory; there is nothing to export (use it directly).")
    tok = tokenizer_source(ckpt, tokenizer)
    report = convert_neo_to_hf(ckpt, out, overwrite=overwrite, dtype=parse_dtype(dtype))
    copy_tokenizer_files(tok, out, overwrite=False)
    report.update(dtype=str(parse_dtype(dtype) or "as stored").replace("torch.", ""), has_tokenizer=has_tokenizer(out))
    return report


@contextmanager
def as_hf_dir(ckpt, dtype="float32", tokenizer=None):
    """Yield an HF directory for `ckpt`: the directory itself when it already is one, else a
    temporary export (removed afterwards). Used by FP8 export and the throughput tool."""
    ckpt = check_source(ckpt)
    if is_hf_dir(ckpt):
        tokenizer_source(ckpt, tokenizer)
        yield ckpt
        return
    with tempfile.TemporaryDirectory(prefix="nemo_neo_hf_") as tmp:
        out = Path(tmp) / "hf"
        export_hf(ckpt, out, dtype=dtype, tokenizer=tokenizer)
        yield out
